"""Frozen CLIP features: turning user images (PIL, numpy, torch; any mode) into the CLIP features a denoiser reads.

The pipeline and the training feature cache both encode through these functions, so a cached feature and one
computed at inference time are the same numbers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import datasets
import numpy as np
import PIL.Image
import torch
from torch.utils.data import DataLoader
from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection
from transformers.image_processing_utils import BaseImageProcessor

from .configuration_clip_diffusionlm import IMAGE_FEATURES, check_vision_feature_layer
from .data.images import to_rgb

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


def check_image_embeds(image_embeds: torch.Tensor, config) -> None:
    """Raises a `ValueError` naming the expected shape when `image_embeds` do not fit a model reading
    `config.image_features` (pooled: `(batch, condition_dim)`; patches: `(batch, num_patches + 1, patch_dim)`)."""
    patches = config.image_features == "patches"
    width = config.patch_dim if patches else config.condition_dim
    if image_embeds.ndim != (3 if patches else 2) or image_embeds.shape[-1] != width or image_embeds.shape[0] == 0:
        expected = f"(batch_size >= 1, num_patches + 1, {width})" if patches else f"(batch_size >= 1, {width})"
        raise ValueError(
            f"`image_embeds` must have shape {expected} for image_features={config.image_features!r}, got "
            f"{tuple(image_embeds.shape)}."
        )


def check_image_features(
    image_features: str, vision_feature_layer: int = -1, image_encoder: CLIPVisionModelWithProjection | None = None
) -> None:
    """Raises a `ValueError` naming the argument unless the feature kind and layer exist (in `image_encoder`)."""
    if image_features not in IMAGE_FEATURES:
        raise ValueError(f"`image_features` must be one of {IMAGE_FEATURES}, got {image_features!r}.")
    check_vision_feature_layer(image_features, vision_feature_layer)
    num_layers = None if image_encoder is None else image_encoder.config.num_hidden_layers
    if num_layers is not None and not -(num_layers + 1) <= vision_feature_layer <= num_layers:
        raise ValueError(
            f"`vision_feature_layer` = {vision_feature_layer} does not exist in a vision tower of {num_layers} layers "
            f"(valid: {-(num_layers + 1)} to {num_layers})."
        )


@torch.no_grad()
def encode_pixel_values(
    image_encoder: CLIPVisionModelWithProjection,
    pixel_values: torch.FloatTensor,
    image_features: str = "pooled",
    vision_feature_layer: int = -1,
) -> torch.FloatTensor:
    """
    CLIP features of preprocessed images, on the encoder's device.

    `image_features="pooled"` gives the L2-normalised `image_embeds`, shape `(batch, projection_dim)`;
    `"patches"` gives the hidden states of [CLS] and every patch after layer `vision_feature_layer` (-1: the last)
    under the post-LayerNorm that CLIP applies to [CLS] before its projection, shape
    `(batch, num_patches + 1, hidden_size)`.
    """
    check_image_features(image_features, vision_feature_layer, image_encoder)
    pixel_values = pixel_values.to(device=image_encoder.device, dtype=image_encoder.dtype)
    if image_features == "patches":
        outputs = image_encoder.vision_model(pixel_values=pixel_values, output_hidden_states=True)
        return image_encoder.vision_model.post_layernorm(outputs.hidden_states[vision_feature_layer])
    outputs = image_encoder(pixel_values=pixel_values)
    return outputs.image_embeds / outputs.image_embeds.norm(dim=-1, keepdim=True)


def encode_images(
    image_encoder: CLIPVisionModelWithProjection,
    image_processor: BaseImageProcessor,
    images: ImageInput | Sequence[ImageInput],
    image_features: str = "pooled",
    vision_feature_layer: int = -1,
) -> torch.FloatTensor:
    """[`encode_pixel_values`] of images in any format [`as_rgb_images`] accepts."""
    check_image_features(image_features, vision_feature_layer, image_encoder)
    pixel_values = image_processor(images=as_rgb_images(images), return_tensors="pt").pixel_values
    return encode_pixel_values(image_encoder, pixel_values, image_features, vision_feature_layer)


def image_feature_shape(image_encoder: CLIPVisionModelWithProjection, image_features: str = "pooled") -> tuple[int, ...]:
    """The shape of one image's features: `(projection_dim,)` pooled, `(num_patches + 1, hidden_size)` patches."""
    check_image_features(image_features)
    config = image_encoder.config
    if image_features == "patches":
        return ((config.image_size // config.patch_size) ** 2 + 1, config.hidden_size)
    return (config.projection_dim,)


class ProcessedImages(torch.utils.data.Dataset):
    """
    The `image` column of a caption dataset as CLIP pixel values, so that a `DataLoader`'s worker processes decode and
    preprocess the images while the main process runs CLIP.

    Args:
        dataset (`datasets.Dataset`):
            Rows with an `image` column (a `datasets.Image` feature).
        image_processor (`CLIPImageProcessor`):
            CLIP's preprocessing.
    """

    def __init__(self, dataset: datasets.Dataset, image_processor: BaseImageProcessor):
        if "image" not in dataset.column_names:
            raise ValueError(f"The dataset has no 'image' column (columns: {dataset.column_names}).")
        self.images = dataset.select_columns(["image"])
        self.image_processor = image_processor

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.FloatTensor:
        image = to_rgb(self.images[index]["image"])
        return self.image_processor(images=image, return_tensors="pt").pixel_values[0]


def default_num_workers() -> int:
    """Image-decoding worker processes: all cores but the one running CLIP, at most 8."""
    return min(8, (os.cpu_count() or 1) - 1)


def image_loader(
    dataset: datasets.Dataset,
    image_processor: BaseImageProcessor,
    batches: Sequence[Sequence[int]],
    num_workers: int | None = None,
) -> DataLoader:
    """A `DataLoader` of pixel-value batches of the given rows of `dataset`, decoded in `num_workers` processes."""
    num_workers = default_num_workers() if num_workers is None else num_workers
    return DataLoader(
        ProcessedImages(dataset, image_processor), batch_sampler=batches, num_workers=num_workers,
        persistent_workers=False,
    )


def encode_dataset_images(
    image_encoder: CLIPVisionModelWithProjection,
    image_processor: BaseImageProcessor,
    dataset: datasets.Dataset,
    batch_size: int = 64,
    image_features: str = "pooled",
    num_workers: int | None = None,
    vision_feature_layer: int = -1,
) -> torch.FloatTensor:
    """[`encode_pixel_values`] of every image of a caption dataset, in row order, on the CPU (see [`image_loader`])."""
    batches = [range(start, min(start + batch_size, len(dataset))) for start in range(0, len(dataset), batch_size)]
    features = [
        encode_pixel_values(image_encoder, pixel_values, image_features, vision_feature_layer).cpu()
        for pixel_values in image_loader(dataset, image_processor, batches, num_workers)
    ]
    return torch.cat(features) if features else torch.empty((0, *image_feature_shape(image_encoder, image_features)))


@torch.no_grad()
def encode_texts(text_encoder: CLIPTextModelWithProjection, tokenizer, texts: Sequence[str]) -> torch.FloatTensor:
    """L2-normalised CLIP `text_embeds`, shape `(batch, projection_dim)`, on the encoder's device."""
    max_length = text_encoder.config.max_position_embeddings
    tokens = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    tokens = tokens.to(text_encoder.device)
    embeds = text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).text_embeds
    return embeds / embeds.norm(dim=-1, keepdim=True)
