"""Diversity of generated captions: self-BLEU within images, distinct-n, vocabulary size and caption lengths.

Captions are cleaned with [`normalize_caption`] and split into words with [`simple_ptb_tokenize`] (no Java), so words
and punctuation are counted the way the caption metrics count them.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from typing import Any

from .caption_metrics import normalize_caption, simple_ptb_tokenize, validate_caption_lists

SELF_BLEU_MAX_ORDER = 4


def _ngrams(words: list[str], order: int) -> list[tuple[str, ...]]:
    return [tuple(words[start : start + order]) for start in range(len(words) - order + 1)]


def sentence_bleu(hypothesis: list[str], references: list[list[str]], max_order: int = SELF_BLEU_MAX_ORDER) -> float:
    """
    Unsmoothed sentence BLEU of one tokenised caption against tokenised references (no corpus statistics): the
    geometric mean of the clipped n-gram precisions for n = 1..`max_order`, times the brevity penalty computed with the
    reference length closest to the hypothesis length (ties go to the shorter reference).

    Orders longer than the hypothesis have no n-grams to score and are left out of the geometric mean, so a caption
    identical to one of its references scores exactly 1.0 whatever its length. An empty hypothesis, or one with a
    zero precision at some order, scores 0.0.

    Args:
        hypothesis (`list[str]`):
            The words of the caption to score.
        references (`list[list[str]]`):
            The words of each reference caption; must not be empty.
        max_order (`int`, *optional*, defaults to 4):
            Longest n-gram order.

    Returns:
        `float`: BLEU in [0, 1].
    """
    if not references:
        raise ValueError("`references` must contain at least one reference caption, got an empty list.")
    if max_order < 1:
        raise ValueError(f"`max_order` must be a positive int, got {max_order}.")
    if not hypothesis:
        return 0.0
    orders = min(max_order, len(hypothesis))
    log_precision_sum = 0.0
    for order in range(1, orders + 1):
        hypothesis_counts = Counter(_ngrams(hypothesis, order))
        max_reference_counts: Counter[tuple[str, ...]] = Counter()
        for reference in references:
            max_reference_counts |= Counter(_ngrams(reference, order))
        clipped_matches = sum(min(count, max_reference_counts[ngram]) for ngram, count in hypothesis_counts.items())
        if clipped_matches == 0:
            return 0.0
        log_precision_sum += math.log(clipped_matches / sum(hypothesis_counts.values()))
    reference_length = min((abs(len(reference) - len(hypothesis)), len(reference)) for reference in references)[1]
    brevity_penalty = (
        1.0 if len(hypothesis) >= reference_length else math.exp(1.0 - reference_length / len(hypothesis))
    )
    return brevity_penalty * math.exp(log_precision_sum / orders)


def _distinct(captions: list[list[str]], order: int) -> float | None:
    ngrams = [ngram for words in captions for ngram in _ngrams(words, order)]
    return len(set(ngrams)) / len(ngrams) if ngrams else None


def compute_diversity(captions_per_image: Sequence[Sequence[str]]) -> dict[str, Any]:
    """
    Diversity statistics of generated captions, e.g. several samples per image from the diffusion sampler.

    Args:
        captions_per_image (`list[list[str]]`):
            For each image, a non-empty list of generated captions. Empty captions are legal (zero words).

    Returns:
        `dict[str, Any]` with:

        - `"self_bleu_4"` (`float` or `None`): for every image with at least two captions, the mean over its captions
          of [`sentence_bleu`] (BLEU-4, pure Python, unsmoothed) of the caption against the image's other captions;
          then the mean over those images. 1.0 means every caption repeats the others, 0.0 means no caption shares
          n-grams with its siblings. `None` when no image has two captions.
        - `"distinct_1"`, `"distinct_2"` (`float` or `None`): unique n-grams / total n-grams over all captions
          (n-grams never cross caption boundaries); `None` when the captions hold no n-gram of that order.
        - `"vocabulary_size"` (`int`): number of distinct words over all captions.
        - `"length_mean"`, `"length_std"` (`float`): mean and population standard deviation of the caption length in
          words, over all captions.
        - `"length_min"`, `"length_max"` (`int`): shortest and longest caption length in words.
    """
    validate_caption_lists(captions_per_image, "captions_per_image")
    tokenized = [
        [simple_ptb_tokenize(normalize_caption(caption)).split() for caption in captions]
        for captions in captions_per_image
    ]

    image_self_bleus = []
    for captions in tokenized:
        if len(captions) < 2:
            continue
        caption_scores = [
            sentence_bleu(caption, captions[:index] + captions[index + 1 :]) for index, caption in enumerate(captions)
        ]
        image_self_bleus.append(statistics.fmean(caption_scores))

    all_captions = [caption for captions in tokenized for caption in captions]
    lengths = [len(caption) for caption in all_captions]
    return {
        "self_bleu_4": statistics.fmean(image_self_bleus) if image_self_bleus else None,
        "distinct_1": _distinct(all_captions, 1),
        "distinct_2": _distinct(all_captions, 2),
        "vocabulary_size": len({word for caption in all_captions for word in caption}),
        "length_mean": statistics.fmean(lengths),
        "length_std": statistics.pstdev(lengths),
        "length_min": min(lengths),
        "length_max": max(lengths),
    }
