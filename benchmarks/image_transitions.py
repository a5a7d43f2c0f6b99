"""Chain transitions read from the image on the harder world: each colour bound to its own object's shape.

    python benchmarks/image_transitions.py --training_seeds 0   # reuses harder_world.py's world, CLIP and models
    python benchmarks/image_transitions.py --tiny               # toy sizes, seconds (what the tests run)

One denoiser pass writes every position at once. On a scene of several objects its colour and shape positions each
hedge between the objects, and the chain rounding (`rounding_transitions`), whose scores say only which words may
follow each other, can then pair one object's colour with another's shape ("two red triangles" for two blue
triangles and two red stars). `image_transition_rank` adds to those scores a term read from the image: every
projected image token licenses `rank` pairs of adjacent words, so that in this image "red" followed by "star" scores
high only if a patch holds a red star. This benchmark trains the plain recipe's two diffusion models again with it
(on the references, and on the AR twin's captions) and the one on the references once more with reference selection
as well (`reference_selection.py`'s option), captions the test split with the five at one step and at two
beside AR greedy over the training seeds × three sampling seeds, and times the one-step rows of the models on the AR
twin's captions against AR greedy in alternating rounds, since the image term adds to the cost of rounding.

Writes `image_transitions.json` and `image_transitions.md` to `--output_dir`.
"""

from __future__ import annotations

from typing import Any

from harder_world import GREEDY_TEACHER_MODEL, IMAGE_TRANSITION_RANK, compare_twins
from harder_world import MODELS as RECOMMENDED

RESULT_NAME = "image_transitions"
# Each diffusion model's name in the table: its folder under the training seed's (`diffusion` and `distilled`: the
# plain recipe, as in reference_selection.py), whether it learns from the AR twin's captions, and its options; the two
# with reference selection or a teacher are harder_world.py's recommended ones (the teacher's on its greedy captions,
# as the recommended recipe was then).
MODELS = {
    "references": ("diffusion", False, {}),
    "references, image transitions": ("references_image_transitions", False,
                                      {"model_config": {"image_transition_rank": IMAGE_TRANSITION_RANK}}),
    "references, reference selection, image transitions": RECOMMENDED["no teacher"],
    "on AR's captions": ("distilled", True, {}),
    "on AR's captions, image transitions": GREEDY_TEACHER_MODEL,
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return compare_twins(argv, "image_transitions.py", __doc__, RESULT_NAME, MODELS,
                         timed=("on AR's captions: 1 step", "on AR's captions, image transitions: 1 step"))


if __name__ == "__main__":
    main()
