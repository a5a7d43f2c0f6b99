"""Reference selection on the harder world: train each caption towards the reference the model already leans to.

    python benchmarks/reference_selection.py --training_seeds 0   # reuses harder_world.py's world, CLIP and models
    python benchmarks/reference_selection.py --tiny               # toy sizes, seconds (what the tests run)

The harder world has five references per image in varied wording and order. A model that writes every position at
once and is trained towards a reference drawn at random regresses to their mean ("references", the plain recipe);
the usual cure is one caption per image written by the AR twin ("on AR's captions", sequence-level knowledge
distillation). `reference_selection` trains each caption towards whichever of its image's references the model's own
prediction is closest to (Shao et al. 2022), so that the model settles on one wording per image without a teacher;
with `caption_teacher` the AR twin's caption is one more reference (their diverse distillation with reference
selection). Every model is trained by `harder_world.py`'s recipe and captioned in one
step and in two, beside AR greedy, over the training seeds × three sampling seeds. Selection changes only training:
sampling costs what it did.

Writes `reference_selection.json` and `reference_selection.md` to `--output_dir`.
"""

from __future__ import annotations

from typing import Any

from harder_world import compare_twins

RESULT_NAME = "reference_selection"
# Each diffusion model's name in the table: its folder under the training seed's (`diffusion` and `distilled`: the
# plain recipe, without reference selection or the image term), whether it learns from the AR twin's captions, and its
# options.
MODELS = {
    "references": ("diffusion", False, {"reference_selection": False}),
    "references, reference selection": ("reference_selection", False, {"reference_selection": True}),
    "on AR's captions": ("distilled", True, {"reference_selection": False}),
    "AR's caption and the references, reference selection": ("kd_reference_selection", True,
                                                             {"reference_selection": True}),
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return compare_twins(argv, "reference_selection.py", __doc__, RESULT_NAME, MODELS)


if __name__ == "__main__":
    main()
