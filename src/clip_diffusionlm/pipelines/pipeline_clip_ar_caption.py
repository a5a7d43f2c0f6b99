"""
`CLIPARCaptionPipeline`: images → CLIP features → the autoregressive baseline's `generate()` → text.

Written verbatim into saved pipeline folders beside `captioning_utils.py`, like the diffusion pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from transformers import (
    AutoModelForCausalLM,
    CLIPVisionModelWithProjection,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.image_processing_utils import BaseImageProcessor

from .captioning_utils import CaptionPipelineMixin, ImageInput, check_image_embeds, decode_captions, encode_images

AR_OUTPUT_TYPES = ("str", "token_ids")  # no "latent": the captioner emits tokens


@dataclass
class CLIPARCaptionPipelineOutput(BaseOutput):
    """
    Output of [`CLIPARCaptionPipeline`].

    Args:
        captions (`list[str]` or `torch.LongTensor`):
            One result per image and returned sequence, image-major. With `output_type="str"` the caption strings
            (decoded exactly as the diffusion pipeline decodes: special tokens dropped, repeated words collapsed);
            `"token_ids"` the generated ids `(batch, caption_length)`, [CLS] first, [PAD] after [SEP].
    """

    captions: list[str] | torch.Tensor


class CLIPARCaptionPipeline(CaptionPipelineMixin, DiffusionPipeline):
    r"""
    Image captioning with the autoregressive baseline [`CLIPCaptionerARForCausalLM`] (greedy or beam search through
    transformers' `generate()` with its KV cache). Saved and loaded like [`CLIPDiffusionCaptionPipeline`]
    (`save_pretrained` / `from_pretrained`, safetensors).

    Args:
        captioner ([`CLIPCaptionerARForCausalLM`]):
            The prefix captioner.
        image_encoder ([`CLIPVisionModelWithProjection`]):
            The frozen CLIP image tower it was trained on.
        image_processor ([`CLIPImageProcessor`]):
            Resizes and normalises images for `image_encoder`.
        tokenizer ([`PreTrainedTokenizerBase`]):
            The captioner's word-piece tokenizer.
    """

    model_cpu_offload_seq = "image_encoder->captioner"
    model_component = "captioner"
    model_auto_class = AutoModelForCausalLM

    def __init__(
        self,
        captioner: PreTrainedModel,
        image_encoder: CLIPVisionModelWithProjection,
        image_processor: BaseImageProcessor,
        tokenizer: PreTrainedTokenizerBase,
    ):
        super().__init__()
        self.register_modules(
            captioner=captioner, image_encoder=image_encoder, image_processor=image_processor, tokenizer=tokenizer
        )

    def encode_images(self, images: ImageInput | Sequence[ImageInput]) -> torch.FloatTensor:
        """The CLIP features the captioner reads (`config.image_features`), as the diffusion pipeline computes them."""
        config = self.captioner.config
        return encode_images(
            self.image_encoder, self.image_processor, images, config.image_features, config.vision_feature_layer
        )

    @torch.inference_mode()
    def __call__(
        self,
        images: ImageInput | Sequence[ImageInput] | None = None,
        image_embeds: torch.FloatTensor | None = None,
        num_beams: int = 1,
        max_new_tokens: int | None = None,
        num_captions_per_image: int = 1,
        do_sample: bool = False,
        generator_seed: int | None = None,
        output_type: str = "str",
        return_dict: bool = True,
        **generate_kwargs,
    ) -> CLIPARCaptionPipelineOutput | tuple:
        r"""
        Captions images.

        Args:
            images (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them, *optional*):
                Images in any format the diffusion pipeline accepts. Give either `images` or `image_embeds`.
            image_embeds (`torch.FloatTensor` of shape `(batch_size, condition_dim)` or `(batch_size, num_patches + 1, patch_dim)`, *optional*):
                Precomputed CLIP features as [`encode_images`] returns them.
            num_beams (`int`, *optional*, defaults to 1):
                1 is greedy decoding; more runs beam search.
            max_new_tokens (`int`, *optional*):
                Tokens after [CLS]; defaults to `caption_length - 1`.
            num_captions_per_image (`int`, *optional*, defaults to 1):
                Sequences returned per image (at most `num_beams` without sampling).
            do_sample (`bool`, *optional*, defaults to `False`):
                Sample instead of taking the most likely tokens.
            generator_seed (`int`, *optional*):
                Seeds `torch.manual_seed` before sampling (`generate()` takes no generator).
            output_type (`str`, *optional*, defaults to `"str"`):
                `"str"` or `"token_ids"`.
            return_dict (`bool`, *optional*, defaults to `True`):
                Return a [`CLIPARCaptionPipelineOutput`] instead of a tuple.
            generate_kwargs:
                Passed to `generate()` (e.g. `length_penalty`, `repetition_penalty`).
        """
        if (images is None) == (image_embeds is None):
            raise ValueError("Pass exactly one of `images` or `image_embeds`.")
        if output_type not in AR_OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {AR_OUTPUT_TYPES}, got {output_type!r}.")
        for name, value in (("num_beams", num_beams), ("num_captions_per_image", num_captions_per_image)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        config = self.captioner.config
        if image_embeds is None:
            image_embeds = self.encode_images(images)
        check_image_embeds(image_embeds, config)
        if generator_seed is not None:
            torch.manual_seed(generator_seed)
        if max_new_tokens is not None:
            generate_kwargs["max_new_tokens"] = max_new_tokens  # else the generation config's caption_length
        token_ids = self.captioner.generate(
            image_embeds=image_embeds.to(self._execution_device, self.captioner.dtype),
            num_beams=num_beams,
            num_return_sequences=num_captions_per_image,
            do_sample=do_sample,
            **generate_kwargs,
        )
        result = token_ids if output_type == "token_ids" else decode_captions(self.tokenizer, token_ids)
        self.maybe_free_model_hooks()
        return CLIPARCaptionPipelineOutput(captions=result) if return_dict else (result,)
