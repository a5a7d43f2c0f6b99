from __future__ import annotations

import dataclasses
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
from diffusers import DDPMScheduler

from clip_diffusionlm import CLIPDiffusionCaptionPipeline
from clip_diffusionlm.training import (
    TrainingConfig,
    TrainingDivergedError,
    build_optimizer_and_schedule,
    caption_pairs,
    train,
    training_config_from_args,
)

REPO = Path(__file__).resolve().parents[1]


def _history(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "loss_history.jsonl").read_text().splitlines()]


def _learning_rates(config, total_steps=100, steps_per_epoch=10):
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer, scheduler = build_optimizer_and_schedule(config, torch.nn.Linear(1, 1), total_steps, steps_per_epoch)
    rates = []
    for _ in range(total_steps + 1):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    del parameter
    return rates


@pytest.mark.parametrize("schedule", ["linear", "log", "cosine"])
def test_decaying_schedules_go_from_lr_to_lr_end(schedule):
    config = TrainingConfig(datasets=["x"], lr_schedule=schedule, learning_rate=1e-4, lr_end=5e-5)
    rates = _learning_rates(config)
    assert rates[0] == pytest.approx(1e-4) and rates[-1] == pytest.approx(5e-5)
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    linear_at_quarter = 1e-4 - 0.25 * 5e-5
    if schedule == "log":  # faster than linear early on
        assert rates[25] < linear_at_quarter - 5e-6
    if schedule == "linear":
        assert rates[25] == pytest.approx(linear_at_quarter)


def test_cosine_restarts_and_warmup():
    config = TrainingConfig(datasets=["x"], lr_schedule="cosine_restarts", lr_restart_epochs=2, warmup_steps=4)
    rates = _learning_rates(config, total_steps=100, steps_per_epoch=10)  # 5 cycles of 20 steps after warm-up
    assert rates[0] == 0.0 and rates[2] == pytest.approx(0.5e-4) and rates[4] == pytest.approx(1e-4)
    assert rates[22] < 0.1e-4 and rates[24] > 0.9e-4  # restarted
    assert set(_learning_rates(TrainingConfig(datasets=["x"]))) == {1e-4}


def test_adam_flags_reach_the_optimizer():
    config = training_config_from_args(["--datasets", "x", "--adam_beta1", "0.8", "--adam_beta2", "0.95",
                                        "--adam_epsilon", "1e-6", "--adam_weight_decay", "0.01"])
    optimizer, _ = build_optimizer_and_schedule(config, torch.nn.Linear(1, 1), total_steps=10, steps_per_epoch=10)
    (group,) = optimizer.param_groups
    assert group["betas"] == (0.8, 0.95) and group["eps"] == 1e-6 and group["weight_decay"] == 0.01


def test_config_validation_and_cli_parsing(tmp_path):
    with pytest.raises(ValueError, match="No training data"):
        TrainingConfig()
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainingConfig(datasets=["x"], lr_schedule="exponential")
    with pytest.raises(ValueError, match="fusion"):
        TrainingConfig(datasets=["x"], model_config={"fusion": "multiply"})
    with pytest.raises(ValueError, match="inference_scheduler.*'ddim', 'ddpm'"):
        TrainingConfig(datasets=["x"], inference_scheduler="euler")
    with pytest.raises(ValueError, match="hub_model_id"):
        TrainingConfig(datasets=["x"], push_to_hub=True)
    with pytest.raises(ValueError, match="rounding_transitions.*restrict_rounding_vocabulary"):
        TrainingConfig(datasets=["x"], model_config={"rounding_transitions": True})
    TrainingConfig(datasets=["x"], model_config={"rounding_transitions": True}, restrict_rounding_vocabulary=True)
    with pytest.raises(ValueError, match="time_warping.*mask_predict_prob"):
        TrainingConfig(datasets=["x"], weighting_scheme="time_warping", mask_predict_prob=0.5)
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
        restrict_rounding_vocabulary=True, report_to="tensorboard", inference_scheduler="ddpm",
        # A partial backbone_config overrides the pretrained backbone's keys; the CLIP features come from layer 1.
        model_config={"caption_length": 12, "backbone_config": {"hidden_dropout_prob": 0.0},
                      "image_features": "patches", "vision_feature_layer": 1,
                      "rounding_transitions": True, "image_transition_rank": 2},
    ))
    history = _history(output_dir)
    assert [record["step"] for record in history] == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(record["loss"])) for record in history)
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert list((output_dir / "logs").rglob("events.out.tfevents*"))
    samples = [json.loads(line) for line in (output_dir / "validation_samples.jsonl").read_text().splitlines()]
    steps = [sample["step"] for sample in samples]
    # The last step's validation also serves the model card: step 6 is validated once, not again after the loop.
    assert set(steps) == {3, 6} and steps.count(6) == steps.count(3) and all("caption" in s for s in samples)
    card = (output_dir / "README.md").read_text()
    assert "model-index" in card and "CIDEr" in card and "image-to-text" in card
    assert "linear-chain CRF, Viterbi), its transition scores read from the image (2 word pairs per image token)" in card

    pipe = CLIPDiffusionCaptionPipeline.from_pretrained(output_dir)
    pipe.set_progress_bar_config(disable=True)
    backbone_config = pipe.denoiser.config.backbone_config
    assert backbone_config["hidden_dropout_prob"] == 0.0 and backbone_config["attention_probs_dropout_prob"] == 0.1
    assert pipe.denoiser.config.vision_feature_layer == 1
    # Ancestral sampling from t = T-1: the trailing spacing the deterministic default has too.
    assert isinstance(pipe.scheduler, DDPMScheduler)
    pipe.scheduler.set_timesteps(5)
    assert pipe.scheduler.timesteps.tolist() == [999, 799, 599, 399, 199]
    vocabulary = set(pipe.denoiser.config.rounding_vocabulary)
    ids = pipe(torch.rand(2, 3, 32, 32), output_type="token_ids", generator=torch.Generator().manual_seed(0)).captions
    assert set(ids.flatten().tolist()) <= vocabulary
    # They start at zero: six steps of training moved them, and the saved pipeline kept them.
    assert pipe.denoiser.transition_scores.abs().sum() > 0
    assert pipe.denoiser.image_transition_right.weight.abs().sum() > 0


def test_step_distillation_trains_a_copy_of_a_saved_pipeline(training_assets, pipeline_from_assets, tmp_path):
    teacher = CLIPDiffusionCaptionPipeline.from_pretrained(pipeline_from_assets).denoiser
    output_dir = train(tiny_training_config(
        training_assets, tmp_path / "student", distill_from=str(pipeline_from_assets), model_config={},
        distillation_teacher_steps=2, max_steps=3, checkpointing_steps=0,
    ))
    assert all(record["restoring_loss"] > 0 for record in _history(output_dir))
    student = CLIPDiffusionCaptionPipeline.from_pretrained(output_dir).denoiser
    assert student.config.to_diff_dict() | {"_name_or_path": ""} == teacher.config.to_diff_dict() | {"_name_or_path": ""}
    changed = [name for name, weight in student.state_dict().items()
               if not torch.equal(weight, teacher.state_dict()[name])]
    assert changed and all(not name.startswith("backbone.embeddings.word") for name in changed)
    # Its card says what the steps were: a distillation of a model trained for the teacher's own steps.
    teacher_steps = json.loads((pipeline_from_assets / "training_results.json").read_text())["global_step"]
    card = " ".join((output_dir / "README.md").read_text().split())
    assert (f"These steps **step-distilled** a trained CLIP-DiffusionLM (`distill_from`, itself trained for "
            f"{teacher_steps} steps)") in card and "what 2 of its DDIM steps do" in card
    with pytest.raises(ValueError, match="`distill_from` trains a copy of a diffusion model"):
        tiny_training_config(training_assets, tmp_path / "bad", distill_from=str(pipeline_from_assets))


@pytest.mark.parametrize("option", ["draft_prob", "mask_predict_prob"])
def test_refinement_training_options_train_and_only_for_the_diffusion_objective(training_assets, pipeline_from_assets,
                                                                                tmp_path, option):
    output_dir = train(tiny_training_config(training_assets, tmp_path / "drafts", **{option: 0.5}, max_steps=2,
                                            checkpointing_steps=0))
    assert json.loads((output_dir / "training_config.json").read_text())[option] == 0.5
    assert all(record["restoring_loss"] > 0 for record in _history(output_dir))
    for bad, message in (({option: 1.5}, rf"`{option}` must be in \[0, 1\], got 1.5"),
                         ({option: 0.5, "model_type": "ar"}, f"`{option}` is a term of the diffusion objective"),
                         ({option: 0.5, "distill_from": str(pipeline_from_assets), "model_config": {}},
                          f"`{option}` is a term of the diffusion objective")):
        with pytest.raises(ValueError, match=message):
            tiny_training_config(training_assets, tmp_path / "bad", **bad)


def test_reference_selection_gives_each_caption_all_references_of_its_image(training_assets, pipeline_from_assets,
                                                                             tmp_path):
    from clip_diffusionlm.training import make_accelerator, prepare_data, tokenize_captions

    config = tiny_training_config(training_assets, tmp_path / "selection", reference_selection=True, max_steps=2,
                                  checkpointing_steps=0)
    data = prepare_data(config, make_accelerator(config))
    train_split = data.dataset["train"]
    for index in (0, len(data.train_set) - 1):
        item = data.train_set[index]
        captions = train_split[int(data.train_set.image_index[index])]["captions"]
        expected = tokenize_captions(data.tokenizer, captions, 12)
        assert any(torch.equal(item["input_ids"], row) for row in item["reference_ids"])
        assert {tuple(row.tolist()) for row in item["reference_ids"]} == {tuple(row.tolist()) for row in expected}
    output_dir = train(config)
    assert json.loads((output_dir / "training_config.json").read_text())["reference_selection"] is True
    card = " ".join((output_dir / "README.md").read_text().split())
    assert ("Each caption was trained towards whichever of its image's references the model's own prediction was "
            "closest to (`reference_selection`)") in card
    assert all(record["restoring_loss"] > 0 for record in _history(output_dir))
    for bad in ({"model_type": "ar"}, {"captions_per_image": 1},
                {"distill_from": str(pipeline_from_assets), "model_config": {}}):
        with pytest.raises(ValueError, match="`reference_selection` picks the target of the diffusion objective"):
            tiny_training_config(training_assets, tmp_path / "bad", reference_selection=True, **bad)


def test_caption_teacher_replaces_the_references_by_its_captions(training_assets, pipeline_from_assets, tmp_path):
    from clip_diffusionlm import CLIPARCaptionPipeline
    from clip_diffusionlm.training import make_accelerator, prepare_data, tokenize_captions

    teacher_dir = train(tiny_training_config(training_assets, tmp_path / "ar", model_type="ar", max_steps=2,
                                             checkpointing_steps=0, restrict_rounding_vocabulary=True))
    config = tiny_training_config(training_assets, tmp_path / "student", caption_teacher=str(teacher_dir),
                                  restrict_rounding_vocabulary=True)
    data = prepare_data(config, make_accelerator(config))
    teacher = CLIPARCaptionPipeline.from_pretrained(teacher_dir)
    train_split = data.dataset["train"]
    features = data.train_set.image_features
    # One pair per training image: the teacher's caption of it, where the references were several per image.
    assert len(data.train_set) == len(train_split) < sum(len(captions) for captions in train_split["captions"])
    expected = tokenize_captions(data.tokenizer, teacher(image_embeds=features).captions, 12)
    torch.testing.assert_close(data.train_set.input_ids, expected)
    # Under reference selection the teacher's caption is one more reference of its image.
    selecting = tiny_training_config(training_assets, tmp_path / "selecting", caption_teacher=str(teacher_dir),
                                     restrict_rounding_vocabulary=True, reference_selection=True)
    item = prepare_data(selecting, make_accelerator(selecting)).train_set[0]
    references = tokenize_captions(data.tokenizer, train_split[0]["captions"], 12)
    assert torch.equal(item["input_ids"], expected[0]) and torch.equal(item["reference_ids"][0], expected[0])
    assert torch.equal(item["reference_ids"][1:1 + len(references)], references)

    # `caption_teacher_kwargs` reach the teacher's call: its beam search, here different from its greedy captions.
    beams = tiny_training_config(training_assets, tmp_path / "beams", caption_teacher=str(teacher_dir),
                                 caption_teacher_kwargs='{"num_beams": 3}', restrict_rounding_vocabulary=True,
                                 max_steps=1, checkpointing_steps=0)
    expected_beams = tokenize_captions(data.tokenizer, teacher(image_embeds=features, num_beams=3).captions, 12)
    assert not torch.equal(expected_beams, expected)
    torch.testing.assert_close(prepare_data(beams, make_accelerator(beams)).train_set.input_ids, expected_beams)
    card = " ".join((train(beams) / "README.md").read_text().split())
    assert '(`caption_teacher`, called with `{"num_beams": 3}`, sequence-level knowledge distillation)' in card

    with pytest.raises(ValueError, match="leave `captions_per_image` unset"):
        tiny_training_config(training_assets, tmp_path / "bad", caption_teacher=str(teacher_dir), captions_per_image=1)
    with pytest.raises(ValueError, match=r"`caption_teacher_kwargs` \(\{'num_beams': 3\}\) are read only with a "):
        tiny_training_config(training_assets, tmp_path / "bad", caption_teacher_kwargs={"num_beams": 3})
    with pytest.raises(ValueError, match=r"may not set \['image_embeds', 'output_type'\]"):
        tiny_training_config(training_assets, tmp_path / "bad", caption_teacher=str(teacher_dir),
                             caption_teacher_kwargs={"output_type": "pt", "image_embeds": None})
    diffusion_teacher = tiny_training_config(training_assets, tmp_path / "typo", caption_teacher=str(pipeline_from_assets),
                                             caption_teacher_kwargs={"num_inference_step": 2})
    with pytest.raises(ValueError, match=r"names \['num_inference_step'\], which CLIPDiffusionCaptionPipeline does not "
                                         r"take; it takes \[.*'num_inference_steps'"):
        prepare_data(diffusion_teacher, make_accelerator(diffusion_teacher))
    patches = tiny_training_config(training_assets, tmp_path / "patches", caption_teacher=str(teacher_dir),
                                   model_config={"caption_length": 12, "image_features": "patches"})
    with pytest.raises(ValueError, match="it reads other features"):
        prepare_data(patches, make_accelerator(patches))


def test_train_uses_a_dataset_given_in_memory(training_assets, tmp_path):
    from datasets import DatasetDict
    from transformers import AutoTokenizer

    from clip_diffusionlm.data import load_caption_dataset

    world = load_caption_dataset(training_assets["world"])
    subset = DatasetDict({**world, "train": world["train"].select(range(2))})
    output_dir = train(tiny_training_config(
        training_assets, tmp_path / "run", max_steps=2, checkpointing_steps=0, restrict_rounding_vocabulary=True
    ), subset)
    # The rounding vocabulary is built from the training captions: those of the two given images, not the world's.
    tokenizer = AutoTokenizer.from_pretrained(training_assets["backbone"])
    captions, _ = caption_pairs(subset["train"])
    expected = sorted({token for ids in tokenizer(captions)["input_ids"] for token in ids}
                      | set(tokenizer.all_special_ids))
    assert json.loads((output_dir / "denoiser" / "config.json").read_text())["rounding_vocabulary"] == expected


def test_resume_after_sigkill_reproduces_the_uninterrupted_curve(training_assets, tmp_path):
    overrides = {"max_steps": 40, "checkpointing_steps": 5, "checkpoints_total_limit": 2}
    reference = train(tiny_training_config(training_assets, tmp_path / "reference", **overrides))

    config_file = tmp_path / "interrupted.json"
    config = tiny_training_config(training_assets, tmp_path / "interrupted", **overrides)
    config_file.write_text(json.dumps(config.__dict__))
    command = [sys.executable, str(REPO / "examples" / "train.py"), "--config", str(config_file)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while not (tmp_path / "interrupted" / "checkpoint-10").exists():
            assert process.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint-10 within two minutes"
            time.sleep(0.05)
    finally:  # also when the test fails: no training left running after it
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
    # `train()` raised `InterruptedCleanly`, so that a script calling it stops too; the command line says why.
    assert "interrupted: checkpoint saved" in process.stderr.read()
    assert not (tmp_path / "run" / "model_index.json").exists()
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
    assert "on 2 process(es)" in card
    assert (tmp_path / "run" / "checkpoint-4" / "random_states_1.pkl").exists()
    pipe = CLIPDiffusionCaptionPipeline.from_pretrained(tmp_path / "run")
    pipe.set_progress_bar_config(disable=True)
    assert len(pipe(torch.rand(3, 3, 32, 32), generator=torch.Generator().manual_seed(0)).captions) == 3


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        training_config_from_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for spec in dataclasses.fields(TrainingConfig):
        assert f"--{spec.name}" in text, spec.name
        assert spec.metadata.get("help"), spec.name
    for alias in ("--train_batch_size", "--lr_scheduler", "--lr_warmup_steps", "--max_train_steps"):
        assert alias in text
    assert training_config_from_args(["--datasets", "a", "--train_batch_size", "7"]).batch_size == 7


def test_yaml_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("datasets: [a]\nlearning_rate: 0.001\nmodel_config:\n  fusion: add\n")
    config = training_config_from_args(["--config", str(path), "--seed", "3"])
    assert config.learning_rate == 0.001 and config.model_config == {"fusion": "add"} and config.seed == 3


def test_accelerate_configuration_decides_mixed_precision(tmp_path):
    script = (
        "from clip_diffusionlm.training import TrainingConfig, make_accelerator;"
        f"print(make_accelerator(TrainingConfig(datasets=['x'], output_dir={str(tmp_path)!r})).mixed_precision)"
    )
    for environment, expected in (({"ACCELERATE_MIXED_PRECISION": "bf16"}, "bf16"), ({}, "no")):
        env = {key: value for key, value in os.environ.items() if key != "ACCELERATE_MIXED_PRECISION"}
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                env={**env, **environment})
        assert result.stdout.strip().splitlines()[-1] == expected, result.stderr[-2000:]


def test_validation_leaves_the_training_random_stream_alone(training_assets, tmp_path):
    overrides = {"max_steps": 6, "checkpointing_steps": 0}
    plain = _history(train(tiny_training_config(training_assets, tmp_path / "plain", **overrides)))
    validated = _history(train(tiny_training_config(
        training_assets, tmp_path / "validated", validation_steps=2, **overrides
    )))
    assert [r["loss"] for r in validated] == [r["loss"] for r in plain]
    assert (tmp_path / "validated" / "validation_samples.jsonl").exists()


def test_bf16_mixed_precision_and_gradient_checkpointing_train(training_assets, tmp_path):
    config = tiny_training_config(training_assets, tmp_path / "run", max_steps=3)
    config_file = tmp_path / "run.json"
    config_file.write_text(json.dumps(dataclasses.asdict(config)))
    model_config = {"caption_length": 12, "prediction_type": "previous_sample", "self_conditioning": True,
                    "condition_drop_prob": 0.2}
    # A fresh process: Accelerate fixes the precision of its process-wide state on first use.
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "train.py"), "--config", str(config_file), "--mixed_precision",
         "bf16", "--gradient_checkpointing", "--attn_implementation", "eager", "--model_config",
         json.dumps(model_config)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    history = _history(tmp_path / "run")
    assert len(history) == 3 and all(torch.isfinite(torch.tensor(record["loss"])) for record in history)
    pipe = CLIPDiffusionCaptionPipeline.from_pretrained(tmp_path / "run")
    assert pipe.denoiser.dtype == torch.float32  # mixed precision keeps float32 master weights
    assert pipe.denoiser.config.prediction_type == "previous_sample"


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@requires_cuda
def test_cuda_encoders_on_the_device_and_rng_stream(training_assets, tmp_path):
    from clip_diffusionlm.training import forked_rng, make_accelerator, prepare_data

    config = tiny_training_config(training_assets, tmp_path / "run", mixed_precision="bf16")
    accelerator = make_accelerator(config)
    data = prepare_data(config, accelerator)
    assert data.image_encoder.device.type == "cuda" and data.image_encoder.dtype == torch.bfloat16
    torch.cuda.manual_seed(123)
    expected = torch.randn(4, device="cuda")
    torch.cuda.manual_seed(123)
    with forked_rng(accelerator, seed=0):
        torch.randn(100, device="cuda")
    torch.testing.assert_close(torch.randn(4, device="cuda"), expected)
