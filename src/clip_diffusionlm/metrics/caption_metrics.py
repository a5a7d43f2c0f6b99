"""COCO-caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D) computed offline with `pycocoevalcap`.

The scorers are the ones of the COCO caption evaluation server, run on captions tokenised by pycocoevalcap's
`PTBTokenizer` (Stanford CoreNLP, needs `java`). Without `java`, a small Python tokenizer that mimics the PTB one
stands in for BLEU, ROUGE-L and CIDEr, METEOR (a Java program) is skipped, and both facts are reported in the
`"skipped"` entry of the result. SPICE is never computed: it needs Stanford CoreNLP models that pycocoevalcap downloads
on first use, and nothing here downloads at run time.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

logger = logging.getLogger(__name__)

AVAILABLE_METRICS = ("BLEU", "METEOR", "ROUGE-L", "CIDEr", "SPICE")

SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]", "<|startoftext|>", "<|endoftext|>")
_SPECIAL_TOKENS_RE = re.compile("|".join(re.escape(token) for token in SPECIAL_TOKENS), flags=re.IGNORECASE)

SPICE_SKIP_REASON = (
    "SPICE needs the Stanford CoreNLP 3.6.0 models, which pycocoevalcap downloads on first use; "
    "this package never downloads at run time."
)
NO_JAVA_METEOR_REASON = "`java` was not found on PATH and METEOR 1.5 runs in the JVM."
NO_JAVA_TOKENIZER_REASON = (
    "`java` was not found on PATH, so pycocoevalcap's PTBTokenizer (Stanford CoreNLP) was replaced by the Python "
    "fallback `simple_ptb_tokenize`; BLEU, ROUGE-L and CIDEr may differ slightly from the official values."
)

# The Stanford PTB tokenizer writes brackets as -LRB- etc.; pycocoevalcap lowercases them and then fails to drop them
# (its punctuation list is upper case), so they survive as words. The fallback keeps that quirk to match its output.
_BRACKET_TOKENS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_BRACKETS_RE = re.compile(r"[()\[\]{}]")
# Punctuation that PTB splits off and pycocoevalcap then removes; "," and ":" inside numbers (1,000 or 10:30) stay.
_REMOVED_PUNCTUATION_RE = re.compile(r"\.\.\.|--+|[\"`?!;]|(?<!\d)[,:]|[,:](?!\d)")
_CLITICS = ("n't", "'s", "'re", "'ve", "'ll", "'d", "'m")
_CLITIC_RE = re.compile(r"(?<=[a-z0-9])(" + "|".join(re.escape(clitic) for clitic in _CLITICS) + r")(?![a-z0-9])")
_WORD_EDGE_PUNCTUATION = ".'-"
# PTB keeps the final period of dotted abbreviations such as "u.s." or "p.m.".
_DOTTED_ABBREVIATION_RE = re.compile(r"(?:[a-z]\.){2,}")


def normalize_caption(caption: str) -> str:
    """
    Cleans a decoded caption before scoring: removes BERT special tokens (`[CLS]`, `[SEP]`, `[PAD]`, `[UNK]`,
    `[MASK]`) and CLIP's `<|startoftext|>`/`<|endoftext|>` (case-insensitively), lowercases, and collapses all
    whitespace (newlines included) to single spaces.

    Args:
        caption (`str`):
            The caption, e.g. the output of `tokenizer.decode` without `skip_special_tokens`.

    Returns:
        `str`: the cleaned caption; `""` if nothing but special tokens and whitespace was left.
    """
    if not isinstance(caption, str):
        raise TypeError(f"`caption` must be a str, got {type(caption).__name__}.")
    return " ".join(_SPECIAL_TOKENS_RE.sub(" ", caption).lower().split())


def simple_ptb_tokenize(caption: str) -> str:
    """
    Java-free stand-in for pycocoevalcap's `PTBTokenizer`: lowercases, splits clitics the PTB way (`dog's` ->
    `dog 's`, `don't` -> `do n't`), turns brackets into `-lrb-`/`-rrb-`/`-lsb-`/`-rsb-`/`-lcb-`/`-rcb-` (as
    pycocoevalcap leaves them), splits off `%`, and removes the punctuation pycocoevalcap removes
    (`. , ? ! : ; - -- ... ' "` and backquotes), keeping `.`, `-` and `'` inside words (`3.5`, `e-mail`, `o'clock`),
    `,`/`:` inside numbers (`1,000`, `10:30`) and the final period of dotted abbreviations (`u.s.`, `p.m.`).

    It agrees with the PTB tokenizer on ordinary captions; it differs on other abbreviations (PTB keeps `mr.`, this
    gives `mr`) and on rarer Stanford rules (`'n'`).

    Args:
        caption (`str`):
            The caption to tokenise.

    Returns:
        `str`: the tokens joined by single spaces, like pycocoevalcap's tokenizer output.
    """
    if not isinstance(caption, str):
        raise TypeError(f"`caption` must be a str, got {type(caption).__name__}.")
    text = _BRACKETS_RE.sub(lambda match: f" {_BRACKET_TOKENS[match.group()]} ", caption.lower())
    text = _REMOVED_PUNCTUATION_RE.sub(" ", text)
    text = _CLITIC_RE.sub(r" \1", text).replace("%", " % ")
    words = []
    for word in text.split():
        is_kept_whole = word in _CLITICS or word in _BRACKET_TOKENS.values() or _DOTTED_ABBREVIATION_RE.fullmatch(word)
        if not is_kept_whole:
            word = word.strip(_WORD_EDGE_PUNCTUATION)
        if word:
            words.append(word)
    return " ".join(words)


def validate_caption_lists(value: Any, name: str) -> None:
    """
    Checks that `value` is a non-empty list of non-empty lists of str (one list of captions per image).

    Args:
        value (`Any`):
            The object to check.
        name (`str`):
            The argument name used in error messages, e.g. `"references"`.
    """
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise TypeError(f"`{name}` must be a list of lists of str (one list per image), got {type(value).__name__}.")
    if len(value) == 0:
        raise ValueError(f"`{name}` must contain at least one image, got an empty list.")
    for index, captions in enumerate(value):
        if isinstance(captions, str) or not isinstance(captions, Sequence):
            raise TypeError(
                f"`{name}[{index}]` must be a list of str (the captions of image {index}), "
                f"got {type(captions).__name__}."
            )
        if len(captions) == 0:
            raise ValueError(f"`{name}[{index}]` must contain at least one caption, got an empty list.")
        for caption_index, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise TypeError(f"`{name}[{index}][{caption_index}]` must be a str, got {type(caption).__name__}.")


def _validate_inputs(predictions: Any, references: Any) -> None:
    if isinstance(predictions, str) or not isinstance(predictions, Sequence):
        raise TypeError(
            f"`predictions` must be a list of str (one caption per image), got {type(predictions).__name__}."
        )
    if len(predictions) == 0:
        raise ValueError("`predictions` must contain at least one caption, got an empty list.")
    for index, prediction in enumerate(predictions):
        if not isinstance(prediction, str):
            raise TypeError(f"`predictions[{index}]` must be a str, got {type(prediction).__name__}.")
    validate_caption_lists(references, "references")
    if len(predictions) != len(references):
        raise ValueError(
            "`predictions` and `references` must have the same length (one entry per image), got "
            f"{len(predictions)} predictions and {len(references)} reference lists."
        )


def _resolve_metrics(metrics: Sequence[str] | None) -> list[str]:
    if metrics is None:
        return list(AVAILABLE_METRICS)
    if isinstance(metrics, str) or not isinstance(metrics, Sequence | set | frozenset):
        raise TypeError(f"`metrics` must be a list of metric names or None, got {type(metrics).__name__}.")
    if len(metrics) == 0:
        raise ValueError(f"`metrics` must name at least one of {list(AVAILABLE_METRICS)}, got an empty list.")
    canonical_names = {name.lower(): name for name in AVAILABLE_METRICS}
    resolved = set()
    for metric in metrics:
        if not isinstance(metric, str) or metric.lower() not in canonical_names:
            raise ValueError(
                f"`metrics` contains unknown metric {metric!r}; expected names from {list(AVAILABLE_METRICS)}."
            )
        resolved.add(canonical_names[metric.lower()])
    return [name for name in AVAILABLE_METRICS if name in resolved]


@contextlib.contextmanager
def _stderr_to_debug_log(name: str) -> Iterator[None]:
    """Keeps what a Java subprocess writes to the inherited stderr (the PTB tokenizer's "tokenized N tokens at ..."
    line on every call) out of the user's terminal: captured at the file-descriptor level, logged at DEBUG."""
    sys.stderr.flush()
    with tempfile.TemporaryFile() as captured:
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode(errors="replace").strip()
            if text:
                logger.debug("%s: %s", name, text)


def _tokenize(
    hypotheses: list[str], references: list[list[str]], use_ptb: bool, skipped: dict[str, str]
) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """Returns `(res, gts)` in pycocoevalcap's format: image index -> list of tokenised captions."""
    if use_ptb:
        # One JVM launch for predictions and references together: the prediction is caption 0 of each image.
        captions = {
            index: [{"caption": hypothesis}] + [{"caption": reference} for reference in refs]
            for index, (hypothesis, refs) in enumerate(zip(hypotheses, references, strict=True))
        }
        try:
            with _stderr_to_debug_log("PTBTokenizer"):
                tokenized = PTBTokenizer().tokenize(captions)
        except OSError as error:
            # The tokenizer writes its input file next to its jar, inside site-packages, which may be read-only.
            skipped["PTBTokenizer"] = (
                f"pycocoevalcap's PTBTokenizer could not run ({error}); the Python fallback `simple_ptb_tokenize` "
                "was used, so BLEU, ROUGE-L and CIDEr may differ slightly from the official values."
            )
        else:
            res = {index: tokens[:1] for index, tokens in tokenized.items()}
            gts = {index: tokens[1:] for index, tokens in tokenized.items()}
            return res, gts
    else:
        skipped["PTBTokenizer"] = NO_JAVA_TOKENIZER_REASON
    res = {index: [simple_ptb_tokenize(hypothesis)] for index, hypothesis in enumerate(hypotheses)}
    gts = {index: [simple_ptb_tokenize(reference) for reference in refs] for index, refs in enumerate(references)}
    return res, gts


def _close_meteor(meteor: Meteor) -> None:
    # pycocoevalcap stops the METEOR JVM only in `__del__`, which can run late, and leaves `meteor.lock` held when
    # scoring raises, which would make that `__del__` hang. Stop the JVM and close its pipes here, and free the lock.
    process = meteor.meteor_p
    process.kill()
    process.wait()
    for stream in (process.stdin, process.stdout, process.stderr):
        # A JVM that died mid-request leaves unflushed input whose flush on close fails; the process is gone anyway.
        with contextlib.suppress(OSError):
            stream.close()
    if meteor.lock.locked():
        meteor.lock.release()


_shared_meteor: Meteor | None = None
_shared_meteor_guard = threading.Lock()


def shared_meteor() -> Meteor:
    """This process's METEOR scorer. Its JVM takes about 6 s to load the paraphrase table and then scores 500 captions
    in about 0.3 s, so it is started on first use and kept (a validation, then the test and held-out splits, reuse it)
    until [`stop_shared_meteor`], which also runs at exit."""
    global _shared_meteor
    with _shared_meteor_guard:
        if _shared_meteor is None or _shared_meteor.meteor_p.poll() is not None:
            _shared_meteor = Meteor()
        return _shared_meteor


def stop_shared_meteor() -> None:
    """Stops the shared METEOR JVM, if one runs; the next [`shared_meteor`] starts a new one."""
    global _shared_meteor
    with _shared_meteor_guard:
        if _shared_meteor is not None:
            _close_meteor(_shared_meteor)
            _shared_meteor = None


atexit.register(stop_shared_meteor)


def compute_caption_metrics(
    predictions: Sequence[str], references: Sequence[Sequence[str]], metrics: Sequence[str] | None = None
) -> dict[str, Any]:
    """
    Scores one generated caption per image against that image's reference captions with the COCO caption metrics.

    Every caption first goes through [`normalize_caption`] (special tokens removed, lowercased, whitespace collapsed),
    then through pycocoevalcap's `PTBTokenizer` (or [`simple_ptb_tokenize`] when `java` is missing), then through
    pycocoevalcap's scorers:

    - BLEU-1..4: corpus-level BLEU (`Bleu(4)`, closest reference length for the brevity penalty), in [0, 1]. As in
      pycocoevalcap, an order without any matching n-gram gives a tiny positive value rather than exactly 0 (but an
      all-empty corpus gives exactly 0).
    - METEOR: METEOR 1.5 (`Meteor`, a JVM subprocess shared by the calls of a process: [`shared_meteor`]), in [0, 1].
    - ROUGE-L: mean over images of the sentence ROUGE-L F-score (beta 1.2) against the best references, in [0, 1].
    - CIDEr: CIDEr-D as implemented by pycocoevalcap's `Cider` (document frequencies from the references of
      `references`, Gaussian length penalty, no clipping to 1), on pycocoevalcap's scale of 10 x the mean cosine
      similarity, so typically 0..~3 and at most 10. With a single image every n-gram has zero idf and CIDEr
      is 0 by construction: score a whole test set at once.
    - SPICE: never computed (it needs a download), reported as `None` and listed in `"skipped"`.

    An empty prediction (or one that is empty after normalization) is legal: it has no words, matches nothing and
    scores 0 for its image; a corpus of only empty predictions scores exactly 0 on every metric.

    Args:
        predictions (`list[str]`):
            One generated caption per image.
        references (`list[list[str]]`):
            For each image, a non-empty list of reference captions. Every reference must contain at least one word.
        metrics (`list[str]`, *optional*, defaults to `None`):
            Subset of `"BLEU"`, `"METEOR"`, `"ROUGE-L"`, `"CIDEr"`, `"SPICE"` (case-insensitive) to compute; `None`
            computes all of them. Leaving out METEOR saves the few seconds its JVM takes to start in a process's first call.

    Returns:
        `dict[str, Any]`: for the requested metrics, `"BLEU-1"` .. `"BLEU-4"`, `"METEOR"`, `"ROUGE-L"`, `"CIDEr"`
        (plain floats, `None` when skipped), `"CIDEr_per_image"` (list of floats, when CIDEr is requested),
        `"SPICE"` (`None`), and `"skipped"`, a dict mapping each metric or component that was skipped or replaced (e.g.
        `"SPICE"`, `"METEOR"`, `"PTBTokenizer"`) to the reason.
    """
    requested = _resolve_metrics(metrics)
    _validate_inputs(predictions, references)
    hypotheses = [normalize_caption(prediction) for prediction in predictions]
    normalized_references = [[normalize_caption(reference) for reference in refs] for refs in references]
    for index, refs in enumerate(normalized_references):
        for reference_index, reference in enumerate(refs):
            if not reference:
                raise ValueError(
                    f"`references[{index}][{reference_index}]` is empty after normalization "
                    f"({references[index][reference_index]!r}); every reference must contain at least one word."
                )
    if len(hypotheses) == 1 and "CIDEr" in requested:
        logger.warning("CIDEr is 0 by construction for a single image (all idf weights vanish); score a corpus.")

    skipped: dict[str, str] = {}
    java_available = shutil.which("java") is not None
    # Started before tokenising so the JVM loads its paraphrase table while the other scorers run.
    meteor = shared_meteor() if "METEOR" in requested and java_available else None
    try:
        res, gts = _tokenize(hypotheses, normalized_references, java_available, skipped)
        for index, refs in gts.items():
            for reference_index, reference in enumerate(refs):
                if not reference:
                    # An empty reference would let an empty prediction match it (ROUGE-L of "" vs "" is 1).
                    raise ValueError(
                        f"`references[{index}][{reference_index}]` ({references[index][reference_index]!r}) has no "
                        "words left after tokenization (punctuation is removed); every reference needs a word."
                    )
        results: dict[str, Any] = {}
        if "BLEU" in requested:
            bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
            results.update({f"BLEU-{order}": float(score) for order, score in enumerate(bleu, start=1)})
        if "METEOR" in requested:
            if meteor is None:
                results["METEOR"] = None
                skipped["METEOR"] = NO_JAVA_METEOR_REASON
            else:
                results["METEOR"] = float(meteor.compute_score(gts, res)[0])
        if "ROUGE-L" in requested:
            results["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
        if "CIDEr" in requested:
            cider, cider_per_image = Cider().compute_score(gts, res)
            results["CIDEr"] = float(cider)
            results["CIDEr_per_image"] = [float(score) for score in cider_per_image]
        if "SPICE" in requested:
            results["SPICE"] = None
            skipped["SPICE"] = SPICE_SKIP_REASON
    except BaseException:
        # A request may have been cut off half-way (an interrupt), which would leave the JVM out of step.
        if meteor is not None:
            stop_shared_meteor()
        raise
    results["skipped"] = skipped
    return results
