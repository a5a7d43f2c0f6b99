"""Caption datasets (Flickr8k/30k, COCO, image folders, the shapes world) in one schema, and the CLIP feature cache."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from datasets import DatasetDict

from .images import load_rgb_image, to_rgb, validate_images
from .readers import (
    combine_datasets,
    load_caption_dataset,
    load_coco_captions_json,
    load_flickr8k_captions_txt,
    load_flickr8k_token_txt,
    load_image_folder,
    load_karpathy_json,
    split_by_image,
)
from .shapes import build_shapes_world, canonical_caption, content_accuracy, shapes_world_dataset


def load_datasets(
    paths: Sequence[str | os.PathLike], images_dirs: Sequence[str] = (), on_bad_input: str = "error"
) -> DatasetDict:
    """
    Loads each path (any supported format, or a shapes world folder) and combines them split-wise, as the paper's
    Flickr8k + Flickr30k. `images_dirs` gives each dataset's image folder (one for all, or one per path) where the
    format needs it.
    """
    if len(images_dirs) not in (0, 1, len(paths)):
        raise ValueError(f"Give one images_dir for all datasets or one per dataset ({len(paths)}), got {len(images_dirs)}.")
    loaded = []
    for index, path in enumerate(paths):
        images_dir = images_dirs[index] if len(images_dirs) == len(paths) else (images_dirs[0] if images_dirs else None)
        if (Path(path) / "world.json").is_file():
            loaded.append(shapes_world_dataset(path))
        else:
            kwargs = {"on_bad_input": on_bad_input}
            if images_dir:
                kwargs["images_dir"] = images_dir
            loaded.append(load_caption_dataset(path, **kwargs))
    return loaded[0] if len(loaded) == 1 else combine_datasets(*loaded)


__all__ = [
    "build_shapes_world",
    "canonical_caption",
    "combine_datasets",
    "content_accuracy",
    "load_caption_dataset",
    "load_coco_captions_json",
    "load_datasets",
    "load_flickr8k_captions_txt",
    "load_flickr8k_token_txt",
    "load_image_folder",
    "load_karpathy_json",
    "load_rgb_image",
    "shapes_world_dataset",
    "split_by_image",
    "to_rgb",
    "validate_images",
]
