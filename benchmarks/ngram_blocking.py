"""N-gram blocking in the rounding on the harder world: the second object a parallel pass names twice.

    python benchmarks/ngram_blocking.py --training_seeds 0   # reuses the models of harder_world.py and its sequels
    python benchmarks/ngram_blocking.py --tiny               # toy sizes, seconds (what the tests run)

One denoiser pass writes every position at once, and on a scene of several objects a later mention can name the
object an earlier one named ("a red triangle is to the left of a red triangle"): every adjacent pair of words is
licensed, and nothing between positions far apart says that the second object is another one. The pipeline's
`no_repeat_ngram_size` (transformers' name; 3 by default) decodes a caption that repeats an n-gram again, with the
repeat's last word banned at its second place, so that the chain's next best words there take its place. This
benchmark captions the models of `harder_world.py`, `reference_selection.py` and `image_transitions.py` at one step
with trigrams blocked (the default), with repeats allowed (the rounding before) and with bigrams blocked, beside AR
greedy with and without the same blocking in `generate()`, over the training seeds × three sampling seeds, and times
the default one-step rows of the two models with the image term, and one of them with repeats allowed, against AR
greedy in alternating rounds, since blocking adds Viterbi passes to the rounding.

Writes `ngram_blocking.json` and `ngram_blocking.md` to `--output_dir`.
"""

from __future__ import annotations

from typing import Any

from harder_world import compare_twins
from image_transitions import MODELS as IMAGE_TRANSITION_MODELS
from reference_selection import MODELS as REFERENCE_SELECTION_MODELS

RESULT_NAME = "ngram_blocking"
MODELS = {
    **{name: REFERENCE_SELECTION_MODELS[name] for name in ("references", "references, reference selection")},
    **IMAGE_TRANSITION_MODELS,
}
DEFAULT = "1 step (no trigram twice, the default)"
SAMPLINGS = {
    DEFAULT: ({}, 1),
    "1 step, repeats allowed": ({"no_repeat_ngram_size": 0}, 1),
    "1 step, no bigram twice": ({"no_repeat_ngram_size": 2}, 1),
}
AR_SAMPLINGS = {"AR greedy": {"num_beams": 1}, "AR greedy, no trigram twice": {"num_beams": 1, "no_repeat_ngram_size": 3}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return compare_twins(argv, "ngram_blocking.py", __doc__, RESULT_NAME, MODELS,
                         timed=(f"on AR's captions, image transitions: {DEFAULT}",
                                "on AR's captions, image transitions: 1 step, repeats allowed",
                                f"references, reference selection, image transitions: {DEFAULT}"),
                         samplings=SAMPLINGS, ar_samplings=AR_SAMPLINGS)


if __name__ == "__main__":
    main()
