"""
`CLIPDiffusionCaptionPipeline`: images → CLIP features → a few denoising steps in word-embedding space → text.

This module and `captioning_utils.py` are written verbatim into every saved pipeline folder, so that
`DiffusionPipeline.from_pretrained(repo_id, trust_remote_code=True)` runs them where this package is not installed:
they import nothing of the package.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor
from transformers import AutoModel, CLIPVisionModelWithProjection, PreTrainedModel, PreTrainedTokenizerBase
from transformers.image_processing_utils import BaseImageProcessor

from .captioning_utils import (
    OUTPUT_TYPES,
    CaptionPipelineMixin,
    ImageInput,
    check_image_embeds,
    decode_captions,
    encode_images,
)

logger = logging.get_logger(__name__)

# The recommended number of denoising steps, the default of `__call__` (and of the CLI, the Endpoint handler, the
# Space and training's validation): one x̂0 prediction from pure noise, the fastest setting. On the demo world's
# benchmark (docs/benchmarks.md) 2-10 steps added at most 0.6 points of object accuracy at 2-9x the cost.
RECOMMENDED_INFERENCE_STEPS = 1
# The default n-gram blocking of the rounding (`no_repeat_ngram_size`): no three words twice in a caption. One
# parallel pass can name one object twice where the scene has two ("a red triangle is to the left of a red
# triangle"); on the harder world blocking trigrams lifted one step's object accuracy by 7-13 points with
# `image_transition_rank` (1-6 without), and it changed no score of the demo's model, where 2 (blocking "a red"
# twice) cost 8 points.
RECOMMENDED_NO_REPEAT_NGRAM_SIZE = 3
# The default word bonus of the rounding (`length_bonus`), in the rounding's scores (log-probabilities per word). One
# pass that hedges on how many objects a scene has ends a list early ("three objects: a red square, a black star"); on
# the harder world's validation split a bonus of 1 lifted one step's object accuracy by 3-6 points with and without a
# teacher (0.5-2 tried; above 1, CIDEr and the captions fully correct fell), and on the demo world it changed no
# caption up to 2.
RECOMMENDED_LENGTH_BONUS = 1.0


@dataclass
class CLIPDiffusionCaptionPipelineOutput(BaseOutput):
    """
    Output of [`CLIPDiffusionCaptionPipeline`].

    Args:
        captions (`list[str]`, `torch.LongTensor` or `torch.FloatTensor`):
            `batch_size · num_captions_per_image` results, image-major (the captions of image 0 first). With
            `output_type="str"` the caption strings; `"token_ids"` a tensor `(batch, caption_length)` of rounded ids;
            `"latent"` the final `x̂0` embeddings `(batch, caption_length, hidden_size)`.
    """

    captions: list[str] | torch.Tensor


class CLIPDiffusionCaptionPipeline(CaptionPipelineMixin, DiffusionPipeline):
    r"""
    Image captioning with CLIP-DiffusionLM.

    Args:
        denoiser ([`CLIPDiffusionLMModel`]):
            Predicts clean caption embeddings from noisy ones, conditioned on CLIP embeddings.
        scheduler ([`SchedulerMixin`]):
            A diffusers scheduler configured with `prediction_type="sample"` (DDIM by default; DDPM and others work).
        image_encoder ([`CLIPVisionModelWithProjection`]):
            The frozen CLIP image tower the denoiser was trained on.
        image_processor ([`CLIPImageProcessor`]):
            Resizes and normalises images for `image_encoder`.
        tokenizer ([`PreTrainedTokenizerBase`]):
            The denoiser's word-piece tokenizer, used to turn rounded ids into text.
    """

    model_cpu_offload_seq = "image_encoder->denoiser"
    model_component = "denoiser"
    model_auto_class = AutoModel
    _callback_tensor_inputs = ["noisy_embeds", "original_estimate", "image_embeds"]

    def __init__(
        self,
        denoiser: PreTrainedModel,
        scheduler: SchedulerMixin,
        image_encoder: CLIPVisionModelWithProjection,
        image_processor: BaseImageProcessor,
        tokenizer: PreTrainedTokenizerBase,
    ):
        super().__init__()
        self.register_modules(
            denoiser=denoiser,
            scheduler=scheduler,
            image_encoder=image_encoder,
            image_processor=image_processor,
            tokenizer=tokenizer,
        )

    def encode_images(self, images: ImageInput | Sequence[ImageInput]) -> torch.FloatTensor:
        """The CLIP features the denoiser reads (`config.image_features`) of PIL/numpy/torch images: L2-normalised
        `image_embeds` `(batch, condition_dim)`, or patch features `(batch, num_patches + 1, patch_dim)`."""
        config = self.denoiser.config
        return encode_images(
            self.image_encoder, self.image_processor, images, config.image_features, config.vision_feature_layer
        )

    def _guided_prediction(
        self,
        noisy_embeds: torch.FloatTensor,
        timestep: torch.Tensor,
        image_embeds: torch.FloatTensor,
        text_embeds: torch.FloatTensor | None,
        self_conditioning_embeds: torch.FloatTensor | None,
        guidance_scale: float,
    ) -> torch.FloatTensor:
        """`x̂0 = f(x|∅) + w·(f(x|c) − f(x|∅))`, both halves in one batch; `w = 1` runs the conditional pass only."""
        batch_size = noisy_embeds.shape[0]
        timesteps = timestep.to(noisy_embeds.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(batch_size)
        if guidance_scale == 1.0:
            prediction = self.denoiser(
                noisy_embeds, timesteps, image_embeds, text_embeds, self_conditioning_embeds
            ).prediction
        else:

            def double(tensor: torch.Tensor | None) -> torch.Tensor | None:
                return None if tensor is None else torch.cat([tensor, tensor])

            drop_condition = torch.arange(2 * batch_size, device=noisy_embeds.device) >= batch_size
            both = self.denoiser(
                double(noisy_embeds),
                double(timesteps),
                double(image_embeds),
                double(text_embeds),
                double(self_conditioning_embeds),
                drop_condition,
            ).prediction
            conditional, unconditional = both.chunk(2)
            prediction = unconditional + guidance_scale * (conditional - unconditional)
        return self.denoiser.predicted_original_sample(prediction, noisy_embeds, timesteps, self.scheduler.alphas_cumprod)

    @torch.no_grad()
    def __call__(
        self,
        images: ImageInput | Sequence[ImageInput] | None = None,
        image_embeds: torch.FloatTensor | None = None,
        text_embeds: torch.FloatTensor | None = None,
        num_inference_steps: int = RECOMMENDED_INFERENCE_STEPS,
        guidance_scale: float = 1.0,
        num_captions_per_image: int = 1,
        num_refinement_steps: int = 0,
        refinement_timestep: int = 0,
        refinement_ratio: float = 1.0,
        clamp_to_vocabulary: bool = False,
        expected_embedding: bool = False,
        no_repeat_ngram_size: int = RECOMMENDED_NO_REPEAT_NGRAM_SIZE,
        length_bonus: float = RECOMMENDED_LENGTH_BONUS,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "str",
        return_dict: bool = True,
        callback_on_step_end: Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> CLIPDiffusionCaptionPipelineOutput | tuple:
        r"""
        Captions images.

        Args:
            images (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them, *optional*):
                Images of any size and mode (RGB, grayscale, RGBA, ...). Arrays are `(H, W[, C])` or `(C, H, W)`,
                uint8 or float in [0, 1]; a 4-D array or tensor is a batch. Give either `images` or `image_embeds`.
            image_embeds (`torch.FloatTensor` of shape `(batch_size, condition_dim)` or `(batch_size, num_patches + 1, patch_dim)`, *optional*):
                Precomputed CLIP features as [`encode_images`] returns them (e.g. from a feature cache): L2-normalised
                `image_embeds`, or patch features of layer `config.vision_feature_layer` for a denoiser with
                `image_features="patches"` (every layer has the same shape, so only the values tell them apart).
            text_embeds (`torch.FloatTensor` of shape `(batch_size, condition_dim)`, *optional*):
                CLIP text embeddings for a denoiser trained with `use_text_condition`; the learned null condition
                is used when omitted.
            num_inference_steps (`int`, *optional*, defaults to `RECOMMENDED_INFERENCE_STEPS` = 1):
                Denoising steps. One is the recommended setting, the fastest; more steps cost one denoiser pass each
                and added little on the demo world (see `RECOMMENDED_INFERENCE_STEPS`).
            guidance_scale (`float`, *optional*, defaults to 1.0):
                Classifier-free guidance weight `w`: 1 is the conditional model alone, larger values push further
                from the unconditional prediction. Needs a model trained with `condition_drop_prob > 0`.
            num_captions_per_image (`int`, *optional*, defaults to 1):
                Independent samples per image.
            num_refinement_steps (`int`, *optional*, defaults to 0):
                The paper's refinement: after sampling, feed `x̂0` back through the denoiser at `t = 0` this many times.
            refinement_timestep (`int`, *optional*, defaults to 0):
                With `num_refinement_steps`, above 0: each refinement rounds `x̂0` to its words, noises them to this
                timestep and predicts again (LaDiC's Back&Refine, SUNDAE's unrolled steps), so that the denoiser can
                rewrite a word that does not fit the others. It helps a model trained with `draft_prob` (to correct
                its own one-step drafts); one trained only on noised correct captions keeps the words it is shown.
            refinement_ratio (`float`, *optional*, defaults to 1.0):
                Share of the positions each re-noised refinement re-noises: below 1, only the words the rounding head
                is least sure of, while the others stay clean at `t = 0` and are kept (mask-predict, Ghazvininejad
                et al. 2019). `refinement_timestep=999` re-noises them to pure noise, the continuous [MASK]. Needs a
                model trained with `mask_predict_prob`.
            clamp_to_vocabulary (`bool`, *optional*, defaults to `False`):
                Replace `x̂0` by the nearest word embeddings at every step (Diffusion-LM's clamping trick).
            expected_embedding (`bool`, *optional*, defaults to `False`):
                Replace the denoiser's regression `x̂0` at every step by the rounding head's expected word embedding
                (CDCD's score interpolation).
            no_repeat_ngram_size (`int`, *optional*, defaults to `RECOMMENDED_NO_REPEAT_NGRAM_SIZE` = 3):
                As in transformers' `generate()`: no n-gram of this many words occurs twice in a caption. The final
                rounding decodes again, with the repeat's last word banned at its second place, while a caption
                repeats one (n-grams with padding or other special tokens do not count). 0 turns it off.
            length_bonus (`float`, *optional*, defaults to `RECOMMENDED_LENGTH_BONUS` = 1.0):
                Added by the final rounding to the score (a log-probability) of every word that is not padding or
                another special token: a caption ends only where its end is surer than that, so that a pass that
                hedges on how many objects to name names them all (speech recognition's word insertion bonus). 0 is
                the paper's rounding; a negative value shortens captions.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Makes sampling deterministic.
            output_type (`str`, *optional*, defaults to `"str"`):
                `"str"`, `"token_ids"` or `"latent"`; see [`CLIPDiffusionCaptionPipelineOutput`].
            return_dict (`bool`, *optional*, defaults to `True`):
                Return a [`CLIPDiffusionCaptionPipelineOutput`] instead of a tuple.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*):
                Called after every denoising step as `callback_on_step_end(self, step_index, timestep,
                callback_kwargs)`, where `callback_kwargs` holds the tensors named in
                `callback_on_step_end_tensor_inputs`; tensors in the dict it returns replace the pipeline's own, so
                a callback can watch the caption form or steer it.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*, defaults to `["original_estimate"]`):
                Any of `"noisy_embeds"` (`x_t` after the step), `"original_estimate"` (this step's `x̂0`) and
                `"image_embeds"` (the conditioning, repeated per caption).
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if callback_on_step_end_tensor_inputs is None:
            callback_on_step_end_tensor_inputs = ["original_estimate"]
        self.check_inputs(
            images, image_embeds, num_inference_steps, num_captions_per_image, num_refinement_steps,
            refinement_timestep, refinement_ratio, guidance_scale, no_repeat_ngram_size, length_bonus, output_type,
            callback_on_step_end_tensor_inputs,
        )

        # 1. Conditioning: CLIP features, one row per caption to sample
        device, dtype = self._execution_device, self.denoiser.dtype
        if image_embeds is None:
            image_embeds = self.encode_images(images)
        check_image_embeds(image_embeds, self.denoiser.config)
        self.check_text_embeds(text_embeds, image_embeds.shape[0])
        image_embeds = image_embeds.to(device, dtype).repeat_interleave(num_captions_per_image, dim=0)
        if text_embeds is not None:
            text_embeds = text_embeds.to(device, dtype).repeat_interleave(num_captions_per_image, dim=0)

        # 2. x_T ~ N(0, I) and the sampling timesteps
        noisy_embeds = self.prepare_latents(image_embeds.shape[0], generator, device, dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device)

        # 3. The denoising loop: x̂0 = f(x_t, t, c), then x_{t'} from the scheduler
        original_estimate = None
        for step_index, timestep in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = self.scheduler.scale_model_input(noisy_embeds, timestep)
            original_estimate = self._guided_prediction(
                model_input, timestep, image_embeds, text_embeds, original_estimate, guidance_scale
            )
            if expected_embedding:
                original_estimate = self.denoiser.expected_word_embeddings(original_estimate)
            if clamp_to_vocabulary:
                original_estimate = self.denoiser.nearest_word_embeddings(original_estimate, image_embeds)
            noisy_embeds = self.scheduler.step(
                original_estimate, timestep, noisy_embeds, generator=generator
            ).prev_sample
            if callback_on_step_end is not None:
                step_tensors = {"noisy_embeds": noisy_embeds, "original_estimate": original_estimate,
                                "image_embeds": image_embeds}
                callback_kwargs = {name: step_tensors[name] for name in callback_on_step_end_tensor_inputs}
                returned = callback_on_step_end(self, step_index, timestep, callback_kwargs) or {}
                noisy_embeds = returned.get("noisy_embeds", noisy_embeds)
                original_estimate = returned.get("original_estimate", original_estimate)
                image_embeds = returned.get("image_embeds", image_embeds)

        # 4. Refinement: x̂0 fed back at t = 0 (the paper's), or its words (all, or the least sure) re-noised to
        # `refinement_timestep`
        for _ in range(num_refinement_steps):
            original_estimate = self.refine(
                original_estimate, refinement_timestep, refinement_ratio, image_embeds, text_embeds, guidance_scale,
                generator,
            )

        # 5. Rounding to words
        result = self.decode(original_estimate, output_type, image_embeds, no_repeat_ngram_size, length_bonus)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (result,)
        return CLIPDiffusionCaptionPipelineOutput(captions=result)

    def refine(
        self,
        original_estimate: torch.FloatTensor,
        refinement_timestep: int,
        refinement_ratio: float,
        image_embeds: torch.FloatTensor,
        text_embeds: torch.FloatTensor | None,
        guidance_scale: float,
        generator: torch.Generator | list[torch.Generator] | None,
    ) -> torch.FloatTensor:
        """One refinement pass over `x̂0` `(batch, caption_length, hidden_size)`; see `refinement_timestep` and
        `refinement_ratio` of `__call__`."""
        device, dtype = original_estimate.device, original_estimate.dtype
        timesteps = torch.full((), refinement_timestep, dtype=torch.long, device=device)
        if refinement_timestep == 0:
            return self._guided_prediction(
                original_estimate, timesteps, image_embeds, text_embeds, original_estimate, guidance_scale
            )
        words = self.denoiser.nearest_word_embeddings(original_estimate, image_embeds)
        noise = randn_tensor(words.shape, generator=generator, device=device, dtype=dtype)
        model_input = self.scheduler.add_noise(words, noise, timesteps)
        if refinement_ratio == 1.0:
            return self._guided_prediction(
                model_input, timesteps, image_embeds, text_embeds, original_estimate, guidance_scale
            )
        confidence = self.denoiser.round_to_logits(original_estimate).softmax(dim=-1).amax(dim=-1)  # (batch, length)
        num_renoised = max(1, round(refinement_ratio * confidence.shape[1]))
        least_sure = confidence.topk(num_renoised, dim=1, largest=False).indices
        renoised = torch.zeros_like(confidence, dtype=torch.bool).scatter_(1, least_sure, True)
        kept_input = self.scheduler.add_noise(words, noise, torch.zeros_like(timesteps))
        model_input = torch.where(renoised[..., None], model_input, kept_input)
        per_position_timesteps = torch.where(renoised, timesteps, 0)  # (batch, caption_length)
        prediction = self._guided_prediction(
            model_input, per_position_timesteps, image_embeds, text_embeds, original_estimate, guidance_scale
        )
        return torch.where(renoised[..., None], prediction, original_estimate)

    def check_inputs(
        self,
        images,
        image_embeds,
        num_inference_steps,
        num_captions_per_image,
        num_refinement_steps,
        refinement_timestep,
        refinement_ratio,
        guidance_scale,
        no_repeat_ngram_size,
        length_bonus,
        output_type,
        callback_on_step_end_tensor_inputs,
    ) -> None:
        """Raises a `ValueError` naming the first argument of `__call__` that cannot be used."""
        unknown = [name for name in callback_on_step_end_tensor_inputs if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` must be among {self._callback_tensor_inputs}, got {unknown}."
            )
        if (images is None) == (image_embeds is None):
            raise ValueError("Pass exactly one of `images` or `image_embeds`.")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}.")
        if not isinstance(num_captions_per_image, int) or num_captions_per_image < 1:
            raise ValueError(f"`num_captions_per_image` must be a positive integer, got {num_captions_per_image!r}.")
        if not isinstance(num_refinement_steps, int) or num_refinement_steps < 0:
            raise ValueError(f"`num_refinement_steps` must be a non-negative integer, got {num_refinement_steps!r}.")
        num_train_timesteps = self.denoiser.config.num_train_timesteps
        if not isinstance(refinement_timestep, int) or not 0 <= refinement_timestep < num_train_timesteps:
            raise ValueError(
                f"`refinement_timestep` must be an integer in [0, {num_train_timesteps}), got {refinement_timestep!r}."
            )
        if not 0 < refinement_ratio <= 1:
            raise ValueError(f"`refinement_ratio` must be in (0, 1], got {refinement_ratio!r}.")
        if refinement_ratio < 1 and refinement_timestep == 0:
            raise ValueError(
                "`refinement_ratio` below 1 re-noises the least sure words to `refinement_timestep`: give a "
                "`refinement_timestep` above 0."
            )
        if guidance_scale < 0:
            raise ValueError(f"`guidance_scale` must be non-negative, got {guidance_scale}.")
        caption_length = self.denoiser.config.caption_length
        if not isinstance(no_repeat_ngram_size, int) or not 0 <= no_repeat_ngram_size <= caption_length:
            raise ValueError(
                f"`no_repeat_ngram_size` must be an integer in [0, {caption_length}] (0: off; at most the caption "
                f"length), got {no_repeat_ngram_size!r}."
            )
        if isinstance(length_bonus, bool) or not isinstance(length_bonus, (int, float)) or not math.isfinite(length_bonus):
            raise ValueError(f"`length_bonus` must be a finite number (0: off), got {length_bonus!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if guidance_scale != 1.0 and self.denoiser.config.condition_drop_prob == 0:
            logger.warning(
                "guidance_scale != 1 on a denoiser trained without condition dropout: its null condition was never "
                "trained, so guidance will not help."
            )

    def check_text_embeds(self, text_embeds: torch.FloatTensor | None, batch_size: int) -> None:
        condition_dim = self.denoiser.config.condition_dim
        if text_embeds is not None and text_embeds.shape != (batch_size, condition_dim):
            raise ValueError(
                f"`text_embeds` must have shape ({batch_size}, {condition_dim}), got {tuple(text_embeds.shape)}."
            )

    def prepare_latents(
        self, batch_size: int, generator: torch.Generator | list[torch.Generator] | None, device, dtype
    ) -> torch.FloatTensor:
        """Pure noise `(batch_size, caption_length, hidden_size)`, scaled as the scheduler starts."""
        shape = (batch_size, self.denoiser.config.caption_length, self.denoiser.hidden_size)
        noisy_embeds = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        return noisy_embeds * self.scheduler.init_noise_sigma

    def decode(
        self,
        original_estimate: torch.FloatTensor,
        output_type: str = "str",
        image_embeds: torch.FloatTensor | None = None,
        no_repeat_ngram_size: int = RECOMMENDED_NO_REPEAT_NGRAM_SIZE,
        length_bonus: float = RECOMMENDED_LENGTH_BONUS,
    ) -> list[str] | torch.Tensor:
        """`x̂0` as `output_type`: the embeddings themselves (`"latent"`), their nearest words' ids, or captions.
        `image_embeds` (the captions' image features, as the denoiser reads them) are needed by a denoiser whose
        rounding reads the image (`image_transition_rank`); `no_repeat_ngram_size` and `length_bonus` as for
        `__call__`."""
        if output_type == "latent":
            return original_estimate
        token_ids = self.denoiser.round_to_token_ids(
            original_estimate, image_embeds, no_repeat_ngram_size, self.tokenizer.all_special_ids, length_bonus
        )
        return token_ids if output_type == "token_ids" else decode_captions(self.tokenizer, token_ids)

