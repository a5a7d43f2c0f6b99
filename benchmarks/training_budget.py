"""How each family's captions on the harder world grow with its training budget.

    python benchmarks/training_budget.py   # reuses harder_world.py's world, CLIP and training seed 0's AR twin
    python benchmarks/training_budget.py --tiny

`harder_world.py` compares the two families at one budget (`--max_steps`, 1200 steps each), where one diffusion step
of the plain recipe on the AR twin's captions named 0.62 of the objects against the AR's 0.95. This asks how many
times that budget closes the gap: the plain diffusion model on the AR twin's captions (its teacher the 1x AR twin
throughout) trained for 1, 2 and 4 times the budget, and the AR twin for 1/8, 1/4, 1/2 and 1 times, the recipe otherwise
unchanged (the cosine schedule stretches to each budget); one training seed, captioned at one step and greedily over
3 sampling seeds. The 1x models are those of `harder_world.py` (the AR twin) and `reference_selection.py` ("on
AR's captions").

Writes `training_budget.json` and `training_budget.md` to `--output_dir`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from caption_speed_quality import load_quiet, start_benchmark, train_if_needed
from harder_world import (
    add_world_arguments,
    features_of_split,
    prepare_world_and_recipe,
    quality_rows,
    quality_table,
    write_results,
)

from clip_diffusionlm import CLIPARCaptionPipeline, CLIPDiffusionCaptionPipeline
from clip_diffusionlm.training import TrainingConfig

RESULT_NAME = "training_budget"
# Multiples of `--max_steps`, the budget at which harder_world.py compares the families.
BUDGETS = {"diffusion on AR's captions": (1, 2, 4), "AR": (0.125, 0.25, 0.5, 1)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_world_arguments(parser, "harder_world.py's folder: its world, CLIP and models are reused, the new ones go there.")
    parser.add_argument("--training_seed", type=int, default=0, help="The training seed of every model.")
    parser.set_defaults(min_seconds=None)  # nothing is timed here
    args = parser.parse_args(argv)
    device, _, command = start_benchmark(args, argv, "training_budget.py", default_min_seconds=0.0)
    started = time.monotonic()

    world_dir, recipe = prepare_world_and_recipe(args)
    seed_dir = Path(args.work_dir) / f"seed{args.training_seed}"
    budget = recipe["max_steps"]
    teacher = train_if_needed(TrainingConfig(**recipe, seed=args.training_seed, model_type="ar",
                                             output_dir=str(seed_dir / "ar")))
    budget_settings, models = [], {}
    for family, multiples in BUDGETS.items():
        is_ar = family == "AR"
        # The folder names of harder_world.py's AR twin and reference_selection.py's plain model on its captions: the
        # 1x models are reused, the others go beside them.
        folder_name = "ar" if is_ar else "distilled"
        options = {"model_type": "ar"} if is_ar else {"caption_teacher": str(teacher)}
        pipeline_class = CLIPARCaptionPipeline if is_ar else CLIPDiffusionCaptionPipeline
        for multiple in multiples:
            steps = max(1, round(budget * multiple))
            folder = seed_dir / folder_name
            if multiple != 1:
                folder = seed_dir / "training_budget" / f"{folder_name}_{steps}_steps"
            trained = train_if_needed(TrainingConfig(**{**recipe, "max_steps": steps}, **options,
                                                     seed=args.training_seed, output_dir=str(folder)))
            name = f"{family}, {steps} steps ({multiple:g}x)"
            models[name] = load_quiet(pipeline_class, trained, device)
            training = json.loads((trained / "training_results.json").read_text())
            budget_settings.append({
                "family": "ar" if is_ar else "diffusion", "model": name, "name": name, "passes": 1,
                "kwargs": {"num_beams": 1} if is_ar else {}, "folder": str(trained), "budget_multiple": multiple,
                "steps": training["global_step"], "training_seconds": training["training_seconds"],
            })
    # Both families read the same CLIP patch features; the diffusion pipeline knows which layer.
    test, features = features_of_split(world_dir, models[budget_settings[0]["name"]])

    results: dict[str, Any] = {"command": command, "training_seed": args.training_seed, "budget_steps": budget,
                               "num_test_images": len(test),
                               "settings": quality_rows({args.training_seed: models}, budget_settings, features, test)}
    results["seconds"] = round(time.monotonic() - started, 1)

    write_results(args, RESULT_NAME, results, markdown(results))
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = [f"`{results['command']}` — {results['num_test_images']} test images of the harder world; training seed "
             f"{results['training_seed']}, median (worst) over 3 sampling seeds; 1x = {results['budget_steps']} "
             "steps, the budget of harder_world.py's comparison; diffusion at one step, AR greedy.", "",
             *quality_table(results["settings"], {"training steps": lambda row: str(row["steps"]),
                                                  "training s": lambda row: f"{row['training_seconds']:.0f}"})]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
