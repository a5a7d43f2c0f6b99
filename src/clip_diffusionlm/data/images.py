"""Image loading and validation for caption datasets.

The readers in :mod:`clip_diffusionlm.data.readers` run :func:`validate_images` so that missing or corrupt images are
found while the dataset is loaded, not hours into training, and the training code loads every image with
:func:`load_rgb_image` so that all color modes reach the image processor as 8-bit RGB.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from datasets import DatasetDict
from datasets import Image as ImageFeature
from PIL import Image

from ..pipelines.captioning_utils import to_rgb

__all__ = ["BAD_INPUT_POLICIES", "BadInputPolicy", "load_rgb_image", "validate_images"]

logger = logging.getLogger("clip_diffusionlm.data")

BadInputPolicy = Literal["error", "skip"]
BAD_INPUT_POLICIES: tuple[str, ...] = ("error", "skip")

_VALIDATION_BATCH = 1000


def check_bad_input_policy(on_bad_input: str, max_report: int) -> None:
    """Raises a `ValueError` for an unknown bad-input policy or a non-positive `max_report`."""
    if on_bad_input not in BAD_INPUT_POLICIES:
        raise ValueError(f"on_bad_input must be one of {BAD_INPUT_POLICIES}, got {on_bad_input!r}.")
    if isinstance(max_report, bool) or not isinstance(max_report, int) or max_report < 1:
        raise ValueError(f"max_report must be a positive integer, got {max_report!r}.")


def handle_bad_items(problems: Sequence[tuple[str, str]], what: str, on_bad_input: str, max_report: int) -> None:
    """Applies the bad-input policy to a list of problems found while loading a dataset.

    Args:
        problems (`Sequence[tuple[str, str]]`):
            `(item, reason)` pairs, e.g. an image path and why it cannot be used.
        what (`str`):
            Plural noun for the items in messages, e.g. `"images"`.
        on_bad_input (`str`):
            `"error"` raises a `ValueError` listing the first `max_report` problems and the total count; `"skip"`
            logs the count, and the caller drops the items.
        max_report (`int`):
            Maximum number of problems listed in the error message.
    """
    if not problems:
        return
    if on_bad_input == "error":
        listed = "\n".join(f"  {item}: {reason}" for item, reason in problems[:max_report])
        more = f"\n  ... and {len(problems) - max_report} more" if len(problems) > max_report else ""
        raise ValueError(
            f"Bad {what} ({len(problems)} in total):\n{listed}{more}\n"
            "Fix them, or pass on_bad_input='skip' to drop them."
        )
    logger.warning("Skipped bad %s (%d in total; the first is %s: %s).", what, len(problems), *problems[0])


def load_rgb_image(path: str | os.PathLike) -> Image.Image:
    """Loads an image file of any common mode as an 8-bit RGB image (see [`to_rgb`]) that no longer references the
    file.

    Args:
        path (`str` or `os.PathLike`):
            Path of the image file.
    """
    with Image.open(path) as image:
        image.load()
        rgb = to_rgb(image)
        return rgb.copy() if rgb is image else rgb


def _open(reference: dict[str, Any]) -> Image.Image:
    data = reference.get("bytes")
    return Image.open(io.BytesIO(data) if data else reference["path"])


def _image_problem(reference: dict[str, Any] | None) -> str | None:
    """Returns why an image reference (`{"path", "bytes"}` of `datasets.Image`) cannot be used, or `None`."""
    if reference is None or not (reference.get("bytes") or reference.get("path")):
        return "no image"
    if not reference.get("bytes") and not os.path.isfile(reference["path"]):
        return "missing file"
    try:
        with _open(reference) as image:
            image.verify()
        # `verify` leaves the image unusable and does not decode pixel data, so truncated files need a second open.
        with _open(reference) as image:
            # Decoding JPEGs at reduced scale still reads every byte of the stream, so truncation is found ~8x faster.
            image.draft(None, (1, 1))
            image.load()
    # PIL plugins raise many unrelated exception types (OSError, SyntaxError, struct.error, ...) on corrupt data.
    except Exception as err:
        return f"unreadable image ({type(err).__name__}: {err})"
    return None


def validate_images(
    dataset_dict: DatasetDict,
    on_bad_input: BadInputPolicy = "error",
    max_report: int = 10,
    num_threads: int | None = None,
) -> DatasetDict:
    """Checks that the `image` of every row of a caption dataset exists and decodes.

    Args:
        dataset_dict (`datasets.DatasetDict`):
            Caption dataset with `image_id` and `image` (a `datasets.Image` feature) columns in every split.
        on_bad_input (`str`, *optional*, defaults to `"error"`):
            `"error"` raises a `ValueError` listing the first `max_report` bad images and their total count;
            `"skip"` drops them and logs the count on the `clip_diffusionlm.data` logger.
        max_report (`int`, *optional*, defaults to 10):
            Maximum number of bad images listed in the error message.
        num_threads (`int`, *optional*):
            Threads used to decode images. Defaults to `min(8, os.cpu_count())`.

    Returns:
        `datasets.DatasetDict`: The input, without the bad images when `on_bad_input="skip"`.
    """
    check_bad_input_policy(on_bad_input, max_report)
    if num_threads is None:
        num_threads = min(8, os.cpu_count() or 1)
    if num_threads < 1:
        raise ValueError(f"num_threads must be a positive integer, got {num_threads!r}.")
    problems_by_split: dict[str, list[str | None]] = {}
    problems = []
    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        for split, dataset in dataset_dict.items():
            if not {"image_id", "image"} <= set(dataset.column_names):
                raise ValueError(f"Split {split!r} lacks an 'image_id' or 'image' column (columns: {dataset.column_names}).")
            # Undecoded references, a batch at a time: a split of encoded images may not fit in memory at once.
            references = dataset.select_columns(["image_id", "image"]).cast_column("image", ImageFeature(decode=False))
            found = problems_by_split[split] = []
            for batch in references.iter(batch_size=_VALIDATION_BATCH):
                batch_problems = list(pool.map(_image_problem, batch["image"]))
                found.extend(batch_problems)
                for image_id, reference, problem in zip(batch["image_id"], batch["image"], batch_problems, strict=True):
                    if problem is not None:
                        problems.append(((reference or {}).get("path") or image_id, problem))
    handle_bad_items(problems, "images", on_bad_input, max_report)
    if not problems:
        return dataset_dict
    return DatasetDict(
        {
            split: dataset.select([i for i, problem in enumerate(problems_by_split[split]) if problem is None])
            for split, dataset in dataset_dict.items()
        }
    )
