"""The demo's code path end to end at toy size: world → CLIP pre-training → cached features → training → evaluation."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import transformers

from clip_diffusionlm.data import load_image_folder
from clip_diffusionlm.demo import STEP_DISTILLATION, DemoConfig, content_accuracy, run_demo
from clip_diffusionlm.demo.clip_pretraining import CLIPPretrainingConfig, zero_shot_retrieval
from clip_diffusionlm.demo.shapes_world import ShapesWorldConfig, contradicting_words
from clip_diffusionlm.metrics import compute_caption_metrics


def _tiny_demo(backbone) -> DemoConfig:
    demo_training = DemoConfig().training
    return DemoConfig(
        seed=3,
        num_train=24, num_validation=6, num_test=6, num_holdout=4,
        world=ShapesWorldConfig(image_size=32),
        clip=CLIPPretrainingConfig(image_size=32, patch_size=16, hidden_size=32, num_layers=1, projection_dim=16,
                                   epochs=1, batch_size=8, hard_negative_swaps=contradicting_words()),
        text_backbone=str(backbone),
        # The demo's own training choices (patch features, canonical captions, ...) at toy size.
        training={
            **demo_training,
            "model_config": {**demo_training["model_config"], "caption_length": 12},
            "batch_size": 8, "max_steps": 3, "warmup_steps": 0, "validation_steps": 0, "checkpointing_steps": 0,
            "report_to": "none",
        },
        distillation={**STEP_DISTILLATION, "max_steps": 2, "warmup_steps": 0},
        num_inference_steps=(2,),
    )


def test_demo_end_to_end_and_second_run_reuses_everything(training_assets, tmp_path, capfd):
    results = run_demo(tmp_path, _tiny_demo(training_assets["backbone"]))
    captured = capfd.readouterr()
    printed = captured.out
    assert "| split | steps | BLEU-4 | CIDEr |" in printed and "| holdout | 2 |" in printed
    # Quiet by default: the stages, the table, where things are and the time; no library chatter.
    assert [line for line in printed.splitlines() if line.startswith("== ")] == [
        "== 1/6 shapes world: 24 training images", "== 2/6 CLIP pre-training (contrastive, on the training split)",
        "== 3/6 CLIP-DiffusionLM training (features cached)", "== 4/6 step distillation into one step",
        "== 5/6 evaluation on the test and held-out-combination splits", "== 6/6 pictures",
    ]
    for chatter in ("Generating train split", "UNEXPECTED", "PTBTokenizer", "tokenized", "validation:"):
        assert chatter not in captured.out + captured.err, chatter
    # One progress bar per long stage: no library's loading or saving bars, no feature-cache or captioning bars.
    bars = set(re.findall(r"(?:^|\r)([^\r\n:]+?):\s+\d+%\|", captured.err, flags=re.MULTILINE))
    assert bars == {"CLIP pre-training", "training"}, bars
    assert transformers.utils.logging.is_progress_bar_enabled()  # restored afterwards
    world = load_image_folder(tmp_path / "shapes")
    for split in ("test", "holdout"):
        # The reported figures are those of the captions the demo wrote.
        (row,) = results[split]
        records = [json.loads(line) for line in (tmp_path / "evaluation" / split / "predictions.jsonl").read_text().splitlines()]
        first = [record["captions"][0] for record in records]
        assert row["CIDEr"] == pytest.approx(compute_caption_metrics(first, world[split]["captions"])["CIDEr"])
        assert row["object_accuracy"] == pytest.approx(
            content_accuracy(first, world[split]["objects"])["object_accuracy"]
        )
    assert results["clip_retrieval"] == zero_shot_retrieval(tmp_path / "clip", world["test"])
    # One seed for every stage.
    assert json.loads((tmp_path / "clip" / "pretraining_config.json").read_text())["seed"] == 3
    assert json.loads((tmp_path / "teacher" / "training_config.json").read_text())["seed"] == 3
    # The saved pipeline is the trained model distilled, with the demo's distillation options.
    saved = json.loads((tmp_path / "pipeline" / "training_config.json").read_text())
    assert saved["distill_from"] == str(tmp_path / "teacher") and saved["seed"] == 3
    assert saved["weighting_scheme"] == STEP_DISTILLATION["weighting_scheme"] and saved["max_steps"] == 2
    assert len(results["denoising"]) == 10  # the caption after each of the figure's denoising steps
    for name in ("captions.png", "denoising.png", "loss_curve.png", "results.json", "pipeline/model_index.json",
                 "evaluation/test/metrics.md", "evaluation/holdout/predictions.jsonl"):
        assert (tmp_path / name).is_file(), name

    produced = {
        path: path.stat().st_mtime_ns
        for pattern in ("clip/model.safetensors", "teacher/denoiser/model.safetensors",
                        "pipeline/denoiser/model.safetensors", "shapes/images/*.png",
                        "feature_cache/**/*.safetensors")
        for path in tmp_path.glob(pattern)
    }
    again = run_demo(tmp_path, _tiny_demo(training_assets["backbone"]))
    assert "Reusing the trained pipeline" in capfd.readouterr().out
    assert {path: path.stat().st_mtime_ns for path in produced} == produced
    assert again["test"][0]["CIDEr"] == results["test"][0]["CIDEr"]
    assert json.loads((tmp_path / "results.json").read_text())["test"][0]["num_inference_steps"] == 2


def test_demo_by_default_saves_the_trained_model_without_distilling(training_assets, tmp_path, capfd):
    assert DemoConfig().distillation is None
    run_demo(tmp_path, dataclasses.replace(_tiny_demo(training_assets["backbone"]), distillation=None))
    stages = [line for line in capfd.readouterr().out.splitlines() if line.startswith("== ")]
    assert stages == [
        "== 1/5 shapes world: 24 training images", "== 2/5 CLIP pre-training (contrastive, on the training split)",
        "== 3/5 CLIP-DiffusionLM training (features cached)",
        "== 4/5 evaluation on the test and held-out-combination splits", "== 5/5 pictures",
    ]
    assert not (tmp_path / "teacher").exists()
    saved = json.loads((tmp_path / "pipeline" / "training_config.json").read_text())
    assert saved["distill_from"] is None and saved["max_steps"] == 3


def test_attribute_probe_is_perfect_against_itself(training_assets):
    from clip_diffusionlm.data import load_image_folder
    from clip_diffusionlm.demo.clip_pretraining import attribute_probe

    world = load_image_folder(training_assets["world"])
    assert attribute_probe(training_assets["clip"], world["train"], world["train"]) == {
        "same_colours": 1.0, "same_shapes": 1.0, "same_objects": 1.0
    }


def test_caption_errors_mark_the_differing_words():
    from clip_diffusionlm.demo.run import caption_errors

    wrong, missed = caption_errors("a red square and a red square", "a red square and a blue circle")
    assert wrong == {5, 6} and missed == {5, 6}
    assert caption_errors("an red circle", "a red circle") == ({0}, {0})
    assert caption_errors("a red circle", "a red circle") == (set(), set())
