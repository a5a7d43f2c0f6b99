"""Caption metrics against pycocoevalcap called directly, the `evaluate` wrapper offline, and diversity by hand."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from clip_diffusionlm.metrics import (
    CAPTION_METRIC_PATH,
    caption_metrics,
    compute_caption_metrics,
    compute_diversity,
    normalize_caption,
)
from clip_diffusionlm.metrics.caption_metrics import simple_ptb_tokenize
from clip_diffusionlm.metrics.diversity import sentence_bleu

SRC_DIR = Path(__file__).resolve().parents[1] / "src"

PREDICTIONS = [
    "A dog runs across the grass.",
    "Two cats sleeping on a red couch",
    "A man's bicycle leans against a wall, near the door.",
    "a plate of food with broccoli and rice",
    "",
]
REFERENCES = [
    ["A brown dog running across a grassy field.", "A dog runs on the grass.", "The dog is playing outside."],
    ["Two cats are asleep on a couch.", "A pair of cats sleeping on a red sofa.", "Cats lying on a couch."],
    [
        "A bicycle parked against a brick wall.",
        "A man's bike leaning on the wall next to a door.",
        "A bike near a door.",
    ],
    ["A plate with broccoli, rice and chicken.", "Food on a white plate.", "A dinner plate of rice and vegetables."],
    ["A bird sitting on a branch.", "A small bird perched on a tree branch."],
]
# Same captions as PREDICTIONS, dressed the way a BERT or CLIP tokenizer's `decode` leaves them.
NOISY_PREDICTIONS = [
    "[CLS] A DOG   runs across the grass. [SEP] [PAD] [PAD]",
    "<|startoftext|>Two cats sleeping on a red couch<|endoftext|>",
    "a man's bicycle\tleans against a wall,\nnear the door. [SEP]",
    "[CLS] a plate of food with broccoli and rice [SEP] [PAD]",
    "[CLS] [SEP] [PAD]",
]
SCORE_KEYS = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]
NO_METEOR = ["BLEU", "ROUGE-L", "CIDEr", "SPICE"]
EVALUATE_SCRIPT = """
import json, sys
import evaluate
from clip_diffusionlm.metrics import CAPTION_METRIC_PATH
data = json.loads(open(sys.argv[1]).read())
metric = evaluate.load(CAPTION_METRIC_PATH)
results = metric.compute(predictions=data["predictions"], references=data["references"], metrics=data["metrics"])
open(sys.argv[2], "w").write(json.dumps(results))
"""


def ptb_tokenize(predictions, references):
    tokenized_res = PTBTokenizer().tokenize({i: [{"caption": p}] for i, p in enumerate(predictions)})
    tokenized_gts = PTBTokenizer().tokenize({i: [{"caption": r} for r in refs] for i, refs in enumerate(references)})
    return tokenized_res, tokenized_gts


def direct_scores(res, gts, meteor=None) -> dict:
    """pycocoevalcap used the way its COCOEvalCap does, on already tokenised captions."""
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"BLEU-{order}": value for order, value in enumerate(bleu, start=1)}
    scores["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
    scores["CIDEr"], scores["CIDEr_per_image"] = Cider().compute_score(gts, res)
    if meteor is not None:
        scores["METEOR"] = meteor.compute_score(gts, res)[0]
    return scores


@pytest.fixture(scope="module")
def evaluate_run(tmp_path_factory):
    """Starts `evaluate.load(CAPTION_METRIC_PATH)` in an offline subprocess; it runs while the JVMs below load."""
    work_dir = tmp_path_factory.mktemp("evaluate")
    inputs, outputs = work_dir / "inputs.json", work_dir / "outputs.json"
    inputs.write_text(json.dumps({"predictions": PREDICTIONS, "references": REFERENCES, "metrics": NO_METEOR}))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(work_dir / "hf_home"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC_DIR), os.environ.get("PYTHONPATH")])),
    }
    process = subprocess.Popen(
        [sys.executable, "-c", EVALUATE_SCRIPT, str(inputs), str(outputs)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    yield process, outputs
    if process.poll() is None:
        process.kill()
        process.communicate()


@pytest.fixture(scope="module")
def scored(evaluate_run):
    """
    The package and pycocoevalcap (called directly) on the hand-made set. Each METEOR scorer is a JVM that loads a
    60 MB paraphrase table for several seconds, so the two run side by side, and the direct one also scores the
    all-empty corpus.
    """
    started = []

    class RecordingMeteor(Meteor):
        def __init__(self):
            super().__init__()
            started.append(self)

    caption_metrics.stop_shared_meteor()  # an earlier test's scorer would otherwise serve the package's call
    with pytest.MonkeyPatch.context() as patch, ThreadPoolExecutor(max_workers=1) as pool:
        patch.setattr(caption_metrics, "Meteor", RecordingMeteor)
        package_future = pool.submit(compute_caption_metrics, PREDICTIONS, REFERENCES)
        meteor = Meteor()
        try:
            res, gts = ptb_tokenize(PREDICTIONS, REFERENCES)
            direct = direct_scores(res, gts, meteor)
            direct_empty_meteor = meteor.compute_score(gts, {index: [""] for index in gts})[0]
        finally:
            caption_metrics._close_meteor(meteor)
        package = package_future.result()
    assert len(started) == 1
    return {
        "package": package,
        "direct": direct,
        "direct_empty_meteor": direct_empty_meteor,
        "res": res,
        "gts": gts,
        "meteors": started,
    }


def test_matches_pycocoevalcap_called_directly(scored):
    package, direct = scored["package"], scored["direct"]
    for key in SCORE_KEYS:
        assert isinstance(package[key], float), key
        assert package[key] == pytest.approx(direct[key], abs=1e-9), key
    assert package["CIDEr_per_image"] == pytest.approx(list(direct["CIDEr_per_image"]), abs=1e-9)
    assert 0.0 < package["BLEU-1"] <= 1.0 and 0.0 < package["METEOR"] <= 1.0 and package["CIDEr"] > 0.0


def test_meteor_jvm_serves_later_calls_and_stops_after_a_failed_one(scored):
    (meteor,) = scored["meteors"]
    again = compute_caption_metrics(PREDICTIONS, REFERENCES, metrics=["METEOR"])
    assert again["METEOR"] == scored["package"]["METEOR"]
    assert caption_metrics.shared_meteor() is meteor and meteor.meteor_p.poll() is None
    with pytest.raises(ValueError, match="no words left"):
        compute_caption_metrics(["a cat"], [["..."]], metrics=["METEOR"])
    assert meteor.meteor_p.poll() is not None  # stopped: a failure may leave a request half-sent
    assert caption_metrics.shared_meteor() is not meteor
    caption_metrics.stop_shared_meteor()


def test_close_meteor_frees_a_lock_left_held_by_a_failed_scoring():
    stand_in = Meteor.__new__(Meteor)
    stand_in.meteor_p = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stand_in.lock = threading.Lock()
    stand_in.lock.acquire()
    caption_metrics._close_meteor(stand_in)
    assert stand_in.meteor_p.poll() is not None
    assert not stand_in.lock.locked()
    del stand_in  # pycocoevalcap's `__del__` must now run without blocking


def test_spice_is_reported_unavailable(scored):
    assert scored["package"]["SPICE"] is None
    assert "download" in scored["package"]["skipped"]["SPICE"]
    assert set(scored["package"]["skipped"]) == {"SPICE"}


def test_empty_predictions_score_zero(scored):
    empty = compute_caption_metrics([""] * len(REFERENCES), REFERENCES, metrics=NO_METEOR)
    for key in ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"]:
        assert empty[key] == 0.0, key
    assert empty["CIDEr_per_image"] == [0.0] * len(REFERENCES)
    # Empty predictions reach the scorers unchanged (the hand-made set has one and matches pycocoevalcap, METEOR
    # included), and METEOR 1.5 scores an all-empty corpus 0; a third METEOR JVM here would cost seconds.
    assert scored["package"]["CIDEr_per_image"][-1] == 0.0
    assert scored["direct_empty_meteor"] == 0.0


def test_identical_predictions(scored):
    predictions = [refs[0] for refs in REFERENCES]
    results = compute_caption_metrics(predictions, REFERENCES, metrics=["BLEU", "CIDEr"])
    assert results["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert results["BLEU-1"] == pytest.approx(1.0, abs=1e-6)
    res = {i: [scored["gts"][i][0]] for i in range(len(REFERENCES))}
    assert results["CIDEr"] == pytest.approx(Cider().compute_score(scored["gts"], res)[0], abs=1e-9)
    assert set(results) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr", "CIDEr_per_image", "skipped"}


def test_special_tokens_casing_and_spaces_do_not_change_scores(scored):
    results = compute_caption_metrics(NOISY_PREDICTIONS, REFERENCES, metrics=["BLEU", "ROUGE-L", "CIDEr"])
    for key in ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"]:
        assert results[key] == scored["package"][key], key


def test_evaluate_load_offline_matches_function(scored, evaluate_run):
    assert Path(CAPTION_METRIC_PATH, "caption_scores.py").is_file()
    process, outputs = evaluate_run
    log, _ = process.communicate(timeout=120)
    assert process.returncode == 0, log
    results = json.loads(outputs.read_text())
    for key in ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"]:
        assert results[key] == pytest.approx(scored["package"][key], abs=1e-12), key
    assert results["SPICE"] is None and "SPICE" in results["skipped"]
    assert "METEOR" not in results


def test_fallback_tokenizer_agrees_with_ptb_on_the_hand_made_set(scored):
    for index, prediction in enumerate(PREDICTIONS):
        assert simple_ptb_tokenize(prediction) == scored["res"][index][0]
        assert [simple_ptb_tokenize(reference) for reference in REFERENCES[index]] == scored["gts"][index]


def test_without_java_falls_back_and_skips_meteor(scored, monkeypatch):
    monkeypatch.setattr(caption_metrics.shutil, "which", lambda name, *args, **kwargs: None)
    results = compute_caption_metrics(PREDICTIONS, REFERENCES)
    assert results["METEOR"] is None
    assert set(results["skipped"]) == {"METEOR", "PTBTokenizer", "SPICE"}
    assert "java" in results["skipped"]["METEOR"] and "java" in results["skipped"]["PTBTokenizer"]
    # The fallback tokenises the hand-made set like PTB does, so the Python-only scores are the official ones.
    for key in ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"]:
        assert results[key] == pytest.approx(scored["package"][key], abs=1e-12), key


def test_unwritable_ptb_directory_falls_back(scored, monkeypatch):
    def read_only(self, captions_for_image):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(caption_metrics.PTBTokenizer, "tokenize", read_only)
    results = compute_caption_metrics(PREDICTIONS, REFERENCES, metrics=["BLEU"])
    assert "read-only file system" in results["skipped"]["PTBTokenizer"]
    assert results["BLEU-4"] == pytest.approx(scored["package"]["BLEU-4"], abs=1e-12)


def test_simple_ptb_tokenize_rules():
    assert simple_ptb_tokenize("Don't \"quote\" (it), the dog's e-mail -- 3.5 1,000 ... ok!") == (
        "do n't quote -lrb- it -rrb- the dog 's e-mail 3.5 1,000 ok"
    )
    assert simple_ptb_tokenize("The U.S. team wins 20% more.") == "the u.s. team wins 20 % more"
    assert simple_ptb_tokenize("...") == ""


def test_normalize_caption():
    assert normalize_caption("[CLS] A  Dog\n[UNK] runs [MASK] [SEP] [PAD] [PAD]") == "a dog runs"
    assert normalize_caption("<|startoftext|>A cat.<|endoftext|>") == "a cat."
    assert normalize_caption("[PAD] [PAD]") == ""
    with pytest.raises(TypeError, match="`caption` must be a str, got int"):
        normalize_caption(3)


@pytest.mark.parametrize(
    ("predictions", "references", "metrics", "error", "match"),
    [
        (["a"], [["a"], ["b"]], None, ValueError, "got 1 predictions and 2 reference lists"),
        ([], [], None, ValueError, r"`predictions` must contain at least one caption"),
        ("a dog", [["a dog"]], None, TypeError, r"`predictions` must be a list of str .* got str"),
        (["a", 3], [["a"], ["b"]], None, TypeError, r"`predictions\[1\]` must be a str, got int"),
        (["a"], ["a dog"], None, TypeError, r"`references\[0\]` must be a list of str .* got str"),
        (["a", "b"], [["a"], []], None, ValueError, r"`references\[1\]` must contain at least one caption"),
        (["a", "b"], [["a"], ["b", None]], None, TypeError, r"`references\[1\]\[1\]` must be a str, got NoneType"),
        (["a"], [["[PAD]"]], None, ValueError, r"`references\[0\]\[0\]` is empty after normalization"),
        (["a"], [["a"]], ["BLEU", "SPICY"], ValueError, "unknown metric 'SPICY'"),
        (["a"], [["a"]], "BLEU", TypeError, "`metrics` must be a list of metric names"),
        (["a"], [["a"]], [], ValueError, "`metrics` must name at least one"),
    ],
)
def test_bad_inputs_raise(predictions, references, metrics, error, match):
    with pytest.raises(error, match=match):
        compute_caption_metrics(predictions, references, metrics=metrics)


def test_reference_without_words_after_tokenization_raises():
    with pytest.raises(ValueError, match=r"`references\[1\]\[0\]` \('\.\.\.'\) has no words left after tokenization"):
        compute_caption_metrics(["a dog", "a cat"], [["a dog"], ["...", "a cat"]], metrics=["BLEU"])


def test_metric_names_are_case_insensitive():
    results = compute_caption_metrics(["a dog runs"], [["a dog runs"]], metrics=["rouge-l", "spice"])
    assert set(results) == {"ROUGE-L", "SPICE", "skipped"}
    assert results["ROUGE-L"] == pytest.approx(1.0)


def test_diversity_by_hand():
    results = compute_diversity([["A dog runs.", "a dog runs"], ["red car", "blue sky"], ["one"]])
    # Words: [a dog runs] x2, [red car], [blue sky], [one]; the single-caption image has no self-BLEU.
    assert results["self_bleu_4"] == pytest.approx((1.0 + 0.0) / 2)
    assert results["distinct_1"] == pytest.approx(8 / 11)
    assert results["distinct_2"] == pytest.approx(4 / 6)
    assert results["vocabulary_size"] == 8
    assert results["length_mean"] == pytest.approx(11 / 5)
    assert results["length_std"] == pytest.approx(math.sqrt((0.8**2 * 2 + 0.2**2 * 2 + 1.2**2) / 5))
    assert (results["length_min"], results["length_max"]) == (1, 3)


def test_self_bleu_extremes_and_partial_overlap():
    assert compute_diversity([["a dog runs on grass"] * 3, ["two cats"] * 2])["self_bleu_4"] == 1.0
    assert compute_diversity([["a dog runs", "two cats sleep", "red car"]])["self_bleu_4"] == 0.0
    # Precisions 4/5, 3/4, 2/3, 1/2 and equal lengths, both ways round.
    assert compute_diversity([["a b c d e", "a b c d f"]])["self_bleu_4"] == pytest.approx(0.2**0.25)
    assert sentence_bleu(["a", "b"], [["a", "b", "c", "d"]]) == pytest.approx(math.exp(1 - 4 / 2))
    assert sentence_bleu([], [["a"]]) == 0.0


def test_diversity_undefined_values_and_empty_captions():
    results = compute_diversity([["dog"], [""]])
    assert results["self_bleu_4"] is None
    assert results["distinct_2"] is None
    assert results["distinct_1"] == 1.0
    assert (results["length_min"], results["length_max"], results["length_mean"]) == (0, 1, 0.5)


@pytest.mark.parametrize(
    ("captions", "error", "match"),
    [
        ([], ValueError, "`captions_per_image` must contain at least one image"),
        ("a dog", TypeError, "`captions_per_image` must be a list of lists of str"),
        ([["a"], "b"], TypeError, r"`captions_per_image\[1\]` must be a list of str"),
        ([["a"], []], ValueError, r"`captions_per_image\[1\]` must contain at least one caption"),
        ([["a", 2]], TypeError, r"`captions_per_image\[0\]\[1\]` must be a str, got int"),
    ],
)
def test_diversity_bad_inputs_raise(captions, error, match):
    with pytest.raises(error, match=match):
        compute_diversity(captions)
