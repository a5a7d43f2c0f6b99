"""The rounding's word bonus on the harder world: a list that one parallel pass ends too early.

    python benchmarks/length_bonus.py --training_seeds 0 --split validation   # choose the bonus
    python benchmarks/length_bonus.py --training_seeds 0                      # report it on the test split
    python benchmarks/length_bonus.py --tiny                                  # toy sizes, seconds (what the tests run)

One denoiser pass writes every position at once, and where it hedges on how many objects a scene has, the chain
rounding can end the caption at the first place where the end scores above the next word: "three objects: a red
square, a black star". The pipeline's `length_bonus` (1 by default) adds a constant to the rounding score of every
word that is not padding or another special token, speech recognition's word insertion bonus, so that a caption ends
only where its end is surer than that. This benchmark captions the models of `harder_world.py` (the recommended
recipes as they were then: the AR teacher's greedy captions) and of `reference_selection.py` (the plain recipe,
without the image term) at one step with bonuses from 0
(the paper's rounding) to 2, over the training seeds × three sampling seeds, on the split `--split` names: the
validation split chose the default, the test split reports it. Nothing is timed: the bonus adds one vector to the
rounding's scores.

Writes `length_bonus.json` and `length_bonus.md` (`length_bonus_validation.*` for the validation split) to
`--output_dir`.
"""

from __future__ import annotations

from typing import Any

from harder_world import GREEDY_TEACHER_MODEL, compare_twins
from harder_world import MODELS as RECOMMENDED
from reference_selection import MODELS as PLAIN

RESULT_NAME = "length_bonus"
MODELS = {
    "references": PLAIN["references"],
    "on AR's captions": PLAIN["on AR's captions"],
    "no teacher (reference selection, image transitions)": RECOMMENDED["no teacher"],
    "AR teacher (image transitions)": GREEDY_TEACHER_MODEL,
}
BONUSES = (0.0, 0.5, 1.0, 1.5, 2.0)
SAMPLINGS = {f"1 step, length_bonus={bonus:g}" + (" (the default)" if bonus == 1.0 else ""):
             ({"length_bonus": bonus}, 1) for bonus in BONUSES}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return compare_twins(argv, "length_bonus.py", __doc__, RESULT_NAME, MODELS, samplings=SAMPLINGS)


if __name__ == "__main__":
    main()
