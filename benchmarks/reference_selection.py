"""Reference selection on the harder world: train each caption towards the reference the model already leans to.

    python benchmarks/reference_selection.py --training_seeds 0   # reuses harder_world.py's world, CLIP and models
    python benchmarks/reference_selection.py --tiny               # toy sizes, seconds (what the tests run)

The harder world has five references per image in varied wording and order. A model that writes every position at
once and is trained towards a reference drawn at random regresses to their mean; `harder_world.py` measures that
model ("references") and the usual cure, one caption per image written by the AR twin ("on AR's captions",
sequence-level knowledge distillation). `reference_selection` trains each caption towards whichever of its image's
references the model's own prediction is closest to (Shao et al. 2022), so that the model settles on one wording per
image without a teacher; with `caption_teacher` the AR twin's caption is one more reference (their diverse
distillation with reference selection). Every model is trained by `harder_world.py`'s recipe and captioned in one
step and in two, beside AR greedy, over the training seeds × three sampling seeds. Selection changes only training:
sampling costs what it did.

Writes `reference_selection.json` and `reference_selection.md` to `--output_dir`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from caption_speed_quality import load_quiet, start_benchmark
from harder_world import (
    add_world_arguments,
    features_of_test_split,
    prepare_world_and_recipe,
    quality_rows,
    quality_table,
    train_twins,
    write_results,
)

from clip_diffusionlm import CLIPARCaptionPipeline

RESULT_NAME = "reference_selection"
# Each diffusion model's name in the table: its folder under the training seed's (`diffusion` and `distilled` are
# harder_world.py's), whether it learns from the AR twin's captions and whether it selects its references.
MODELS = {
    "references": ("diffusion", False, False),
    "references, reference selection": ("reference_selection", False, True),
    "on AR's captions": ("distilled", True, False),
    "AR's caption and the references, reference selection": ("kd_reference_selection", True, True),
}


def settings() -> list[dict[str, Any]]:
    rows = []
    for model in MODELS:
        rows.append({"family": "diffusion", "model": model, "name": f"{model}: 1 step", "kwargs": {}, "passes": 1})
        rows.append({"family": "diffusion", "model": model, "name": f"{model}: 2 steps",
                     "kwargs": {"num_inference_steps": 2}, "passes": 2})
    return [*rows, {"family": "ar", "name": "AR greedy", "kwargs": {"num_beams": 1}, "passes": None}]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_world_arguments(parser, "harder_world.py's folder: its world, CLIP and models are reused, the new ones go there.")
    parser.add_argument("--training_seeds", type=int, nargs="+", default=[0], help="Training seeds of the models.")
    parser.set_defaults(min_seconds=None)  # nothing is timed here
    args = parser.parse_args(argv)
    device, _, command = start_benchmark(args, argv, "reference_selection.py", default_min_seconds=0.0)
    started = time.monotonic()

    world_dir, recipe = prepare_world_and_recipe(args)

    def twins(teacher: Path) -> dict[str, tuple[str, dict[str, Any]]]:
        return {name: (folder, {"caption_teacher": str(teacher) if distilled else None,
                                "reference_selection": selecting})
                for name, (folder, distilled, selecting) in MODELS.items()}

    models, folders, teachers = train_twins(args, recipe, device, twins)
    for seed, teacher in teachers.items():
        models[seed]["ar"] = load_quiet(CLIPARCaptionPipeline, teacher, device)
        folders[seed]["ar"] = str(teacher)
    first = models[args.training_seeds[0]]
    test, features = features_of_test_split(world_dir, first["references"])
    results: dict[str, Any] = {"command": command, "models": folders, "num_test_images": len(test),
                               "settings": quality_rows(models, settings(), features, test)}
    results["seconds"] = round(time.monotonic() - started, 1)

    write_results(args, RESULT_NAME, results, markdown(results))
    return results


def markdown(results: dict[str, Any]) -> str:
    seeds = sorted({run["training_seed"] for run in results["settings"][0]["runs"]})
    lines = [f"`{results['command']}` — {results['num_test_images']} test images of the harder world; median (worst) "
             f"over training seeds {seeds} × 3 sampling seeds (AR greedy: one); "
             f"{results['seconds'] / 60:.0f} min.", "",
             *quality_table(results["settings"], {"passes": lambda row: str(row["passes"] or "—")})]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
