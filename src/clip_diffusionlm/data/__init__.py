"""Caption datasets (Hugging Face datasets and image folders, Flickr8k/30k, COCO, the shapes world) in one schema."""

from __future__ import annotations

import os
from collections.abc import Sequence

from datasets import DatasetDict

from .hf_datasets import load_hf_caption_dataset, load_image_folder
from .images import load_rgb_image, to_rgb, validate_images
from .readers import (
    combine_datasets,
    load_caption_dataset,
    load_coco_captions_json,
    load_flickr8k_captions_txt,
    load_flickr8k_token_txt,
    load_karpathy_json,
)
from .schema import SCHEMA_FEATURES, SPLITS, LoadOptions, split_by_image


def load_datasets(
    paths: Sequence[str | os.PathLike] = (),
    images_dirs: Sequence[str | os.PathLike] = (),
    on_bad_input: str = "error",
    *,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    train_data_dir: str | os.PathLike | None = None,
    image_column: str = "image",
    caption_column: str | None = None,
) -> DatasetDict:
    """Loads every given source and combines them split-wise, as the paper's Flickr8k + Flickr30k.

    Args:
        paths (`Sequence[str or os.PathLike]`, *optional*):
            Dataset files or folders in any format of :func:`load_caption_dataset` (a shapes world is an image
            folder).
        images_dirs (`Sequence[str or os.PathLike]`, *optional*):
            The image folder of the formats that need one: one for all `paths` or one per path.
        on_bad_input (`str`, *optional*, defaults to `"error"`):
            `"error"` raises a `ValueError` on bad input; `"skip"` drops it and logs a count.
        dataset_name (`str`, *optional*):
            A Hub dataset id or anything else :func:`load_hf_caption_dataset` takes.
        dataset_config_name (`str`, *optional*):
            The configuration of `dataset_name`.
        cache_dir (`str` or `os.PathLike`, *optional*):
            Cache folder of `datasets`.
        train_data_dir (`str` or `os.PathLike`, *optional*):
            An image folder with `metadata.jsonl` / `metadata.csv`, split sub-folders allowed.
        image_column (`str`, *optional*, defaults to `"image"`):
            Image column of Hugging Face layouts.
        caption_column (`str`, *optional*):
            Caption column of Hugging Face layouts; defaults to the first of `text`, `caption`, `captions`,
            `sentences`.

    Returns:
        `datasets.DatasetDict`: The splits `"train"`, `"validation"` and `"test"` (and any extra split of a source),
        one row per image with `image_id`, `image` and `captions` (see :mod:`clip_diffusionlm.data.schema`).
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    images_dirs = [images_dirs] if isinstance(images_dirs, (str, os.PathLike)) else list(images_dirs)
    if not paths and dataset_name is None and train_data_dir is None:
        raise ValueError("No dataset given: pass --datasets, --dataset_name or --train_data_dir.")
    if len(images_dirs) not in (0, 1, len(paths)):
        raise ValueError(
            f"Give one images_dir for all datasets or one per dataset ({len(paths)}), got {len(images_dirs)}."
        )
    hf_options = {"cache_dir": cache_dir, "image_column": image_column, "caption_column": caption_column}
    options = LoadOptions(on_bad_input=on_bad_input)
    loaded = []
    for index, path in enumerate(paths):
        kwargs = {"options": options, **hf_options}
        if images_dirs:
            kwargs["images_dir"] = images_dirs[index] if len(images_dirs) == len(paths) else images_dirs[0]
        loaded.append(load_caption_dataset(path, **kwargs))
    for source in ({"dataset_name": dataset_name}, {"train_data_dir": train_data_dir}):
        if next(iter(source.values())) is not None:
            loaded.append(
                load_hf_caption_dataset(
                    **source, dataset_config_name=dataset_config_name, options=options, **hf_options
                )
            )
    return loaded[0] if len(loaded) == 1 else combine_datasets(*loaded)


__all__ = [
    "SCHEMA_FEATURES",
    "SPLITS",
    "LoadOptions",
    "combine_datasets",
    "load_caption_dataset",
    "load_coco_captions_json",
    "load_datasets",
    "load_flickr8k_captions_txt",
    "load_flickr8k_token_txt",
    "load_hf_caption_dataset",
    "load_image_folder",
    "load_karpathy_json",
    "load_rgb_image",
    "split_by_image",
    "to_rgb",
    "validate_images",
]
