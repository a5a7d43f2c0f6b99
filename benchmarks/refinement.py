"""Refinement passes on the harder world, and the training that teaches the denoiser to refine.

    python benchmarks/refinement.py --training_seeds 0   # reuses harder_world.py's world, CLIP and models
    python benchmarks/refinement.py --tiny               # toy sizes, seconds (what the tests run)

The harder world's best plain diffusion model (before the image term) is trained on its AR twin's captions
(`caption_teacher`, "on AR's captions"); its one-step captions lose the coordination of many positions. A refinement
pass re-noises the rounded caption and predicts it again: two denoiser passes in all. This benchmark trains two twins of that model by
the same recipe and captions the test split with the three at one step and with one refinement, over the training
seeds × three sampling seeds:
- `draft_prob`: half of each batch noised from the model's own one-step draft (SUNDAE's step-unrolled denoising, so
  that it learns to correct its drafts); refined by re-noising every word to `refinement_timestep` (LaDiC's
  Back&Refine, the pipeline's `num_refinement_steps` with `refinement_timestep`);
- `mask_predict_prob`: half of each batch with a random share of the positions pure noise and the rest clean words
  (CMLM's mask-predict in embedding space); refined by re-noising only the least sure words (`refinement_ratio`).

Writes `refinement.json` and `refinement.md` to `--output_dir`.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from caption_speed_quality import start_benchmark
from harder_world import (
    add_world_arguments,
    features_of_split,
    prepare_world_and_recipe,
    quality_rows,
    train_twins,
    twins_markdown,
    write_results,
)

RESULT_NAME = "refinement"
# The share of each batch that the third twin trains as a mask-predict refinement, unless `--mask_predict_prob` says.
MASK_PREDICT_PROB = 0.5
# Each model's name in the table: its folder under the training seed's (`distilled`: the plain recipe on the AR twin's
# captions, as in reference_selection.py), the training option that tells it from that model, and the refinements it
# is captioned with besides one step.
MODELS = {
    "on AR's captions": ("distilled", None, [{"refinement_timestep": t} for t in (300, 600, 900)]),
    "on AR's captions, draft_prob": ("kd_draft", "draft_prob", [{"refinement_timestep": t} for t in (300, 600, 900)]),
    "on AR's captions, mask_predict_prob": ("kd_mask_predict", "mask_predict_prob", [
        {"refinement_timestep": 999, "refinement_ratio": ratio} for ratio in (0.25, 0.5)
    ] + [{"refinement_timestep": 600, "refinement_ratio": 0.5}]),
}


def refinement_name(kwargs: dict[str, Any]) -> str:
    ratio = kwargs.get("refinement_ratio", 1.0)
    renoised = "every word" if ratio == 1.0 else f"the least sure {ratio:.0%}"
    return f"refinement of {renoised} at t = {kwargs['refinement_timestep']}"


def settings() -> list[dict[str, Any]]:
    rows = []
    for model, (_, _, refinements) in MODELS.items():
        rows.append({"family": "diffusion", "model": model, "name": f"{model}: 1 step", "kwargs": {}, "passes": 1})
        rows += [{"family": "diffusion", "model": model, "passes": 2,
                  "name": f"{model}: 1 step + {refinement_name(kwargs)}",
                  "kwargs": {"num_refinement_steps": 1, **kwargs}}
                 for kwargs in refinements]
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_world_arguments(parser, "harder_world.py's folder: its world, CLIP and models are reused, the new ones go there.")
    parser.add_argument("--training_seeds", type=int, nargs="+", default=[0], help="Training seeds of the models.")
    parser.add_argument("--draft_prob", type=float, default=0.5, help="`draft_prob` of the second model.")
    parser.add_argument("--mask_predict_prob", type=float, default=MASK_PREDICT_PROB,
                        help="`mask_predict_prob` of the third.")
    parser.set_defaults(min_seconds=None)  # nothing is timed here
    args = parser.parse_args(argv)
    device, _, command = start_benchmark(args, argv, "refinement.py", default_min_seconds=0.0)
    started = time.monotonic()

    world_dir, recipe = prepare_world_and_recipe(args)
    twins = {name: (folder, True, {option: getattr(args, option)} if option else {})
             for name, (folder, option, _) in MODELS.items()}
    models, folders = train_twins(args, recipe, device, twins)
    test, features = features_of_split(world_dir, next(iter(models[args.training_seeds[0]].values())))
    results: dict[str, Any] = {"command": command, "draft_prob": args.draft_prob,
                               "mask_predict_prob": args.mask_predict_prob, "models": folders,
                               "split": "test", "num_images": len(test),
                               "settings": quality_rows(models, settings(), features, test)}
    results["seconds"] = round(time.monotonic() - started, 1)

    write_results(args, RESULT_NAME, results, markdown(results))
    return results


def markdown(results: dict[str, Any]) -> str:
    return twins_markdown(results, f"`draft_prob` {results['draft_prob']}, `mask_predict_prob` "
                                   f"{results['mask_predict_prob']}; ")


if __name__ == "__main__":
    main()
