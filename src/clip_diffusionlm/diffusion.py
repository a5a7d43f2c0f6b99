"""The diffusion process around the denoiser: noise schedules (diffusers schedulers), the training objective's
inputs, and the conversion of an `x_{t-n}` prediction back to `x0` for sampling.

Training (`diffusion_loss`) and sampling (the pipeline) both go through the functions here, so the schedule math
exists once.
"""

from __future__ import annotations

import math

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .configuration_clip_diffusionlm import CLIPDiffusionLMConfig
from .modeling_clip_diffusionlm import CLIPDiffusionLMModel, CLIPDiffusionLMOutput

SELF_CONDITIONING_PROB = 0.5  # Chen et al. (2022): half the batches see their own detached estimate
SQRT_SCHEDULE_OFFSET = 1e-4  # Diffusion-LM's s in ᾱ(t) = 1 - sqrt(t/T + s)
MAX_BETA = 0.999


def sqrt_schedule_betas(num_train_timesteps: int) -> list[float]:
    """Diffusion-LM's sqrt schedule, `ᾱ(t) = 1 - sqrt(t/T + s)`: noise rises fast at first, which suits text."""

    def alpha_bar(fraction: float) -> float:
        return 1.0 - math.sqrt(fraction + SQRT_SCHEDULE_OFFSET)

    return [
        min(1.0 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), MAX_BETA)
        for i in range(num_train_timesteps)
    ]


def make_noise_scheduler(
    config: CLIPDiffusionLMConfig, scheduler_class: type[SchedulerMixin] = DDIMScheduler, **overrides
) -> SchedulerMixin:
    """
    A diffusers scheduler for the model's schedule that treats the model output as `x0` (`prediction_type="sample"`,
    no clipping: embeddings are not images in [-1, 1]).

    Args:
        config (`CLIPDiffusionLMConfig`):
            Supplies `num_train_timesteps` and `noise_schedule`.
        scheduler_class (`type`, *optional*, defaults to `DDIMScheduler`):
            `DDIMScheduler` for sampling, `DDPMScheduler` for training's `add_noise` or ancestral sampling.
        overrides:
            Extra scheduler arguments, e.g. `timestep_spacing="leading"`.
    """
    kwargs = {
        "num_train_timesteps": config.num_train_timesteps,
        "prediction_type": "sample",
        "clip_sample": False,
    }
    if config.noise_schedule == "sqrt":
        kwargs["trained_betas"] = sqrt_schedule_betas(config.num_train_timesteps)
    else:
        kwargs["beta_schedule"] = config.noise_schedule
    if scheduler_class is DDIMScheduler:
        # Trailing spacing starts few-step sampling at t = T-1, where training saw pure noise.
        kwargs.update(set_alpha_to_one=True, timestep_spacing="trailing")
    kwargs.update(overrides)
    return scheduler_class(**kwargs)


def jump_posterior_coefficients(
    alphas_cumprod: torch.Tensor, timesteps: torch.LongTensor, offset: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Coefficients of the posterior mean of `q(x_s | x_t, x0) = c0·x0 + ct·x_t` for the jump `s = t - offset`
    (`s < 0` means the data itself: `c0 = 1`, `ct = 0`). Shapes `(batch, 1, 1)`.
    """
    alphas_cumprod = alphas_cumprod.to(timesteps.device)
    alpha_bar_t = alphas_cumprod[timesteps]
    earlier = timesteps - offset
    alpha_bar_s = torch.where(earlier >= 0, alphas_cumprod[earlier.clamp(min=0)], torch.ones_like(alpha_bar_t))
    alpha_ts = alpha_bar_t / alpha_bar_s
    coefficient_x0 = alpha_bar_s.sqrt() * (1 - alpha_ts) / (1 - alpha_bar_t)
    coefficient_xt = alpha_ts.sqrt() * (1 - alpha_bar_s) / (1 - alpha_bar_t)
    return coefficient_x0[:, None, None], coefficient_xt[:, None, None]


def predicted_original_sample(
    config: CLIPDiffusionLMConfig,
    alphas_cumprod: torch.Tensor,
    prediction: torch.Tensor,
    noisy_embeds: torch.Tensor,
    timesteps: torch.LongTensor,
) -> torch.Tensor:
    """The model's estimate of `x0`: its output, or for `x_{t-n}` models, `(x̂_{t-n} - ct·x_t) / c0`."""
    if config.prediction_type == "sample":
        return prediction
    if timesteps.ndim == 0:
        timesteps = timesteps.expand(prediction.shape[0])
    coefficient_x0, coefficient_xt = jump_posterior_coefficients(
        alphas_cumprod, timesteps, config.prediction_step_offset
    )
    return (prediction - coefficient_xt * noisy_embeds) / coefficient_x0


def diffusion_loss(
    model: CLIPDiffusionLMModel | torch.nn.Module,
    noise_scheduler: DDPMScheduler,
    input_ids: torch.LongTensor,
    image_embeds: torch.FloatTensor,
    text_embeds: torch.FloatTensor | None = None,
    timesteps_per_caption: int = 1,
) -> CLIPDiffusionLMOutput:
    """
    One evaluation of the paper's objective on a batch: sample `t` (several per caption, as the paper samples 100 of
    the 1000 steps), noise `x0` into `x_t` and `x_1` with `noise_scheduler.add_noise`, drop the conditioning for
    classifier-free guidance, optionally self-condition, and call the model with the targets.

    Args:
        model (`CLIPDiffusionLMModel` or a wrapper of it such as DDP):
            Called once with gradients; its unwrapped module serves the no-gradient helper passes.
        noise_scheduler (`DDPMScheduler`):
            From [`make_noise_scheduler`] with the model's config.
        input_ids (`torch.LongTensor` of shape `(batch_size, caption_length)`):
            Padded caption token ids.
        image_embeds (`torch.FloatTensor` of shape `(batch_size, condition_dim)` or `(batch_size, num_patches + 1, patch_dim)`):
            Cached CLIP image features (see `config.image_features`).
        text_embeds (`torch.FloatTensor` of shape `(batch_size, condition_dim)`, *optional*):
            Cached CLIP text embeddings, for `config.use_text_condition`.
        timesteps_per_caption (`int`, *optional*, defaults to 1):
            How many independent `t` each caption is trained on in this step.
    """
    core: CLIPDiffusionLMModel = getattr(model, "module", model)
    config = core.config
    if timesteps_per_caption > 1:
        input_ids = input_ids.repeat_interleave(timesteps_per_caption, dim=0)
        image_embeds = image_embeds.repeat_interleave(timesteps_per_caption, dim=0)
        if text_embeds is not None:
            text_embeds = text_embeds.repeat_interleave(timesteps_per_caption, dim=0)
    batch_size, device = input_ids.shape[0], input_ids.device

    clean_embeds = core.embed_captions(input_ids)  # x0: (batch, caption_length, hidden)
    timesteps = torch.randint(0, config.num_train_timesteps, (batch_size,), device=device)
    noisy_embeds = noise_scheduler.add_noise(clean_embeds, torch.randn_like(clean_embeds), timesteps)
    x1_noisy_embeds = None
    if config.x1_restoring_loss:
        ones = torch.ones_like(timesteps)
        x1_noisy_embeds = noise_scheduler.add_noise(clean_embeds, torch.randn_like(clean_embeds), ones)

    target_embeds = None
    if config.prediction_type == "previous_sample":
        coefficient_x0, coefficient_xt = jump_posterior_coefficients(
            noise_scheduler.alphas_cumprod, timesteps, config.prediction_step_offset
        )
        target_embeds = coefficient_x0 * clean_embeds + coefficient_xt * noisy_embeds

    # Always a mask (all False when p = 0) so the null condition takes part in every graph, as DDP requires.
    drop_condition = torch.rand(batch_size, device=device) < config.condition_drop_prob

    self_conditioning_embeds = None
    if config.self_conditioning and torch.rand(()).item() < SELF_CONDITIONING_PROB:
        with torch.no_grad():
            first_guess = core.denoise(noisy_embeds, timesteps, image_embeds, text_embeds, None, drop_condition)
            self_conditioning_embeds = predicted_original_sample(
                config, noise_scheduler.alphas_cumprod, first_guess, noisy_embeds, timesteps
            )

    return model(
        noisy_embeds=noisy_embeds,
        timesteps=timesteps,
        image_embeds=image_embeds,
        text_embeds=text_embeds,
        self_conditioning_embeds=self_conditioning_embeds,
        drop_condition=drop_condition,
        labels=input_ids,
        target_embeds=target_embeds,
        x1_noisy_embeds=x1_noisy_embeds,
    )
