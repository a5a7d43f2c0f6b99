"""Deterministic (DDIM) against ancestral (DDPM) sampling of one trained demo pipeline, on its test and
held-out-combination splits:

    python benchmarks/sampler_comparison.py --demo_dir outputs/demo --output benchmarks/results/sampler_comparison.json

For each sampler, step count and generator seed: object accuracy, exact match and the number of article errors ("an
pink", "a orange": an article whose next word's first letter disagrees with it). Prints a table and saves JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from clip_diffusionlm import CLIPDiffusionCaptionPipeline, make_noise_scheduler
from clip_diffusionlm.demo import content_accuracy, load_shapes_world
from clip_diffusionlm.demo.run import library_chatter
from clip_diffusionlm.diffusion import INFERENCE_SCHEDULERS
from clip_diffusionlm.feature_cache import CLIPFeatureCache


def article_errors(caption: str) -> int:
    """Articles that disagree with the next word: "an" before a consonant, "a" before a vowel."""
    words = caption.split()
    return sum(
        (article == "an") != (following[0] in "aeiou")
        for article, following in zip(words, words[1:])
        if article in ("a", "an")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo_dir", default="outputs/demo", help="A finished `make demo` output folder.")
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10], help="Denoising step counts.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="Generator seeds (the initial noise).")
    parser.add_argument("--output", default="benchmarks/results/sampler_comparison.json")
    args = parser.parse_args()

    demo_dir = Path(args.demo_dir)
    with library_chatter(verbose=False):
        pipe = CLIPDiffusionCaptionPipeline.from_pretrained(demo_dir / "pipeline")
        pipe.set_progress_bar_config(disable=True)
        world = load_shapes_world(demo_dir / "shapes")
        cache = CLIPFeatureCache(demo_dir / "feature_cache", pipe.image_encoder, pipe.image_processor,
                                 show_progress=False)
        config = pipe.denoiser.config
        splits = {
            name: (cache.image_features(world[name], config.image_features, config.vision_feature_layer),
                   world[name]["objects"])
            for name in ("test", "holdout")
        }
        rows = []
        print("| sampler | steps | seed | test accuracy / exact / article errors | held-out accuracy / exact / article errors |")
        print("|---|---:|---:|---|---|")
        for sampler, scheduler_class in INFERENCE_SCHEDULERS.items():
            pipe.scheduler = make_noise_scheduler(config, scheduler_class)
            for steps in args.steps:
                for seed in args.seeds:
                    row = {"sampler": sampler, "num_inference_steps": steps, "seed": seed}
                    for name, (image_embeds, objects) in splits.items():
                        captions = pipe(image_embeds=image_embeds, num_inference_steps=steps,
                                        generator=torch.Generator().manual_seed(seed)).captions
                        row[name] = {
                            **content_accuracy(captions, objects),
                            "article_errors": sum(article_errors(caption) for caption in captions),
                        }
                    rows.append(row)
                    cells = [
                        f"{row[name]['object_accuracy']:.3f} / {row[name]['exact_match']:.3f} / "
                        f"{row[name]['article_errors']}"
                        for name in splits
                    ]
                    print(f"| {sampler} | {steps} | {seed} | {cells[0]} | {cells[1]} |", flush=True)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"demo_dir": str(demo_dir), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
