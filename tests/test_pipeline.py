from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import CONDITION_DIM, IMAGE_SIZE, PATCH_DIM, ModelCalls, tiny_pipeline
from diffusers import DDPMScheduler, DiffusionPipeline

from clip_diffusionlm import CLIPDiffusionCaptionPipeline, CLIPDiffusionLMModel
from clip_diffusionlm.pipelines.captioning_utils import collapse_repeated_words, decode_captions, encode_images


def _images():
    return [
        PIL.Image.new("RGB", (40, 30), (255, 0, 0)),
        PIL.Image.new("L", (20, 20), 128),
        PIL.Image.new("RGBA", (24, 24), (0, 0, 255, 100)),
    ]


def _run(pipe, images=None, seed=0, **kwargs):
    return pipe(images if images is not None else _images(), generator=torch.Generator().manual_seed(seed), **kwargs)


def test_captions_per_image_and_types(pipeline):
    captions = _run(pipeline, num_captions_per_image=2).captions
    assert len(captions) == 6 and all(isinstance(caption, str) for caption in captions)
    token_ids = _run(pipeline, output_type="token_ids").captions
    assert token_ids.shape == (3, pipeline.denoiser.config.caption_length) and token_ids.dtype == torch.long
    latent = _run(pipeline, output_type="latent").captions
    assert latent.shape == (3, pipeline.denoiser.config.caption_length, 32)
    assert _run(pipeline, return_dict=False)[0] == _run(pipeline).captions


def test_accepts_numpy_tensor_and_grayscale_inputs(pipeline):
    rgb = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 200, dtype=np.uint8)
    as_pil = _run(pipeline, [PIL.Image.fromarray(rgb)], output_type="latent").captions
    for same in (rgb, rgb.astype(np.float32) / 255.0, torch.from_numpy(rgb).permute(2, 0, 1), rgb[None]):
        torch.testing.assert_close(_run(pipeline, same, output_type="latent").captions, as_pil)
    gray = np.full((IMAGE_SIZE, IMAGE_SIZE), 200, dtype=np.uint8)
    torch.testing.assert_close(_run(pipeline, gray, output_type="latent").captions, as_pil)
    batch = torch.rand(4, 3, 16, 16)
    assert len(_run(pipeline, batch).captions) == 4


def test_vision_feature_layer_reads_that_layer_of_the_vision_tower(tokenizer, tmp_path):
    pipe = tiny_pipeline(tokenizer, image_features="patches", patch_dim=PATCH_DIM, vision_feature_layer=0)
    pipe.set_progress_bar_config(disable=True)
    vision = pipe.image_encoder.vision_model
    pixel_values = pipe.image_processor(images=_images(), return_tensors="pt").pixel_values
    with torch.no_grad():  # layer 0: the patch embeddings as the first layer receives them
        expected = vision.post_layernorm(vision.pre_layrnorm(vision.embeddings(pixel_values)))
    patches = pipe.encode_images(_images())
    torch.testing.assert_close(patches, expected)
    assert not torch.allclose(patches, encode_images(pipe.image_encoder, pipe.image_processor, _images(), "patches"))

    pipe.save_pretrained(tmp_path / "pipe")
    reloaded = CLIPDiffusionCaptionPipeline.from_pretrained(tmp_path / "pipe")
    assert reloaded.denoiser.config.vision_feature_layer == 0
    torch.testing.assert_close(reloaded.encode_images(_images()), patches)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"vision_feature_layer": 1}, "needs image_features='patches'"),
        ({"image_features": "patches", "patch_dim": PATCH_DIM, "vision_feature_layer": 9}, "vision tower of 2 layers"),
        ({"image_features": "patches", "patch_dim": PATCH_DIM, "vision_feature_layer": "last"}, "must be an int"),
    ],
)
def test_vision_feature_layer_errors_name_it(tokenizer, kwargs, message):
    with pytest.raises(ValueError, match=f"vision_feature_layer.*{message}"):
        tiny_pipeline(tokenizer, **kwargs).encode_images(_images())


def test_image_embeds_path_matches_images(pipeline):
    embeds = pipeline.encode_images(_images())
    assert embeds.shape == (3, CONDITION_DIM)
    torch.testing.assert_close(embeds.norm(dim=-1), torch.ones(3))
    from_embeds = pipeline(image_embeds=embeds, generator=torch.Generator().manual_seed(0)).captions
    assert from_embeds == _run(pipeline).captions


def test_patch_features_pipeline(tokenizer, tmp_path):
    pipe = tiny_pipeline(tokenizer, image_features="patches", patch_dim=PATCH_DIM)
    pipe.set_progress_bar_config(disable=True)
    patches = pipe.encode_images(_images())
    num_patches = (IMAGE_SIZE // pipe.image_encoder.config.patch_size) ** 2
    assert patches.shape == (3, num_patches + 1, PATCH_DIM)
    # [CLS] under CLIP's own projection is the pooled embedding: both kinds come from the same forward pass.
    projected = pipe.image_encoder.visual_projection(patches[:, 0])
    pooled = encode_images(pipe.image_encoder, pipe.image_processor, _images())
    torch.testing.assert_close(projected / projected.norm(dim=-1, keepdim=True), pooled)

    captions = _run(pipe).captions
    assert pipe(image_embeds=patches, generator=torch.Generator().manual_seed(0)).captions == captions
    with pytest.raises(ValueError, match=r"image_embeds.*\(batch_size >= 1, num_patches \+ 1, 32\).*'patches'"):
        pipe(image_embeds=pooled)
    pipe.save_pretrained(tmp_path / "pipe")
    reloaded = CLIPDiffusionCaptionPipeline.from_pretrained(tmp_path / "pipe")
    reloaded.set_progress_bar_config(disable=True)
    assert reloaded.denoiser.config.image_features == "patches"
    assert _run(reloaded).captions == captions


def test_rounding_reads_the_image_where_the_chain_does(tokenizer, tmp_path):
    """With `image_transition_rank`, every rounding of a call (the captions, clamping, a mask-predict refinement)
    uses the captions' own image features, and the image term survives saving."""
    pipe = tiny_pipeline(tokenizer, image_features="patches", patch_dim=PATCH_DIM, rounding_transitions=True,
                         image_transition_rank=2, rounding_vocabulary=list(range(tokenizer.vocab_size)))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        pipe.denoiser.image_transition_right.weight.normal_(generator=torch.Generator().manual_seed(0))
    patches = pipe.encode_images(_images())
    latent = _run(pipe, output_type="latent").captions
    token_ids = _run(pipe, output_type="token_ids", no_repeat_ngram_size=0, length_bonus=0).captions
    assert torch.equal(token_ids, pipe.denoiser.round_to_token_ids(latent, patches))
    assert not torch.equal(token_ids, pipe.denoiser.round_to_token_ids(latent, patches.roll(1, dims=0)))
    special = pipe.tokenizer.all_special_ids
    assert torch.equal(_run(pipe, output_type="token_ids").captions,
                       pipe.denoiser.round_to_token_ids(latent, patches, 3, special, 1.0))
    for kwargs in ({"clamp_to_vocabulary": True},
                   {"num_refinement_steps": 1, "refinement_timestep": 999, "refinement_ratio": 0.25}):
        assert len(_run(pipe, **kwargs).captions) == 3
    with pytest.raises(ValueError, match="image_embeds"):
        pipe.decode(latent)
    pipe.save_pretrained(tmp_path / "pipe")
    reloaded = CLIPDiffusionCaptionPipeline.from_pretrained(tmp_path / "pipe")
    reloaded.set_progress_bar_config(disable=True)
    assert torch.equal(_run(reloaded, output_type="token_ids", no_repeat_ngram_size=0, length_bonus=0).captions,
                       token_ids)


def test_captions_repeat_no_trigram_by_default(pipeline):
    """The default rounding (`no_repeat_ngram_size=3`, `length_bonus=1`) is the denoiser's with repeated trigrams
    blocked, special tokens exempt, and every other word's score raised by 1; 0 and 0 are the plain rounding. The
    untrained tiny model repeats plenty."""
    from clip_diffusionlm.models.modeling_clip_diffusionlm import first_repeated_ngram_ends
    from clip_diffusionlm.pipelines.pipeline_clip_diffusion_caption import (
        RECOMMENDED_LENGTH_BONUS,
        RECOMMENDED_NO_REPEAT_NGRAM_SIZE,
    )

    assert RECOMMENDED_NO_REPEAT_NGRAM_SIZE == 3 and RECOMMENDED_LENGTH_BONUS == 1.0
    images = _images() * 4
    latent = _run(pipeline, images, output_type="latent").captions
    plain = _run(pipeline, images, output_type="token_ids", no_repeat_ngram_size=0, length_bonus=0).captions
    assert torch.equal(plain, pipeline.denoiser.round_to_token_ids(latent))
    blocked = _run(pipeline, images, output_type="token_ids").captions
    special = pipeline.tokenizer.all_special_ids
    assert torch.equal(blocked, pipeline.denoiser.round_to_token_ids(latent, None, 3, special, 1.0))
    exempt = torch.isin(torch.arange(pipeline.tokenizer.vocab_size), torch.tensor(special))
    assert (first_repeated_ngram_ends(plain, 3, exempt) >= 0).any()
    assert (first_repeated_ngram_ends(blocked, 3, exempt) == -1).all()
    assert _run(pipeline, images).captions == pipeline.decode(latent)


def test_deterministic_with_generator(pipeline):
    first = _run(pipeline, seed=3, output_type="latent").captions
    torch.testing.assert_close(_run(pipeline, seed=3, output_type="latent").captions, first)
    assert not torch.allclose(_run(pipeline, seed=4, output_type="latent").captions, first)


class StepRecorder:
    """A `callback_on_step_end` that keeps each step's tensors."""

    def __init__(self):
        self.steps: list[dict] = []

    def __call__(self, pipe, step_index, timestep, callback_kwargs):
        self.steps.append({"step_index": step_index, "timestep": int(timestep), **callback_kwargs})
        return {}


def test_guidance_combines_both_halves_of_one_call(tokenizer):
    pipe = tiny_pipeline(tokenizer, condition_drop_prob=0.2)
    pipe.set_progress_bar_config(disable=True)
    calls, steps = ModelCalls(pipe.denoiser), StepRecorder()
    _run(pipe, num_inference_steps=2, guidance_scale=3.0, callback_on_step_end=steps)
    assert len(calls.calls) == 2  # one doubled batch per step
    for call, step in zip(calls.calls, steps.steps):
        assert call["drop_condition"].tolist() == [False] * 3 + [True] * 3
        conditional, unconditional = call["prediction"].chunk(2)
        torch.testing.assert_close(step["original_estimate"], unconditional + 3.0 * (conditional - unconditional))
    calls.calls.clear()
    _run(pipe, num_inference_steps=2, guidance_scale=1.0)
    assert [call["noisy_embeds"].shape[0] for call in calls.calls] == [3, 3]  # w = 1: the conditional pass only


def test_sampling_starts_from_unit_noise_at_the_last_timestep(pipeline):
    calls = ModelCalls(pipeline.denoiser)
    _run(pipeline, num_inference_steps=4)
    first = calls.calls[0]
    # Trailing spacing: few-step sampling starts where training saw pure noise.
    assert int(first["timesteps"][0]) == pipeline.denoiser.config.num_train_timesteps - 1
    assert (first["noisy_embeds"].std() - 1).abs() < 0.1 and first["noisy_embeds"].mean().abs() < 0.1


def test_callback_on_step_end_sees_and_steers_each_step(pipeline):
    steps = StepRecorder()
    _run(pipeline, num_inference_steps=3, callback_on_step_end=steps,
         callback_on_step_end_tensor_inputs=["noisy_embeds", "original_estimate"])
    assert [step["step_index"] for step in steps.steps] == [0, 1, 2]
    assert [step["timestep"] for step in steps.steps] == pipeline.scheduler.timesteps.tolist()
    assert steps.steps[0]["noisy_embeds"].shape == (3, 8, 32)

    def replace_estimate(pipe, step_index, timestep, callback_kwargs):
        return {"original_estimate": torch.zeros_like(callback_kwargs["original_estimate"])}

    steered = _run(pipeline, output_type="latent", callback_on_step_end=replace_estimate).captions
    assert torch.count_nonzero(steered) == 0
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        _run(pipeline, callback_on_step_end=steps, callback_on_step_end_tensor_inputs=["latents"])


def test_ddpm_swap_takes_the_ancestral_path(pipeline):
    ddim = _run(pipeline, output_type="latent", num_inference_steps=4).captions
    pipeline.scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    calls, steps = ModelCalls(pipeline.denoiser), StepRecorder()
    ddpm = _run(pipeline, output_type="latent", num_inference_steps=4, callback_on_step_end=steps,
                callback_on_step_end_tensor_inputs=["noisy_embeds", "original_estimate"]).captions
    assert [int(call["timesteps"][0]) for call in calls.calls] == pipeline.scheduler.timesteps.tolist()
    assert not torch.allclose(ddpm, ddim)
    # Each DDPM step lands on the posterior mean of x_{t'} given x_t and x̂0, plus fresh noise of its variance.
    scheduler = pipeline.scheduler
    for call, step in zip(calls.calls[:-1], steps.steps[:-1]):
        t = int(call["timesteps"][0])
        t_prev = scheduler.previous_timestep(t)
        alpha_bar, alpha_bar_prev = scheduler.alphas_cumprod[t], scheduler.alphas_cumprod[t_prev]
        beta = 1 - alpha_bar / alpha_bar_prev
        mean = (alpha_bar_prev.sqrt() * beta / (1 - alpha_bar)) * step["original_estimate"] + (
            (1 - beta).sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar)
        ) * call["noisy_embeds"]
        noise = (step["noisy_embeds"] - mean) / ((1 - alpha_bar_prev) / (1 - alpha_bar) * beta).sqrt()
        assert (noise.std() - 1).abs() < 0.15


def test_refinement_and_clamping(pipeline):
    calls = ModelCalls(pipeline.denoiser)
    plain = _run(pipeline, output_type="latent").captions
    calls.calls.clear()
    refined = _run(pipeline, output_type="latent", num_refinement_steps=2).captions
    assert [int(call["timesteps"][0]) for call in calls.calls[-2:]] == [0, 0]
    torch.testing.assert_close(refined, calls.calls[-1]["prediction"])
    assert not torch.allclose(refined, plain)
    clamped = _run(pipeline, output_type="latent", clamp_to_vocabulary=True).captions
    vocabulary = pipeline.denoiser.get_input_embeddings().weight
    distances = torch.cdist(clamped.reshape(-1, 32), vocabulary).min(dim=-1).values
    assert distances.max() < 1e-4


def test_renoised_refinement_predicts_again_from_the_words_noised_to_its_timestep(pipeline):
    calls = ModelCalls(pipeline.denoiser)
    generator = torch.Generator().manual_seed(0)
    first = pipeline(_images(), output_type="latent", generator=generator).captions
    refinement_noise = torch.randn(first.shape, generator=generator)  # the generator's next draw
    refined = _run(pipeline, output_type="latent", num_refinement_steps=1, refinement_timestep=600).captions
    call = calls.calls[-1]
    assert call["timesteps"].unique().tolist() == [600]
    words = pipeline.denoiser.nearest_word_embeddings(first)
    torch.testing.assert_close(call["noisy_embeds"], pipeline.scheduler.add_noise(words, refinement_noise,
                                                                                   torch.tensor(600)))
    torch.testing.assert_close(refined, call["prediction"])  # an x0 predictor: its output is the new estimate
    with pytest.raises(ValueError, match=r"`refinement_timestep` must be an integer in \[0, 1000\), got 1000"):
        _run(pipeline, num_refinement_steps=1, refinement_timestep=1000)


def test_mask_predict_refinement_renoises_only_the_least_sure_words_and_keeps_the_others(pipeline):
    calls = ModelCalls(pipeline.denoiser)
    generator = torch.Generator().manual_seed(0)
    first = pipeline(_images(), output_type="latent", generator=generator).captions  # (3, 8, 32)
    refinement_noise = torch.randn(first.shape, generator=generator)
    refined = _run(pipeline, output_type="latent", num_refinement_steps=1, refinement_timestep=999,
                   refinement_ratio=0.25).captions
    call = calls.calls[-1]
    confidence = pipeline.denoiser.round_to_logits(first).softmax(dim=-1).amax(dim=-1)
    least_sure = confidence.argsort(dim=1)[:, :2]  # 0.25 of 8 positions
    renoised = torch.zeros_like(confidence, dtype=torch.bool).scatter_(1, least_sure, True)
    assert call["timesteps"].shape == (3, 8)
    assert torch.equal(call["timesteps"], torch.where(renoised, 999, 0))
    words = pipeline.denoiser.nearest_word_embeddings(first)
    expected_input = torch.where(renoised[..., None],
                                 pipeline.scheduler.add_noise(words, refinement_noise, torch.tensor(999)),
                                 pipeline.scheduler.add_noise(words, refinement_noise, torch.tensor(0)))
    torch.testing.assert_close(call["noisy_embeds"], expected_input)
    torch.testing.assert_close(refined[renoised], call["prediction"][renoised])
    torch.testing.assert_close(refined[~renoised], first[~renoised])
    for kwargs, message in (({"refinement_ratio": 0.0, "refinement_timestep": 999}, r"`refinement_ratio` must be in"),
                            ({"refinement_ratio": 0.5}, "give a `refinement_timestep` above 0")):
        with pytest.raises(ValueError, match=message):
            _run(pipeline, num_refinement_steps=1, **kwargs)


def test_previous_sample_model_converts_each_output_to_x0(tokenizer):
    pipe = tiny_pipeline(tokenizer, prediction_type="previous_sample", prediction_step_offset=100)
    pipe.set_progress_bar_config(disable=True)
    calls, steps = ModelCalls(pipe.denoiser), StepRecorder()
    _run(pipe, num_inference_steps=3, callback_on_step_end=steps)
    alphas_cumprod = pipe.scheduler.alphas_cumprod
    for call, step in zip(calls.calls, steps.steps):
        t = int(call["timesteps"][0])
        alpha_bar_t = alphas_cumprod[t]
        alpha_bar_s = alphas_cumprod[t - 100] if t >= 100 else torch.tensor(1.0)
        c0 = alpha_bar_s.sqrt() * (1 - alpha_bar_t / alpha_bar_s) / (1 - alpha_bar_t)
        ct = (alpha_bar_t / alpha_bar_s).sqrt() * (1 - alpha_bar_s) / (1 - alpha_bar_t)
        expected = (call["prediction"] - ct * call["noisy_embeds"]) / c0
        torch.testing.assert_close(step["original_estimate"], expected, rtol=1e-4, atol=1e-4)


def test_self_conditioned_sampling_feeds_back_the_previous_estimate(tokenizer):
    pipe = tiny_pipeline(tokenizer, self_conditioning=True)
    pipe.set_progress_bar_config(disable=True)
    torch.nn.init.normal_(pipe.denoiser.self_condition_projection.weight, std=0.5)
    calls, steps = ModelCalls(pipe.denoiser), StepRecorder()
    _run(pipe, num_inference_steps=3, callback_on_step_end=steps)
    assert calls.calls[0].get("self_conditioning_embeds") is None
    for call, previous in zip(calls.calls[1:], steps.steps):
        torch.testing.assert_close(call["self_conditioning_embeds"], previous["original_estimate"])
    first = calls.calls[1]
    without = pipe.denoiser(first["noisy_embeds"], first["timesteps"], first["image_embeds"]).prediction
    assert not torch.allclose(without, first["prediction"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "options, call_kwargs",
    [
        ({}, {}),
        ({"prediction_type": "previous_sample"}, {}),
        ({"condition_drop_prob": 0.2}, {"guidance_scale": 2.0}),
        ({"self_conditioning": True}, {"num_refinement_steps": 1}),
        ({}, {"clamp_to_vocabulary": True}),
        ({"use_text_condition": True}, {"text_embeds": torch.randn(3, CONDITION_DIM)}),
    ],
)
def test_half_precision_sampling(tokenizer, dtype, options, call_kwargs):
    pipe = tiny_pipeline(tokenizer, **options).to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    steps = StepRecorder()
    latent = _run(pipe, output_type="latent", num_inference_steps=3, callback_on_step_end=steps,
                  callback_on_step_end_tensor_inputs=["noisy_embeds"], **call_kwargs).captions
    assert latent.dtype == dtype and torch.isfinite(latent).all()
    assert all(step["noisy_embeds"].dtype == dtype for step in steps.steps)
    assert len(_run(pipe, **call_kwargs).captions) == 3


def test_decode_strips_special_tokens_and_collapses_per_caption(tokenizer):
    ids = tokenizer(["a a red red circle", "red circle"], padding="max_length", max_length=8, return_tensors="pt")
    assert decode_captions(tokenizer, ids.input_ids) == ["a red circle", "red circle"]
    assert collapse_repeated_words("a star star and a star") == "a star and a star"


def test_save_and_reload_through_both_loaders(pipeline, tmp_path):
    expected = _run(pipeline).captions
    pipeline.save_pretrained(tmp_path / "pipe")
    saved = sorted(os.listdir(tmp_path / "pipe" / "denoiser"))
    assert "model.safetensors" in saved and not any(name.endswith(".bin") for name in saved)
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["denoiser"][1] == "CLIPDiffusionLMModel"

    reloaded = CLIPDiffusionCaptionPipeline.from_pretrained(tmp_path / "pipe")
    assert type(reloaded) is CLIPDiffusionCaptionPipeline and type(reloaded.denoiser) is CLIPDiffusionLMModel
    reloaded.set_progress_bar_config(disable=True)
    assert _run(reloaded).captions == expected

    # diffusers alone runs the folder's own copy of the pipeline and denoiser code.
    generic = DiffusionPipeline.from_pretrained(tmp_path / "pipe", trust_remote_code=True)
    assert type(generic).__name__ == "CLIPDiffusionCaptionPipeline" and type(generic) is not CLIPDiffusionCaptionPipeline
    generic.set_progress_bar_config(disable=True)
    assert _run(generic).captions == expected


def test_loading_by_hub_id_offline(pipeline, tmp_path):
    """A Hub repository in the Hugging Face cache layout, loaded by id with the network switched off."""
    expected = _run(pipeline).captions
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo_cache = tmp_path / "hf" / "hub" / "models--someone--shapes-captioner"
    pipeline.save_pretrained(repo_cache / "snapshots" / revision)
    (repo_cache / "refs").mkdir()
    (repo_cache / "refs" / "main").write_text(revision)
    script = textwrap.dedent(
        """
        import json, sys, torch, PIL.Image
        from clip_diffusionlm import CLIPDiffusionCaptionPipeline
        pipe = CLIPDiffusionCaptionPipeline.from_pretrained("someone/shapes-captioner")
        pipe.set_progress_bar_config(disable=True)
        images = [PIL.Image.new("RGB", (40, 30), (255, 0, 0)), PIL.Image.new("L", (20, 20), 128),
                  PIL.Image.new("RGBA", (24, 24), (0, 0, 255, 100))]
        print(json.dumps(pipe(images, generator=torch.Generator().manual_seed(0)).captions))
        """
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected


def test_bad_inputs_are_named(pipeline):
    with pytest.raises(ValueError, match="exactly one"):
        pipeline()
    with pytest.raises(ValueError, match="empty"):
        pipeline([])
    with pytest.raises(TypeError, match=r"images\[1\]"):
        pipeline([PIL.Image.new("RGB", (8, 8)), "not-an-image.png"])
    with pytest.raises(TypeError, match="images"):
        pipeline("photo.jpg")
    with pytest.raises(ValueError, match=r"images\[0\].*shape"):
        pipeline(np.zeros((8, 8, 5), dtype=np.uint8))
    with pytest.raises(ValueError, match="outside"):
        pipeline(np.full((8, 8, 3), 3.0, dtype=np.float32))
    with pytest.raises(ValueError, match="num_inference_steps"):
        _run(pipeline, num_inference_steps=0)
    with pytest.raises(ValueError, match="image_embeds"):
        pipeline(image_embeds=torch.zeros(2, CONDITION_DIM + 1))
    with pytest.raises(ValueError, match="image_embeds"):
        pipeline(image_embeds=torch.zeros(0, CONDITION_DIM))
    with pytest.raises(ValueError, match="output_type"):
        _run(pipeline, output_type="pil")
    with pytest.raises(ValueError, match="guidance_scale"):
        _run(pipeline, guidance_scale=-1.0)
    caption_length = pipeline.denoiser.config.caption_length
    for size in (-1, caption_length + 1, 2.0):
        with pytest.raises(ValueError, match=rf"`no_repeat_ngram_size` must be an integer in \[0, {caption_length}\]"):
            _run(pipeline, no_repeat_ngram_size=size)
    for bonus in (float("nan"), float("inf"), "1", True):
        with pytest.raises(ValueError, match="`length_bonus` must be a finite number"):
            _run(pipeline, length_bonus=bonus)


def test_incomplete_or_pickled_checkpoints_are_refused(pipeline, tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        CLIPDiffusionCaptionPipeline.from_pretrained(tmp_path)
    pipeline.save_pretrained(tmp_path / "pipe")
    shutil.rmtree(tmp_path / "pipe" / "tokenizer")
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        CLIPDiffusionCaptionPipeline.from_pretrained(tmp_path / "pipe")

    pipeline.save_pretrained(tmp_path / "pickled")
    denoiser_dir = tmp_path / "pickled" / "denoiser"
    (denoiser_dir / "model.safetensors").unlink()
    torch.save(pipeline.denoiser.state_dict(), denoiser_dir / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="allow_pickle"):
        CLIPDiffusionCaptionPipeline.from_pretrained(tmp_path / "pickled")
    loaded = CLIPDiffusionCaptionPipeline.from_pretrained(tmp_path / "pickled", allow_pickle=True)
    assert isinstance(loaded, CLIPDiffusionCaptionPipeline)


def test_a_pipeline_saved_by_the_flat_layout_loads_and_captions_the_same(tmp_path):
    """`tests/fixtures/pipeline_0.1_flat_layout` was saved by version 0.1 (modules at the package's top level, a
    repository stub importing `clip_diffusionlm`), with the captions that version wrote for two images. The copies of
    0.1's modeling code that transformers wrote into `denoiser/` are left out: this package loads its own classes."""
    fixture = Path(__file__).parent / "fixtures" / "pipeline_0.1_flat_layout"
    expected = json.loads((fixture / "expected_captions.json").read_text())
    index = json.loads((fixture / "pipeline" / "model_index.json").read_text())
    assert index["denoiser"][0] == "clip_diffusionlm.modeling_clip_diffusionlm"  # a module that no longer exists

    pipe = CLIPDiffusionCaptionPipeline.from_pretrained(fixture / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    images = [PIL.Image.new("RGB", (40, 30), (255, 0, 0)), PIL.Image.new("RGB", (32, 32), (0, 0, 255))]
    generator = torch.Generator().manual_seed(expected["seed"])
    # 0.1 rounded each caption as it stood: no n-gram blocking, no word bonus.
    assert pipe(images, num_inference_steps=expected["num_inference_steps"], no_repeat_ngram_size=0, length_bonus=0,
                generator=generator).captions == expected["captions"]
    # Saved again, it is a folder of the current layout.
    pipe.save_pretrained(tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / "model_index.json").read_text())["denoiser"][0] == "modeling_clip_diffusionlm"
