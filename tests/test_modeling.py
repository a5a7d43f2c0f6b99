from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import CONDITION_DIM, PATCH_DIM, ModelCalls, tiny_backbone_config, tiny_denoiser
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
    assert model.round_to_logits(output.prediction).shape == (BATCH, LENGTH, tokenizer.vocab_size)


def _condition_tokens(model, *args, **kwargs) -> torch.Tensor:
    """The conditioning tokens the backbone receives after the caption positions (segment embedding removed)."""
    seen = {}
    handle = model.backbone.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True
    )
    model(torch.randn(BATCH, LENGTH, 32), torch.tensor([0, 500, 999]), *args, **kwargs)
    handle.remove()
    return seen["inputs_embeds"][:, LENGTH:] - model.segment_embedding.weight[1]


@pytest.mark.parametrize("use_text_condition", [False, True])
def test_image_condition_tokens_are_separate_slots(tokenizer, use_text_condition):
    model = tiny_denoiser(tokenizer, image_condition_tokens=3, use_text_condition=use_text_condition)
    image = torch.randn(BATCH, CONDITION_DIM)
    tokens = _condition_tokens(model, image)
    assert tokens.shape == (BATCH, 3 + use_text_condition, 32)
    assert not torch.allclose(tokens[:, 0], tokens[:, 1])  # distinct projections, not one token repeated
    dropped = _condition_tokens(model, image, drop_condition=torch.tensor([True, False, True]))
    torch.testing.assert_close(dropped[0], model.null_condition.detach())
    torch.testing.assert_close(dropped[1], tokens[1])


@pytest.mark.parametrize("use_text_condition", [False, True])
def test_patch_features_get_their_own_tokens(tokenizer, use_text_condition):
    model = tiny_denoiser(
        tokenizer, image_features="patches", patch_dim=PATCH_DIM, image_condition_tokens=2,
        use_text_condition=use_text_condition, x1_restoring_loss=False,
    )
    patches = torch.randn(BATCH, 5, PATCH_DIM)  # [CLS] + 4 patches
    text = torch.randn(BATCH, CONDITION_DIM) if use_text_condition else None
    tokens = _condition_tokens(model, patches, text)
    assert tokens.shape == (BATCH, 5 * 2 + use_text_condition, 32)
    dropped = _condition_tokens(model, patches, text, drop_condition=torch.tensor([True, False, True]))
    null = torch.cat([model.null_condition[:2].repeat(5, 1), model.null_condition[2:]]).detach()
    torch.testing.assert_close(dropped[0], null)
    torch.testing.assert_close(dropped[1], tokens[1])

    noisy, timesteps = torch.randn(BATCH, LENGTH, 32), torch.tensor([10, 500, 990])
    prediction = model(noisy, timesteps, patches, text).prediction
    one_patch_changed = patches.clone()
    one_patch_changed[:, 3] += 1.0
    assert not torch.allclose(model(noisy, timesteps, one_patch_changed, text).prediction, prediction)
    scheduler = make_noise_scheduler(model.config, DDPMScheduler)
    assert torch.isfinite(diffusion_loss(model, scheduler, _ids(tokenizer), patches, text).loss)


def test_conditioning_changes_prediction(tokenizer):
    model = tiny_denoiser(tokenizer)
    noisy, t = torch.randn(BATCH, LENGTH, 32), torch.tensor([10, 10, 10])
    first = model(noisy, t, torch.randn(BATCH, CONDITION_DIM)).prediction
    second = model(noisy, t, torch.randn(BATCH, CONDITION_DIM)).prediction
    assert not torch.allclose(first, second)
    dropped = torch.ones(BATCH, dtype=torch.bool)
    unconditional_a = model(noisy, t, torch.randn(BATCH, CONDITION_DIM), drop_condition=dropped).prediction
    unconditional_b = model(noisy, t, torch.randn(BATCH, CONDITION_DIM), drop_condition=dropped).prediction
    torch.testing.assert_close(unconditional_a, unconditional_b)


def test_timestep_conditioning_switch(tokenizer):
    noisy, image = torch.randn(BATCH, LENGTH, 32), torch.randn(BATCH, CONDITION_DIM)
    with_t = tiny_denoiser(tokenizer)
    assert not torch.allclose(
        with_t(noisy, torch.tensor(5), image).prediction, with_t(noisy, torch.tensor(900), image).prediction
    )
    without_t = tiny_denoiser(tokenizer, timestep_conditioning=False)
    torch.testing.assert_close(
        without_t(noisy, torch.tensor(5), image).prediction, without_t(noisy, torch.tensor(900), image).prediction
    )


def test_noisy_input_gate_starts_open_and_can_silence_the_noise(tokenizer):
    plain = tiny_denoiser(tokenizer)
    gated = tiny_denoiser(tokenizer, gate_noisy_input=True)
    missing, unexpected = gated.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["input_gate.bias", "input_gate.weight"] and not unexpected
    noisy, other_noisy = torch.randn(2, BATCH, LENGTH, 32)
    image, per_row = torch.randn(BATCH, CONDITION_DIM), torch.tensor([999, 500, 3])
    torch.testing.assert_close(gated(noisy, per_row, image).prediction, plain(noisy, per_row, image).prediction)

    with torch.no_grad():
        gated.input_gate.bias.fill_(-1.0)  # 1 + g(t) = 0: x_t no longer reaches the backbone
    for timesteps in (per_row, per_row[:, None].expand(-1, LENGTH)):
        torch.testing.assert_close(gated(noisy, timesteps, image).prediction,
                                   gated(other_noisy, timesteps, image).prediction)
    assert not torch.allclose(plain(noisy, per_row, image).prediction, plain(other_noisy, per_row, image).prediction)


def test_word_embeddings_frozen_and_tied(tokenizer, tmp_path):
    model = tiny_denoiser(tokenizer, embedding_scale=4.0, rounding_logit_scale=10.0)
    embeddings = model.get_input_embeddings()
    assert not embeddings.weight.requires_grad
    model.save_pretrained(tmp_path)
    # Loading builds new parameters; a loaded model that is trained further (resumed, distilled) keeps them frozen.
    loaded = CLIPDiffusionLMModel.from_pretrained(tmp_path)
    assert [name for name, weight in loaded.named_parameters() if not weight.requires_grad] == [
        "backbone.embeddings.word_embeddings.weight"
    ]
    ids = _ids(tokenizer)
    x0 = model.embed_captions(ids)
    torch.testing.assert_close(x0, embeddings(ids) * 4.0)
    torch.testing.assert_close(model.round_to_logits(x0), 10.0 * embeddings(ids) @ embeddings.weight.T)


def test_rounding_logit_scale_sharpens_the_loss_not_the_decoding(tokenizer):
    flat, sharp = tiny_denoiser(tokenizer), tiny_denoiser(tokenizer, rounding_logit_scale=10.0)
    sharp.load_state_dict(flat.state_dict())
    ids = _ids(tokenizer)
    x0 = flat.embed_captions(ids) + 0.01 * torch.randn(BATCH, LENGTH, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(flat.round_to_token_ids(x0), sharp.round_to_token_ids(x0))
    flat_loss, sharp_loss = (
        torch.nn.functional.cross_entropy(model.round_to_logits(x0).flatten(0, 1), ids.flatten())
        for model in (flat, sharp)
    )
    assert sharp_loss < flat_loss


def _loss(model, tokenizer, image_embeds=None, **kwargs):
    torch.manual_seed(0)
    image_embeds = torch.randn(BATCH, CONDITION_DIM) if image_embeds is None else image_embeds
    return diffusion_loss(
        model.train(), make_noise_scheduler(model.config, DDPMScheduler), _ids(tokenizer), image_embeds, **kwargs
    )


def _squared_error(prediction, target):
    return ((prediction - target) ** 2).sum(-1).mean()


def _check_noising(noisy, x0, timesteps, alphas_cumprod):
    """x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε with ε standard normal, recovered per sample."""
    alpha_bar = alphas_cumprod[timesteps][:, None, None]
    noise = (noisy - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()
    assert noise.mean().abs() < 0.1 and (noise.std() - 1).abs() < 0.1


def test_loss_terms_follow_the_paper(tokenizer):
    """Every term recomputed from what the denoiser saw and returned: one call holding x_t and x_1."""
    model = tiny_denoiser(tokenizer, rounding_weight=0.5, rounding_logit_scale=3.0, caption_length=LENGTH)
    calls = ModelCalls(model)
    scheduler = make_noise_scheduler(model.config, DDPMScheduler)
    image = torch.randn(BATCH, CONDITION_DIM)
    output = _loss(model, tokenizer, image_embeds=image, timesteps_per_caption=4)
    (call,) = calls.calls
    ids = _ids(tokenizer).repeat_interleave(4, dim=0)
    batch = BATCH * 4
    x0 = model.get_input_embeddings()(ids)
    assert call["noisy_embeds"].shape == (2 * batch, LENGTH, 32)
    assert call["timesteps"][batch:].tolist() == [1] * batch
    assert len(set(call["timesteps"][:batch].tolist())) > 1
    _check_noising(call["noisy_embeds"][:batch], x0, call["timesteps"][:batch], scheduler.alphas_cumprod)
    torch.testing.assert_close(call["image_embeds"], image.repeat_interleave(4, dim=0).repeat(2, 1))
    assert not call["drop_condition"].any()

    prediction = call["prediction"]
    torch.testing.assert_close(output.restoring_loss, _squared_error(prediction[:batch], x0))
    torch.testing.assert_close(output.x1_restoring_loss, _squared_error(prediction[batch:], x0))
    logits = 3.0 * prediction[:batch] @ model.get_input_embeddings().weight.T
    rounding = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())
    torch.testing.assert_close(output.rounding_loss, rounding)
    assert output.rounding_weight.item() == pytest.approx(0.5)
    torch.testing.assert_close(output.loss, output.restoring_loss + output.x1_restoring_loss + 0.5 * rounding)
    output.loss.backward()
    assert model.get_input_embeddings().weight.grad is None
    assert model.image_projection.linear_1.weight.grad.abs().sum() > 0


def test_x1_term_switch_keeps_one_call(tokenizer):
    model = tiny_denoiser(tokenizer, x1_restoring_loss=False, caption_length=LENGTH)
    calls = ModelCalls(model)
    output = _loss(model, tokenizer)
    assert output.x1_restoring_loss.item() == 0.0
    assert len(calls.calls) == 1 and calls.calls[0]["noisy_embeds"].shape[0] == BATCH
    x0 = model.get_input_embeddings()(_ids(tokenizer))
    torch.testing.assert_close(output.loss, _squared_error(calls.calls[0]["prediction"], x0) + 0.3 * output.rounding_loss)


def test_dynamic_lambda_is_ratio_without_gradient(tokenizer):
    model = tiny_denoiser(tokenizer, dynamic_rounding_constant=3.0)
    output = _loss(model, tokenizer)
    simple = output.restoring_loss + output.x1_restoring_loss
    torch.testing.assert_close(output.rounding_weight, 3.0 * simple.detach() / output.rounding_loss.detach())
    assert not output.rounding_weight.requires_grad
    # With λ detached, L = L'_simple + λ·L_R = (1 + C)·L'_simple in value.
    torch.testing.assert_close(output.loss.detach(), 4.0 * simple.detach())


def _posterior_coefficients(alphas_cumprod, t, n):
    """q(x_{t-n} | x_t, x0) = c0·x0 + ct·x_t, written out independently of `jump_posterior_coefficients`."""
    alpha_bar_t = alphas_cumprod[t]
    alpha_bar_s = torch.where(t - n >= 0, alphas_cumprod[(t - n).clamp(min=0)], torch.ones_like(alpha_bar_t))
    c0 = alpha_bar_s.sqrt() * (1 - alpha_bar_t / alpha_bar_s) / (1 - alpha_bar_t)
    ct = (alpha_bar_t / alpha_bar_s).sqrt() * (1 - alpha_bar_s) / (1 - alpha_bar_t)
    return c0[:, None, None], ct[:, None, None]


def test_previous_sample_objective_targets_the_posterior_mean(tokenizer):
    model = tiny_denoiser(tokenizer, prediction_type="previous_sample", prediction_step_offset=100, caption_length=LENGTH)
    calls = ModelCalls(model)
    scheduler = make_noise_scheduler(model.config, DDPMScheduler)
    output = _loss(model, tokenizer)
    (call,) = calls.calls
    x0 = model.get_input_embeddings()(_ids(tokenizer))
    t, xt = call["timesteps"][:BATCH], call["noisy_embeds"][:BATCH]
    c0, ct = _posterior_coefficients(scheduler.alphas_cumprod, t, 100)
    torch.testing.assert_close(output.restoring_loss, _squared_error(call["prediction"][:BATCH], c0 * x0 + ct * xt))
    # One step from the data the target is x0 itself.
    torch.testing.assert_close(output.x1_restoring_loss, _squared_error(call["prediction"][BATCH:], x0))

    t = torch.tensor([50, 400, 999])
    xt = scheduler.add_noise(x0, torch.randn_like(x0), t)
    c0, ct = _posterior_coefficients(scheduler.alphas_cumprod, t, 100)
    recovered = predicted_original_sample(model.config, scheduler.alphas_cumprod, c0 * x0 + ct * xt, xt, t)
    torch.testing.assert_close(recovered, x0, atol=1e-4, rtol=1e-4)
    assert c0[0].item() == pytest.approx(1.0) and ct[0].item() == pytest.approx(0.0)  # t < n: the target is x0
    torch.testing.assert_close(jump_posterior_coefficients(scheduler.alphas_cumprod, t, 100), (c0, ct))


def test_condition_dropout_uses_the_null_condition(tokenizer):
    model = tiny_denoiser(tokenizer, condition_drop_prob=0.5, caption_length=LENGTH)
    calls = ModelCalls(model)
    torch.manual_seed(0)
    scheduler = make_noise_scheduler(model.config, DDPMScheduler)
    ids = _ids(tokenizer).repeat(20, 1)
    diffusion_loss(model, scheduler, ids, torch.randn(len(ids), CONDITION_DIM))
    timesteps = calls.calls[0]["timesteps"][: len(ids)]
    assert timesteps.min() < 100 and timesteps.max() >= model.config.num_train_timesteps - 100  # t ~ U[0, T)
    dropped = calls.calls[0]["drop_condition"]
    assert dropped.shape == (2 * len(ids),) and 0.3 < dropped.float().mean() < 0.7
    torch.testing.assert_close(dropped[: len(ids)], dropped[len(ids):])  # x_t and x_1 of a caption agree


def test_logit_normal_timestep_sampling_reaches_the_model(tokenizer):
    """SD3's logit-normal density with a positive mean puts most training timesteps at high noise; uniform does not."""
    from clip_diffusionlm.diffusion import TimestepSampling

    model = tiny_denoiser(tokenizer, x1_restoring_loss=False, caption_length=LENGTH)
    calls = ModelCalls(model)
    scheduler = make_noise_scheduler(model.config, DDPMScheduler)
    ids = _ids(tokenizer).repeat(100, 1)
    high_noise = {}
    for scheme, mean in (("none", 0.0), ("logit_normal", 1.0)):
        calls.calls.clear()
        torch.manual_seed(0)
        sampling = TimestepSampling(weighting_scheme=scheme, logit_mean=mean)
        diffusion_loss(model, scheduler, ids, torch.randn(len(ids), CONDITION_DIM), timestep_sampling=sampling)
        timesteps = calls.calls[0]["timesteps"]
        assert timesteps.dtype == torch.long and 0 <= timesteps.min() and timesteps.max() < 1000
        high_noise[scheme] = (timesteps >= 500).float().mean().item()
    assert 0.4 < high_noise["none"] < 0.6
    assert high_noise["logit_normal"] > 0.75  # P(sigmoid(N(1, 1)) > 0.5) = 0.84
    with pytest.raises(ValueError, match="weighting_scheme"):
        TimestepSampling(weighting_scheme="lognormal")


def test_time_warping_draws_where_the_cross_entropy_rises():
    """CDCD's density ∝ F'(u), F the monotone fit of the loss over u = t/T: uniform before any loss is seen, all but
    the uniform share in the bin where the loss jumps, and a dip in the loss (a non-monotone estimate) draws nothing."""
    from clip_diffusionlm.diffusion import TimeWarping

    warping = TimeWarping(num_bins=10, uniform_share=0.05)
    torch.manual_seed(0)
    bins = warping.sample(1000, 20000, torch.device("cpu")) // 100
    assert (torch.bincount(bins, minlength=10) / 20000 - 0.1).abs().max() < 0.01

    timesteps = torch.arange(0, 1000, 5)  # every bin, 20 captions each
    bin_of = timesteps // 100
    # 0 up to u = 0.3, 1 in bin 3, a dip to 0.5 in bins 4-5, 1 again after.
    losses = torch.where(bin_of < 3, 0.0, torch.where((bin_of == 4) | (bin_of == 5), 0.5, 1.0))
    for _ in range(3):
        warping.update(timesteps, losses, 1000)
    expected = torch.full((10,), 0.005, dtype=torch.float64)
    expected[3] += 0.95
    torch.testing.assert_close(warping.bin_probabilities(), expected)
    bins = warping.sample(1000, 20000, torch.device("cpu")) // 100
    assert abs((bins == 3).float().mean().item() - 0.955) < 0.01

    resumed = TimeWarping(num_bins=10, uniform_share=0.05)
    resumed.load_state_dict(warping.state_dict())
    torch.testing.assert_close(resumed.bin_probabilities(), warping.bin_probabilities())


def test_time_warping_learns_from_the_training_loop(training_assets, tmp_path):
    """A run with `weighting_scheme="time_warping"` feeds its sampler every step's rounding losses, and checkpoints
    (and resumes) what it has learnt."""
    from conftest import tiny_training_config

    from clip_diffusionlm.training import build_run, training_step

    config = tiny_training_config(training_assets, tmp_path / "run", weighting_scheme="time_warping", max_steps=2,
                                  model_config={"caption_length": 12})
    run = build_run(config)
    batch = next(iter(run.dataloader))
    output, _ = training_step(run, batch, stop_requested=False)
    assert output.rounding_loss_per_caption.shape == output.timesteps.shape == (len(batch["input_ids"]),)
    torch.testing.assert_close(output.rounding_loss_per_caption.mean(), output.rounding_loss)
    counts = run.timestep_sampling.loss_counts
    assert counts.sum().item() == len(batch["input_ids"])
    seen_bins = (output.timesteps * run.timestep_sampling.num_bins // 1000).unique()
    assert torch.equal(counts.nonzero().flatten(), seen_bins)
    run.accelerator.save_state(tmp_path / "state")
    resumed = build_run(config)
    resumed.accelerator.load_state(tmp_path / "state")
    torch.testing.assert_close(resumed.timestep_sampling.loss_counts, counts)


def test_self_conditioning_feeds_the_first_estimate_back(tokenizer):
    model = tiny_denoiser(tokenizer, self_conditioning=True, caption_length=LENGTH)
    torch.nn.init.normal_(model.self_condition_projection.weight, std=0.5)  # zero-initialised: make it matter
    calls = ModelCalls(model)
    scheduler = make_noise_scheduler(model.config, DDPMScheduler)
    image = torch.randn(BATCH, CONDITION_DIM)
    counts = set()
    for seed in range(6):  # the branch runs for half of the batches
        calls.calls.clear()
        torch.manual_seed(seed)
        output = diffusion_loss(model.train(), scheduler, _ids(tokenizer), image)
        counts.add(len(calls.calls))
        if len(calls.calls) == 2:
            first, second = calls.calls
            assert first.get("self_conditioning_embeds") is None
            torch.testing.assert_close(second["self_conditioning_embeds"], first["prediction"])
            torch.testing.assert_close(second["noisy_embeds"], first["noisy_embeds"])
            assert not torch.allclose(second["prediction"], first["prediction"])
            output.loss.backward()
            assert model.self_condition_projection.weight.grad.abs().sum() > 0
    assert counts == {1, 2}


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
    torch.save({"noisy": noisy, "expected": model(noisy, torch.tensor(3), torch.ones(1, CONDITION_DIM)).prediction},
               tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(tmp_path / "denoiser")!r}, trust_remote_code=True).eval()
        assert "clip_diffusionlm" not in sys.modules, "the package was imported"
        io = torch.load({str(tmp_path / "io.pt")!r})
        got = model(io["noisy"], torch.tensor(3), torch.ones(1, {CONDITION_DIM})).prediction
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


def test_from_text_backbone_overrides_only_the_given_backbone_keys(tokenizer, tmp_path):
    BertModel(__import__("transformers").BertConfig(**tiny_backbone_config(tokenizer))).save_pretrained(tmp_path)
    model = CLIPDiffusionLMModel.from_text_backbone(
        str(tmp_path), condition_dim=CONDITION_DIM, backbone_config={"hidden_dropout_prob": 0.0}
    )
    backbone_config = model.backbone.config
    assert backbone_config.hidden_dropout_prob == 0.0
    assert backbone_config.attention_probs_dropout_prob == 0.1  # BERT's, untouched
    assert backbone_config.hidden_size == tiny_backbone_config(tokenizer)["hidden_size"]


def test_from_text_backbone_missing_directory(tmp_path):
    with pytest.raises((OSError, ValueError)):
        CLIPDiffusionLMModel.from_text_backbone(str(tmp_path / "nothing-here"))


def test_attention_implementations_give_the_same_outputs(tokenizer, tmp_path):
    tiny_denoiser(tokenizer).save_pretrained(tmp_path)
    noisy, t, image = torch.randn(BATCH, LENGTH, 32), torch.tensor([3, 500, 990]), torch.randn(BATCH, CONDITION_DIM)
    outputs = {}
    for implementation in ("eager", "sdpa"):
        model = CLIPDiffusionLMModel.from_pretrained(tmp_path, attn_implementation=implementation).eval()
        assert model.backbone.config._attn_implementation == implementation
        outputs[implementation] = model(noisy, t, image).prediction
    torch.testing.assert_close(outputs["sdpa"], outputs["eager"], rtol=1e-5, atol=1e-5)
    built = tiny_denoiser(tokenizer, attn_implementation="eager")
    assert built.backbone.config._attn_implementation == "eager"


def test_gradient_checkpointing_recomputes_and_matches(tokenizer):
    gradients = {}
    for checkpointing in (False, True):
        model = tiny_denoiser(tokenizer, caption_length=LENGTH).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        layer_calls = []
        model.backbone.encoder.layer[0].attention.register_forward_hook(lambda *args, calls=layer_calls: calls.append(1))
        _loss(model, tokenizer).loss.backward()
        assert len(layer_calls) == (2 if checkpointing else 1)  # recomputed in the backward pass
        gradients[checkpointing] = model.backbone.encoder.layer[0].output.dense.weight.grad
    torch.testing.assert_close(gradients[True], gradients[False])


def test_expected_word_embedding_of_a_one_hot_distribution_is_that_word(tokenizer):
    """CDCD's x̂0: softmax(logits)·E. A (near) one-hot rounding distribution gives the word's embedding exactly; a
    uniform one gives the mean of the rounding vocabulary's embeddings."""
    from conftest import tiny_denoiser

    model = tiny_denoiser(tokenizer, rounding_vocabulary=[0, 1, 2, 3, 5, 6, 7], embedding_scale=2.0)
    words = torch.tensor([[5, 7, 3]])
    exact = model.embed_captions(words)
    # Far along its own direction, a word's embedding rounds to itself with probability ~1.
    with torch.no_grad():
        torch.testing.assert_close(model.expected_word_embeddings(exact * 1e4), exact, atol=1e-4, rtol=0)
    weight = model.get_input_embeddings().weight[model.rounding_token_ids] * 2.0
    zeros = torch.zeros(1, 1, weight.shape[1])  # all logits 0: the uniform distribution
    torch.testing.assert_close(model.expected_word_embeddings(zeros)[0, 0], weight.mean(dim=0))


@pytest.mark.parametrize("shape", [(3, 3), (2, 3, 3)], ids=["shared", "per caption"])
def test_linear_chain_rounding_matches_enumerating_every_caption(shape):
    """Viterbi, the forward algorithm and the path score against brute force over all V^L paths."""
    import itertools

    from clip_diffusionlm.models.modeling_clip_diffusionlm import (
        linear_chain_best_path,
        linear_chain_log_partition,
        linear_chain_scores,
    )

    generator = torch.Generator().manual_seed(0)
    logits, transitions = torch.randn(2, 4, 3, generator=generator), torch.randn(*shape, generator=generator)
    paths = torch.tensor(list(itertools.product(range(3), repeat=4)))  # (81, 4)
    for row in range(2):
        caption_transitions = transitions if transitions.ndim == 2 else transitions[row]
        every_score = linear_chain_scores(logits[row].expand(len(paths), -1, -1), caption_transitions, paths)
        expected = sum(logits[row, position, paths[:, position]] for position in range(4)) + sum(
            caption_transitions[paths[:, position], paths[:, position + 1]] for position in range(3)
        )
        torch.testing.assert_close(every_score, expected)
        torch.testing.assert_close(linear_chain_log_partition(logits, transitions)[row], every_score.logsumexp(0))
        assert torch.equal(linear_chain_best_path(logits, transitions)[row], paths[every_score.argmax()])


def test_no_repeat_ngram_rounding_bans_the_second_occurrence_and_keeps_everything_else():
    """Per position and along a chain: a repeated n-gram's last word gives way to its position's next best at the
    second occurrence only; a caption without repeats is the unconstrained best; n-grams holding an exempt class
    (padding) may repeat."""
    from clip_diffusionlm.models.modeling_clip_diffusionlm import (
        best_path_without_repeated_ngrams,
        first_repeated_ngram_ends,
        linear_chain_best_path,
    )

    none = torch.zeros(4, dtype=torch.bool)
    paths = torch.tensor([[0, 1, 2, 0, 1, 3], [0, 1, 2, 3, 1, 2], [3, 3, 3, 3, 0, 1]])
    assert first_repeated_ngram_ends(paths, 2, none).tolist() == [4, 5, 2]
    assert first_repeated_ngram_ends(paths, 3, none).tolist() == [-1, -1, 3]
    assert first_repeated_ngram_ends(paths, 2, torch.tensor([False, False, False, True])).tolist() == [4, 5, -1]

    # Each position's best word spells 0 1 0 1 0 1; the next best is 2 at positions 2-3 and 3 at positions 4-5.
    logits = torch.full((1, 6, 4), -5.0)
    for position, (best, next_best) in enumerate([(0, 2), (1, 2), (0, 2), (1, 2), (0, 3), (1, 3)]):
        logits[0, position, best], logits[0, position, next_best] = 1.0, 0.5
    assert best_path_without_repeated_ngrams(logits, None, 2, none).tolist() == [[0, 1, 0, 2, 0, 3]]
    assert best_path_without_repeated_ngrams(logits, None, 3, none).tolist() == [[0, 1, 0, 1, 3, 1]]
    assert best_path_without_repeated_ngrams(logits, None, 2, torch.tensor([False, True, False, False])).tolist() == [
        [0, 1, 0, 1, 0, 1]
    ]

    generator = torch.Generator().manual_seed(0)
    chain_logits, transitions = torch.randn(8, 6, 4, generator=generator), torch.randn(8, 4, 4, generator=generator)
    viterbi = linear_chain_best_path(chain_logits, transitions)
    blocked = best_path_without_repeated_ngrams(chain_logits, transitions, 2, none)
    repeats = first_repeated_ngram_ends(viterbi, 2, none) >= 0
    assert repeats.any() and not repeats.all()
    assert torch.equal(blocked[~repeats], viterbi[~repeats])
    assert (first_repeated_ngram_ends(blocked, 2, none) == -1).all()
    for row in repeats.nonzero().squeeze(1).tolist():  # each decoded again under its own transitions
        end = first_repeated_ngram_ends(viterbi[row : row + 1], 2, none).item()
        banned = chain_logits[row : row + 1].clone()
        banned[0, end, viterbi[row, end]] = float("-inf")
        again = linear_chain_best_path(banned, transitions[row])
        if first_repeated_ngram_ends(again, 2, none).item() == -1:
            assert torch.equal(blocked[row], again[0])


def test_rounding_blocks_repeated_ngrams_but_special_tokens(tokenizer):
    """`round_to_indices(no_repeat_ngram_size=n, special_token_ids=...)` maps the special token ids into the rounding
    vocabulary: n-grams of special tokens may repeat (as padding does), any other repeat goes."""
    vocabulary = [0, 1, 2, 3, 5, 6, 7]  # index 3 is [SEP], whose embedding, unlike [PAD]'s, is not zero
    model = tiny_denoiser(tokenizer, rounding_vocabulary=vocabulary, rounding_logit_scale=10.0, rounding_transitions=True)
    weight = model.get_input_embeddings().weight[vocabulary] * model.config.embedding_scale
    spelled = torch.tensor([[4, 5, 4, 5, 3, 3, 3, 3]])  # "w w w w [SEP] [SEP] [SEP] [SEP]" in rounding classes
    estimate = weight[spelled] + 0.01 * torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.round_to_indices(estimate), spelled)
    blocked = model.round_to_indices(estimate, no_repeat_ngram_size=2, special_token_ids=tokenizer.all_special_ids)
    assert torch.equal(blocked[0, :3], spelled[0, :3]) and blocked[0, 3] != 5
    assert torch.equal(blocked[0, 4:], spelled[0, 4:])  # [SEP] [SEP] repeats, exempt
    assert (model.rounding_token_ids[blocked] == model.round_to_token_ids(
        estimate, no_repeat_ngram_size=2, special_token_ids=tokenizer.all_special_ids)).all()


def test_length_bonus_raises_every_word_but_the_special_tokens(tokenizer):
    """`length_bonus` b adds b to every rounding class but the special tokens': a position torn between a word and
    [SEP] takes the word for a b above their gap and [SEP] for one below minus it; clear positions keep their word,
    and without the special ids there is nothing to tell words from the end."""
    vocabulary = [0, 1, 2, 3, 5, 6, 7]  # index 3 is [SEP]
    model = tiny_denoiser(tokenizer, rounding_vocabulary=vocabulary, rounding_logit_scale=10.0, rounding_transitions=True)
    weight = model.get_input_embeddings().weight[vocabulary] * model.config.embedding_scale
    estimate = torch.stack([weight[4], weight[5], 0.5 * weight[4] + 0.5 * weight[3], weight[3]])[None]
    logits = model.round_to_logits(estimate)[0]
    gap = (logits[2, 4] - logits[2, 3]).abs().item()
    margins = [(logits[p, word] - logits[p].clone().index_fill_(0, torch.tensor([word]), -1e9).max()).item()
               for p, word in ((0, 4), (1, 5), (3, 3))]
    bonus = 1.5 * gap
    assert min(margins) > bonus  # so the bonus moves only the torn position
    special = tokenizer.all_special_ids
    assert model.round_to_indices(estimate, special_token_ids=special, length_bonus=bonus).tolist() == [[4, 5, 4, 3]]
    assert model.round_to_indices(estimate, special_token_ids=special, length_bonus=-bonus).tolist() == [[4, 5, 3, 3]]
    assert torch.equal(model.round_to_token_ids(estimate, None, 0, special, bonus),
                       model.rounding_token_ids[torch.tensor([[4, 5, 4, 3]])])
    with pytest.raises(ValueError, match="special_token_ids"):
        model.round_to_indices(estimate, length_bonus=1.0)


def test_rounding_transitions_start_as_per_word_rounding_and_keep_the_caption_consistent(tokenizer):
    """Zero transitions: L_R is the per-position cross-entropy and rounding the per-position argmax. A forbidden pair
    (the article "a" before "orange" in the issue's example) is never written, even when each word's own argmax
    would write it."""
    from clip_diffusionlm.diffusion import weighted_rounding_loss

    vocabulary = [0, 1, 2, 3, 5, 6, 7]
    plain = tiny_denoiser(tokenizer, rounding_vocabulary=vocabulary, rounding_logit_scale=10.0)
    chain = tiny_denoiser(tokenizer, rounding_vocabulary=vocabulary, rounding_logit_scale=10.0, rounding_transitions=True)
    missing, unexpected = chain.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["transition_scores"] and not unexpected
    estimate = torch.randn(BATCH, LENGTH, 32, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, len(vocabulary), (BATCH, LENGTH), generator=torch.Generator().manual_seed(1))
    zero = torch.tensor(0.0)
    plain_loss, chain_loss = (weighted_rounding_loss(model, estimate, targets, zero)[0].mean() for model in (plain, chain))
    torch.testing.assert_close(chain_loss, plain_loss)
    assert torch.equal(chain.round_to_token_ids(estimate), plain.round_to_token_ids(estimate))

    chain_loss.backward()
    assert chain.transition_scores.grad is not None and chain.transition_scores.grad.abs().sum() > 0
    independent = plain.round_to_indices(estimate)  # (batch, length)
    first, second = independent[0, 0].item(), independent[0, 1].item()
    with torch.no_grad():
        chain.transition_scores[first, second] = -1e4
    joint = chain.round_to_indices(estimate)

    def writes_the_pair(indices: torch.Tensor) -> torch.Tensor:
        return ((indices[:, :-1] == first) & (indices[:, 1:] == second)).any(dim=1)

    assert writes_the_pair(independent)[0] and not writes_the_pair(joint).any()
    unaffected = ~writes_the_pair(independent)
    assert torch.equal(joint[unaffected], independent[unaffected])


def _image_chain(tokenizer, **config_kwargs):
    """A chain-rounding denoiser over patch features whose transitions read the image, its image term non-zero."""
    vocabulary = sorted(set(_ids(tokenizer).flatten().tolist()))  # the words of `_ids`, the training captions
    model = tiny_denoiser(
        tokenizer, caption_length=LENGTH, rounding_vocabulary=vocabulary, rounding_logit_scale=10.0,
        rounding_transitions=True, image_transition_rank=2, image_features="patches", patch_dim=PATCH_DIM,
        x1_restoring_loss=False, **config_kwargs,
    )
    with torch.no_grad():
        model.image_transition_right.weight.normal_(generator=torch.Generator().manual_seed(2))
    return model


def test_image_transitions_are_the_static_scores_plus_each_image_tokens_pairs(tokenizer):
    """`A_image[a, b] = A[a, b] + Σ_p Σ_k left_k(c_p)[a] · right_k(c_p)[b]` over the projected image tokens `c_p`,
    zero at initialisation, and one matrix per image."""
    patches = torch.randn(BATCH, 5, PATCH_DIM, generator=torch.Generator().manual_seed(0))
    fresh = tiny_denoiser(tokenizer, rounding_vocabulary=[0, 1, 2, 3, 5, 6, 7], rounding_transitions=True,
                          image_transition_rank=2, image_features="patches", patch_dim=PATCH_DIM)
    torch.testing.assert_close(fresh.chain_transitions(patches), torch.zeros(BATCH, 7, 7))

    model = _image_chain(tokenizer)
    vocab_size = len(model.rounding_token_ids)
    with torch.no_grad():
        model.transition_scores.normal_(generator=torch.Generator().manual_seed(3))
        transitions = model.chain_transitions(patches)
        tokens = model.image_projection(patches)  # (batch, 5, hidden)
        expected = model.transition_scores.expand(BATCH, -1, -1).clone()
        for row in range(BATCH):
            for token in tokens[row]:
                first, second = (layer(token).view(2, vocab_size) for layer in (model.image_transition_left,
                                                                        model.image_transition_right))
                for k in range(2):
                    expected[row] += torch.outer(first[k], second[k])
    assert transitions.shape == (BATCH, vocab_size, vocab_size)
    torch.testing.assert_close(transitions, expected)
    assert not torch.allclose(transitions[0], transitions[1])


def test_rounding_with_image_transitions_reads_each_captions_own_image(tokenizer):
    """Each caption is rounded (Viterbi) under its own image's transitions; without the images the model says what
    it needs."""
    from clip_diffusionlm.models.modeling_clip_diffusionlm import linear_chain_best_path

    model = _image_chain(tokenizer)
    patches = torch.randn(BATCH, 5, PATCH_DIM, generator=torch.Generator().manual_seed(0))
    estimate = torch.randn(BATCH, LENGTH, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        rounded = model.round_to_indices(estimate, patches)
        logits, transitions = model.round_to_logits(estimate).float(), model.chain_transitions(patches)
        for row in range(BATCH):
            assert torch.equal(rounded[row], linear_chain_best_path(logits[row : row + 1], transitions[row])[0])
        other_images = patches.roll(1, dims=0)
        assert not torch.equal(model.round_to_indices(estimate, other_images), rounded)
    with pytest.raises(ValueError, match="image_transition_rank.*image_embeds"):
        model.round_to_token_ids(estimate)


def test_image_transitions_are_trained_by_every_objective(tokenizer):
    """The chain's loss reads each caption's image: it changes with the image, and its gradient reaches the image
    term. Every objective that rounds (drafts, reference selection, step distillation) hands the images on."""
    from clip_diffusionlm.diffusion import distillation_loss

    model = _image_chain(tokenizer).train()
    scheduler = make_noise_scheduler(model.config, DDPMScheduler)
    ids = _ids(tokenizer)
    patches = torch.randn(BATCH, 5, PATCH_DIM, generator=torch.Generator().manual_seed(0))
    references = torch.stack([ids, ids.roll(1, dims=0)], dim=1)  # (batch, 2, length)

    def rounding_loss(images):
        torch.manual_seed(0)
        return diffusion_loss(model, scheduler, ids, images, draft_prob=0.5, reference_ids=references).rounding_loss

    loss = rounding_loss(patches)
    assert not torch.allclose(loss, rounding_loss(patches.roll(1, dims=0)))
    loss.backward()
    assert model.image_transition_right.weight.grad.abs().sum() > 0
    teacher = _image_chain(tokenizer).requires_grad_(False)
    distilled = distillation_loss(model, teacher, scheduler, ids, patches)
    assert torch.isfinite(distilled.loss)


@pytest.mark.parametrize("self_conditioning", [False, True])
def test_distillation_target_is_the_teachers_two_step_ddim_result(tokenizer, self_conditioning):
    """From x_T at t = T - 1, the teacher's two trailing DDIM steps are what the pipeline samples with DDIM in two."""
    from conftest import tiny_pipeline

    from clip_diffusionlm.diffusion import teacher_estimate

    pipe = tiny_pipeline(tokenizer, self_conditioning=self_conditioning)
    pipe.set_progress_bar_config(disable=True)
    if self_conditioning:
        torch.nn.init.normal_(pipe.denoiser.self_condition_projection.weight, std=0.5)  # zero-initialised
    image = torch.randn(3, CONDITION_DIM)
    sampled = pipe(image_embeds=image, num_inference_steps=2, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).captions
    config = pipe.denoiser.config
    start = torch.randn(3, config.caption_length, pipe.denoiser.hidden_size, generator=torch.Generator().manual_seed(0))
    last = torch.full((3,), config.num_train_timesteps - 1)
    with torch.no_grad():
        target = teacher_estimate(pipe.denoiser, pipe.scheduler.alphas_cumprod, start, last, 2, image_embeds=image)
        one_step = teacher_estimate(pipe.denoiser, pipe.scheduler.alphas_cumprod, start, last, 1, image_embeds=image)
    torch.testing.assert_close(target, sampled)
    assert not torch.allclose(one_step, sampled)


def test_distillation_loss_is_zero_for_a_student_matching_a_one_step_teacher(tokenizer):
    from clip_diffusionlm.diffusion import distillation_loss

    # The same weights (tiny_denoiser seeds its initialisation), without dropout: the same function.
    teacher = tiny_denoiser(tokenizer, caption_length=LENGTH).requires_grad_(False)
    student = tiny_denoiser(tokenizer, caption_length=LENGTH)
    scheduler = make_noise_scheduler(teacher.config, DDPMScheduler)
    image = torch.randn(BATCH, CONDITION_DIM)
    torch.manual_seed(0)
    same = distillation_loss(student, teacher, scheduler, _ids(tokenizer), image, teacher_steps=1)
    assert same.restoring_loss.item() == pytest.approx(0.0, abs=1e-10)
    torch.manual_seed(0)
    output = distillation_loss(student, teacher, scheduler, _ids(tokenizer), image, teacher_steps=2,
                               timesteps_per_caption=2)
    assert output.restoring_loss > 0 and output.prediction.shape[0] == 2 * BATCH
    output.loss.backward()
    assert all(parameter.grad is None for parameter in teacher.parameters())
    assert any(parameter.grad is not None and parameter.grad.abs().sum() > 0 for parameter in student.parameters())


def test_one_step_draft_is_what_the_pipeline_writes_in_one_step(tokenizer):
    from conftest import tiny_pipeline

    from clip_diffusionlm.diffusion import one_step_draft

    pipe = tiny_pipeline(tokenizer)
    pipe.set_progress_bar_config(disable=True)
    image = torch.randn(3, CONDITION_DIM)
    written = pipe(image_embeds=image, num_inference_steps=1, output_type="token_ids", no_repeat_ngram_size=0,
                   length_bonus=0, generator=torch.Generator().manual_seed(0)).captions
    config = pipe.denoiser.config
    noise = torch.randn(3, config.caption_length, pipe.denoiser.hidden_size, generator=torch.Generator().manual_seed(0))
    draft = one_step_draft(pipe.denoiser, pipe.scheduler.alphas_cumprod, noise, image_embeds=image)
    assert torch.equal(pipe.denoiser.round_to_token_ids(draft), written)
    torch.testing.assert_close(draft, pipe.denoiser.embed_captions(written))  # words, not a regression mean


@pytest.mark.parametrize("draft_prob", [0.0, 1.0])
def test_draft_rows_are_noised_from_the_models_one_step_draft(tokenizer, draft_prob):
    """Step-unrolled denoising: the denoiser's input x_t is the one-step draft (not the caption) noised to t, and
    the target stays the caption. With `draft_prob=0` the random draws are those of the plain objective."""
    from clip_diffusionlm.diffusion import TimestepSampling, diffusion_loss, one_step_draft

    model = tiny_denoiser(tokenizer, caption_length=LENGTH, x1_restoring_loss=False)
    scheduler = make_noise_scheduler(model.config, DDPMScheduler)
    calls = ModelCalls(model)
    image, ids, sampling = torch.randn(BATCH, CONDITION_DIM), _ids(tokenizer), TimestepSampling()
    torch.manual_seed(0)
    output = diffusion_loss(model, scheduler, ids, image, timestep_sampling=sampling, draft_prob=draft_prob)
    noisy = calls.calls[-1]["noisy_embeds"]

    torch.manual_seed(0)  # the draws in the objective's order: t, the noise, condition dropout, the draft's noise
    timesteps = sampling.sample(model.config.num_train_timesteps, BATCH, torch.device("cpu"))
    noise = torch.randn(BATCH, LENGTH, model.hidden_size)
    torch.rand(BATCH)
    noised_from = model.embed_captions(ids)
    if draft_prob:
        noised_from = one_step_draft(model, scheduler.alphas_cumprod, torch.randn(BATCH, LENGTH, model.hidden_size),
                                     image_embeds=image)
        assert not torch.equal(model.round_to_token_ids(noised_from), ids)
    torch.testing.assert_close(noisy, scheduler.add_noise(noised_from, noise, timesteps))
    target = model.embed_captions(ids)
    assert output.restoring_loss.item() == pytest.approx(
        (output.prediction - target).pow(2).sum(-1).mean().item(), rel=1e-6)


def test_closest_reference_is_the_one_the_prediction_spells(tokenizer):
    """Reference selection's choice: a prediction that is exactly one reference's word embeddings picks that one, and
    otherwise the reference of lowest `‖x̂0 − E[ids]‖² + λ·L_R`, checked against the objective's own terms."""
    from clip_diffusionlm.diffusion import closest_references, rounding_loss_per_caption

    ids = _ids(tokenizer)
    model = tiny_denoiser(tokenizer, caption_length=LENGTH, rounding_logit_scale=10.0, rounding_transitions=True,
                          rounding_vocabulary=sorted(set(ids.flatten().tolist())))
    with torch.no_grad():
        model.transition_scores.normal_(generator=torch.Generator().manual_seed(0))
    references = torch.stack([ids.roll(shift, dims=0) for shift in range(BATCH)], dim=1)  # (batch, 3, length)
    spelled = torch.tensor([2, 0, 1])
    exact = model.embed_captions(references[torch.arange(BATCH), spelled])
    assert torch.equal(closest_references(model, exact, references), references[torch.arange(BATCH), spelled])

    prediction = torch.randn(BATCH, LENGTH, model.hidden_size, generator=torch.Generator().manual_seed(1))
    costs = torch.stack([
        (prediction - model.embed_captions(references[:, k])).pow(2).sum(-1).mean(-1)
        + model.config.rounding_weight * rounding_loss_per_caption(
            model, model.round_to_logits(prediction), model.rounding_targets(references[:, k]))
        for k in range(BATCH)
    ], dim=1)
    expected = references[torch.arange(BATCH), costs.argmin(dim=1)]
    assert torch.equal(closest_references(model, prediction, references), expected)


def test_reference_selection_trains_towards_the_closest_reference(tokenizer):
    """With every reference of the image given, a row's target is the closest one to its prediction, not the caption
    it was noised from; one reference, the caption itself, is the plain objective."""
    from clip_diffusionlm.diffusion import TimestepSampling, closest_references, diffusion_loss

    model = tiny_denoiser(tokenizer, caption_length=LENGTH, x1_restoring_loss=False)
    scheduler = make_noise_scheduler(model.config, DDPMScheduler)
    image, ids, sampling = torch.randn(BATCH, CONDITION_DIM), _ids(tokenizer), TimestepSampling()
    references = torch.stack([ids.roll(shift, dims=0) for shift in range(BATCH)], dim=1)

    def loss(**kwargs):
        torch.manual_seed(0)
        return diffusion_loss(model, scheduler, ids, image, timestep_sampling=sampling, **kwargs)

    plain, itself = loss(), loss(reference_ids=ids[:, None])
    torch.testing.assert_close(itself.loss, plain.loss)
    selected = loss(reference_ids=references)
    chosen = closest_references(model, selected.prediction, references)
    assert not torch.equal(chosen, ids)  # some rows were trained towards another of their references
    torch.testing.assert_close(selected.loss, loss(reference_ids=chosen[:, None]).loss)
    assert selected.loss < plain.loss


def test_per_position_timesteps_equal_per_row_ones_when_all_positions_share_them(tokenizer):
    model = tiny_denoiser(tokenizer, caption_length=LENGTH, prediction_type="previous_sample",
                          prediction_step_offset=100).eval()
    scheduler = make_noise_scheduler(model.config, DDPMScheduler)
    noisy, image = torch.randn(BATCH, LENGTH, model.hidden_size), torch.randn(BATCH, CONDITION_DIM)
    per_row = torch.tensor([0, 999, 500, 250])[:BATCH]
    per_position = per_row[:, None].expand(-1, LENGTH)
    for timesteps in (per_row, per_position):
        prediction = model(noisy, timesteps, image).prediction
        estimate = model.predicted_original_sample(prediction, noisy, timesteps, scheduler.alphas_cumprod)
        if timesteps.ndim == 1:
            expected_prediction, expected_estimate = prediction, estimate
    torch.testing.assert_close(prediction, expected_prediction)
    torch.testing.assert_close(estimate, expected_estimate)
    mixed = per_position.clone()
    mixed[:, 0] = 500
    assert not torch.allclose(model(noisy, mixed, image).prediction, expected_prediction)


def test_mask_predict_rows_are_pure_noise_where_masked_and_clean_words_elsewhere(tokenizer):
    from clip_diffusionlm.diffusion import TimestepSampling, diffusion_loss

    model = tiny_denoiser(tokenizer, caption_length=LENGTH, x1_restoring_loss=False)
    scheduler = make_noise_scheduler(model.config, DDPMScheduler)
    calls = ModelCalls(model)
    ids, image, rows = _ids(tokenizer).repeat(4, 1), torch.randn(4 * BATCH, CONDITION_DIM), 4 * BATCH
    torch.manual_seed(0)
    diffusion_loss(model, scheduler, ids, image, mask_predict_prob=1.0)
    timesteps, noisy = calls.calls[-1]["timesteps"], calls.calls[-1]["noisy_embeds"]
    assert timesteps.shape == (rows, LENGTH) and set(timesteps.unique().tolist()) == {0, 999}

    torch.manual_seed(0)  # the draws in the objective's order: t, the noise, condition dropout, then the masks
    TimestepSampling().sample(1000, rows, torch.device("cpu"))
    noise = torch.randn(rows, LENGTH, model.hidden_size)
    torch.rand(rows), torch.rand(rows)  # dropout; which rows refine (all of them)
    masked_share = torch.rand(rows, 1)
    masked = torch.rand(rows, LENGTH) < masked_share
    assert torch.equal(timesteps, torch.where(masked, 999, 0))
    alpha_bar = scheduler.alphas_cumprod[timesteps][..., None]
    torch.testing.assert_close(noisy, alpha_bar.sqrt() * model.embed_captions(ids) + (1 - alpha_bar).sqrt() * noise)

    torch.manual_seed(0)
    diffusion_loss(model, scheduler, ids, image, mask_predict_prob=0.0)
    assert calls.calls[-1]["timesteps"].shape == (rows,)
