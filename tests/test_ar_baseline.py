"""The autoregressive baseline: trained by the same loop, saved and reloaded, generating with transformers' KV cache."""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    CONDITION_DIM,
    tiny_backbone_config,
    tiny_image_encoder,
    tiny_image_processor,
    tiny_training_config,
)
from transformers import BertModel

from clip_diffusionlm import CLIPARCaptionPipeline, CLIPCaptionerARConfig, CLIPCaptionerARForCausalLM, captioner_loss
from clip_diffusionlm.pipelines.captioning_utils import decode_captions

REPO = Path(__file__).resolve().parents[1]


def tiny_captioner(tokenizer, **config_kwargs) -> CLIPCaptionerARForCausalLM:
    config = CLIPCaptionerARConfig(
        condition_dim=CONDITION_DIM, backbone_config=tiny_backbone_config(tokenizer), caption_length=8,
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id,
        **config_kwargs,
    )
    torch.manual_seed(0)
    return CLIPCaptionerARForCausalLM(config).eval()


def sharpen(captioner: CLIPCaptionerARForCausalLM, factor: float = 10.0) -> CLIPCaptionerARForCausalLM:
    """Scales the random weights up so that the prefix steers the captions (at BERT's initial scale every image gets
    the same caption, and a lost prefix would go unnoticed)."""
    with torch.no_grad():
        for parameter in [*captioner.backbone.encoder.parameters(), captioner.image_projection.linear_2.weight]:
            if parameter.ndim == 2:
                parameter.mul_(factor)
    return captioner


def argmax_loop(model, image_embeds, max_length):
    """Greedy decoding written out: the whole sequence through the model at every step, no cache."""
    config = model.config
    ids = torch.full((len(image_embeds), 1), config.bos_token_id)
    finished = torch.zeros(len(image_embeds), dtype=torch.bool)
    with torch.no_grad():
        while ids.shape[1] < max_length and not finished.all():
            logits = model(ids, image_embeds, use_cache=False).logits[:, -1]
            next_ids = torch.where(finished, config.pad_token_id, logits.argmax(dim=-1))
            ids = torch.cat([ids, next_ids[:, None]], dim=1)
            finished |= next_ids == config.eos_token_id
    return ids


@pytest.fixture(scope="module")
def trained_ar(training_assets, tmp_path_factory):
    """Two steps of `examples/train.py --model_type ar` on the tiny shapes world."""
    output_dir = tmp_path_factory.mktemp("ar") / "run"
    config = tiny_training_config(training_assets, output_dir, max_steps=2, learning_rate=1e-2)
    config_file = output_dir.parent / "config.json"
    config_file.write_text(json.dumps(config.__dict__))
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "train.py"), "--config", str(config_file), "--model_type", "ar",
         "--restrict_rounding_vocabulary", "true"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


def test_trains_through_the_training_script_and_reloads(trained_ar, training_assets):
    history = [json.loads(line) for line in (trained_ar / "loss_history.jsonl").read_text().splitlines()]
    assert [record["step"] for record in history] == [1, 2]
    assert all(set(record) == {"step", "loss", "lr", "seconds"} for record in history)
    assert history[1]["loss"] < history[0]["loss"]  # the second step's batch, after one update at a high rate
    assert json.loads((trained_ar / "training_config.json").read_text())["model_type"] == "ar"
    assert list((trained_ar / "captioner").glob("*.safetensors"))

    pipe = CLIPARCaptionPipeline.from_pretrained(trained_ar)
    captioner = pipe.captioner
    assert isinstance(captioner, CLIPCaptionerARForCausalLM)
    assert captioner.config.caption_length == 12 and captioner.backbone.config.is_decoder
    # The word embeddings (input and tied head) stay the pretrained backbone's, as the denoiser's do.
    backbone = BertModel.from_pretrained(training_assets["backbone"])
    assert torch.equal(captioner.get_input_embeddings().weight, backbone.get_input_embeddings().weight)
    assert not torch.equal(captioner.backbone.encoder.layer[0].output.dense.weight,
                           backbone.encoder.layer[0].output.dense.weight)
    vocabulary = set(captioner.config.rounding_vocabulary)
    ids = pipe(torch.rand(3, 3, 32, 32), output_type="token_ids").captions
    assert set(ids.flatten().tolist()) <= vocabulary and ids.shape[1] <= 12
    assert all(isinstance(caption, str) for caption in pipe(torch.rand(2, 3, 32, 32), num_beams=3).captions)


def test_save_and_reload_give_equal_outputs(tokenizer, tmp_path):
    captioner = tiny_captioner(tokenizer, rounding_vocabulary=list(range(tokenizer.vocab_size))[::2] + [3])
    pipe = CLIPARCaptionPipeline(captioner, tiny_image_encoder(), tiny_image_processor(), tokenizer)
    images = torch.rand(2, 3, 32, 32)
    image_embeds = torch.randn(4, CONDITION_DIM)
    ids = tokenizer(["a red circle", "two shapes", "a star", "the blue square"], return_tensors="pt",
                    padding="max_length", max_length=8).input_ids
    expected_logits = captioner(ids, image_embeds, use_cache=False).logits
    expected = pipe(images, output_type="token_ids").captions
    pipe.save_pretrained(tmp_path / "pipe")
    assert not list((tmp_path / "pipe").rglob("*.bin"))

    reloaded = CLIPARCaptionPipeline.from_pretrained(tmp_path / "pipe")
    assert torch.equal(reloaded.captioner.rounding_token_ids, captioner.rounding_token_ids)
    torch.testing.assert_close(reloaded.captioner(ids, image_embeds, use_cache=False).logits, expected_logits)
    assert torch.equal(reloaded(images, output_type="token_ids").captions, expected)


@pytest.mark.parametrize("image_features", ["pooled", "patches"])
@pytest.mark.parametrize("restricted", [False, True])
def test_greedy_generate_equals_an_argmax_loop_without_cache(tokenizer, image_features, restricted):
    vocabulary = [0, 1, 2, 3, 5, 6, 8, 13, 14, 16, 17, 18] if restricted else None
    captioner = tiny_captioner(tokenizer, image_features=image_features, patch_dim=24, rounding_vocabulary=vocabulary)
    torch.manual_seed(1)
    image_embeds = torch.randn(5, 4, 24) if image_features == "patches" else torch.randn(5, CONDITION_DIM)
    sharpen(captioner)
    generated = captioner.generate(image_embeds=image_embeds, do_sample=False, num_beams=1)
    expected = argmax_loop(captioner, image_embeds, captioner.config.caption_length)
    assert torch.equal(generated, expected)
    assert len({tuple(row) for row in generated.tolist()}) > 1  # the prefix matters at every step
    if restricted:
        assert set(generated.flatten().tolist()) <= set(vocabulary)


def test_beam_search_returns_valid_captions(tokenizer):
    vocabulary = [0, 1, 2, 3, 5, 6, 8, 13, 14, 16, 17, 18]
    captioner = sharpen(tiny_captioner(tokenizer, rounding_vocabulary=vocabulary))
    image_embeds = torch.randn(4, CONDITION_DIM)
    beams = captioner.generate(image_embeds=image_embeds, num_beams=3, num_return_sequences=3, do_sample=False,
                               output_scores=True, return_dict_in_generate=True)
    sequences = beams.sequences.view(4, 3, -1)
    assert (sequences[..., 0] == tokenizer.cls_token_id).all()
    assert set(sequences.flatten().tolist()) <= set(vocabulary)
    # Beams come best first, and the best beam scores at least as well as greedy decoding under the same length
    # normalisation.
    scores = beams.sequences_scores.view(4, 3)
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    assert all(len(set(map(tuple, image_beams.tolist()))) == 3 for image_beams in sequences)  # distinct beams
    # The pipeline returns each image's best beam, which differs from greedy decoding somewhere.
    pipe = CLIPARCaptionPipeline(captioner, tiny_image_encoder(), tiny_image_processor(), tokenizer)
    captions = pipe(image_embeds=image_embeds, num_beams=3).captions
    assert captions == decode_captions(tokenizer, sequences[:, 0])
    assert captions != pipe(image_embeds=image_embeds).captions
    assert all(isinstance(caption, str) and "[" not in caption for caption in captions)


def test_loss_scores_caption_tokens_and_ignores_padding(tokenizer):
    captioner = tiny_captioner(tokenizer)
    image_embeds = torch.randn(2, CONDITION_DIM)
    ids = tokenizer(["a red circle", "two shapes"], return_tensors="pt", padding="max_length", max_length=8).input_ids
    loss = captioner_loss(captioner, ids, image_embeds).loss
    logits = captioner(ids, image_embeds, use_cache=False).logits[:, :-1]
    targets = ids[:, 1:]
    keep = targets != tokenizer.pad_token_id
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, expected)


def run_tiny_benchmark(script: str, tmp_path: Path, work_dir: str, *arguments: str, result_name: str | None = None
                       ) -> dict:
    """Runs `benchmarks/<script>.py --tiny` in a subprocess, as a user would, and returns its JSON results (those of
    `result_name`, by default the script's name)."""
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / f"{script}.py"), "--tiny", "--work_dir", str(tmp_path / work_dir),
         "--output_dir", str(tmp_path / "results"), *arguments],
        capture_output=True, text=True, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((tmp_path / "results" / f"{result_name or script}_tiny.json").read_text())


def test_speed_quality_benchmark_tiny_mode_writes_its_results(tmp_path):
    results = run_tiny_benchmark("caption_speed_quality", tmp_path, "work", "--training_seeds", "0", "1")
    assert (tmp_path / "results" / "caption_speed_quality_tiny.png").stat().st_size > 0
    assert "| AR beam 3 |" in (tmp_path / "results" / "caption_speed_quality_tiny.md").read_text()
    names = [row["name"] for row in results["settings"]]
    # Rows name the scheduler that runs them (the tiny pipeline was saved with DDIM); the first is the pipeline's
    # defaults, the recommended setting.
    assert names[0] == "recommended: DDIM 1 step (the pipeline's defaults)" and results["settings"][0]["kwargs"] == {}
    assert {f"DDIM {steps} steps" for steps in (2, 3, 5, 10)} <= set(names)
    assert {"AR greedy", "AR beam 3", "DDIM 2 steps, clamped", "DDIM 1 step, guidance 2"} <= set(names)
    for row in results["settings"]:
        assert set(row["speed"]) == {"1", "16", "64"}
        assert all(speed["captions_per_s"] > 0 and speed["p90_s"] >= speed["median_s"] for speed in row["speed"].values())
        assert {"CIDEr", "BLEU-4", "object_accuracy", "malformed", "worst"} <= set(row)
        # Two training seeds, three sampling seeds each for diffusion, one greedy decode each for AR.
        expected_runs = {(t, s) for t in (0, 1) for s in ((0, 1, 2) if row["family"] == "diffusion" else (0,))}
        assert {(run["training_seed"], run["sampling_seed"]) for run in row["runs"]} == expected_runs
        assert row["worst"]["object_accuracy"] == min(run["object_accuracy"] for run in row["runs"])
    assert {(row["caption_length"], row["batch_size"]) for row in results["length_scaling"]} == {
        (length, batch) for length in (16, 32, 64) for batch in (1, 16, 64)
    }
    flops = results["flops"]
    assert flops["denoiser_forward_flops_batch64"] > 0 and 0 < flops["fraction_of_matmul_peak"]
    per_caption = flops["flops_per_caption"]
    # Five denoising steps cost about five times one; beam 3 about three times greedy.
    assert 4 < per_caption["diffusion 5 step(s)"] / per_caption["diffusion 1 step(s)"] < 6
    assert per_caption["AR beam 3"] > 2 * per_caption["AR greedy"]
    assert {"object_accuracy", "exact_match", "malformed", "speed_batch1", "speed_batch64"} <= set(results["targets"])
    # The speed targets come from alternating rounds of the two settings, not from the rows timed minutes apart.
    for batch_size in ("1", "64"):
        rounds = results["head_to_head"][batch_size]["ratios"]
        assert len(rounds) == 7 and results["targets"][f"speed_batch{batch_size}"]["ratio"] == sorted(rounds)[3]
    full_vocabulary = [row for row in results["speedups"] if row["switch"].startswith("full vocabulary")]
    assert full_vocabulary and all(isinstance(row["captions_per_s"], float) for row in full_vocabulary)
    assert results["command"].endswith("--output_dir " + str(tmp_path / "results") + " --training_seeds 0 1")


def test_malformed_captions_are_those_outside_the_canonical_grammar():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from caption_speed_quality import is_malformed

    assert not is_malformed("a red circle")
    assert not is_malformed("an orange star, a blue square and a black cross")
    assert is_malformed("an pink cross")  # article disagreement
    assert is_malformed("a orange star")
    assert is_malformed("a red circle and a blue")  # missing word
    assert is_malformed("a red circle a blue square")  # missing "and"


def test_a_saved_model_is_reused_when_the_fields_added_since_are_at_their_defaults(training_assets, tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    from caption_speed_quality import what_trains

    from clip_diffusionlm.training import TrainingConfig

    config = dataclasses.asdict(tiny_training_config(training_assets, tmp_path / "run"))
    # A record written before `reference_selection` (a plain default) and `caption_teacher_kwargs` (a dict's) existed.
    recorded = {name: value for name, value in config.items()
                if name not in ("reference_selection", "caption_teacher_kwargs")}
    assert what_trains(recorded) == what_trains(config)
    assert what_trains(recorded) != what_trains({**config, "caption_teacher_kwargs": {"num_beams": 3}})
    assert {spec.name for spec in dataclasses.fields(TrainingConfig)} == set(what_trains(recorded))


def test_harder_world_benchmark_tiny_mode_writes_its_results(tmp_path):
    results = run_tiny_benchmark("harder_world", tmp_path, "work", "--training_seeds", "0", "1")
    assert (tmp_path / "results" / "harder_world_tiny.png").stat().st_size > 0
    assert "| AR greedy |" in (tmp_path / "results" / "harder_world_tiny.md").read_text()
    # Both families trained on all five references of the harder world, with the same recipe.
    assert results["recipe"]["captions_per_image"] is None
    world = json.loads(Path(results["recipe"]["datasets"][0], "world.json").read_text())
    assert world["config"]["caption_style"] == "scene" and world["config"]["max_objects"] == 4
    rows = {row["name"]: row for row in results["settings"]}
    assert list(rows) == ["no teacher: DDIM 1 step (the pipeline's defaults)", "no teacher: DDIM 2 steps",
                          "AR teacher: DDIM 1 step (the pipeline's defaults)", "AR teacher: DDIM 2 steps",
                          "AR greedy", "AR beam 3"]
    # The recommended recipes: without a teacher, selecting among the references; with the AR twin as teacher, on its
    # beam-3 captions (and its card says so); both with the image's chain transitions.
    folders = results["models"]["0"]
    assert {name: Path(folder).name for name, folder in folders.items()} == {
        "no teacher": "references_selection_image_transitions", "AR teacher": "kd_beam_image_transitions", "ar": "ar"}
    selecting, distilled = (json.loads(Path(folders[name], "training_config.json").read_text())
                            for name in ("no teacher", "AR teacher"))
    assert selecting["reference_selection"] and selecting["caption_teacher"] is None
    assert distilled["caption_teacher"] == folders["ar"] and not distilled["reference_selection"]
    assert distilled["caption_teacher_kwargs"] == {"num_beams": 3}
    assert '(`caption_teacher`, called with `{"num_beams": 3}`, sequence-level knowledge distillation)' in " ".join(
        Path(folders["AR teacher"], "README.md").read_text().split())
    # Every option of the recipe reaches the models (the tiny recipe has the demo's gate and chain rounding).
    for name in ("no teacher", "AR teacher"):
        model_config = json.loads(Path(folders[name], "denoiser", "config.json").read_text())
        assert model_config["gate_noisy_input"] and model_config["rounding_transitions"]
        assert model_config["image_transition_rank"] == 4
    for row in rows.values():
        assert {"object_accuracy", "count_accuracy", "relation_accuracy", "fully_correct", "CIDEr"} <= set(row)
        assert row["worst"]["fully_correct"] == min(run["fully_correct"] for run in row["runs"])
        assert {(run["training_seed"], run["sampling_seed"]) for run in row["runs"]} == {
            (t, s) for t in (0, 1) for s in ((0, 1, 2) if row["family"] == "diffusion" else (0,))}
        assert all(row["speed"][batch]["captions_per_s"] > 0 for batch in ("1", "64"))
    goal = results["targets"]
    assert rows[goal["setting"]]["passes"] <= 2
    # The speed targets come from the rounds that alternate the best row with AR greedy.
    for batch in ("1", "64"):
        rounds = results["head_to_head"][batch]
        assert goal[f"speed_batch{batch}"]["ratio"] == rounds["median_ratio"] == statistics.median(rounds["ratios"])
    assert {"object_accuracy", "relation_accuracy", "count_accuracy", "CIDEr", "speed_batch1"} <= set(goal)


def test_harder_world_relation_target_needs_relations_stated_as_often_as_the_ar():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from harder_world import CONTENT_METRICS, targets

    def row(name, family, relation_accuracy, relations_per_caption):
        scores = {name: 0.5 for name in CONTENT_METRICS} | {"relation_accuracy": relation_accuracy}
        return {"name": name, "family": family, "passes": 1, "CIDEr": 1.0, "fully_correct": 0.5,
                "relations_per_caption": relations_per_caption, "worst": scores,
                "speed": {1: {"captions_per_s": 1.0}, 64: {"captions_per_s": 1.0}}}

    rows = [row("silent", "diffusion", 1.0, 0.0), row("talkative", "diffusion", 0.6, 0.5),
            row("AR greedy", "ar", 0.4, 0.4)]
    checked = targets(rows)["all"]
    assert not checked["silent"]["relation_accuracy"]["met"]  # right in every relation it states: none
    assert checked["talkative"]["relation_accuracy"]["met"]
    assert targets(rows)["setting"] == "talkative"


def test_harder_world_malformed_captions():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from harder_world import is_malformed

    assert not is_malformed("two green triangles and a red circle")
    assert not is_malformed("a blue square is to the right of a red circle, with an orange star")
    assert is_malformed("an pink cross")
    assert is_malformed("a red red circle")
    assert is_malformed("a red circle to the left of")  # cut off
    assert is_malformed("there are")


def test_step_distillation_benchmark_tiny_mode(tmp_path):
    results = run_tiny_benchmark("step_distillation", tmp_path, "w")
    names = [row["name"] for row in results["settings"]]
    assert names == ["teacher, DDIM 1 step(s)", "teacher, DDIM 2 step(s)", "step-distilled student, DDPM 1 step(s)",
                     "step-distilled student, DDPM 2 step(s)"]
    assert all(len(row["runs"]) == 3 and row["worst"]["malformed"] == max(r["malformed"] for r in row["runs"])
               for row in results["settings"])
    student = json.loads((tmp_path / "w" / "distilled_seed0" / "pipeline" / "training_config.json").read_text())
    assert student["distill_from"] == results["teachers"][0] and student["model_config"] == {}


def test_refinement_benchmark_tiny_mode(tmp_path):
    results = run_tiny_benchmark("refinement", tmp_path, "w")
    rows = {row["name"]: row for row in results["settings"]}
    assert rows["on AR's captions, draft_prob: 1 step + refinement of every word at t = 600"]["kwargs"] == {
        "num_refinement_steps": 1, "refinement_timestep": 600}
    assert rows["on AR's captions, mask_predict_prob: 1 step + refinement of the least sure 25% at t = 999"][
        "kwargs"] == {"num_refinement_steps": 1, "refinement_timestep": 999, "refinement_ratio": 0.25}
    assert len(rows) == 12 and all(len(row["runs"]) == 3 for row in rows.values())
    # The second and third models are the first's recipe (on the AR twin's captions) with one option more.
    plain, drafts, masks = (json.loads(Path(results["models"]["0"][name], "training_config.json").read_text())
                            for name in ("on AR's captions", "on AR's captions, draft_prob",
                                         "on AR's captions, mask_predict_prob"))
    assert drafts["draft_prob"] == 0.5 and plain.get("draft_prob", 0.0) == 0.0 == masks["draft_prob"]
    assert masks["mask_predict_prob"] == 0.5 and drafts["mask_predict_prob"] == 0.0
    assert drafts["caption_teacher"] == plain["caption_teacher"] == masks["caption_teacher"] == str(
        tmp_path / "w" / "seed0" / "ar")


def test_training_budget_benchmark_tiny_mode(tmp_path):
    results = run_tiny_benchmark("training_budget", tmp_path, "w")
    budget = results["budget_steps"]
    rows = results["settings"]
    assert [(row["family"], row["budget_multiple"]) for row in rows] == [
        ("diffusion", 1), ("diffusion", 2), ("diffusion", 4), ("ar", 0.125), ("ar", 0.25), ("ar", 0.5), ("ar", 1)]
    teacher = str(tmp_path / "w" / "seed0" / "ar")
    for row in rows:
        # Each model trained for its multiple of the budget, the cosine schedule stretched to it.
        config = json.loads(Path(row["folder"], "training_config.json").read_text())
        assert row["steps"] == config["max_steps"] == max(1, round(budget * row["budget_multiple"]))
        assert len(row["runs"]) == (3 if row["family"] == "diffusion" else 1)
        # Every diffusion model learns from the same teacher, the 1x AR twin, which is harder_world.py's.
        if row["family"] == "diffusion":
            assert config["caption_teacher"] == teacher
    assert rows[0]["folder"] == str(tmp_path / "w" / "seed0" / "distilled") and rows[-1]["folder"] == teacher
    table = (tmp_path / "results" / "training_budget_tiny.md").read_text()
    assert f"| diffusion on AR's captions, {4 * budget} steps (4x) | {4 * budget} |" in table


def test_reference_selection_benchmark_tiny_mode(tmp_path):
    results = run_tiny_benchmark("reference_selection", tmp_path, "w")
    rows = {row["name"]: row for row in results["settings"]}
    assert len(rows) == 9 and rows["AR greedy"]["passes"] is None and len(rows["AR greedy"]["runs"]) == 1
    assert rows["references, reference selection: 2 steps"]["kwargs"] == {"num_inference_steps": 2}
    configs = {name: json.loads(Path(folder, "training_config.json").read_text())
               for name, folder in results["models"]["0"].items()}
    teacher = str(tmp_path / "w" / "seed0" / "ar")
    # harder_world.py's two models, and each again with reference selection, the teacher's caption one reference more.
    assert results["models"]["0"]["references"] == str(tmp_path / "w" / "seed0" / "diffusion")
    assert results["models"]["0"]["on AR's captions"] == str(tmp_path / "w" / "seed0" / "distilled")
    for plain, selecting in (("references", "references, reference selection"),
                             ("on AR's captions", "AR's caption and the references, reference selection")):
        assert not configs[plain]["reference_selection"] and configs[selecting]["reference_selection"]
        assert configs[plain]["caption_teacher"] == configs[selecting]["caption_teacher"]
    assert configs["on AR's captions"]["caption_teacher"] == teacher and configs["references"]["caption_teacher"] is None
    table = (tmp_path / "results" / "reference_selection_tiny.md").read_text()
    assert "| AR's caption and the references, reference selection: 1 step | 1 |" in table


def test_image_transitions_benchmark_tiny_mode(tmp_path):
    results = run_tiny_benchmark("image_transitions", tmp_path, "w")
    rows = {row["name"]: row for row in results["settings"]}
    assert len(rows) == 11 and all(len(row["runs"]) == 3 for name, row in rows.items() if name != "AR greedy")
    configs = {name: json.loads(Path(folder, "training_config.json").read_text())
               for name, folder in results["models"]["0"].items()}
    # harder_world.py's two models, and each again with the image term added to the recipe's model_config.
    assert results["models"]["0"]["on AR's captions"] == str(tmp_path / "w" / "seed0" / "distilled")
    for plain, reading in (("references", "references, image transitions"),
                           ("on AR's captions", "on AR's captions, image transitions")):
        assert configs[reading]["model_config"] == {**configs[plain]["model_config"], "image_transition_rank": 4}
        assert configs[plain]["caption_teacher"] == configs[reading]["caption_teacher"]
    both = configs["references, reference selection, image transitions"]
    assert both["reference_selection"] and not configs["references, image transitions"]["reference_selection"]
    assert both["model_config"] == configs["references, image transitions"]["model_config"]
    # The one-step rows of both models on the AR's captions timed against AR greedy, round by round.
    assert set(results["head_to_head"]) == {"on AR's captions: 1 step", "on AR's captions, image transitions: 1 step"}
    for rounds in results["head_to_head"].values():
        assert set(rounds) == {"1", "64"} and all(len(speeds["ratios"]) == len(speeds["captions_per_s"]) > 0
                                                  for speeds in rounds.values())
    table = (tmp_path / "results" / "image_transitions_tiny.md").read_text()
    assert "| on AR's captions, image transitions: 1 step | 1 |" in table and "- on AR's captions: 1 step — batch 1" in table


def test_length_bonus_benchmark_tiny_mode_chooses_on_the_validation_split(tmp_path):
    results = run_tiny_benchmark("length_bonus", tmp_path, "w", "--split", "validation",
                                 result_name="length_bonus_validation")
    assert results["split"] == "validation" and "head_to_head" not in results
    rows = {row["name"]: row for row in results["settings"]}
    assert len(rows) == 4 * 5 + 1 and all(len(row["runs"]) == 3 for row in rows.values() if row["family"] == "diffusion")
    bonuses = {name.split(": ")[-1]: row["kwargs"]["length_bonus"]
               for name, row in rows.items() if name.startswith("references: ")}
    assert bonuses == {"1 step, length_bonus=0": 0.0, "1 step, length_bonus=0.5": 0.5,
                       "1 step, length_bonus=1 (the default)": 1.0, "1 step, length_bonus=1.5": 1.5,
                       "1 step, length_bonus=2": 2.0}
    # The plain recipe's models and harder_world.py's, in their folders.
    assert results["models"]["0"]["references"] == str(tmp_path / "w" / "seed0" / "diffusion")
    assert results["models"]["0"]["AR teacher (image transitions)"] == str(tmp_path / "w" / "seed0" / "kd_image_transitions")
    table = (tmp_path / "results" / "length_bonus_validation_tiny.md").read_text()
    assert f"{results['num_images']} validation images of the harder world" in table


def test_teacher_decoding_benchmark_tiny_mode(tmp_path):
    results = run_tiny_benchmark("teacher_decoding", tmp_path, "w")
    rows = {row["name"]: row for row in results["settings"]}
    assert list(rows) == ["no teacher: 1 step (the pipeline's defaults)",
                          "AR teacher, greedy captions: 1 step (the pipeline's defaults)",
                          "AR teacher, beam-3 captions: 1 step (the pipeline's defaults)", "AR greedy", "AR beam 3"]
    assert rows["AR beam 3"]["kwargs"] == {"num_beams": 3} and "head_to_head" not in results
    configs = {name: json.loads(Path(folder, "training_config.json").read_text())
               for name, folder in results["models"]["0"].items()}
    # harder_world.py's two models, and the AR-teacher recipe again on the twin's beam-3 captions.
    assert results["models"]["0"]["AR teacher, greedy captions"] == str(tmp_path / "w" / "seed0" / "kd_image_transitions")
    greedy, beams = configs["AR teacher, greedy captions"], configs["AR teacher, beam-3 captions"]
    assert greedy["caption_teacher"] == beams["caption_teacher"] == str(tmp_path / "w" / "seed0" / "ar")
    assert greedy["caption_teacher_kwargs"] == {} and beams["caption_teacher_kwargs"] == {"num_beams": 3}
    assert greedy["model_config"] == beams["model_config"] and beams["model_config"]["image_transition_rank"] == 4


def test_ngram_blocking_benchmark_tiny_mode(tmp_path):
    results = run_tiny_benchmark("ngram_blocking", tmp_path, "w")
    rows = {row["name"]: row for row in results["settings"]}
    assert len(rows) == 6 * 3 + 2 and all(len(row["runs"]) == 3 for row in rows.values() if row["family"] == "diffusion")
    # The models of harder_world.py, reference_selection.py and image_transitions.py, in their folders.
    assert results["models"]["0"]["references, reference selection"] == str(tmp_path / "w" / "seed0" / "reference_selection")
    assert results["models"]["0"]["on AR's captions, image transitions"] == str(tmp_path / "w" / "seed0" / "kd_image_transitions")
    blocking = {name.split(": ")[-1]: row["kwargs"].get("no_repeat_ngram_size")
                for name, row in rows.items() if name.startswith("references: ")}
    assert blocking == {"1 step (no trigram twice, the default)": None, "1 step, repeats allowed": 0,
                        "1 step, no bigram twice": 2}
    assert rows["AR greedy, no trigram twice"]["kwargs"] == {"num_beams": 1, "no_repeat_ngram_size": 3}
    assert results["timed_against"] == "AR greedy" and set(results["head_to_head"]) == {
        "on AR's captions, image transitions: 1 step (no trigram twice, the default)",
        "on AR's captions, image transitions: 1 step, repeats allowed",
        "references, reference selection, image transitions: 1 step (no trigram twice, the default)"}
    table = (tmp_path / "results" / "ngram_blocking_tiny.md").read_text()
    assert "| on AR's captions: 1 step, repeats allowed | 1 |" in table and "Speed against AR greedy" in table
