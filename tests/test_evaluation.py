from __future__ import annotations

import json

import pytest
import yaml

from clip_diffusionlm.data import load_image_folder
from clip_diffusionlm.demo import content_accuracy
from clip_diffusionlm.evaluation import evaluate_main
from clip_diffusionlm.hub.model_card import eval_results_from_metrics
from clip_diffusionlm.metrics import compute_caption_metrics


def test_evaluate_command_writes_predictions_metrics_and_table(training_assets, pipeline_from_assets, tmp_path):
    output_dir = tmp_path / "eval"
    code = evaluate_main([
        "--model", str(pipeline_from_assets), "--datasets", str(training_assets["world"]), "--split", "test",
        "--output_dir", str(output_dir), "--num_inference_steps", "1", "3", "--guidance_scale", "1", "2",
        "--num_captions_per_image", "2", "--batch_size", "4",
    ])
    assert code == 0
    test_split = load_image_folder(training_assets["world"])["test"]
    records = [json.loads(line) for line in (output_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 4 * len(test_split)  # 2 step counts × 2 guidance scales
    assert {(r["num_inference_steps"], r["guidance_scale"]) for r in records} == {(1, 1), (1, 2), (3, 1), (3, 2)}
    assert all(len(r["captions"]) == 2 and r["references"] for r in records)
    assert records[0]["image_id"] == test_split[0]["image_id"]

    rows = json.loads((output_dir / "metrics.json").read_text())
    assert len(rows) == 4
    for row in rows:
        # Each row scores exactly its own setting's first captions against the references.
        own = [r for r in records if (r["num_inference_steps"], r["guidance_scale"]) ==
               (row["num_inference_steps"], row["guidance_scale"])]
        first = [r["captions"][0] for r in own]
        expected = compute_caption_metrics(first, [r["references"] for r in own])
        for name in ("BLEU-4", "CIDEr", "ROUGE-L"):
            assert row[name] == pytest.approx(expected[name]), name
        assert row["SPICE"] is None
        assert row["object_accuracy"] == pytest.approx(
            content_accuracy(first, test_split["objects"])["object_accuracy"]
        )  # the shapes world knows its objects
        assert "self_bleu_4" in row and "distinct_1" in row  # two captions per image
    table = (output_dir / "metrics.md").read_text().splitlines()
    assert table[0].startswith("| steps | guidance |") and len(table) == 2 + 4


def test_evaluate_command_passes_the_rounding_options(training_assets, pipeline_from_assets, tmp_path):
    captions = {}
    for size, bonus in ((0, 0.0), (1, 0.0), (0, 50.0)):
        output_dir = tmp_path / f"eval_{size}_{bonus:g}"
        assert evaluate_main([
            "--model", str(pipeline_from_assets), "--datasets", str(training_assets["world"]), "--split", "test",
            "--output_dir", str(output_dir), "--no_repeat_ngram_size", str(size), "--length_bonus", str(bonus),
        ]) == 0
        rows = json.loads((output_dir / "metrics.json").read_text())
        assert [(row["no_repeat_ngram_size"], row["length_bonus"]) for row in rows] == [(size, bonus)]
        records = (output_dir / "predictions.jsonl").read_text().splitlines()
        captions[size, bonus] = [json.loads(line)["captions"][0].split() for line in records]
    plain, blocked, longer = captions[0, 0.0], captions[1, 0.0], captions[0, 50.0]
    assert all(len(set(caption)) == len(caption) for caption in blocked)  # no word twice
    assert blocked != plain  # the shapes world's captions say "a" twice
    # A bonus above every end's margin leaves no position to padding: every caption as long or longer.
    assert all(len(long) >= len(short) for long, short in zip(longer, plain))
    assert sum(map(len, longer)) > sum(map(len, plain))


def test_eval_results_for_the_model_index():
    metrics = {"BLEU-4": 0.25, "CIDEr": 0.8, "METEOR": None, "SPICE": None, "object_accuracy": 0.9}
    results = eval_results_from_metrics(metrics, "shapes", "shapes-world", "test")
    assert {(r.metric_name, r.metric_type, r.metric_value) for r in results} == {
        ("BLEU-4", "bleu", 0.25), ("CIDEr", "cider", 0.8), ("object_accuracy", "accuracy", 0.9)
    }
    assert all(r.task_type == "image-to-text" and r.dataset_split == "test" for r in results)
    from huggingface_hub import ModelCardData

    card = yaml.safe_load(ModelCardData(model_name="m", eval_results=results).to_yaml())
    assert card["model-index"][0]["results"][0]["task"]["type"] == "image-to-text"


def test_help_documents_every_evaluation_and_clip_flag():
    import dataclasses
    import subprocess
    import sys
    from pathlib import Path

    from clip_diffusionlm.demo.clip_pretraining import CLIPPretrainingConfig
    from clip_diffusionlm.evaluation import EvaluationArguments

    result = subprocess.run([sys.executable, "-m", "clip_diffusionlm.cli", "evaluate", "--help"], capture_output=True,
                            text=True)
    examples = Path(__file__).resolve().parents[1] / "examples"
    clip_help = subprocess.run([sys.executable, str(examples / "pretrain_clip.py"), "--help"], capture_output=True,
                               text=True)
    for text, spec_class in ((result.stdout, EvaluationArguments), (clip_help.stdout, CLIPPretrainingConfig)):
        for spec in dataclasses.fields(spec_class):
            assert f"--{spec.name}" in text and spec.metadata.get("help"), spec.name
