from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import CONDITION_DIM, PATCH_DIM, tiny_backbone_config, tiny_denoiser
from diffusers import DDPMScheduler
from transformers import AutoModel, BertModel

from clip_diffusionlm import CLIPDiffusionLMModel, diffusion_loss, make_noise_scheduler
from clip_diffusionlm.diffusion import jump_posterior_coefficients, predicted_original_sample

BATCH, LENGTH = 3, 8


def _ids(tokenizer):
    captions = ["a small red circle", "two shapes: a blue square and a star", "a green triangle"]
    return tokenizer(captions, padding="max_length", truncation=True, max_length=LENGTH, return_tensors="pt").input_ids


@pytest.mark.parametrize("fusion", ["concat", "add"])
@pytest.mark.parametrize("use_text_condition", [False, True])
def test_forward_shapes(tokenizer, fusion, use_text_condition):
    model = tiny_denoiser(tokenizer, fusion=fusion, use_text_condition=use_text_condition)
    noisy = torch.randn(BATCH, LENGTH, 32)
    text = torch.randn(BATCH, CONDITION_DIM) if use_text_condition else None
    output = model(noisy, torch.tensor([0, 500, 999]), torch.randn(BATCH, CONDITION_DIM), text_embeds=text)
    assert output.prediction.shape == (BATCH, LENGTH, 32)
    assert output.logits.shape == (BATCH, LENGTH, tokenizer.vocab_size)
    assert output.loss is None


@pytest.mark.parametrize("use_text_condition", [False, True])
def test_image_condition_tokens_are_separate_slots(tokenizer, use_text_condition):
    model = tiny_denoiser(tokenizer, image_condition_tokens=3, use_text_condition=use_text_condition)
    image = torch.randn(BATCH, CONDITION_DIM)
    tokens = model._condition_tokens(image, None, None)
    assert tokens.shape == (BATCH, 3 + use_text_condition, 32)
    assert not torch.allclose(tokens[:, 0], tokens[:, 1])  # distinct projections, not one token repeated
    dropped = model._condition_tokens(image, None, torch.tensor([True, False, True]))
    torch.testing.assert_close(dropped[0], model.null_condition.detach())
    torch.testing.assert_close(dropped[1], tokens[1])
    output = model(torch.randn(BATCH, LENGTH, 32), torch.tensor([0, 500, 999]), image)
    assert output.prediction.shape == (BATCH, LENGTH, 32)


@pytest.mark.parametrize("use_text_condition", [False, True])
def test_patch_features_get_their_own_tokens(tokenizer, use_text_condition):
    model = tiny_denoiser(
        tokenizer, image_features="patches", patch_dim=PATCH_DIM, image_condition_tokens=2,
        use_text_condition=use_text_condition, x1_restoring_loss=False,
    )
    patches = torch.randn(BATCH, 5, PATCH_DIM)  # [CLS] + 4 patches
    text = torch.randn(BATCH, CONDITION_DIM) if use_text_condition else None
    tokens = model._condition_tokens(patches, text, None)
    assert tokens.shape == (BATCH, 5 * 2 + use_text_condition, 32)
    dropped = model._condition_tokens(patches, text, torch.tensor([True, False, True]))
    null = torch.cat([model.null_condition[:2].repeat(5, 1), model.null_condition[2:]]).detach()
    torch.testing.assert_close(dropped[0], null)
    torch.testing.assert_close(dropped[1], tokens[1])

    noisy, timesteps = torch.randn(BATCH, LENGTH, 32), torch.tensor([10, 500, 990])
    prediction = model.denoise(noisy, timesteps, patches, text)
    one_patch_changed = patches.clone()
    one_patch_changed[:, 3] += 1.0
    assert not torch.allclose(model.denoise(noisy, timesteps, one_patch_changed, text), prediction)
    output = model(noisy, timesteps, patches, text, labels=_ids(tokenizer))
    torch.testing.assert_close(output.prediction, prediction)
    assert torch.isfinite(output.loss)


def test_conditioning_changes_prediction(tokenizer):
    model = tiny_denoiser(tokenizer)
    noisy, t = torch.randn(BATCH, LENGTH, 32), torch.tensor([10, 10, 10])
    first = model.denoise(noisy, t, torch.randn(BATCH, CONDITION_DIM))
    second = model.denoise(noisy, t, torch.randn(BATCH, CONDITION_DIM))
    assert not torch.allclose(first, second)
    dropped = torch.ones(BATCH, dtype=torch.bool)
    unconditional_a = model.denoise(noisy, t, torch.randn(BATCH, CONDITION_DIM), drop_condition=dropped)
    unconditional_b = model.denoise(noisy, t, torch.randn(BATCH, CONDITION_DIM), drop_condition=dropped)
    torch.testing.assert_close(unconditional_a, unconditional_b)


def test_timestep_conditioning_switch(tokenizer):
    noisy, image = torch.randn(BATCH, LENGTH, 32), torch.randn(BATCH, CONDITION_DIM)
    with_t = tiny_denoiser(tokenizer)
    assert not torch.allclose(
        with_t.denoise(noisy, torch.tensor(5), image), with_t.denoise(noisy, torch.tensor(900), image)
    )
    without_t = tiny_denoiser(tokenizer, timestep_conditioning=False)
    torch.testing.assert_close(
        without_t.denoise(noisy, torch.tensor(5), image), without_t.denoise(noisy, torch.tensor(900), image)
    )


def test_word_embeddings_frozen_and_tied(tokenizer):
    model = tiny_denoiser(tokenizer, embedding_scale=4.0)
    embeddings = model.get_input_embeddings()
    assert not embeddings.weight.requires_grad
    ids = _ids(tokenizer)
    x0 = model.embed_captions(ids)
    torch.testing.assert_close(x0, embeddings(ids) * 4.0)
    torch.testing.assert_close(model.round_to_logits(x0), embeddings(ids) @ embeddings.weight.T)


def _loss(model, tokenizer, **kwargs):
    torch.manual_seed(0)
    return diffusion_loss(
        model.train(), make_noise_scheduler(model.config, DDPMScheduler), _ids(tokenizer),
        torch.randn(BATCH, CONDITION_DIM), **kwargs
    )


def test_loss_terms_and_constant_lambda(tokenizer):
    model = tiny_denoiser(tokenizer, rounding_weight=0.5)
    output = _loss(model, tokenizer, timesteps_per_caption=4)
    for term in (output.loss, output.restoring_loss, output.x1_restoring_loss, output.rounding_loss):
        assert torch.isfinite(term) and term > 0
    assert output.prediction.shape[0] == BATCH * 4
    assert output.rounding_weight.item() == pytest.approx(0.5)
    expected = output.restoring_loss + output.x1_restoring_loss + 0.5 * output.rounding_loss
    torch.testing.assert_close(output.loss, expected)
    output.loss.backward()
    assert model.get_input_embeddings().weight.grad is None
    assert model.image_projection.linear_1.weight.grad.abs().sum() > 0


def test_dynamic_lambda_is_ratio_without_gradient(tokenizer):
    model = tiny_denoiser(tokenizer, dynamic_rounding_constant=3.0)
    output = _loss(model, tokenizer)
    simple = output.restoring_loss + output.x1_restoring_loss
    torch.testing.assert_close(output.rounding_weight, 3.0 * simple.detach() / output.rounding_loss.detach())
    assert not output.rounding_weight.requires_grad
    # With λ detached, the total's gradient w.r.t. L_R is exactly λ: L = L'_simple + λ·L_R = (1 + C)·L'_simple.
    torch.testing.assert_close(output.loss, simple + output.rounding_weight * output.rounding_loss)
    torch.testing.assert_close(output.loss.detach(), 4.0 * simple.detach())


def test_x1_loss_switch_and_missing_input(tokenizer):
    model = tiny_denoiser(tokenizer, x1_restoring_loss=False)
    assert _loss(model, tokenizer).x1_restoring_loss.item() == 0.0
    with_x1 = tiny_denoiser(tokenizer)
    ids = _ids(tokenizer)
    with pytest.raises(ValueError, match="x1_noisy_embeds"):
        with_x1(torch.randn(BATCH, LENGTH, 32), torch.tensor([1, 2, 3]), torch.randn(BATCH, CONDITION_DIM), labels=ids)


def test_previous_sample_objective_round_trips_to_x0(tokenizer):
    model = tiny_denoiser(tokenizer, prediction_type="previous_sample", prediction_step_offset=100)
    scheduler = make_noise_scheduler(model.config, DDPMScheduler)
    x0 = model.embed_captions(_ids(tokenizer))
    t = torch.tensor([50, 400, 999])
    xt = scheduler.add_noise(x0, torch.randn_like(x0), t)
    c0, ct = jump_posterior_coefficients(scheduler.alphas_cumprod, t, 100)
    assert c0[0].item() == pytest.approx(1.0) and ct[0].item() == pytest.approx(0.0)  # t < n: the target is x0
    previous = c0 * x0 + ct * xt
    recovered = predicted_original_sample(model.config, scheduler.alphas_cumprod, previous, xt, t)
    torch.testing.assert_close(recovered, x0, atol=1e-4, rtol=1e-4)
    output = _loss(model, tokenizer)
    assert torch.isfinite(output.loss)


@pytest.mark.parametrize("options", [{"self_conditioning": True}, {"condition_drop_prob": 0.5}])
def test_training_options_give_finite_loss(tokenizer, options):
    output = _loss(tiny_denoiser(tokenizer, **options), tokenizer, timesteps_per_caption=2)
    assert torch.isfinite(output.loss)
    output.loss.backward()


def test_sqrt_schedule_is_monotone():
    from clip_diffusionlm import CLIPDiffusionLMConfig

    scheduler = make_noise_scheduler(CLIPDiffusionLMConfig(noise_schedule="sqrt"), DDPMScheduler)
    alphas = scheduler.alphas_cumprod
    assert torch.all(alphas[1:] < alphas[:-1])
    # ᾱ_t = (1 - sqrt((t+1)/T + s)) / (1 - sqrt(s)) after diffusers' cumulative product, with s = 1e-4.
    expected_first = (1 - (1 / 1000 + 1e-4) ** 0.5) / (1 - 1e-4**0.5)
    assert alphas[0].item() == pytest.approx(expected_first, rel=1e-5)
    assert alphas[-1] < 0.01


def test_save_load_and_automodel(tokenizer, tmp_path):
    model = tiny_denoiser(tokenizer, fusion="add")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    reloaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(reloaded, CLIPDiffusionLMModel)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor)


def test_remote_code_loads_without_package(tokenizer, tmp_path):
    model = tiny_denoiser(tokenizer)
    model.save_pretrained(tmp_path / "denoiser")
    noisy = torch.randn(1, LENGTH, 32)
    torch.save({"noisy": noisy, "expected": model.denoise(noisy, torch.tensor(3), torch.ones(1, CONDITION_DIM))},
               tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(tmp_path / "denoiser")!r}, trust_remote_code=True).eval()
        assert "clip_diffusionlm" not in sys.modules, "the package was imported"
        io = torch.load({str(tmp_path / "io.pt")!r})
        got = model.denoise(io["noisy"], torch.tensor(3), torch.ones(1, {CONDITION_DIM}))
        torch.testing.assert_close(got, io["expected"])
        print("REMOTE_OK", type(model).__module__)
        """
    )
    # Run outside the source tree so that `clip_diffusionlm` cannot be imported by accident.
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf")})
    assert "REMOTE_OK" in result.stdout, result.stderr[-2000:]
    assert "transformers_modules" in result.stdout


def test_from_text_backbone_copies_pretrained_layers(tokenizer, tmp_path):
    torch.manual_seed(1)
    text_model = BertModel(__import__("transformers").BertConfig(**tiny_backbone_config(tokenizer)))
    text_model.save_pretrained(tmp_path / "bert")
    model = CLIPDiffusionLMModel.from_text_backbone(str(tmp_path / "bert"), condition_dim=CONDITION_DIM)
    assert model.config.text_backbone_name_or_path == str(tmp_path / "bert")
    torch.testing.assert_close(model.get_input_embeddings().weight, text_model.get_input_embeddings().weight)
    torch.testing.assert_close(
        model.backbone.encoder.layer[1].output.dense.weight, text_model.encoder.layer[1].output.dense.weight
    )
    assert not model.get_input_embeddings().weight.requires_grad


def test_from_text_backbone_missing_directory(tmp_path):
    with pytest.raises((OSError, ValueError)):
        CLIPDiffusionLMModel.from_text_backbone(str(tmp_path / "nothing-here"))
