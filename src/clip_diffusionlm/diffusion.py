"""The diffusion process around the denoiser: noise schedules (diffusers schedulers), the paper's training objective,
and the conversion of an `x_{t-n}` prediction back to `x0` for sampling.

The objective lives here, diffusers-style, and not in the model's `forward`: every term needs the noise schedule
(`add_noise`, the posterior of `x_{t-n}`), which belongs with the scheduler, and the model file must stay importable
as Hub remote code without diffusers. The model is a pure function `f(x_t, t, c)`; `diffusion_loss` makes its inputs,
calls it once with gradients (x_t and x_1 share one batch, so DDP synchronises once per step) and computes every term.
Training and sampling (the pipeline) both go through the functions here, so the schedule math exists once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.training_utils import compute_density_for_timestep_sampling
from diffusers.utils import BaseOutput

from .models.modeling_clip_diffusionlm import (
    CLIPDiffusionLMConfig,
    CLIPDiffusionLMModel,
    jump_posterior_coefficients,
    linear_chain_log_partition,
    linear_chain_scores,
    predicted_original_sample,
)

SELF_CONDITIONING_PROB = 0.5  # Chen et al. (2022): half the batches see their own detached estimate
SQRT_SCHEDULE_OFFSET = 1e-4  # Diffusion-LM's s in ᾱ(t) = 1 - sqrt(t/T + s)
MAX_BETA = 0.999
WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "time_warping")
# What a trained pipeline can sample with. DDIM's steps are deterministic: in a demo model trained with
# self-conditioning every word was fixed by the first step (from pure noise) and never revised. DDPM's ancestral
# steps add fresh noise, so later steps can correct a word the first one got wrong (README).
INFERENCE_SCHEDULERS: dict[str, type[SchedulerMixin]] = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}


@dataclass(frozen=True)
class TimestepSampling:
    """
    How training draws `t`: uniformly (`"none"`, the paper), or from Stable Diffusion 3's densities over `u = t / T`
    through diffusers' `compute_density_for_timestep_sampling`, with the flag names of diffusers' SD3 examples. The
    adaptive `"time_warping"` learns its density during training: [`TimeWarping`] (`TrainingConfig` builds one).

    Args:
        weighting_scheme (`str`, *optional*, defaults to `"none"`):
            `"none"`, `"logit_normal"` (`u = sigmoid(N(logit_mean, logit_std))`), `"mode"` or `"time_warping"`.
        logit_mean (`float`, *optional*, defaults to 0.0):
            Above 0, more of each batch is drawn at high noise, where the caption has to come from the image.
        logit_std (`float`, *optional*, defaults to 1.0):
            Spread of `"logit_normal"`.
        mode_scale (`float`, *optional*, defaults to 1.29):
            Shape of `"mode"`.
    """

    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29

    def __post_init__(self):
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"`weighting_scheme` must be one of {WEIGHTING_SCHEMES}, got {self.weighting_scheme!r}.")
        if not self.logit_std > 0:
            raise ValueError(f"`logit_std` must be positive, got {self.logit_std}.")

    def sample(self, num_train_timesteps: int, batch_size: int, device: torch.device) -> torch.LongTensor:
        """`batch_size` timesteps in `[0, num_train_timesteps)`."""
        if self.weighting_scheme == "none":
            return torch.randint(0, num_train_timesteps, (batch_size,), device=device)
        if self.weighting_scheme == "time_warping":
            raise ValueError("`time_warping` learns from the losses it sees: sample with a `TimeWarping` instance.")
        u = compute_density_for_timestep_sampling(
            self.weighting_scheme, batch_size, self.logit_mean, self.logit_std, self.mode_scale, device=device
        )
        return (u * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)


class TimeWarping:
    """
    CDCD's time warping (Dieleman et al. 2022, "Continuous diffusion for categorical data", §4.3): training draws `t`
    with density proportional to how fast the cross-entropy of the rounding grows with `t`, so that the batch goes
    where the denoiser's uncertainty about the words changes, not where the task is trivial (words still readable in
    `x_t`) or hopeless in the same way at every `t` (pure noise).

    The cross-entropy is tracked per bin of `u = t / T` (an exponential moving average of the losses seen there) and
    made monotone (its running maximum over `u`): that is CDCD's fitted unnormalised CDF `F(u)`. A bin is drawn with
    probability `∝ F(bin) − F(previous bin)` and `u` uniformly inside it, i.e. `u = F⁻¹(uniform)` for the piecewise
    linear `F`. A share `uniform_share` of the draws stays uniform, so that every bin keeps being measured. Before any
    loss is seen the draws are uniform.

    Args:
        num_bins (`int`, *optional*, defaults to 100):
            Resolution of `F` over `u ∈ [0, 1)`.
        decay (`float`, *optional*, defaults to 0.99):
            Weight of a bin's past losses against a new one.
        uniform_share (`float`, *optional*, defaults to 0.05):
            Share of the density spread uniformly.
    """

    def __init__(self, num_bins: int = 100, decay: float = 0.99, uniform_share: float = 0.05):
        if num_bins < 2 or not 0 <= decay < 1 or not 0 < uniform_share <= 1:
            raise ValueError(
                f"TimeWarping needs num_bins ≥ 2, decay in [0, 1) and uniform_share in (0, 1], got {num_bins}, "
                f"{decay} and {uniform_share}."
            )
        self.num_bins, self.decay, self.uniform_share = num_bins, decay, uniform_share
        self.loss_sums = torch.zeros(num_bins, dtype=torch.float64)
        self.loss_counts = torch.zeros(num_bins, dtype=torch.float64)

    def bin_probabilities(self) -> torch.Tensor:
        """Probability of drawing `u` from each bin, shape `(num_bins,)`."""
        seen = self.loss_counts > 0
        mean_losses = torch.where(seen, self.loss_sums / self.loss_counts.clamp(min=1e-12), torch.zeros(()))
        cdf = mean_losses.cummax(dim=0).values  # monotone: the fitted F at each bin
        increments = torch.diff(cdf, prepend=cdf[:1])
        uniform = torch.full((self.num_bins,), 1 / self.num_bins, dtype=torch.float64)
        if increments.sum() <= 0:
            return uniform
        return (1 - self.uniform_share) * increments / increments.sum() + self.uniform_share * uniform

    def sample(self, num_train_timesteps: int, batch_size: int, device: torch.device) -> torch.LongTensor:
        """`batch_size` timesteps in `[0, num_train_timesteps)`, drawn from the warped density."""
        bins = torch.multinomial(self.bin_probabilities().float(), batch_size, replacement=True)
        u = (bins + torch.rand(batch_size)) / self.num_bins
        return (u * num_train_timesteps).long().clamp(0, num_train_timesteps - 1).to(device)

    def update(self, timesteps: torch.LongTensor, losses: torch.Tensor, num_train_timesteps: int) -> None:
        """Folds the per-caption rounding cross-entropies `losses` seen at `timesteps` (both `(batch,)`) into `F`."""
        bins = (timesteps.double().cpu() / num_train_timesteps * self.num_bins).long().clamp(0, self.num_bins - 1)
        self.loss_sums *= self.decay
        self.loss_counts *= self.decay
        self.loss_sums.index_add_(0, bins, losses.detach().double().cpu())
        self.loss_counts.index_add_(0, bins, torch.ones_like(bins, dtype=torch.float64))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"loss_sums": self.loss_sums.clone(), "loss_counts": self.loss_counts.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.loss_sums, self.loss_counts = state["loss_sums"].clone(), state["loss_counts"].clone()


@dataclass
class DiffusionLossOutput(BaseOutput):
    """
    Output of [`diffusion_loss`]; `batch_size` counts each caption once per sampled timestep.

    Args:
        loss (`torch.FloatTensor` of shape `()`):
            `L'_simple + λ·L_R`.
        restoring_loss (`torch.FloatTensor` of shape `()`):
            `‖f(x_t, t) − target‖²` (summed over the embedding dimension, averaged over positions); the target is `x0`,
            or the posterior mean of `x_{t-n}` for the `"previous_sample"` objective.
        x1_restoring_loss (`torch.FloatTensor` of shape `()`):
            `‖f(x_1, 1) − x0‖²`; zero when `config.x1_restoring_loss` is off.
        rounding_loss (`torch.FloatTensor` of shape `()`):
            `L_R = −log softmax(f(x_t, t) · Eᵀ)[labels]`, averaged over positions.
        rounding_loss_per_caption (`torch.FloatTensor` of shape `(batch_size,)`):
            `L_R` of each caption (averaged over its positions), what [`TimeWarping`] learns from.
        timesteps (`torch.LongTensor` of shape `(batch_size,)`):
            The `t` each caption was noised to (for mask-predict rows, the `t` drawn before their positions were
            re-assigned).
        rounding_weight (`torch.FloatTensor` of shape `()`):
            The `λ` of this batch (constant, or dynamic without gradient).
        prediction (`torch.FloatTensor` of shape `(batch_size, caption_length, hidden_size)`):
            `f(x_t, t)`.
        logits (`torch.FloatTensor` of shape `(batch_size, caption_length, rounding_vocab_size)`):
            `f(x_t, t) · Eᵀ` through the frozen, tied word embeddings.
    """

    loss: torch.FloatTensor
    restoring_loss: torch.FloatTensor
    x1_restoring_loss: torch.FloatTensor
    rounding_loss: torch.FloatTensor
    rounding_weight: torch.FloatTensor
    prediction: torch.FloatTensor
    logits: torch.FloatTensor
    rounding_loss_per_caption: torch.FloatTensor
    timesteps: torch.LongTensor


def squared_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The paper's `‖x̂ − x‖²`: summed over the embedding dimension, averaged over positions and samples. The sum (not
    a per-element mean) keeps it on the scale of the rounding cross-entropy, which is what λ = 0.3 was tuned against.
    """
    return (prediction - target).pow(2).sum(dim=-1).mean()


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
            `DDIMScheduler` for deterministic sampling, `DDPMScheduler` for training's `add_noise` or ancestral
            sampling (see `INFERENCE_SCHEDULERS`).
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
        kwargs["set_alpha_to_one"] = True
    # Trailing spacing starts few-step sampling at t = T-1, where training saw pure noise (`add_noise` ignores it).
    kwargs["timestep_spacing"] = "trailing"
    kwargs.update(overrides)
    return scheduler_class(**kwargs)


def rounding_loss_per_caption(
    model: CLIPDiffusionLMModel, logits: torch.Tensor, rounding_targets: torch.LongTensor,
    image_embeds: torch.FloatTensor | None = None,
) -> torch.Tensor:
    """`L_R` of each caption `(batch,)` from the rounding head's `logits` `(batch, caption_length, rounding_vocab_size)`:
    the words' cross-entropy averaged over positions, or with `rounding_transitions` the linear chain's `−log p(ids)`
    per position (its transitions read from each caption's `image_embeds` with `image_transition_rank`)."""
    if model.transition_scores is None:
        return F.cross_entropy(logits.transpose(1, 2).float(), rounding_targets, reduction="none").mean(dim=1)
    chain_logits, transitions = logits.float(), model.chain_transitions(image_embeds)
    negative_log_likelihood = linear_chain_log_partition(chain_logits, transitions) - linear_chain_scores(
        chain_logits, transitions, rounding_targets
    )
    return negative_log_likelihood / logits.shape[1]


@torch.no_grad()
def closest_references(
    model: CLIPDiffusionLMModel, prediction: torch.FloatTensor, reference_ids: torch.LongTensor,
    image_embeds: torch.FloatTensor | None = None,
) -> torch.LongTensor:
    """
    Of each caption's references, the one its prediction is closest to under the objective, `‖x̂0 − E[ids]‖² +
    λ·L_R(ids)` (the configured `rounding_weight` as `λ`): reference selection (Shao et al. 2022, "One Reference Is
    Not Enough"). Trained towards the reference it already leans to, a one-pass model settles on one wording and
    word order per image instead of regressing to the mean of all of them.

    Args:
        prediction (`torch.FloatTensor` of shape `(batch_size, caption_length, hidden_size)`):
            The denoiser's `x̂0`.
        reference_ids (`torch.LongTensor` of shape `(batch_size, num_references, caption_length)`):
            Every reference of each caption's image, padded token ids.
        image_embeds (`torch.FloatTensor`, *optional*):
            Each caption's image features, for a chain whose transitions read them (`image_transition_rank`).

    Returns:
        `torch.LongTensor` of shape `(batch_size, caption_length)`: the chosen reference of each caption.
    """
    batch_size, num_references, _ = reference_ids.shape
    references = reference_ids.flatten(0, 1)  # (batch · references, caption_length)
    predictions, images = repeat_rows(num_references, prediction, image_embeds)
    restoring = (predictions - model.embed_captions(references)).pow(2).sum(dim=-1).mean(dim=-1)
    rounding = rounding_loss_per_caption(model, model.round_to_logits(predictions), model.rounding_targets(references),
                                         images)
    cost = (restoring + model.config.rounding_weight * rounding).view(batch_size, num_references)
    return reference_ids[torch.arange(batch_size, device=reference_ids.device), cost.argmin(dim=1)]


def weighted_rounding_loss(
    model: CLIPDiffusionLMModel, prediction: torch.Tensor, rounding_targets: torch.LongTensor, simple_loss: torch.Tensor,
    image_embeds: torch.FloatTensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`L_R = −log softmax(x̂0 · Eᵀ)[ids]` through the tied lm_head (with `rounding_transitions`, the linear chain's
    `−log p(ids)`), averaged over positions, of each caption `(batch,)`; its weight `λ` (the configured one, or
    `C · L'_simple / L_R` without gradient for dynamic λ) and the logits `(batch, caption_length, rounding_vocab_size)`."""
    logits = model.round_to_logits(prediction)
    per_caption = rounding_loss_per_caption(model, logits, rounding_targets, image_embeds)
    if model.config.dynamic_rounding_constant is None:
        return per_caption, torch.tensor(model.config.rounding_weight, device=prediction.device), logits
    with torch.no_grad():
        rounding_weight = model.config.dynamic_rounding_constant * simple_loss / per_caption.mean()
    return per_caption, rounding_weight, logits


def repeat_rows(count: int, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Each row of each tensor `count` times in a row (one copy per sampled timestep); `None` stays `None`."""
    return tuple(None if rows is None else rows.repeat_interleave(count, dim=0) for rows in tensors)


def add_noise(
    noise_scheduler: SchedulerMixin, clean_embeds: torch.FloatTensor, noise: torch.FloatTensor,
    timesteps: torch.LongTensor,
) -> torch.FloatTensor:
    """`x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε` through the scheduler's `add_noise`, which takes one `t` per row; per-position
    timesteps `(batch, caption_length)` are given to it one position per row."""
    if timesteps.ndim < 2:
        return noise_scheduler.add_noise(clean_embeds, noise, timesteps)
    positions = clean_embeds.flatten(0, 1)[:, None]  # (batch · caption_length, 1, hidden)
    noisy = noise_scheduler.add_noise(positions, noise.flatten(0, 1)[:, None], timesteps.flatten())
    return noisy.view_as(clean_embeds)


def mask_predict_timesteps(
    timesteps: torch.LongTensor, caption_length: int, mask_predict_prob: float, num_train_timesteps: int
) -> torch.LongTensor:
    """
    Per-position timesteps `(batch, caption_length)`: each row keeps its `t` at every position, except a share
    `mask_predict_prob` of the rows, trained as a mask-predict refinement (CMLM, Ghazvininejad et al. 2019, in
    embedding space): a uniformly drawn share of their positions is pure noise (`t = T - 1`, the continuous [MASK]),
    the others are the clean words (`t = 0`) that the prediction of the noised ones may read.
    """
    batch_size, device = timesteps.shape[0], timesteps.device
    refining = torch.rand(batch_size, device=device) < mask_predict_prob
    masked_share = torch.rand(batch_size, 1, device=device)
    masked = torch.rand(batch_size, caption_length, device=device) < masked_share
    per_position = torch.where(masked, num_train_timesteps - 1, 0)
    return torch.where(refining[:, None], per_position, timesteps[:, None].expand(-1, caption_length))


@torch.no_grad()
def one_step_draft(
    model: CLIPDiffusionLMModel, alphas_cumprod: torch.Tensor, pure_noise: torch.FloatTensor, **condition
) -> torch.FloatTensor:
    """What one sampling step writes from `x_{T-1}` = `pure_noise`: the denoiser's `x̂0`, rounded to the nearest word
    embeddings. The pipeline's first step (rounded without its n-gram blocking, which needs the tokenizer) and the
    draft that [`diffusion_loss`]'s `draft_prob` trains on."""
    timesteps = torch.full(pure_noise.shape[:1], len(alphas_cumprod) - 1, device=pure_noise.device)
    prediction = model(pure_noise, timesteps, **condition).prediction
    estimate = predicted_original_sample(model.config, alphas_cumprod, prediction, pure_noise, timesteps)
    return model.nearest_word_embeddings(estimate, condition.get("image_embeds"))


def restoring_target(
    config, alphas_cumprod: torch.Tensor, clean_embeds: torch.FloatTensor, noisy_embeds: torch.FloatTensor,
    timesteps: torch.LongTensor,
) -> torch.FloatTensor:
    """What the denoiser regresses to: `x0` itself, or for `prediction_type="previous_sample"` the posterior mean
    `x_{t−n}` from `x0` and `x_t`."""
    if config.prediction_type != "previous_sample":
        return clean_embeds
    coefficient_x0, coefficient_xt = jump_posterior_coefficients(alphas_cumprod, timesteps, config.prediction_step_offset)
    return coefficient_x0 * clean_embeds + coefficient_xt * noisy_embeds


def diffusion_loss(
    model: CLIPDiffusionLMModel | torch.nn.Module,
    noise_scheduler: DDPMScheduler,
    input_ids: torch.LongTensor,
    image_embeds: torch.FloatTensor,
    text_embeds: torch.FloatTensor | None = None,
    timesteps_per_caption: int = 1,
    timestep_sampling: TimestepSampling | TimeWarping | None = None,
    draft_prob: float = 0.0,
    mask_predict_prob: float = 0.0,
    reference_ids: torch.LongTensor | None = None,
) -> DiffusionLossOutput:
    """
    The paper's objective on a batch, `L = L'_simple + λ·L_R`: sample `t` (several per caption, as the paper samples
    100 of the 1000 steps), noise `x0 = E[ids]` into `x_t` (and `x_1`) with `noise_scheduler.add_noise`, drop the
    conditioning for classifier-free guidance, optionally self-condition, run the denoiser once, and score it.

    Args:
        model (`CLIPDiffusionLMModel` or a wrapper of it such as DDP):
            Called once with gradients; its unwrapped module serves the no-gradient self-conditioning pass.
        noise_scheduler (`DDPMScheduler`):
            From [`make_noise_scheduler`] with the model's config.
        input_ids (`torch.LongTensor` of shape `(batch_size, caption_length)`):
            Padded caption token ids (the model learns [PAD] to end captions).
        image_embeds (`torch.FloatTensor` of shape `(batch_size, condition_dim)` or `(batch_size, num_patches + 1, patch_dim)`):
            Cached CLIP image features (see `config.image_features`).
        text_embeds (`torch.FloatTensor` of shape `(batch_size, condition_dim)`, *optional*):
            Cached CLIP text embeddings, for `config.use_text_condition`.
        timesteps_per_caption (`int`, *optional*, defaults to 1):
            How many independent `t` each caption is trained on in this step.
        timestep_sampling (`TimestepSampling` or `TimeWarping`, *optional*):
            How `t` is drawn; uniformly by default.
        draft_prob (`float`, *optional*, defaults to 0.0):
            Share of the rows whose `x_t` is noised from the model's own one-step draft ([`one_step_draft`], no
            gradient) instead of from the caption, still with the caption as the target: step-unrolled denoising
            (Savinov et al. 2022, SUNDAE). A model trained only on noised correct captions trusts the words it is
            shown; these rows teach it to correct a draft, which a re-noised refinement pass (the pipeline's
            `refinement_timestep`) needs.
        mask_predict_prob (`float`, *optional*, defaults to 0.0):
            Share of the rows trained as a mask-predict refinement ([`mask_predict_timesteps`]): some positions
            pure noise, the rest clean words at `t = 0`; what the pipeline's `refinement_ratio` samples with.
        reference_ids (`torch.LongTensor` of shape `(batch_size, num_references, caption_length)`, *optional*):
            Every reference of each caption's image (`input_ids` among them): each row's target becomes the one its
            prediction is closest to ([`closest_references`]) instead of the caption it was noised from.
    """
    core: CLIPDiffusionLMModel = getattr(model, "module", model)
    config = core.config
    rounding_targets = core.rounding_targets(input_ids)
    if (rounding_targets < 0).any():
        raise ValueError("`input_ids` hold token ids outside `config.rounding_vocabulary`.")
    input_ids, rounding_targets, image_embeds, text_embeds, reference_ids = repeat_rows(
        timesteps_per_caption, input_ids, rounding_targets, image_embeds, text_embeds, reference_ids
    )
    batch_size, device = input_ids.shape[0], input_ids.device

    clean_embeds = core.embed_captions(input_ids)  # x0: (batch, caption_length, hidden)
    timesteps = (timestep_sampling or TimestepSampling()).sample(config.num_train_timesteps, batch_size, device)
    sampled_timesteps = timesteps
    noise = torch.randn_like(clean_embeds)
    # Always a mask (all False when p = 0) so the null condition takes part in every graph, as DDP requires.
    drop_condition = torch.rand(batch_size, device=device) < config.condition_drop_prob
    noised_from = clean_embeds
    if draft_prob > 0:
        draft = one_step_draft(core, noise_scheduler.alphas_cumprod, torch.randn_like(clean_embeds),
                               image_embeds=image_embeds, text_embeds=text_embeds, drop_condition=drop_condition)
        from_draft = torch.rand(batch_size, device=device) < draft_prob
        noised_from = torch.where(from_draft[:, None, None], draft, clean_embeds)
    if mask_predict_prob > 0:
        timesteps = mask_predict_timesteps(timesteps, clean_embeds.shape[1], mask_predict_prob,
                                           config.num_train_timesteps)  # (batch, caption_length)
    noisy_embeds = add_noise(noise_scheduler, noised_from, noise, timesteps)

    # x_1 rides in the same batch as x_t (the first `batch_size` rows), with the same conditioning.
    copies = 2 if config.x1_restoring_loss else 1
    if config.x1_restoring_loss:
        ones = torch.ones_like(timesteps)
        x1_noisy_embeds = add_noise(noise_scheduler, clean_embeds, torch.randn_like(clean_embeds), ones)
        noisy_embeds = torch.cat([noisy_embeds, x1_noisy_embeds])
        timesteps = torch.cat([timesteps, ones])
    condition = {
        "image_embeds": image_embeds.repeat(copies, *[1] * (image_embeds.ndim - 1)),
        "text_embeds": None if text_embeds is None else text_embeds.repeat(copies, 1),
        "drop_condition": drop_condition.repeat(copies),
    }

    self_conditioning_embeds = None
    if config.self_conditioning and torch.rand(()).item() < SELF_CONDITIONING_PROB:
        with torch.no_grad():
            first_guess = core(noisy_embeds, timesteps, **condition).prediction
            self_conditioning_embeds = predicted_original_sample(config, noise_scheduler.alphas_cumprod, first_guess,
                                                                 noisy_embeds, timesteps)

    prediction = model(
        noisy_embeds, timesteps, self_conditioning_embeds=self_conditioning_embeds, **condition
    ).prediction  # (copies · batch, caption_length, hidden)
    # The x_t rows, the first `batch_size` (x_1 rows, if any, follow them).
    xt_prediction, xt_noisy_embeds, xt_timesteps = (rows[:batch_size] for rows in (prediction, noisy_embeds, timesteps))
    target_embeds = clean_embeds
    if reference_ids is not None:
        estimate = predicted_original_sample(
            config, noise_scheduler.alphas_cumprod, xt_prediction.detach(), xt_noisy_embeds, xt_timesteps
        )
        chosen = closest_references(core, estimate, reference_ids, image_embeds)
        target_embeds, rounding_targets = core.embed_captions(chosen), core.rounding_targets(chosen)
    target_embeds = restoring_target(config, noise_scheduler.alphas_cumprod, target_embeds, xt_noisy_embeds, xt_timesteps)
    restoring_loss = squared_error(xt_prediction, target_embeds)
    # For both objectives the target one step from the data is x0 itself.
    x1_restoring_loss = (squared_error(prediction[batch_size:], clean_embeds) if config.x1_restoring_loss
                         else torch.zeros_like(restoring_loss))
    simple_loss = restoring_loss + x1_restoring_loss

    rounding_losses, rounding_weight, logits = weighted_rounding_loss(core, xt_prediction, rounding_targets, simple_loss,
                                                                      image_embeds)
    rounding_loss = rounding_losses.mean()
    return DiffusionLossOutput(
        loss=simple_loss + rounding_weight * rounding_loss,
        restoring_loss=restoring_loss,
        x1_restoring_loss=x1_restoring_loss,
        rounding_loss=rounding_loss,
        rounding_weight=rounding_weight,
        prediction=xt_prediction,
        logits=logits,
        rounding_loss_per_caption=rounding_losses,
        timesteps=sampled_timesteps,
    )


def trailing_timesteps(timesteps: torch.LongTensor, num_steps: int, step_index: int) -> torch.LongTensor:
    """The `step_index`-th of `num_steps` evenly spaced sampling timesteps from `t` down, per row: diffusers'
    "trailing" spacing started at `t` instead of `T - 1` (`[999, 499]` for `t = 999`, two steps); `-1` past the last,
    the clean end."""
    return ((timesteps + 1) * (num_steps - step_index) / num_steps).round().long() - 1


def ddim_step(
    alphas_cumprod: torch.Tensor, original_estimate: torch.Tensor, noisy_embeds: torch.Tensor,
    timesteps: torch.LongTensor, next_timesteps: torch.LongTensor,
) -> torch.Tensor:
    """Deterministic DDIM (η = 0) from `x_t` to `x_{t'}` per row: `√ᾱ_{t'}·x̂0 + √(1−ᾱ_{t'})·ε̂`, with
    `ε̂ = (x_t − √ᾱ_t·x̂0) / √(1−ᾱ_t)` and `ᾱ_{-1} = 1` (what `DDIMScheduler(set_alpha_to_one=True)` does)."""
    alphas_cumprod = alphas_cumprod.to(noisy_embeds.device, torch.float32)
    alpha = alphas_cumprod[timesteps][:, None, None]
    alpha_next = torch.where(next_timesteps >= 0, alphas_cumprod[next_timesteps.clamp(min=0)], 1.0)[:, None, None]
    noise = (noisy_embeds - alpha.sqrt() * original_estimate) / (1 - alpha).sqrt()
    return alpha_next.sqrt() * original_estimate + (1 - alpha_next).sqrt() * noise


@torch.no_grad()
def teacher_estimate(
    teacher: CLIPDiffusionLMModel, alphas_cumprod: torch.Tensor, noisy_embeds: torch.FloatTensor,
    timesteps: torch.LongTensor, num_steps: int, **condition,
) -> torch.FloatTensor:
    """
    The teacher's `x̂0` after `num_steps` deterministic DDIM steps from `x_t` (trailing spacing from each row's `t`, its
    own estimate fed back when it self-conditions): the target of step distillation. From `t = T - 1` it is what the
    pipeline returns with `DDIMScheduler` and `num_inference_steps=num_steps`.
    """
    estimate = None
    for step_index in range(num_steps):
        self_conditioning = estimate if teacher.config.self_conditioning else None
        prediction = teacher(noisy_embeds, timesteps, self_conditioning_embeds=self_conditioning, **condition).prediction
        estimate = predicted_original_sample(teacher.config, alphas_cumprod, prediction, noisy_embeds, timesteps)
        next_timesteps = trailing_timesteps(timesteps, num_steps, step_index + 1)
        noisy_embeds = ddim_step(alphas_cumprod, estimate, noisy_embeds, timesteps, next_timesteps)
        timesteps = next_timesteps.clamp(min=0)
    return estimate


def distillation_loss(
    student: CLIPDiffusionLMModel | torch.nn.Module,
    teacher: CLIPDiffusionLMModel,
    noise_scheduler: DDPMScheduler,
    input_ids: torch.LongTensor,
    image_embeds: torch.FloatTensor,
    text_embeds: torch.FloatTensor | None = None,
    teacher_steps: int = 2,
    timesteps_per_caption: int = 1,
    timestep_sampling: TimestepSampling | TimeWarping | None = None,
) -> DiffusionLossOutput:
    """
    Step distillation (Salimans & Ho 2022, in embedding space): at a training `x_t` (a caption noised as in
    [`diffusion_loss`]), one student pass learns what `teacher_steps` teacher passes reach ([`teacher_estimate`]):
    `‖f_student(x_t, t) − x̂0_teacher‖² + λ·CE(f_student · Eᵀ, words of x̂0_teacher)`. The rounding term names the
    teacher's words rather than the data's: the student learns the teacher's sampler, one caption per `x_t`, instead of
    the mean of the references the teacher was trained on.

    Args:
        student (`CLIPDiffusionLMModel` or a wrapper of it such as DDP):
            Starts as a copy of the teacher; an `x0` predictor (`prediction_type="sample"`).
        teacher (`CLIPDiffusionLMModel`):
            The trained model, frozen.
        noise_scheduler (`DDPMScheduler`):
            From [`make_noise_scheduler`] with the teacher's config.
        teacher_steps (`int`, *optional*, defaults to 2):
            Teacher passes one student pass learns to match.
        input_ids, image_embeds, text_embeds, timesteps_per_caption, timestep_sampling:
            As for [`diffusion_loss`]; `input_ids` are the captions `x_t` is made from.
    """
    core: CLIPDiffusionLMModel = getattr(student, "module", student)
    alphas_cumprod = noise_scheduler.alphas_cumprod
    input_ids, image_embeds, text_embeds = repeat_rows(timesteps_per_caption, input_ids, image_embeds, text_embeds)
    clean_embeds = core.embed_captions(input_ids)
    batch_size, device = input_ids.shape[0], input_ids.device
    timesteps = (timestep_sampling or TimestepSampling()).sample(core.config.num_train_timesteps, batch_size, device)
    noisy_embeds = noise_scheduler.add_noise(clean_embeds, torch.randn_like(clean_embeds), timesteps)
    condition = {"image_embeds": image_embeds, "text_embeds": text_embeds}
    target_embeds = teacher_estimate(teacher, alphas_cumprod, noisy_embeds, timesteps, teacher_steps, **condition)
    target_words = teacher.round_to_indices(target_embeds, image_embeds)  # indices into the rounding vocabulary

    prediction = student(noisy_embeds, timesteps, **condition).prediction
    restoring_loss = squared_error(prediction, target_embeds)
    rounding_losses, rounding_weight, logits = weighted_rounding_loss(core, prediction, target_words, restoring_loss,
                                                                      image_embeds)
    rounding_loss = rounding_losses.mean()
    return DiffusionLossOutput(
        loss=restoring_loss + rounding_weight * rounding_loss,
        restoring_loss=restoring_loss,
        x1_restoring_loss=torch.zeros_like(restoring_loss),
        rounding_loss=rounding_loss,
        rounding_weight=rounding_weight,
        prediction=prediction,
        logits=logits,
        rounding_loss_per_caption=rounding_losses,
        timesteps=timesteps,
    )
