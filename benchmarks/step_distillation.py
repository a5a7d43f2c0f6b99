"""Step distillation of the demo's denoiser, measured: for each trained teacher, a student that starts as its copy
learns in 400 steps to do in one denoising step what two of the teacher's DDIM steps do (`--distill_from` with the
demo's `STEP_DISTILLATION`, what `make demo` saved before the input gate), then teacher and student caption the
demo's test split at one and two steps with three sampling seeds each.

    python benchmarks/step_distillation.py --demo_dir outputs/demo --teachers outputs/demo/pipeline \
        outputs/benchmarks/caption_speed_quality/seed1/diffusion outputs/benchmarks/caption_speed_quality/seed2/diffusion
    python benchmarks/step_distillation.py --tiny   # toy models, seconds (what the tests run)

The teachers are the model the demo trained and the benchmark's other training seeds (`caption_speed_quality.py
--training_seeds 0 1 2`), so the figures line up with its table; a student has its teacher's architecture, so it
captions at the teacher's speed. Writes `step_distillation.json` and `step_distillation.md` to `--output_dir`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from caption_speed_quality import SAMPLING_SEEDS, is_malformed, tiny_assets, train_if_needed

from clip_diffusionlm import CLIPDiffusionCaptionPipeline
from clip_diffusionlm.clip_features import encode_dataset_images
from clip_diffusionlm.demo import STEP_DISTILLATION, DemoConfig, content_accuracy, load_shapes_world
from clip_diffusionlm.training import TrainingConfig, train

STEPS = (1, 2)
METRICS = ("object_accuracy", "exact_match", "malformed")


def student_config(teacher: Path, seed: int, shared: dict[str, Any], output_dir: Path, tiny: bool) -> TrainingConfig:
    """`STEP_DISTILLATION` of `teacher`, on the demo's training options."""
    options = {**DemoConfig(distillation=STEP_DISTILLATION).distillation_training(teacher), "seed": seed}
    if tiny:
        options.update(max_steps=2, batch_size=8, validation_images=4)
    return TrainingConfig(**{**shared, **options, "validation_steps": 0, "checkpointing_steps": 0,
                             "report_to": "none"}, output_dir=str(output_dir))


def scores(pipe: CLIPDiffusionCaptionPipeline, features: torch.Tensor, test, steps: int) -> list[dict[str, Any]]:
    runs = []
    for seed in SAMPLING_SEEDS:
        captions = [caption for start in range(0, len(features), 64) for caption in pipe(
            image_embeds=features[start:start + 64], num_inference_steps=steps,
            generator=torch.Generator().manual_seed(seed)).captions]
        content = content_accuracy(captions, test["objects"])
        runs.append({"sampling_seed": seed, "object_accuracy": content["object_accuracy"],
                     "exact_match": content["exact_match"], "malformed": sum(map(is_malformed, captions))})
    return runs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="A toy teacher trained here: runs in seconds.")
    parser.add_argument("--demo_dir", default="outputs/demo", help="A finished demo: its world, CLIP and features.")
    parser.add_argument("--teachers", nargs="+", default=["outputs/demo/teacher"],
                        help="Trained pipelines to distil, one per training seed (seeds 0, 1, ... in this order).")
    parser.add_argument("--work_dir", default="outputs/demo_recipe", help="Where the students go.")
    parser.add_argument("--output_dir", default="benchmarks/results", help="Where the JSON and table go.")
    args = parser.parse_args(argv)
    work_dir = Path(args.work_dir)
    if args.tiny:
        torch.set_num_threads(1)
        assets = tiny_assets(work_dir)
        shared = {"datasets": [str(assets["world"])], "clip_model": str(assets["clip"]),
                  "text_backbone": str(assets["backbone"]), "feature_cache_dir": str(work_dir / "feature_cache"),
                  "log_level": "warning"}
        teacher = train(TrainingConfig(**{**shared, **assets["training"], "report_to": "none"},
                                       output_dir=str(work_dir / "teacher")))
        teachers, world_dir = [teacher], assets["world"]
    else:
        from clip_diffusionlm.demo import default_text_backbone

        demo_dir = Path(args.demo_dir)
        shared = {"datasets": [str(demo_dir / "shapes")], "clip_model": str(demo_dir / "clip"),
                  "text_backbone": default_text_backbone(), "feature_cache_dir": str(demo_dir / "feature_cache"),
                  "log_level": "warning"}
        teachers, world_dir = [Path(teacher) for teacher in args.teachers], demo_dir / "shapes"
    test = load_shapes_world(world_dir)["test"]

    rows: dict[str, list[dict[str, Any]]] = {}
    for seed, teacher in enumerate(teachers):
        student = train_if_needed(student_config(teacher, seed, shared, work_dir / f"distilled_seed{seed}" / "pipeline",
                                                 args.tiny))
        for role, folder in (("teacher", teacher), ("step-distilled student", student)):
            pipe = CLIPDiffusionCaptionPipeline.from_pretrained(folder)
            pipe.set_progress_bar_config(disable=True)
            config = pipe.denoiser.config
            features = encode_dataset_images(pipe.image_encoder, pipe.image_processor, test, 64, config.image_features,
                                             num_workers=0, vision_feature_layer=config.vision_feature_layer)
            with torch.inference_mode():
                for steps in STEPS:
                    name = f"{role}, {type(pipe.scheduler).__name__.removesuffix('Scheduler')} {steps} step(s)"
                    rows.setdefault(name, []).extend(
                        {"training_seed": seed, **run} for run in scores(pipe, features, test, steps))
    results = {"command": "python benchmarks/step_distillation.py" + "".join(
        f" {arg}" for arg in (argv if argv is not None else sys.argv[1:])),
        "distillation": STEP_DISTILLATION, "teachers": [str(teacher) for teacher in teachers],
        "num_test_images": len(test), "settings": []}
    for name, runs in rows.items():
        results["settings"].append({
            "name": name, "runs": runs,
            **{metric: statistics.median(run[metric] for run in runs) for metric in METRICS},
            "worst": {metric: (max if metric == "malformed" else min)(run[metric] for run in runs)
                      for metric in METRICS},
        })
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    name = "step_distillation" + ("_tiny" if args.tiny else "")
    (output_dir / f"{name}.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (output_dir / f"{name}.md").write_text(table)
    print(table)
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = [f"`{results['command']}` — {len(results['teachers'])} teachers (training seeds) × sampling seeds "
             f"{list(SAMPLING_SEEDS)}, {results['num_test_images']} test images; median (worst).", "",
             "| setting | object accuracy | exact match | malformed |", "|---|---:|---:|---:|"]
    for row in results["settings"]:
        worst = row["worst"]
        lines.append(f"| {row['name']} | {row['object_accuracy']:.3f} ({worst['object_accuracy']:.3f}) | "
                     f"{row['exact_match']:.3f} ({worst['exact_match']:.3f}) | {row['malformed']:g} "
                     f"({worst['malformed']}) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
