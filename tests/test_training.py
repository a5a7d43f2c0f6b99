from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_training_config

from clip_diffusionlm import CLIPDiffusionCaptionPipeline
from clip_diffusionlm.training import (
    TrainingConfig,
    TrainingDivergedError,
    caption_pairs,
    lr_factor,
    train,
    training_config_from_args,
)

REPO = Path(__file__).resolve().parents[1]


def _history(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "loss_history.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("schedule", ["linear", "log", "cosine"])
def test_decaying_schedules_go_from_lr_to_lr_end(schedule):
    config = TrainingConfig(datasets=["x"], lr_schedule=schedule, learning_rate=1e-4, lr_end=5e-5)
    factors = [lr_factor(config, step, 100, 10) for step in range(101)]
    assert factors[0] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(factors, factors[1:]))
    if schedule == "log":  # faster than linear early on
        assert factors[25] < 1.0 - 0.5 * 0.25


def test_cosine_restarts_and_warmup():
    config = TrainingConfig(datasets=["x"], lr_schedule="cosine_restarts", lr_restart_epochs=2, warmup_steps=4)
    assert lr_factor(config, 0, 100, 5) == pytest.approx(0.25)
    assert lr_factor(config, 9, 100, 5) < 0.6
    assert lr_factor(config, 10, 100, 5) == pytest.approx(1.0)  # restarted after 2 epochs of 5 steps
    constant = TrainingConfig(datasets=["x"])
    assert {lr_factor(constant, step, 100, 5) for step in range(100)} == {1.0}


def test_config_validation_and_cli_parsing(tmp_path):
    with pytest.raises(ValueError, match="datasets"):
        TrainingConfig()
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainingConfig(datasets=["x"], lr_schedule="exponential")
    with pytest.raises(ValueError, match="fusion"):
        TrainingConfig(datasets=["x"], model_config={"fusion": "multiply"})
    with pytest.raises(ValueError, match="hub_model_id"):
        TrainingConfig(datasets=["x"], push_to_hub=True)
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({"datasets": ["a"], "learning_rate": 5e-4, "model_config": {"fusion": "add"}}))
    config = training_config_from_args(
        ["--config", str(config_file), "--learning_rate", "1e-3", "--datasets", "b", "c", "--ema_decay", "0.99"]
    )
    assert config.learning_rate == 1e-3 and config.datasets == ["b", "c"] and config.ema_decay == 0.99
    assert config.model_config == {"fusion": "add"}
    assert training_config_from_args(["--datasets", "a", "--captions_per_image", "1"]).captions_per_image == 1
    with pytest.raises(ValueError, match="captions_per_image"):
        TrainingConfig(datasets=["x"], captions_per_image=0)
    config_file.write_text(json.dumps({"datasets": ["a"], "learning_rat": 1}))
    with pytest.raises(ValueError, match="learning_rat"):
        training_config_from_args(["--config", str(config_file)])


def test_captions_per_image_keeps_the_first_references_of_each_image():
    from datasets import Dataset

    split = Dataset.from_dict({"captions": [["a", "b", "c"], ["d", "e"]]})
    captions, image_index = caption_pairs(split)
    assert captions == ["a", "b", "c", "d", "e"] and image_index.tolist() == [0, 0, 0, 1, 1]
    captions, image_index = caption_pairs(split, captions_per_image=1)
    assert captions == ["a", "d"] and image_index.tolist() == [0, 1]
    captions, image_index = caption_pairs(split, captions_per_image=2)
    assert captions == ["a", "b", "d", "e"] and image_index.tolist() == [0, 0, 1, 1]


def test_paper_configs_are_valid():
    configs = sorted((REPO / "examples" / "configs").glob("*.json"))
    assert len(configs) >= 15
    for path in configs:
        values = json.loads(path.read_text())
        assert "paper_reference" in values, path.name
        training_config_from_args(["--config", str(path), "--datasets", "somewhere"])


def test_single_process_run_saves_a_working_pipeline(training_assets, tmp_path):
    output_dir = train(tiny_training_config(
        training_assets, tmp_path / "run", validation_steps=3, ema_decay=0.9, timesteps_per_caption=2,
        restrict_rounding_vocabulary=True, report_to="tensorboard",
    ))
    history = _history(output_dir)
    assert [record["step"] for record in history] == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(record["loss"])) for record in history)
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert list((output_dir / "logs").rglob("events.out.tfevents*"))
    samples = [json.loads(line) for line in (output_dir / "validation_samples.jsonl").read_text().splitlines()]
    assert {sample["step"] for sample in samples} == {3, 6} and all("caption" in sample for sample in samples)
    card = (output_dir / "README.md").read_text()
    assert "model-index" in card and "CIDEr" in card and "image-to-text" in card

    pipe = CLIPDiffusionCaptionPipeline.from_pretrained(output_dir)
    pipe.set_progress_bar_config(disable=True)
    vocabulary = set(pipe.denoiser.config.rounding_vocabulary)
    ids = pipe(torch.rand(2, 3, 32, 32), output_type="token_ids", generator=torch.Generator().manual_seed(0)).captions
    assert set(ids.flatten().tolist()) <= vocabulary


def test_resume_after_sigkill_reproduces_the_uninterrupted_curve(training_assets, tmp_path):
    overrides = {"max_steps": 40, "checkpointing_steps": 5, "checkpoints_total_limit": 2}
    reference = train(tiny_training_config(training_assets, tmp_path / "reference", **overrides))

    config_file = tmp_path / "interrupted.json"
    config = tiny_training_config(training_assets, tmp_path / "interrupted", **overrides)
    config_file.write_text(json.dumps(config.__dict__))
    command = [sys.executable, str(REPO / "examples" / "train.py"), "--config", str(config_file)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (tmp_path / "interrupted" / "checkpoint-10").exists():
        assert process.poll() is None and time.monotonic() < deadline, "training ended before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "interrupted" / "model_index.json").exists()
    # A kill during a checkpoint write leaves only a temporary folder, which "latest" never picks.
    shutil.copytree(tmp_path / "interrupted" / "checkpoint-10", tmp_path / "interrupted" / ".tmp-checkpoint-99")

    resumed = train(tiny_training_config(
        training_assets, tmp_path / "interrupted", resume_from_checkpoint="latest", **overrides
    ))
    expected, got = _history(reference), _history(resumed)
    assert [r["step"] for r in got] == list(range(1, 41))
    for want, have in zip(expected, got):
        assert have["loss"] == pytest.approx(want["loss"], rel=1e-5), have["step"]
    assert len(list(resumed.glob("checkpoint-*"))) == 2


def test_sigterm_saves_a_checkpoint_and_exits(training_assets, tmp_path):
    config_file = tmp_path / "run.json"
    config = tiny_training_config(training_assets, tmp_path / "run", max_steps=100000, checkpointing_steps=0)
    config_file.write_text(json.dumps(config.__dict__))
    process = subprocess.Popen(
        [sys.executable, str(REPO / "examples" / "train.py"), "--config", str(config_file)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    history = tmp_path / "run" / "loss_history.jsonl"
    deadline = time.monotonic() + 120
    while not (history.exists() and history.read_text().count("\n") >= 3):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0, process.stderr.read()[-2000:]
    checkpoints = list((tmp_path / "run").glob("checkpoint-*"))
    assert len(checkpoints) == 1
    assert int(checkpoints[0].name.split("-")[1]) == len(_history(tmp_path / "run"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(training_assets, tmp_path):
    config = tiny_training_config(
        training_assets, tmp_path / "run", learning_rate=1e12, max_grad_norm=0.0, max_steps=50, checkpointing_steps=1,
        checkpoints_total_limit=None,
    )
    with pytest.raises(TrainingDivergedError, match="loss became"):
        train(config)
    history = _history(tmp_path / "run")
    last_checkpoint = max(int(p.name.split("-")[1]) for p in (tmp_path / "run").glob("checkpoint-*"))
    assert last_checkpoint == len(history)
    assert all(torch.isfinite(torch.tensor(record["loss"])) for record in history)


def test_bad_images_stop_before_training_or_are_skipped(training_assets, tmp_path):
    world = tmp_path / "world"
    shutil.copytree(training_assets["world"], world)
    metadata = [json.loads(line) for line in (world / "metadata.jsonl").read_text().splitlines()]
    (world / metadata[0]["file_name"]).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (world / "world.json").unlink()  # now a plain image folder with a corrupt file
    with pytest.raises(ValueError, match=metadata[0]["file_name"].split("/")[-1]):
        train(tiny_training_config(training_assets, tmp_path / "strict", datasets=[str(world)]))
    assert not (tmp_path / "strict" / "checkpoint-3").exists()
    output_dir = train(tiny_training_config(
        training_assets, tmp_path / "lenient", datasets=[str(world)], on_bad_input="skip", max_steps=2,
    ))
    assert (output_dir / "model_index.json").exists()


@pytest.mark.slow
def test_two_process_data_parallel_run(training_assets, tmp_path):
    config_file = tmp_path / "run.json"
    config = tiny_training_config(training_assets, tmp_path / "run", max_steps=4, checkpointing_steps=2)
    config_file.write_text(json.dumps(config.__dict__))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         str(REPO / "examples" / "train.py"), "--config", str(config_file)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    card = (tmp_path / "run" / "README.md").read_text()
    assert "× 2 process(es)" in card
    assert (tmp_path / "run" / "checkpoint-4" / "random_states_1.pkl").exists()
    pipe = CLIPDiffusionCaptionPipeline.from_pretrained(tmp_path / "run")
    pipe.set_progress_bar_config(disable=True)
    assert len(pipe(torch.rand(3, 3, 32, 32), generator=torch.Generator().manual_seed(0)).captions) == 3
