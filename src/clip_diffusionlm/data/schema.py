"""The one schema every caption-dataset reader returns, and the steps all readers share to reach it.

Every reader returns a `datasets.DatasetDict` with the splits `"train"`, `"validation"` and `"test"` (possibly
empty; a source may add further splits such as the shapes world's `"holdout"`), each with one row per image and the
columns:

- `image_id` (`str`): `"<dataset name>/<file name>"`, unique across the whole `DatasetDict` and across datasets
  with different names, so that :func:`~clip_diffusionlm.data.combine_datasets` can merge e.g. Flickr8k and
  Flickr30k.
- `image` (`datasets.Image`): the image, decoded to a PIL image when a row is read. Readers of files on disk store
  the absolute path; Hugging Face datasets keep whatever they hold (usually the encoded bytes).
- `captions` (`list[str]`): one or more stripped, non-empty captions.

Splits are always by image, so no image has captions in two splits: the splits the source defines where it has
them, otherwise a seeded :func:`split_by_image`. Bad input (missing or corrupt images, images without captions, files
that are not UTF-8) is handled by one policy, `on_bad_input`: `"error"` raises a `ValueError` while loading, before
any training starts, and `"skip"` drops it and logs a count on the `clip_diffusionlm.data` logger. Every reader takes
this policy, the split fractions and seed and the image check as one [`LoadOptions`].
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from datasets import Dataset, DatasetDict, Features, Image, List, Value

from .images import BadInputPolicy, check_bad_input_policy, handle_bad_items, validate_images

__all__ = [
    "DEFAULT_LOAD_OPTIONS",
    "DEFAULT_SEED",
    "DEFAULT_TEST_FRACTION",
    "DEFAULT_VALIDATION_FRACTION",
    "KARPATHY_SPLITS",
    "SCHEMA_FEATURES",
    "SPLITS",
    "LoadOptions",
    "clean_captions",
    "finish_caption_dataset",
    "split_by_image",
]

logger = logging.getLogger("clip_diffusionlm.data")

SPLITS: tuple[str, ...] = ("train", "validation", "test")
SCHEMA_FEATURES = Features({"image_id": Value("string"), "image": Image(), "captions": List(Value("string"))})
# "restval" holds the COCO val2014 images outside Karpathy's 5k val / 5k test images; standard practice trains on them.
KARPATHY_SPLITS: dict[str, str] = {"train": "train", "restval": "train", "val": "validation", "test": "test"}
# Split names as sources spell them (Karpathy's, the Hub's "dev"/"valid") mapped onto ours; others are kept as is.
SPLIT_NAMES: dict[str, str] = {**KARPATHY_SPLITS, "validation": "validation", "valid": "validation", "dev": "validation"}

DEFAULT_VALIDATION_FRACTION = 0.1
DEFAULT_TEST_FRACTION = 0.1
DEFAULT_SEED = 42


def check_fractions(validation_fraction: float, test_fraction: float) -> None:
    for name, value in (("validation_fraction", validation_fraction), ("test_fraction", test_fraction)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must be between 0 and 1, got {value!r}.")
    if validation_fraction + test_fraction > 1:
        raise ValueError(
            f"validation_fraction + test_fraction must be at most 1, got {validation_fraction} + {test_fraction}."
        )


@dataclass(frozen=True)
class LoadOptions:
    """
    How every reader splits, checks and forgives its input. Validated on creation, before any file is read, so that
    a typo fails fast.

    Args:
        validation_fraction (`float`, *optional*, defaults to 0.1):
            Fraction of the images (rounded to the nearest count) in the validation split when the source has no
            splits.
        test_fraction (`float`, *optional*, defaults to 0.1):
            Fraction of the images in the test split when the source has no splits.
        seed (`int`, *optional*, defaults to 42):
            Seed of the split when the source has no splits.
        check_images (`bool`, *optional*, defaults to `True`):
            Whether to check that every image exists and decodes, see :func:`validate_images`.
        on_bad_input (`str`, *optional*, defaults to `"error"`):
            `"error"` raises a `ValueError` on bad input; `"skip"` drops it and logs a count.
        max_report (`int`, *optional*, defaults to 10):
            Maximum number of bad images listed in an error message.
    """

    validation_fraction: float = DEFAULT_VALIDATION_FRACTION
    test_fraction: float = DEFAULT_TEST_FRACTION
    seed: int = DEFAULT_SEED
    check_images: bool = True
    on_bad_input: BadInputPolicy = "error"
    max_report: int = 10

    def __post_init__(self) -> None:
        check_bad_input_policy(self.on_bad_input, self.max_report)
        check_fractions(self.validation_fraction, self.test_fraction)


# The readers' default; sharing one instance is safe because `LoadOptions` is frozen.
DEFAULT_LOAD_OPTIONS = LoadOptions()


def clean_captions(
    image_ids: Sequence[str], captions: Sequence[Sequence[str]], source: object, options: LoadOptions
) -> list[list[str]]:
    """Strips every caption and drops empty ones (logging a count); an image left without captions is bad input.

    Returns:
        `list[list[str]]`: The cleaned captions of each image, empty for the images to drop under `"skip"`.
    """
    cleaned = [[caption.strip() for caption in image_captions if caption.strip()] for image_captions in captions]
    num_dropped = sum(len(before) - len(after) for before, after in zip(captions, cleaned, strict=True))
    if num_dropped:
        logger.warning("Dropped %d empty caption(s) in %s.", num_dropped, source)
    uncaptioned = [(image_id, "no non-empty caption") for image_id, kept in zip(image_ids, cleaned) if not kept]
    handle_bad_items(uncaptioned, "images without captions", options.on_bad_input, options.max_report)
    if len(uncaptioned) == len(cleaned):
        raise ValueError(f"No images with captions found in {source}.")
    return cleaned


def split_by_image(
    dataset: Dataset,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    seed: int = DEFAULT_SEED,
) -> DatasetDict:
    """Randomly splits a dataset with one row per image into train, validation and test.

    The split depends only on the set of `image_id`s and the seed, not on the row order, so re-listing a folder or
    re-exporting a file in another order gives the same split. Rows keep their order within each split.

    Args:
        dataset (`datasets.Dataset`):
            Dataset with a unique `image_id` per row.
        validation_fraction (`float`, *optional*, defaults to 0.1):
            Fraction of the images (rounded to the nearest count) in the validation split.
        test_fraction (`float`, *optional*, defaults to 0.1):
            Fraction of the images (rounded to the nearest count) in the test split.
        seed (`int`, *optional*, defaults to 42):
            Seed of the shuffle.

    Returns:
        `datasets.DatasetDict`: The splits `"train"`, `"validation"` and `"test"`.
    """
    if not isinstance(dataset, Dataset):
        raise ValueError(f"dataset must be a datasets.Dataset, got {type(dataset).__name__}.")
    check_fractions(validation_fraction, test_fraction)
    if "image_id" not in dataset.column_names:
        raise ValueError(f"dataset must have an 'image_id' column, got {dataset.column_names}.")
    image_ids = dataset["image_id"][:]
    if len(set(image_ids)) != len(image_ids):
        raise ValueError("dataset has duplicate image_ids; split_by_image expects one row per image.")
    by_id = sorted(range(len(image_ids)), key=image_ids.__getitem__)
    shuffled = np.random.default_rng(seed).permutation(by_id).tolist()
    num_validation = round(len(shuffled) * validation_fraction)
    num_test = min(round(len(shuffled) * test_fraction), len(shuffled) - num_validation)
    indices = {
        "validation": shuffled[:num_validation],
        "test": shuffled[num_validation : num_validation + num_test],
        "train": shuffled[num_validation + num_test :],
    }
    return DatasetDict({split: dataset.select(sorted(indices[split])) for split in SPLITS})


def finish_caption_dataset(splits: Dataset | Mapping[str, Dataset], source: object, options: LoadOptions) -> DatasetDict:
    """The last steps of every reader: split by image when the source has no splits, order and complete the splits,
    validate the images and log the sizes.

    Args:
        splits (`datasets.Dataset` or `Mapping[str, datasets.Dataset]`):
            One dataset without splits, or the source's splits (already renamed with `SPLIT_NAMES`), in the schema.
        source (`object`):
            What was read, for messages.
        options (`LoadOptions`):
            The reader's options.
    """
    if isinstance(splits, Dataset):
        dataset_dict = split_by_image(splits, options.validation_fraction, options.test_fraction, options.seed)
    else:
        empty = next(iter(splits.values())).select([])
        names = [*SPLITS, *sorted(set(splits) - set(SPLITS))]
        dataset_dict = DatasetDict({name: splits.get(name, empty) for name in names})
    if options.check_images:
        dataset_dict = validate_images(dataset_dict, options.on_bad_input, options.max_report)
    sizes = {split: dataset.num_rows for split, dataset in dataset_dict.items()}
    if not sum(sizes.values()):
        raise ValueError(f"No usable images left in {source} after skipping bad input.")
    logger.info("Loaded %s: %s images.", source, ", ".join(f"{split} {size}" for split, size in sizes.items()))
    return dataset_dict
