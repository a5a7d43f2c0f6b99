"""Frozen CLIP features: turning user images (PIL, numpy, torch; any mode) into the CLIP features a denoiser reads.

The pipeline and the training feature cache both encode through these functions, so a cached feature and one
computed at inference time are the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch
from transformers import CLIPImageProcessor, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

from .configuration_clip_diffusionlm import IMAGE_FEATURES
from .data.images import load_rgb_image, to_rgb

ImageInput = PIL.Image.Image | np.ndarray | torch.Tensor


def _array_to_pil(array: np.ndarray, index: int) -> PIL.Image.Image:
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # channels-first → channels-last
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(
            f"`images[{index}]` has shape {tuple(array.shape)}; expected (H, W), (H, W, C) or (C, H, W) with "
            "C in {1, 3, 4}."
        )
    if np.issubdtype(array.dtype, np.floating):
        if array.size and (array.min() < 0.0 or array.max() > 1.0):
            raise ValueError(f"`images[{index}]` is a float array with values outside [0, 1].")
        array = np.round(array * 255.0).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ValueError(f"`images[{index}]` has dtype {array.dtype}; expected uint8 or float in [0, 1].")
    return PIL.Image.fromarray(array)


def as_rgb_images(images: ImageInput | Sequence[ImageInput]) -> list[PIL.Image.Image]:
    """
    Normalises one image or a batch into a list of RGB PIL images.

    Accepts PIL images of any mode, numpy arrays (`(H, W)`, `(H, W, C)`, `(C, H, W)`; uint8 or float in [0, 1]),
    torch tensors of the same layouts or a 4-D batch `(B, C, H, W)`, and lists of any of these.
    """
    if isinstance(images, torch.Tensor):
        images = list(images) if images.ndim == 4 else [images]
    elif isinstance(images, np.ndarray):
        images = list(images) if images.ndim == 4 else [images]
    elif isinstance(images, PIL.Image.Image):
        images = [images]
    elif not isinstance(images, Sequence) or isinstance(images, (str, bytes)):
        raise TypeError(
            f"`images` must be a PIL image, numpy array, torch tensor or a list of them, got {type(images).__name__}."
        )
    if len(images) == 0:
        raise ValueError("`images` is empty; pass at least one image.")

    converted = []
    for index, image in enumerate(images):
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
        if isinstance(image, np.ndarray):
            image = _array_to_pil(image, index)
        if not isinstance(image, PIL.Image.Image):
            raise TypeError(
                f"`images[{index}]` is a {type(image).__name__}; expected a PIL image, numpy array or torch tensor."
            )
        converted.append(to_rgb(image))
    return converted


def check_image_features(image_features: str) -> None:
    if image_features not in IMAGE_FEATURES:
        raise ValueError(f"`image_features` must be one of {IMAGE_FEATURES}, got {image_features!r}.")


@torch.no_grad()
def encode_images(
    image_encoder: CLIPVisionModelWithProjection,
    image_processor: CLIPImageProcessor,
    images: ImageInput | Sequence[ImageInput],
    image_features: str = "pooled",
) -> torch.FloatTensor:
    """
    CLIP features of images, on the encoder's device.

    `image_features="pooled"` gives the L2-normalised `image_embeds`, shape `(batch, projection_dim)`;
    `"patches"` gives the last hidden states of [CLS] and every patch under the post-LayerNorm that CLIP applies to
    [CLS] before its projection, shape `(batch, num_patches + 1, hidden_size)`.
    """
    check_image_features(image_features)
    pixel_values = image_processor(images=as_rgb_images(images), return_tensors="pt").pixel_values
    pixel_values = pixel_values.to(device=image_encoder.device, dtype=image_encoder.dtype)
    outputs = image_encoder(pixel_values=pixel_values)
    if image_features == "patches":
        return image_encoder.vision_model.post_layernorm(outputs.last_hidden_state)
    return outputs.image_embeds / outputs.image_embeds.norm(dim=-1, keepdim=True)


def encode_image_files(
    image_encoder: CLIPVisionModelWithProjection,
    image_processor: CLIPImageProcessor,
    paths: Sequence[str],
    batch_size: int = 256,
    image_features: str = "pooled",
) -> torch.FloatTensor:
    """[`encode_images`] of image files (any mode, converted with `load_rgb_image`), `batch_size` at a time."""
    return torch.cat([
        encode_images(
            image_encoder, image_processor, [load_rgb_image(path) for path in paths[start : start + batch_size]],
            image_features,
        )
        for start in range(0, len(paths), batch_size)
    ])


@torch.no_grad()
def encode_texts(text_encoder: CLIPTextModelWithProjection, tokenizer, texts: Sequence[str]) -> torch.FloatTensor:
    """L2-normalised CLIP `text_embeds`, shape `(batch, projection_dim)`, on the encoder's device."""
    max_length = text_encoder.config.max_position_embeddings
    tokens = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    tokens = tokens.to(text_encoder.device)
    embeds = text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).text_embeds
    return embeds / embeds.norm(dim=-1, keepdim=True)
