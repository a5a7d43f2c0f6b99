"""Frozen CLIP features of whole datasets, for the training feature cache and evaluation.

Every image goes through the pipelines' own [`encode_pixel_values`], so a cached feature and one computed at inference
time are the same numbers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import datasets
import torch
from torch.utils.data import DataLoader
from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection
from transformers.image_processing_utils import BaseImageProcessor

from .models.modeling_clip_diffusionlm import IMAGE_FEATURES, check_vision_feature_layer
from .pipelines.captioning_utils import check_vision_layer_exists, encode_pixel_values, to_rgb


def check_image_features(
    image_features: str, vision_feature_layer: int = -1, image_encoder: CLIPVisionModelWithProjection | None = None
) -> None:
    """Raises a `ValueError` naming the argument unless the feature kind and layer exist (in `image_encoder`)."""
    if image_features not in IMAGE_FEATURES:
        raise ValueError(f"`image_features` must be one of {IMAGE_FEATURES}, got {image_features!r}.")
    check_vision_feature_layer(image_features, vision_feature_layer)
    if image_encoder is not None:
        check_vision_layer_exists(image_encoder, vision_feature_layer)


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
    check_image_features(image_features, vision_feature_layer, image_encoder)
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
