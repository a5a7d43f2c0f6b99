"""Caption datasets in the layouts of the Hugging Face ecosystem, loaded by `datasets` itself.

:func:`load_hf_caption_dataset` accepts what diffusers' training examples accept: a Hub dataset id, any path
`datasets.load_dataset` reads (an image folder with `metadata.jsonl`/`metadata.csv`, split sub-folders included, a
folder of data files, a Parquet/Arrow/CSV/JSON file), or a folder written by `save_to_disk`. It then brings the rows
into the schema of :mod:`clip_diffusionlm.data.schema`: the captions of an image (one string or a list of strings per
row, over one or several rows) are grouped into one row per image, and without a validation or test split the images
are split deterministically with :func:`~clip_diffusionlm.data.schema.split_by_image`. A `split` column, if the rows
have one, assigns the splits instead (the shapes world and the Hub's Flickr30k use one).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import datasets
from datasets import Dataset, DatasetDict, Image, List, Value, concatenate_datasets

from .images import handle_bad_items
from .schema import (
    DEFAULT_LOAD_OPTIONS,
    SCHEMA_FEATURES,
    SPLIT_NAMES,
    LoadOptions,
    clean_captions,
    finish_caption_dataset,
)

__all__ = ["CAPTION_COLUMNS", "DATA_FILE_BUILDERS", "load_hf_caption_dataset", "load_image_folder"]

logger = logging.getLogger("clip_diffusionlm.data")

PathLike = str | os.PathLike

# The packaged `datasets` builder of each data-file suffix (`load_dataset` takes folders and Hub ids, not files).
DATA_FILE_BUILDERS: dict[str, str] = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json",
                                      ".jsonl": "json"}
# Tried in this order when no caption column is given: `text` is the imagefolder / diffusers convention.
CAPTION_COLUMNS: tuple[str, ...] = ("text", "caption", "captions", "sentences")
_STRING_DTYPES = ("string", "large_string")
_REFERENCE_BATCH = 1000


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _load_raw(
    dataset_name: str | None,
    dataset_config_name: str | None,
    cache_dir: PathLike | None,
    train_data_dir: PathLike | None,
    data_files: str | list | dict | None = None,
) -> tuple[DatasetDict, str, Path | None, str]:
    """Loads the source as `datasets` returns it: `(dataset dict, description, folder of relative paths, id prefix)`."""
    cache_dir = None if cache_dir is None else str(cache_dir)
    if train_data_dir is not None:
        folder = Path(train_data_dir)
        if not folder.is_dir():
            raise ValueError(f"train_data_dir {str(train_data_dir)!r} is not a directory; pass the image folder.")
        loaded = datasets.load_dataset(
            "imagefolder", data_dir=str(folder), data_files=data_files, cache_dir=cache_dir
        )
        return loaded, str(folder), folder.resolve(), folder.resolve().name
    path = Path(dataset_name)
    if path.is_dir() and _is_saved_dataset(path):
        loaded = datasets.load_from_disk(str(path))
        loaded = loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
        return loaded, str(path), path.resolve(), path.resolve().name
    if path.is_file():
        builder = DATA_FILE_BUILDERS.get(path.suffix)
        if builder is None:
            raise ValueError(
                f"dataset_name {dataset_name!r} is a {path.suffix or 'suffix-less'} file; expected one of "
                f"{sorted(DATA_FILE_BUILDERS)}, a folder, or a Hub dataset id."
            )
        loaded = datasets.load_dataset(builder, data_files=str(path), cache_dir=cache_dir)
        return loaded, str(path), path.parent.resolve(), path.stem
    loaded = datasets.load_dataset(dataset_name, dataset_config_name, data_files=data_files, cache_dir=cache_dir)
    if path.is_dir():
        return loaded, str(path), path.resolve(), path.resolve().name
    return loaded, dataset_name, None, dataset_name.rstrip("/").split("/")[-1]


def _caption_column(dataset: Dataset, caption_column: str | None, source: str) -> str:
    columns = dataset.column_names
    if caption_column is None:
        found = [name for name in CAPTION_COLUMNS if name in columns]
        if not found:
            raise ValueError(
                f"{source} has no caption column: none of {list(CAPTION_COLUMNS)} among its columns {columns}. "
                "Pass --caption_column with the column that holds the captions."
            )
        caption_column = found[0]
    elif caption_column not in columns:
        raise ValueError(
            f"{source} has no column {caption_column!r} (--caption_column); its columns are {columns}."
        )
    feature = dataset.features[caption_column]
    inner = getattr(feature, "feature", None)
    is_text = isinstance(feature, Value) and feature.dtype in _STRING_DTYPES
    is_text_list = isinstance(inner, Value) and inner.dtype in _STRING_DTYPES
    if not (is_text or is_text_list):
        raise ValueError(
            f"{source}: the caption column {caption_column!r} holds {feature}; expected a string or a list of strings "
            "per row. Pass --caption_column with a text column."
        )
    return caption_column


def _with_image_feature(dataset: Dataset, image_column: str, base_dir: Path | None, source: str) -> Dataset:
    """Casts a column of image file paths (relative ones to `base_dir`) to the `Image` feature."""
    if image_column not in dataset.column_names:
        raise ValueError(
            f"{source} has no image column {image_column!r} (--image_column); its columns are "
            f"{dataset.column_names}. Pass --image_column with the column that holds the images or their paths."
        )
    feature = dataset.features[image_column]
    if isinstance(feature, Image):
        return dataset
    if not (isinstance(feature, Value) and feature.dtype in _STRING_DTYPES):
        raise ValueError(
            f"{source}: the image column {image_column!r} holds {feature}; expected images or image file paths."
        )
    root = base_dir or Path.cwd()

    def absolute(batch: dict[str, list]) -> dict[str, list]:
        return {image_column: [None if path is None else str(root / path) for path in batch[image_column]]}

    return dataset.map(absolute, batched=True, desc="image paths").cast_column(image_column, Image())


def _image_keys(
    dataset: Dataset, image_column: str, base_dir: Path | None, prefix: str
) -> tuple[list[str | None], list[str]]:
    """A grouping key per row (the file path, or a digest of the encoded bytes) and an image id per key."""
    references = dataset.select_columns([image_column]).cast_column(image_column, Image(decode=False))
    keys: list[str | None] = []
    ids: dict[str, str] = {}
    used: set[str] = set()
    for batch in references.iter(batch_size=_REFERENCE_BATCH):
        for reference in batch[image_column]:
            if reference is None or not (reference.get("bytes") or reference.get("path")):
                keys.append(None)
                continue
            path = reference.get("path")
            if reference.get("bytes"):
                key = hashlib.sha256(reference["bytes"]).hexdigest()
                name = path or key[:16]
            else:
                key = name = path
                if base_dir is not None and os.path.isabs(path) and Path(path).is_relative_to(base_dir):
                    name = Path(path).relative_to(base_dir).as_posix()
            keys.append(key)
            if key not in ids:
                image_id = f"{prefix}/{name}"
                # Two different images with one file name (e.g. from two folders of a Hub export) stay apart.
                ids[key] = image_id if image_id not in used else f"{image_id}#{key[:8]}"
                used.add(ids[key])
    return keys, [ids[key] if key is not None else "" for key in keys]


def _to_schema(
    dataset: Dataset,
    image_column: str,
    caption_column: str | None,
    base_dir: Path | None,
    prefix: str,
    source: str,
    options: LoadOptions,
) -> Dataset:
    """One row per image with `image_id`, `image` and `captions`, plus the source's other columns (first row's)."""
    caption_column = _caption_column(dataset, caption_column, source)
    dataset = _with_image_feature(dataset, image_column, base_dir, source)
    keys, row_ids = _image_keys(dataset, image_column, base_dir, prefix)
    missing = [(f"{source}: row {row}", "no image") for row, key in enumerate(keys) if key is None]
    handle_bad_items(missing, "rows", options.on_bad_input, options.max_report)

    rows_of: dict[str, list[int]] = {}
    for row, key in enumerate(keys):
        if key is not None:
            rows_of.setdefault(key, []).append(row)
    values = dataset[caption_column][:]
    captions = []
    for rows in rows_of.values():
        image_captions = []
        for row in rows:
            value = values[row]
            image_captions.extend([value] if isinstance(value, str) else value or [])
        captions.append(image_captions)
    first_rows = [rows[0] for rows in rows_of.values()]
    image_ids = [row_ids[row] for row in first_rows]
    if "split" in dataset.column_names:
        # One image in two splits would leak test captions into training.
        split_values = dataset["split"][:]
        for image_id, rows in zip(image_ids, rows_of.values()):
            names = {split_values[row] for row in rows}
            if len(names) > 1:
                raise ValueError(f"{source}: image {image_id} is in the splits {sorted(names)}; give it one split.")
    captions = clean_captions(image_ids, captions, source, options)
    kept = [index for index, image_captions in enumerate(captions) if image_captions]

    selected = [first_rows[index] for index in kept]
    if selected != list(range(len(dataset))):
        dataset = dataset.select(selected)
    # The schema's names win over source columns of the same name (e.g. a numeric `image_id`).
    replaced = [name for name in SCHEMA_FEATURES if name in dataset.column_names and name != image_column]
    dataset = dataset.remove_columns(list(dict.fromkeys([caption_column, *replaced])))
    if image_column != "image":
        dataset = dataset.rename_column(image_column, "image")
    dataset = dataset.cast_column("image", Image())
    dataset = dataset.add_column("image_id", [image_ids[index] for index in kept], feature=Value("string"))
    dataset = dataset.add_column(
        "captions", [captions[index] for index in kept], feature=List(Value("string"))
    )
    others = [name for name in dataset.column_names if name not in SCHEMA_FEATURES]
    return dataset.select_columns([*SCHEMA_FEATURES, *others])


def _splits_from_column(dataset: Dataset, source: str) -> dict[str, Dataset]:
    names = []
    for row, value in enumerate(dataset["split"][:]):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{source}: row {row} has split {value!r}; expected a name such as {list(SPLIT_NAMES)}.")
        names.append(SPLIT_NAMES.get(value, value))
    dataset = dataset.remove_columns("split")
    return {name: dataset.select([i for i, split in enumerate(names) if split == name]) for name in dict.fromkeys(names)}


def load_hf_caption_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    *,
    cache_dir: PathLike | None = None,
    train_data_dir: PathLike | None = None,
    image_column: str = "image",
    caption_column: str | None = None,
    images_dir: PathLike | None = None,
    id_prefix: str | None = None,
    data_files: str | list | dict | None = None,
    options: LoadOptions = DEFAULT_LOAD_OPTIONS,
) -> DatasetDict:
    """Loads a caption dataset with `datasets`, from the Hub or a local layout, into the package's schema.

    Args:
        dataset_name (`str`, *optional*):
            A Hub dataset id (`"nlphuji/flickr30k"`), any path `datasets.load_dataset` reads (a folder of images with
            metadata or of data files), a Parquet/Arrow/CSV/JSON file, or a folder written by `save_to_disk`.
            Exactly one of `dataset_name` and `train_data_dir` is required. Offline
            (`HF_DATASETS_OFFLINE=1`), Hub ids load from the `datasets` cache.
        dataset_config_name (`str`, *optional*):
            The configuration of a Hub dataset.
        cache_dir (`str` or `os.PathLike`, *optional*):
            Cache folder of `datasets`; defaults to its own (`HF_DATASETS_CACHE`).
        train_data_dir (`str` or `os.PathLike`, *optional*):
            An image folder (`datasets`' `imagefolder`): images with a `metadata.jsonl` or `metadata.csv` naming
            each `file_name`, optionally in `train/`, `validation/` and `test/` sub-folders.
        image_column (`str`, *optional*, defaults to `"image"`):
            Column of the images, or of image file paths (relative ones are read from `images_dir`, else from the
            folder of the dataset).
        caption_column (`str`, *optional*):
            Column of the captions (a string or a list of strings per row). Defaults to the first of `text`,
            `caption`, `captions` and `sentences` that the dataset has.
        images_dir (`str` or `os.PathLike`, *optional*):
            Folder that relative image paths are relative to.
        id_prefix (`str`, *optional*):
            Prefix of the image ids. Defaults to the folder, file or dataset name.
        data_files (`str`, `list` or `dict`, *optional*):
            `datasets.load_dataset`'s `data_files` for a folder or Hub dataset: the files to read (relative to the
            folder), optionally per split. Without them `datasets` globs the whole folder once per split name it
            knows, several seconds for thousands of images.
        options ([`LoadOptions`], *optional*, defaults to `LoadOptions()`):
            Splitting, image checks and the bad-input policy.

    Returns:
        `datasets.DatasetDict`: The caption dataset, in the schema of :mod:`clip_diffusionlm.data.schema`, plus the
        source's other columns.
    """
    if (dataset_name is None) == (train_data_dir is None):
        raise ValueError("Give exactly one of dataset_name (--dataset_name) and train_data_dir (--train_data_dir).")
    try:
        raw, source, base_dir, prefix = _load_raw(
            dataset_name, dataset_config_name, cache_dir, train_data_dir, data_files
        )
    except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as error:
        raise ValueError(
            f"Cannot load dataset_name={dataset_name!r}: {str(error).rstrip('.')}. Give a Hub dataset id, a local "
            "folder or data file, or a save_to_disk folder; to work offline, load a Hub dataset once online so it is "
            "in the datasets cache (--cache_dir). Tried, in order: a save_to_disk folder, a Parquet/Arrow/CSV/JSON "
            "file, a local folder of data files or images, a Hub dataset id."
        ) from error
    except datasets.exceptions.DatasetGenerationError as error:
        raise ValueError(f"datasets cannot read {dataset_name or train_data_dir}: {error.__cause__ or error}") from error
    if images_dir is not None:
        base_dir = Path(images_dir).resolve()
    prefix = id_prefix or prefix
    splits = {
        SPLIT_NAMES.get(name, name): _to_schema(
            dataset, image_column, caption_column, base_dir, prefix, f"{source} [{name}]", options
        )
        for name, dataset in raw.items()
    }
    if all("split" in dataset.column_names for dataset in splits.values()):
        splits = _splits_from_column(concatenate_datasets(list(splits.values())), source)
    if "validation" not in splits and "test" not in splits:
        return finish_caption_dataset(concatenate_datasets(list(splits.values())), source, options)
    return finish_caption_dataset(splits, source, options)


def load_image_folder(
    folder: PathLike,
    *,
    dataset_name: str | None = None,
    cache_dir: PathLike | None = None,
    caption_column: str | None = None,
    data_files: str | list | dict | None = None,
    options: LoadOptions = DEFAULT_LOAD_OPTIONS,
) -> DatasetDict:
    """Loads an image folder (`datasets`' `imagefolder`) described by `metadata.jsonl` or `metadata.csv`.

    Each metadata row has a `file_name` relative to its folder and the captions (a `text`, `caption` or `captions`
    column; a string or, in JSON Lines, a list); several rows may describe the same file. Split sub-folders
    (`train/`, `validation/`, `test/`) or a `split` column (`"train"`, `"validation"`/`"val"`, `"test"`,
    `"restval"`, or any other name, kept as an extra split) assign the splits, otherwise :func:`split_by_image`
    does. Other columns are kept, e.g. a JSON string of the objects drawn in a synthetic image.

    Args:
        folder (`str` or `os.PathLike`):
            The image folder.
        dataset_name (`str`, *optional*):
            Prefix of the image ids. Defaults to the folder name.
        cache_dir (`str` or `os.PathLike`, *optional*):
            Cache folder of `datasets`.
        caption_column (`str`, *optional*):
            Caption column; defaults to the first of `text`, `caption`, `captions`, `sentences`.
        data_files (`str`, `list` or `dict`, *optional*):
            The files to read, relative to `folder` (the metadata file included), optionally per split; saves
            `datasets`' scan of the folder (a shapes world passes `SHAPES_WORLD_DATA_FILES`).
        options ([`LoadOptions`], *optional*, defaults to `LoadOptions()`):
            Splitting, image checks and the bad-input policy.

    Returns:
        `datasets.DatasetDict`: The caption dataset, in the schema of :mod:`clip_diffusionlm.data.schema`, plus the
        extra metadata columns.
    """
    return load_hf_caption_dataset(
        train_data_dir=folder, cache_dir=cache_dir, caption_column=caption_column, id_prefix=dataset_name,
        data_files=data_files, options=options,
    )

