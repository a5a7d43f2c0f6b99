"""Readers for the caption-file formats `datasets` has no loader for: Karpathy split JSON, the Kaggle and original
Flickr8k caption files and COCO annotation JSON, plus :func:`load_caption_dataset`, which detects any supported
format (Hugging Face layouts go to :func:`~clip_diffusionlm.data.hf_datasets.load_hf_caption_dataset`).

All of them return the schema described in :mod:`clip_diffusionlm.data.schema`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, concatenate_datasets

from .hf_datasets import DATA_FILE_BUILDERS, load_hf_caption_dataset, load_image_folder
from .images import BadInputPolicy
from .schema import (
    DEFAULT_LOAD_OPTIONS,
    KARPATHY_SPLITS,
    SCHEMA_FEATURES,
    SPLITS,
    LoadOptions,
    clean_captions,
    finish_caption_dataset,
    split_by_image,
)

__all__ = [
    "combine_datasets",
    "load_caption_dataset",
    "load_coco_captions_json",
    "load_flickr8k_captions_txt",
    "load_flickr8k_token_txt",
    "load_image_folder",
    "load_karpathy_json",
    "split_by_image",
]

logger = logging.getLogger("clip_diffusionlm.data")

PathLike = str | os.PathLike

_SUPPORTED_FORMATS = (
    "a Karpathy split JSON (dataset_flickr8k.json, dataset_flickr30k.json, dataset_coco.json)",
    "a COCO captions JSON (captions_train2014.json, captions_val2014.json)",
    "a Kaggle Flickr8k captions.txt CSV with the header 'image,caption'",
    "a Flickr8k.token.txt or Flickr30k results_20130124.token file",
    "an image folder with metadata.jsonl or metadata.csv (split sub-folders allowed)",
    "a folder written by Dataset.save_to_disk or DatasetDict.save_to_disk",
    f"a data file that datasets.load_dataset reads ({', '.join(sorted(DATA_FILE_BUILDERS))})",
)


def _check_images_dir(options: LoadOptions, images_dir: PathLike, name: str) -> None:
    # Without this every image would be reported missing, hiding the actual mistake.
    if options.check_images and not os.path.isdir(images_dir):
        raise ValueError(f"{name} {str(images_dir)!r} is not a directory.")


@dataclass
class _ImageEntry:
    image_path: str
    captions: list[str]
    split: str | None


class _ImageTable:
    """Groups the captions of a source file by image, keeping the order in which images first appear."""

    def __init__(self) -> None:
        self.entries: dict[str, _ImageEntry] = {}

    def add(self, image_id: str, image_path: str, captions: Sequence[str], where: str, split: str | None = None) -> None:
        entry = self.entries.get(image_id)
        if entry is None:
            self.entries[image_id] = _ImageEntry(image_path, list(captions), split)
            return
        if split != entry.split:
            raise ValueError(f"{where}: image {image_id!r} is in split {split!r} here but in {entry.split!r} earlier.")
        entry.captions.extend(captions)


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _read_text(path: PathLike, on_bad_input: BadInputPolicy) -> str:
    """Reads a UTF-8 text file, applying the bad-input policy to undecodable bytes."""
    if not os.path.isfile(path):
        raise ValueError(f"{str(path)!r} does not exist or is not a file.")
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        if on_bad_input == "error":
            raise ValueError(
                f"{path} is not valid UTF-8: byte {data[err.start]:#04x} at offset {err.start} (line {line}). "
                "Re-encode it as UTF-8, or pass on_bad_input='skip' to replace undecodable bytes."
            ) from err
        bad_lines = sum(not _is_utf8(raw) for raw in data.splitlines())
        logger.warning("Replaced undecodable bytes on %d line(s) of %s, which is not valid UTF-8.", bad_lines, path)
        text = data.decode("utf-8", errors="replace")
    # Files saved by Windows tools often start with a byte order mark, which would end up in the first field.
    return text.removeprefix("\ufeff")


def _lines(text: str) -> Iterator[tuple[int, str]]:
    """Yields `(line number, line)`, splitting only on line breaks (`str.splitlines` also splits on e.g. U+2028)."""
    for number, line in enumerate(io.StringIO(text, newline=None), start=1):
        yield number, line.rstrip("\n")


def _read_json(path: PathLike, on_bad_input: BadInputPolicy) -> Any:
    try:
        return json.loads(_read_text(path, on_bad_input))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}.") from err


def _read_csv(
    path: PathLike, required: Sequence[str], on_bad_input: BadInputPolicy
) -> list[tuple[str, dict[str, Any]]]:
    """Returns `(location, row)` for each row of a CSV file with a header containing the `required` columns."""
    reader = csv.DictReader(io.StringIO(_read_text(path, on_bad_input), newline=""))
    header = reader.fieldnames or []
    missing = [name for name in required if name not in header]
    if missing:
        raise ValueError(f"{path}: expected a CSV header with the columns {list(required)}, got {header}.")
    rows = []
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if None in row:
            raise ValueError(f"{where}: more fields than the header {header}; quote values that contain commas.")
        rows.append((where, row))
    return rows


def _field(record: Any, key: str, expected: type, where: str) -> Any:
    if not isinstance(record, dict) or key not in record:
        raise ValueError(f"{where}: expected an object with the field {key!r}, got {str(record)[:100]}.")
    value = record[key]
    if not isinstance(value, expected):
        raise ValueError(f"{where}: expected {key!r} to be a {expected.__name__}, got {value!r:.100}.")
    return value


def _file_name(record: Any, key: str, where: str) -> str:
    name = _field(record, key, str, where).strip()
    if not name:
        raise ValueError(f"{where}: {key!r} is empty, expected an image file name.")
    return name


def _keys_or_type(value: Any) -> str:
    """Describes a value expected to be a mapping of splits, for error messages."""
    return repr(list(value)) if isinstance(value, Mapping) else type(value).__name__


def _check_split_keys(mapping: Any, name: str) -> None:
    if not isinstance(mapping, Mapping) or not mapping or not set(mapping) <= set(SPLITS):
        raise ValueError(f"{name} must map split names from {SPLITS} to files, got {_keys_or_type(mapping)}.")


def _image_path(images_dir: PathLike, *parts: str) -> str:
    return os.path.abspath(os.path.join(images_dir, *parts))


def _to_dataset_dict(table: _ImageTable, source: PathLike, options: LoadOptions) -> DatasetDict:
    """Cleans the captions and builds the schema's splits from the images of a source file."""
    if not table.entries:
        raise ValueError(f"No images with captions found in {source}.")
    image_ids = list(table.entries)
    entries = list(table.entries.values())
    captions = clean_captions(image_ids, [entry.captions for entry in entries], source, options)
    kept = [index for index, image_captions in enumerate(captions) if image_captions]
    dataset = Dataset.from_dict(
        {
            "image_id": [image_ids[index] for index in kept],
            "image": [entries[index].image_path for index in kept],
            "captions": [captions[index] for index in kept],
        },
        features=SCHEMA_FEATURES,
    )
    splits = [entries[index].split for index in kept]
    if all(split is None for split in splits):
        return finish_caption_dataset(dataset, source, options)
    by_split = {name: dataset.select([i for i, split in enumerate(splits) if split == name]) for name in set(splits)}
    return finish_caption_dataset(by_split, source, options)


def load_karpathy_json(
    json_path: PathLike,
    images_dir: PathLike,
    *,
    dataset_name: str | None = None,
    options: LoadOptions = DEFAULT_LOAD_OPTIONS,
) -> DatasetDict:
    """Loads a Karpathy split file (`dataset_flickr8k.json`, `dataset_flickr30k.json` or `dataset_coco.json`).

    The `"train"` and `"restval"` images form the train split, `"val"` the validation split and `"test"` the test
    split. The `"raw"` sentences are the captions.

    Args:
        json_path (`str` or `os.PathLike`):
            Path of the Karpathy JSON file.
        images_dir (`str` or `os.PathLike`):
            Folder of the images. For COCO, the folder that contains `train2014/` and `val2014/` (the `"filepath"` of
            each image).
        dataset_name (`str`, *optional*):
            Prefix of the image ids. Defaults to the `"dataset"` field of the file, e.g. `"flickr8k"`.
        options ([`LoadOptions`], *optional*, defaults to `LoadOptions()`):
            Splitting, image checks and the bad-input policy.

    Returns:
        `datasets.DatasetDict`: The caption dataset, see the module docstring for its schema.
    """
    _check_images_dir(options, images_dir, "images_dir")
    data = _read_json(json_path, options.on_bad_input)
    images = _field(data, "images", list, str(json_path))
    if dataset_name is None:
        if not isinstance(data.get("dataset"), str):
            raise ValueError(f"{json_path} has no 'dataset' name; pass dataset_name to name its image ids.")
        dataset_name = data["dataset"]
    table = _ImageTable()
    for index, image in enumerate(images):
        where = f"{json_path}: images[{index}]"
        filename = _file_name(image, "filename", where)
        # COCO images live in train2014/ or val2014/, named by "filepath"; Flickr images share one folder.
        filepath = _field(image, "filepath", str, where) if "filepath" in image else ""
        sentences = _field(image, "sentences", list, where)
        captions = [_field(sentence, "raw", str, f"{where}.sentences[{i}]") for i, sentence in enumerate(sentences)]
        split = _field(image, "split", str, where)
        if split not in KARPATHY_SPLITS:
            raise ValueError(f"{where}: unknown split {split!r}, expected one of {list(KARPATHY_SPLITS)}.")
        table.add(
            f"{dataset_name}/{filename}",
            _image_path(images_dir, filepath, filename),
            captions,
            where,
            split=KARPATHY_SPLITS[split],
        )
    return _to_dataset_dict(table, json_path, options)


def load_flickr8k_captions_txt(
    captions_txt: PathLike,
    images_dir: PathLike,
    *,
    dataset_name: str = "flickr8k",
    options: LoadOptions = DEFAULT_LOAD_OPTIONS,
) -> DatasetDict:
    """Loads the Kaggle Flickr8k `captions.txt`: a CSV with the header `image,caption` and one row per caption.

    The format has no splits, so the images are split with :func:`split_by_image`.

    Args:
        captions_txt (`str` or `os.PathLike`):
            Path of `captions.txt`.
        images_dir (`str` or `os.PathLike`):
            Folder of the images (`Images/` in the Kaggle download).
        dataset_name (`str`, *optional*, defaults to `"flickr8k"`):
            Prefix of the image ids.
        options ([`LoadOptions`], *optional*, defaults to `LoadOptions()`):
            Splitting, image checks and the bad-input policy.

    Returns:
        `datasets.DatasetDict`: The caption dataset, see the module docstring for its schema.
    """
    _check_images_dir(options, images_dir, "images_dir")
    table = _ImageTable()
    for where, row in _read_csv(captions_txt, ("image", "caption"), options.on_bad_input):
        filename = _file_name(row, "image", where)
        caption = _field(row, "caption", str, where)
        table.add(f"{dataset_name}/{filename}", _image_path(images_dir, filename), [caption], where)
    return _to_dataset_dict(table, captions_txt, options)


def _read_split_files(split_files: Mapping[str, PathLike], on_bad_input: BadInputPolicy) -> dict[str, str]:
    """Maps each image file name listed in the split files to its split."""
    _check_split_keys(split_files, "split_files")
    split_of: dict[str, str] = {}
    for split, path in split_files.items():
        for _, line in _lines(_read_text(path, on_bad_input)):
            filename = line.strip()
            if filename and split_of.setdefault(filename, split) != split:
                raise ValueError(f"{path}: {filename!r} is also listed in the {split_of[filename]!r} split file.")
    return split_of


def load_flickr8k_token_txt(
    token_txt: PathLike,
    images_dir: PathLike,
    split_files: Mapping[str, PathLike] | None = None,
    *,
    dataset_name: str = "flickr8k",
    options: LoadOptions = DEFAULT_LOAD_OPTIONS,
) -> DatasetDict:
    """Loads the original `Flickr8k.token.txt` (also Flickr30k's `results_20130124.token`).

    Each line is `<file name>#<caption index>\\t<caption>`.

    Args:
        token_txt (`str` or `os.PathLike`):
            Path of the token file.
        images_dir (`str` or `os.PathLike`):
            Folder of the images (`Flicker8k_Dataset/` in the original download).
        split_files (`Mapping[str, str or os.PathLike]`, *optional*):
            Maps `"train"`, `"validation"` and `"test"` to files listing one image file name per line, e.g.
            `Flickr_8k.trainImages.txt`, `Flickr_8k.devImages.txt` and `Flickr_8k.testImages.txt`. Images in none of
            them are dropped with a logged count. Without split files the images are split with
            :func:`split_by_image`.
        dataset_name (`str`, *optional*, defaults to `"flickr8k"`):
            Prefix of the image ids; `"flickr30k"` for Flickr30k's token file.
        options ([`LoadOptions`], *optional*, defaults to `LoadOptions()`):
            Splitting, image checks and the bad-input policy.

    Returns:
        `datasets.DatasetDict`: The caption dataset, see the module docstring for its schema.
    """
    _check_images_dir(options, images_dir, "images_dir")
    split_of = None if split_files is None else _read_split_files(split_files, options.on_bad_input)
    table = _ImageTable()
    unlisted = set()
    for number, line in _lines(_read_text(token_txt, options.on_bad_input)):
        if not line.strip():
            continue
        where = f"{token_txt}:{number}"
        key, tab, caption = line.partition("\t")
        filename, hash_sign, _ = key.rpartition("#")
        if not tab or not hash_sign or not filename.strip():
            raise ValueError(f"{where}: expected '<image file>#<index>\\t<caption>', got {line!r:.100}.")
        filename = filename.strip()
        split = None
        if split_of is not None:
            split = split_of.get(filename)
            if split is None:
                unlisted.add(filename)
                continue
        table.add(f"{dataset_name}/{filename}", _image_path(images_dir, filename), [caption], where, split=split)
    if unlisted:
        logger.warning("Dropped %d image(s) of %s that are in none of the split files.", len(unlisted), token_txt)
    return _to_dataset_dict(table, token_txt, options)


def load_coco_captions_json(
    annotation_files: Mapping[str, PathLike],
    images_dirs: Mapping[str, PathLike],
    *,
    dataset_name: str = "coco",
    options: LoadOptions = DEFAULT_LOAD_OPTIONS,
) -> DatasetDict:
    """Loads official COCO caption annotations (`captions_train2014.json`, `captions_val2014.json`, ...).

    Args:
        annotation_files (`Mapping[str, str or os.PathLike]`):
            Maps split names (`"train"`, `"validation"`, `"test"`) to annotation files, e.g.
            `{"train": "captions_train2014.json", "validation": "captions_val2014.json"}`.
        images_dirs (`Mapping[str, str or os.PathLike]`):
            Maps the same split names to the image folders, e.g. `{"train": "train2014", "validation": "val2014"}`.
        dataset_name (`str`, *optional*, defaults to `"coco"`):
            Prefix of the image ids.
        options ([`LoadOptions`], *optional*, defaults to `LoadOptions()`):
            Splitting, image checks and the bad-input policy.

    Returns:
        `datasets.DatasetDict`: The splits of `annotation_files`, the missing ones empty, see the module docstring
        for the schema.
    """
    _check_split_keys(annotation_files, "annotation_files")
    if not isinstance(images_dirs, Mapping) or set(images_dirs) != set(annotation_files):
        raise ValueError(
            f"images_dirs must have the splits of annotation_files {list(annotation_files)}, "
            f"got {_keys_or_type(images_dirs)}."
        )
    table = _ImageTable()
    for split, path in annotation_files.items():
        _check_images_dir(options, images_dirs[split], f"images_dirs[{split!r}]")
        data = _read_json(path, options.on_bad_input)
        file_names: dict[int, str] = {}
        for index, image in enumerate(_field(data, "images", list, str(path))):
            where = f"{path}: images[{index}]"
            file_names[_field(image, "id", int, where)] = _file_name(image, "file_name", where)
        captions: dict[int, list[str]] = {coco_id: [] for coco_id in file_names}
        for index, annotation in enumerate(_field(data, "annotations", list, str(path))):
            where = f"{path}: annotations[{index}]"
            coco_id = _field(annotation, "image_id", int, where)
            if coco_id not in captions:
                raise ValueError(f"{where}: image_id {coco_id} is not in 'images'.")
            captions[coco_id].append(_field(annotation, "caption", str, where))
        for coco_id, file_name in file_names.items():
            image_path = _image_path(images_dirs[split], file_name)
            table.add(f"{dataset_name}/{file_name}", image_path, captions[coco_id], f"{path}: image {coco_id}", split)
    return _to_dataset_dict(table, ", ".join(str(path) for path in annotation_files.values()), options)


def _check_schema(dataset_dict: Any, name: str) -> None:
    if not isinstance(dataset_dict, DatasetDict) or not set(SPLITS) <= set(dataset_dict):
        raise ValueError(f"{name} must be a DatasetDict with the splits {SPLITS}, got {_keys_or_type(dataset_dict)}.")
    for split, dataset in dataset_dict.items():
        missing = [column for column in SCHEMA_FEATURES if column not in dataset.column_names]
        if missing:
            raise ValueError(f"{name}[{split!r}] lacks the columns {missing}.")


def combine_datasets(*dataset_dicts: DatasetDict) -> DatasetDict:
    """Concatenates caption datasets split by split, e.g. Flickr8k and Flickr30k.

    Extra columns missing from some datasets are filled with `None`.

    Args:
        *dataset_dicts (`datasets.DatasetDict`):
            Caption datasets returned by the readers.

    Returns:
        `datasets.DatasetDict`: The concatenated splits.
    """
    if not dataset_dicts:
        raise ValueError("combine_datasets needs at least one DatasetDict.")
    features: dict[str, Any] = {}
    seen: set[str] = set()
    collisions = []
    for index, dataset_dict in enumerate(dataset_dicts):
        _check_schema(dataset_dict, f"dataset_dicts[{index}]")
        for split, dataset in dataset_dict.items():
            for name, feature in dataset.features.items():
                if features.setdefault(name, feature) != feature:
                    raise ValueError(
                        f"Column {name!r} is {features[name]} in one dataset but {feature} in dataset_dicts[{index}]"
                        f"[{split!r}]."
                    )
            for image_id in dataset["image_id"][:]:
                if image_id in seen:
                    collisions.append(image_id)
                seen.add(image_id)
    if collisions:
        raise ValueError(
            f"{len(collisions)} image_id(s) occur in more than one dataset, e.g. {collisions[:10]}; load the datasets "
            "with different dataset_name values, or drop the duplicates."
        )

    def with_all_columns(dataset: Dataset) -> Dataset:
        for name, feature in features.items():
            if name not in dataset.column_names:
                dataset = dataset.add_column(name, [None] * dataset.num_rows, feature=feature)
        return dataset

    return DatasetDict(
        {
            split: concatenate_datasets(
                [with_all_columns(dataset_dict[split]) for dataset_dict in dataset_dicts if split in dataset_dict]
            )
            for split in dict.fromkeys(split for dataset_dict in dataset_dicts for split in dataset_dict)
        }
    )


def _is_kaggle_captions_csv(path: Path) -> bool:
    with open(path, encoding="utf-8", errors="replace") as file:
        header = file.readline()
    return header.removeprefix("\ufeff").strip().replace(" ", "").lower() == "image,caption"


def _coco_split(path: Path) -> str:
    for word, split in (("train", "train"), ("val", "validation"), ("test", "test")):
        if word in path.name.lower():
            return split
    raise ValueError(f"Cannot tell the split of {path} from its name; pass split='train', 'validation' or 'test'.")


def load_caption_dataset(
    name_or_path: PathLike,
    *,
    image_column: str = "image",
    caption_column: str | None = None,
    cache_dir: PathLike | None = None,
    options: LoadOptions = DEFAULT_LOAD_OPTIONS,
    **kwargs: Any,
) -> DatasetDict:
    """Loads a caption dataset in any supported format, detected from the path.

    - A `.json` file with `"images"` that have `"sentences"`: :func:`load_karpathy_json`.
    - A `.json` file with `"annotations"`: :func:`load_coco_captions_json`, with `images_dir` and `split` keyword
      arguments instead of the mappings; `split` defaults to the one in the file name (`captions_val2014.json` is
      `"validation"`).
    - A `.token.txt` / `.token` file: :func:`load_flickr8k_token_txt`.
    - A `.txt` / `.csv` file with the header `image,caption`: :func:`load_flickr8k_captions_txt`.
    - Anything else `datasets` reads: a folder (an image folder with `metadata.jsonl`/`metadata.csv`, split
      sub-folders included, a `save_to_disk` folder, a folder of data files), a `metadata.jsonl`/`metadata.csv`
      (its folder), or a Parquet/Arrow/CSV/JSON file: :func:`load_hf_caption_dataset`, which alone uses
      `image_column`, `caption_column` and `cache_dir`.

    Args:
        name_or_path (`str` or `os.PathLike`):
            Path of the dataset file or folder.
        image_column (`str`, *optional*, defaults to `"image"`):
            Image column of a Hugging Face layout.
        caption_column (`str`, *optional*):
            Caption column of a Hugging Face layout; defaults to the first of `text`, `caption`, `captions`,
            `sentences`.
        cache_dir (`str` or `os.PathLike`, *optional*):
            Cache folder of `datasets`.
        options ([`LoadOptions`], *optional*, defaults to `LoadOptions()`):
            Splitting, image checks and the bad-input policy, for every format.
        **kwargs:
            Keyword arguments of the detected reader, e.g. `images_dir` or `dataset_name`.

    Returns:
        `datasets.DatasetDict`: The caption dataset, in the schema of :mod:`clip_diffusionlm.data.schema`.
    """
    path = Path(name_or_path)
    if not path.exists():
        raise ValueError(f"{str(name_or_path)!r} does not exist.")
    kwargs["options"] = options
    hf_kwargs = {"image_column": image_column, "caption_column": caption_column, "cache_dir": cache_dir, **kwargs}
    if path.is_dir():
        return load_hf_caption_dataset(str(path), **hf_kwargs)
    if path.name in ("metadata.jsonl", "metadata.csv"):
        return load_hf_caption_dataset(str(path.parent), **hf_kwargs)
    if path.name.endswith((".token.txt", ".token")):
        return load_flickr8k_token_txt(path, **kwargs)
    if path.suffix in (".txt", ".csv") and _is_kaggle_captions_csv(path):
        return load_flickr8k_captions_txt(path, **kwargs)
    if path.suffix == ".json":
        data = _read_json(path, options.on_bad_input)
        images = data.get("images") if isinstance(data, dict) else None
        if isinstance(images, list) and images and isinstance(images[0], dict) and "sentences" in images[0]:
            return load_karpathy_json(path, **kwargs)
        if isinstance(data, dict) and "annotations" in data:
            if "images_dir" not in kwargs:
                raise ValueError(f"{path} is a COCO captions file; pass images_dir, the folder of its images.")
            images_dir = kwargs.pop("images_dir")
            split = kwargs.pop("split", None) or _coco_split(path)
            return load_coco_captions_json({split: path}, {split: images_dir}, **kwargs)
    if path.suffix in DATA_FILE_BUILDERS:
        return load_hf_caption_dataset(str(path), **hf_kwargs)
    formats = "\n".join(f"  - {description}" for description in _SUPPORTED_FORMATS)
    raise ValueError(
        f"Cannot detect the caption dataset format of {str(name_or_path)!r}. Supported formats:\n{formats}"
    )
