"""One change to the demo's denoiser recipe, measured: train on a finished demo's world, CLIP and feature cache with
some training options overridden, then caption the test and held-out-combination splits (the recommended steps).

    python benchmarks/demo_recipe.py --demo_dir outputs/demo --name scale10 \
        --overrides '{"model_config": {"rounding_logit_scale": 10}}'
    python benchmarks/demo_recipe.py --demo_dir outputs/demo --name steps700 --overrides '{"max_steps": 700}'

    python benchmarks/demo_recipe.py --demo_dir outputs/demo --name clip_epochs10 --clip_overrides '{"epochs": 10}'
    python benchmarks/demo_recipe.py --demo_dir outputs/demo --name distilled --overrides \
        '{"distill_from": "outputs/demo/pipeline", "max_steps": 400, "learning_rate": 3e-4}'

`--overrides` is a JSON object of `TrainingConfig` fields; its `model_config` is merged into the demo's. Prints one
line and appends it to `--output` (JSON lines), so a series of runs builds the README's table of what helped. The
world is read from `--demo_dir` as it is, and so are its CLIP and cached features unless `--clip_overrides` (a JSON
object of `CLIPPretrainingConfig` fields) asks for a CLIP pre-trained with the demo's settings and those on top;
that CLIP, its retrieval and probe figures and its time join the record. Use `--threads 1` to run two of these side
by side on two cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from clip_diffusionlm import CLIPDiffusionCaptionPipeline
from clip_diffusionlm.demo import load_shapes_world
from clip_diffusionlm.demo.clip_pretraining import attribute_probe, pretrain_clip, zero_shot_retrieval
from clip_diffusionlm.demo.run import DemoConfig, default_text_backbone, evaluate_test_splits, library_chatter
from clip_diffusionlm.training import TrainingConfig, train


def recipe(overrides: dict) -> dict:
    """The demo's training options with `overrides` on top (`model_config` merged key by key; none when distilling,
    where the model is the teacher's)."""
    training = DemoConfig().training
    model_config = {**training["model_config"], **overrides.get("model_config", {})}
    if overrides.get("distill_from"):
        model_config = {}
    return {**training, **overrides, "model_config": model_config}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo_dir", default="outputs/demo", help="A finished `make demo` output folder.")
    parser.add_argument("--name", required=True, help="Name of this run (its folder under --work_dir).")
    parser.add_argument("--overrides", default="{}", help="JSON object of TrainingConfig fields to change.")
    parser.add_argument("--clip_overrides", default=None, help=(
        "JSON object of CLIPPretrainingConfig fields to change; pre-trains a new CLIP instead of reusing the demo's."
    ))
    parser.add_argument("--work_dir", default="outputs/demo_recipe", help="Where the runs' pipelines go.")
    parser.add_argument("--output", default="benchmarks/results/demo_recipe.jsonl", help="JSON lines to append to.")
    parser.add_argument("--guidance_scales", type=float, nargs="+", default=[1.0], help=(
        "Classifier-free guidance weights to caption with (each one a record entry; >1 needs condition dropout)."
    ))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    demo_dir = Path(args.demo_dir)
    if not (demo_dir / "clip" / "pretraining_config.json").is_file():
        parser.error(f"--demo_dir {str(demo_dir)!r} holds no finished demo (run `make demo` first).")
    overrides, clip_overrides = (
        json_object(parser, flag, text) for flag, text in (("--overrides", args.overrides),
                                                           ("--clip_overrides", args.clip_overrides or "{}"))
    )
    output_dir = Path(args.work_dir) / args.name
    clip_dir, feature_cache_dir = demo_dir / "clip", demo_dir / "feature_cache"
    result = {"name": args.name, "overrides": overrides}
    if args.clip_overrides is not None:
        try:
            clip_config = dataclasses.replace(DemoConfig().clip, **clip_overrides)
        except (TypeError, ValueError) as error:
            parser.error(f"--clip_overrides: {error}")
        clip_dir, feature_cache_dir = output_dir / "clip", output_dir / "feature_cache"
        result["clip_overrides"] = clip_overrides
    try:
        config = TrainingConfig(
            output_dir=str(output_dir / "pipeline"), datasets=[str(demo_dir / "shapes")], clip_model=str(clip_dir),
            text_backbone=default_text_backbone(), feature_cache_dir=str(feature_cache_dir),
            log_level="warning", **{**recipe(overrides), "validation_steps": 0, "checkpointing_steps": 0,
                                    "report_to": "none"},
        )
    except (TypeError, ValueError) as error:
        parser.error(f"--overrides: {error}")
    with library_chatter(verbose=False):
        world = load_shapes_world(demo_dir / "shapes")
        if args.clip_overrides is not None:
            started = time.monotonic()
            pretrain_clip(world["train"], clip_dir, default_text_backbone(), clip_config)
            result["clip_seconds"] = round(time.monotonic() - started)
            result["clip_retrieval"] = zero_shot_retrieval(clip_dir, world["test"])
            result["clip_probe"] = attribute_probe(clip_dir, world["train"], world["test"])
        started = time.monotonic()
        train(config)
        result.update(training_seconds=round(time.monotonic() - started), threads=torch.get_num_threads())
        pipe = CLIPDiffusionCaptionPipeline.from_pretrained(output_dir / "pipeline")
        pipe.set_progress_bar_config(disable=True)
        splits = evaluate_test_splits(
            pipe, world, feature_cache_dir, output_dir / "evaluation", show_progress=False,
            guidance_scales=tuple(args.guidance_scales),
        )
        for split_name, rows in splits.items():
            for row in rows:
                suffix = "" if row["guidance_scale"] == 1.0 else f"_guidance{row['guidance_scale']:g}"
                result[split_name + suffix] = {name: round(row[name], 3) for name in ("object_accuracy", "exact_match")}
    print(json.dumps(result))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "a") as file:
        file.write(json.dumps(result) + "\n")


def json_object(parser: argparse.ArgumentParser, flag: str, text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        parser.error(f"{flag} must be a JSON object: {error}")
    if not isinstance(value, dict):
        parser.error(f"{flag} must be a JSON object, got {text!r}.")
    return value


if __name__ == "__main__":
    main()
