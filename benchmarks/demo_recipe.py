"""One change to the demo's denoiser recipe, measured: train on a finished demo's world, CLIP and feature cache with
some training options overridden, then caption the test and held-out-combination splits (5 DDIM steps).

    python benchmarks/demo_recipe.py --demo_dir outputs/demo --name scale10 \
        --overrides '{"model_config": {"rounding_logit_scale": 10}}'
    python benchmarks/demo_recipe.py --demo_dir outputs/demo --name steps700 --overrides '{"max_steps": 700}'

`--overrides` is a JSON object of `TrainingConfig` fields; its `model_config` is merged into the demo's. Prints one
line and appends it to `--output` (JSON lines), so a series of runs builds the README's table of what helped. The
denoiser is what changes: the world, CLIP and its cached features are read from `--demo_dir` as they are. Use
`--threads 1` to run two of these side by side on two cores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from clip_diffusionlm import CLIPDiffusionCaptionPipeline
from clip_diffusionlm.data import load_image_folder
from clip_diffusionlm.demo import DemoConfig, default_text_backbone, evaluate_test_splits, library_chatter
from clip_diffusionlm.training import TrainingConfig, train


def recipe(overrides: dict) -> dict:
    """The demo's training options with `overrides` on top (`model_config` merged key by key)."""
    training = DemoConfig().training
    model_config = {**training["model_config"], **overrides.get("model_config", {})}
    return {**training, **overrides, "model_config": model_config}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo_dir", default="outputs/demo", help="A finished `make demo` output folder.")
    parser.add_argument("--name", required=True, help="Name of this run (its folder under --work_dir).")
    parser.add_argument("--overrides", default="{}", help="JSON object of TrainingConfig fields to change.")
    parser.add_argument("--work_dir", default="outputs/demo_recipe", help="Where the runs' pipelines go.")
    parser.add_argument("--output", default="benchmarks/results/demo_recipe.jsonl", help="JSON lines to append to.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    demo_dir = Path(args.demo_dir)
    if not (demo_dir / "clip" / "pretraining_config.json").is_file():
        parser.error(f"--demo_dir {str(demo_dir)!r} holds no finished demo (run `make demo` first).")
    try:
        overrides = json.loads(args.overrides)
    except json.JSONDecodeError as error:
        parser.error(f"--overrides must be a JSON object: {error}")
    output_dir = Path(args.work_dir) / args.name
    try:
        config = TrainingConfig(
            output_dir=str(output_dir), datasets=[str(demo_dir / "shapes")], clip_model=str(demo_dir / "clip"),
            text_backbone=default_text_backbone(), feature_cache_dir=str(demo_dir / "feature_cache"),
            log_level="warning", **{**recipe(overrides), "validation_steps": 0, "checkpointing_steps": 0,
                                    "report_to": "none"},
        )
    except (TypeError, ValueError) as error:
        parser.error(f"--overrides: {error}")
    with library_chatter(verbose=False):
        started = time.monotonic()
        train(config)
        result = {"name": args.name, "overrides": overrides, "training_seconds": round(time.monotonic() - started),
                  "threads": torch.get_num_threads()}
        pipe = CLIPDiffusionCaptionPipeline.from_pretrained(output_dir)
        pipe.set_progress_bar_config(disable=True)
        world = load_image_folder(demo_dir / "shapes")
        splits = evaluate_test_splits(pipe, world, demo_dir / "feature_cache", output_dir / "evaluation")
        for split_name, (row,) in splits.items():
            result[split_name] = {name: round(row[name], 3) for name in ("object_accuracy", "exact_match")}
    print(json.dumps(result))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "a") as file:
        file.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
