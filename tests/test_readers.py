from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset, DatasetDict
from datasets import Image as ImageFeature
from PIL import Image

from clip_diffusionlm.data import LoadOptions
from clip_diffusionlm.data.images import load_rgb_image, validate_images
from clip_diffusionlm.data.readers import (
    SCHEMA_FEATURES,
    SPLITS,
    combine_datasets,
    load_caption_dataset,
    load_coco_captions_json,
    load_flickr8k_captions_txt,
    load_flickr8k_token_txt,
    load_image_folder,
    load_karpathy_json,
    split_by_image,
)

LOGGER = "clip_diffusionlm.data"
# Every image in the train split, so that a test can list the rows it expects.
UNSPLIT = LoadOptions(validation_fraction=0, test_fraction=0)
UNSPLIT_SKIP = LoadOptions(validation_fraction=0, test_fraction=0, on_bad_input="skip")
NO_IMAGE_CHECK = LoadOptions(check_images=False)


def make_image(path: Path, image_format: str = "PNG", color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path, image_format)
    return path


def write_karpathy(path: Path, images_dir: Path, dataset: str, images: list[tuple[str, str, list[str]]]) -> Path:
    """Writes a Karpathy split file for `(file name, split, raw captions)` triples, with the images."""
    records = []
    for index, (filename, split, captions) in enumerate(images):
        make_image(images_dir / filename)
        sentences = [{"raw": raw, "tokens": raw.lower().split()} for raw in captions]
        records.append({"filename": filename, "split": split, "sentences": sentences, "imgid": index})
    path.write_text(json.dumps({"images": records, "dataset": dataset}))
    return path


def write_kaggle(path: Path, images_dir: Path, rows: list[tuple[str, str]]) -> Path:
    for filename in dict.fromkeys(filename for filename, _ in rows):
        make_image(images_dir / filename, "JPEG")
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    return path


def write_token_txt(path: Path, images_dir: Path, captions: dict[str, list[str]]) -> Path:
    lines = []
    for filename, image_captions in captions.items():
        make_image(images_dir / filename, "JPEG")
        lines += [f"{filename}#{index}\t{caption}" for index, caption in enumerate(image_captions)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_coco(path: Path, images_dir: Path, captions: dict[str, list[str]], first_id: int = 1) -> Path:
    images, annotations = [], []
    for coco_id, (file_name, image_captions) in enumerate(captions.items(), start=first_id):
        make_image(images_dir / file_name, "JPEG")
        images.append({"id": coco_id, "file_name": file_name, "height": 8, "width": 8})
        annotations += [{"image_id": coco_id, "id": len(annotations), "caption": c} for c in image_captions]
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}))
    return path


def write_folder(folder: Path, rows: list[dict], metadata: str = "metadata.jsonl") -> Path:
    for file_name in dict.fromkeys(row["file_name"] for row in rows):
        make_image(folder / file_name)
    if metadata.endswith(".jsonl"):
        (folder / metadata).write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        with open(folder / metadata, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return folder


def kaggle_rows(num_images: int, captions_per_image: int = 2) -> list[tuple[str, str]]:
    return [
        (f"{i:03d}.jpg", f"caption {j} of image {i}") for i in range(num_images) for j in range(captions_per_image)
    ]


def assert_schema(dataset_dict: DatasetDict) -> None:
    assert isinstance(dataset_dict, DatasetDict)
    assert list(dataset_dict) == list(SPLITS)
    all_ids = []
    for dataset in dataset_dict.values():
        assert isinstance(dataset, Dataset)
        for name, feature in SCHEMA_FEATURES.items():
            assert dataset.features[name] == feature
        for row in dataset.cast_column("image", ImageFeature(decode=False)):
            assert os.path.isabs(row["image"]["path"]) and os.path.isfile(row["image"]["path"])
            assert row["captions"] and all(c == c.strip() and c for c in row["captions"])
        all_ids += dataset["image_id"][:]
    assert len(all_ids) == len(set(all_ids))


def rows_by_id(dataset_dict: DatasetDict) -> dict[str, tuple[str, list[str]]]:
    return {row["image_id"]: (split, row["captions"]) for split in SPLITS for row in dataset_dict[split]}


# --- readers ---------------------------------------------------------------------------------------------------------


def test_karpathy_json_maps_splits_and_groups_captions(tmp_path):
    images = [
        ("a.jpg", "train", ["A dog runs . ", "A brown dog."]),
        ("b.jpg", "restval", ["Two cats."]),
        ("c.jpg", "val", ["A red car.", "A car parked.", "Car."]),
        ("d.jpg", "test", ["A man surfing."]),
    ]
    path = write_karpathy(tmp_path / "dataset_flickr8k.json", tmp_path / "images", "flickr8k", images)

    dataset_dict = load_karpathy_json(path, tmp_path / "images")

    assert_schema(dataset_dict)
    assert rows_by_id(dataset_dict) == {
        "flickr8k/a.jpg": ("train", ["A dog runs .", "A brown dog."]),
        "flickr8k/b.jpg": ("train", ["Two cats."]),
        "flickr8k/c.jpg": ("validation", ["A red car.", "A car parked.", "Car."]),
        "flickr8k/d.jpg": ("test", ["A man surfing."]),
    }


def test_karpathy_json_coco_uses_filepath(tmp_path):
    make_image(tmp_path / "coco" / "val2014" / "COCO_val2014_1.jpg")
    image = {"filepath": "val2014", "filename": "COCO_val2014_1.jpg", "split": "restval", "cocoid": 1}
    image["sentences"] = [{"raw": "A bus.", "tokens": ["a", "bus"]}]
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": [image], "dataset": "coco"}))

    dataset_dict = load_karpathy_json(path, tmp_path / "coco")

    assert dataset_dict["train"][0]["image_id"] == "coco/COCO_val2014_1.jpg"
    image = dataset_dict["train"].cast_column("image", ImageFeature(decode=False))[0]["image"]
    assert image["path"] == str(tmp_path / "coco" / "val2014" / "COCO_val2014_1.jpg")


def test_karpathy_json_rejects_unknown_split(tmp_path):
    path = write_karpathy(tmp_path / "k.json", tmp_path / "images", "flickr8k", [("a.jpg", "dev", ["A dog."])])
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        load_karpathy_json(path, tmp_path / "images")


def test_flickr8k_captions_txt_groups_quoted_captions(tmp_path):
    rows = [
        ("1.jpg", 'A dog, "Rex", runs .'),
        ("2.jpg", "A cat sleeps"),
        ("1.jpg", "A dog on grass , running"),
        ("2.jpg", "A cat, sleeping"),
        ("3.jpg", "Birds"),
    ]
    path = write_kaggle(tmp_path / "captions.txt", tmp_path / "Images", rows)

    dataset_dict = load_flickr8k_captions_txt(path, tmp_path / "Images", options=UNSPLIT)

    assert_schema(dataset_dict)
    assert dataset_dict["train"]["image_id"][:] == ["flickr8k/1.jpg", "flickr8k/2.jpg", "flickr8k/3.jpg"]
    assert dataset_dict["train"]["captions"][:] == [
        ['A dog, "Rex", runs .', "A dog on grass , running"],
        ["A cat sleeps", "A cat, sleeping"],
        ["Birds"],
    ]


def test_flickr8k_captions_txt_rejects_wrong_header(tmp_path):
    (tmp_path / "captions.txt").write_text("file,text\na.jpg,A dog\n")
    with pytest.raises(ValueError, match=r"columns \['image', 'caption'\]"):
        load_flickr8k_captions_txt(tmp_path / "captions.txt", tmp_path, options=NO_IMAGE_CHECK)


def test_flickr8k_token_txt_with_split_files(tmp_path, caplog):
    captions = {f"{i}.jpg": [f"Caption {j} of {i} ." for j in range(5)] for i in range(5)}
    token = write_token_txt(tmp_path / "Flickr8k.token.txt", tmp_path / "images", captions)
    split_files = {}
    for split, names in (("train", ["0.jpg", "1.jpg"]), ("validation", ["2.jpg"]), ("test", ["3.jpg", ""])):
        split_files[split] = tmp_path / f"{split}.txt"
        split_files[split].write_text("\n".join(names) + "\n")

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dataset_dict = load_flickr8k_token_txt(token, tmp_path / "images", split_files)

    assert_schema(dataset_dict)
    assert {split: dataset_dict[split]["image_id"][:] for split in SPLITS} == {
        "train": ["flickr8k/0.jpg", "flickr8k/1.jpg"],
        "validation": ["flickr8k/2.jpg"],
        "test": ["flickr8k/3.jpg"],
    }
    assert dataset_dict["train"][0]["captions"] == [f"Caption {j} of 0 ." for j in range(5)]
    assert "Dropped 1 image(s)" in caplog.text


def test_flickr8k_token_txt_without_split_files_uses_seeded_split(tmp_path):
    captions = {f"{i}.jpg": ["A caption .", "Another caption ."] for i in range(10)}
    token = write_token_txt(tmp_path / "Flickr8k.token.txt", tmp_path / "images", captions)

    dataset_dict = load_flickr8k_token_txt(
        token, tmp_path / "images", options=LoadOptions(validation_fraction=0.2, test_fraction=0.1)
    )

    assert_schema(dataset_dict)
    assert [dataset_dict[split].num_rows for split in SPLITS] == [7, 2, 1]


def test_flickr8k_token_txt_rejects_malformed_line(tmp_path):
    (tmp_path / "Flickr8k.token.txt").write_text("a.jpg#0\tA dog\na.jpg A cat\n")
    with pytest.raises(ValueError, match=r"Flickr8k.token.txt:2"):
        load_flickr8k_token_txt(tmp_path / "Flickr8k.token.txt", tmp_path, options=NO_IMAGE_CHECK)


def test_coco_captions_json(tmp_path):
    train = write_coco(
        tmp_path / "captions_train2014.json", tmp_path / "train2014", {"t1.jpg": ["A", "B"], "t2.jpg": ["C"]}
    )
    val = write_coco(tmp_path / "captions_val2014.json", tmp_path / "val2014", {"v1.jpg": ["D", "E", "F"]}, first_id=9)

    dataset_dict = load_coco_captions_json(
        {"train": train, "validation": val}, {"train": tmp_path / "train2014", "validation": tmp_path / "val2014"}
    )

    assert_schema(dataset_dict)
    assert rows_by_id(dataset_dict) == {
        "coco/t1.jpg": ("train", ["A", "B"]),
        "coco/t2.jpg": ("train", ["C"]),
        "coco/v1.jpg": ("validation", ["D", "E", "F"]),
    }
    assert dataset_dict["test"].num_rows == 0


def test_coco_captions_json_rejects_unknown_image_and_mismatched_dirs(tmp_path):
    path = tmp_path / "captions_val2014.json"
    path.write_text(
        json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 2, "caption": "x"}]})
    )
    with pytest.raises(ValueError, match="image_id 2 is not in 'images'"):
        load_coco_captions_json({"validation": path}, {"validation": tmp_path}, options=NO_IMAGE_CHECK)
    with pytest.raises(ValueError, match="images_dirs must have the splits"):
        load_coco_captions_json({"validation": path}, {"train": tmp_path})
    with pytest.raises(ValueError, match="annotation_files must map split names"):
        load_coco_captions_json({"val": path}, {"val": tmp_path})


def test_image_folder_jsonl_with_split_column_keeps_extra_columns(tmp_path):
    objects = json.dumps([{"shape": "circle", "color": "red"}])
    rows = [
        {"file_name": "img/0.png", "captions": ["a red circle", " a circle "], "split": "train", "objects": objects},
        {"file_name": "img/1.png", "captions": ["a blue square"], "split": "val", "objects": "[]"},
        {"file_name": "img/2.png", "captions": ["nothing"], "split": "test", "objects": "[]"},
    ]
    folder = write_folder(tmp_path / "shapes", rows)

    dataset_dict = load_image_folder(folder)

    assert_schema(dataset_dict)
    assert rows_by_id(dataset_dict) == {
        "shapes/img/0.png": ("train", ["a red circle", "a circle"]),
        "shapes/img/1.png": ("validation", ["a blue square"]),
        "shapes/img/2.png": ("test", ["nothing"]),
    }
    assert json.loads(dataset_dict["train"][0]["objects"]) == [{"shape": "circle", "color": "red"}]
    assert "split" not in dataset_dict["train"].column_names


def test_image_folder_csv_groups_rows_and_uses_seeded_split(tmp_path):
    rows = [
        {"file_name": f"{i}.png", "caption": f"caption {j} of {i}", "source": "synthetic"}
        for i in range(10)
        for j in range(3)
    ]
    folder = write_folder(tmp_path / "synth", rows, "metadata.csv")

    dataset_dict = load_image_folder(folder, dataset_name="s", options=LoadOptions(seed=3))

    assert_schema(dataset_dict)
    assert sum(dataset_dict[split].num_rows for split in SPLITS) == 10
    by_id = rows_by_id(dataset_dict)
    assert by_id["s/4.png"][1] == ["caption 0 of 4", "caption 1 of 4", "caption 2 of 4"]
    assert set(dataset_dict["train"]["source"][:]) == {"synthetic"}


def test_image_folder_rejects_conflicting_rows(tmp_path):
    rows = [
        {"file_name": "0.png", "caption": "a", "split": "train"},
        {"file_name": "0.png", "caption": "b", "split": "test"},
    ]
    with pytest.raises(ValueError, match=r"image f/0.png is in the splits \['test', 'train'\]"):
        load_image_folder(write_folder(tmp_path / "f", rows, "metadata.csv"))
    rows = [{"file_name": "0.png", "caption": "a", "split": ""}]
    with pytest.raises(ValueError, match="row 0 has split None; expected a name"):
        load_image_folder(write_folder(tmp_path / "g", rows, "metadata.csv"))


def test_image_folder_keeps_extra_splits(tmp_path):
    """A held-out split (as the shapes world writes) becomes a split of its own beside train/validation/test."""
    rows = [
        {"file_name": "0.png", "caption": "a", "split": "train"},
        {"file_name": "1.png", "caption": "b", "split": "val"},
        {"file_name": "2.png", "caption": "c", "split": "holdout"},
    ]
    dataset_dict = load_image_folder(write_folder(tmp_path / "f", rows, "metadata.csv"))
    assert list(dataset_dict) == ["train", "validation", "test", "holdout"]
    assert dataset_dict["holdout"]["captions"] == [["c"]] and dataset_dict["validation"]["captions"] == [["b"]]


# --- splits and combining ------------------------------------------------------------------------------------------


def test_split_by_image_is_seeded_image_level_and_order_independent():
    image_ids = [f"set/{i}.jpg" for i in range(50)]
    dataset = Dataset.from_dict({"image_id": image_ids, "captions": [["c"]] * 50})

    def split_ids(dataset_dict: DatasetDict) -> dict[str, set[str]]:
        return {split: set(dataset_dict[split]["image_id"][:]) for split in SPLITS}

    first = split_ids(split_by_image(dataset, 0.1, 0.2, seed=1))
    assert {split: len(ids) for split, ids in first.items()} == {"train": 35, "validation": 5, "test": 10}
    assert set.union(*first.values()) == set(image_ids)
    assert not (
        first["train"] & first["validation"] or first["train"] & first["test"] or first["validation"] & first["test"]
    )
    assert split_ids(split_by_image(dataset, 0.1, 0.2, seed=1)) == first
    assert split_ids(split_by_image(dataset.shuffle(seed=0), 0.1, 0.2, seed=1)) == first
    assert split_ids(split_by_image(dataset, 0.1, 0.2, seed=2)) != first


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"validation_fraction": -0.1}, "validation_fraction must be between 0 and 1"),
        ({"test_fraction": 1.5}, "test_fraction must be between 0 and 1"),
        ({"validation_fraction": 0.6, "test_fraction": 0.6}, "at most 1"),
    ],
)
def test_split_by_image_rejects_bad_fractions(kwargs, message):
    dataset = Dataset.from_dict({"image_id": ["a"]})
    with pytest.raises(ValueError, match=message):
        split_by_image(dataset, **kwargs)


def test_split_by_image_rejects_duplicate_image_ids():
    with pytest.raises(ValueError, match="one row per image"):
        split_by_image(Dataset.from_dict({"image_id": ["a", "a"]}))


def test_combine_datasets_concatenates_splits_and_rejects_collisions(tmp_path):
    flickr8k = load_karpathy_json(
        write_karpathy(
            tmp_path / "8k.json", tmp_path / "8k", "flickr8k", [("a.jpg", "train", ["x"]), ("b.jpg", "test", ["y"])]
        ),
        tmp_path / "8k",
    )
    flickr30k = load_karpathy_json(
        write_karpathy(tmp_path / "30k.json", tmp_path / "30k", "flickr30k", [("a.jpg", "train", ["z"])]),
        tmp_path / "30k",
    )
    shapes = load_image_folder(
        write_folder(tmp_path / "shapes", [{"file_name": "0.png", "caption": "c", "split": "val", "objects": "[]"}])
    )

    combined = combine_datasets(flickr8k, flickr30k, shapes)

    assert_schema(combined)
    assert combined["train"]["image_id"][:] == ["flickr8k/a.jpg", "flickr30k/a.jpg"]
    assert combined["train"]["objects"][:] == [None, None]
    assert combined["validation"]["objects"][:] == ["[]"]
    with pytest.raises(ValueError, match=r"1 image_id\(s\) occur in more than one dataset.*flickr8k/a.jpg"):
        combine_datasets(flickr8k, flickr30k, flickr8k.filter(lambda row: row["image_id"] == "flickr8k/a.jpg"))
    with pytest.raises(ValueError, match="must be a DatasetDict"):
        combine_datasets(flickr8k, flickr8k["train"])


# --- format detection ----------------------------------------------------------------------------------------------


def test_load_caption_dataset_detects_every_format(tmp_path):
    karpathy = write_karpathy(
        tmp_path / "dataset_flickr30k.json", tmp_path / "f30k", "flickr30k", [("a.jpg", "val", ["x"])]
    )
    assert load_caption_dataset(karpathy, images_dir=tmp_path / "f30k")["validation"]["image_id"][:] == [
        "flickr30k/a.jpg"
    ]

    coco = write_coco(tmp_path / "captions_val2014.json", tmp_path / "val2014", {"v.jpg": ["x"]})
    assert load_caption_dataset(coco, images_dir=tmp_path / "val2014")["validation"]["image_id"][:] == ["coco/v.jpg"]
    assert load_caption_dataset(coco, images_dir=tmp_path / "val2014", split="test")["test"].num_rows == 1

    kaggle = write_kaggle(tmp_path / "captions.txt", tmp_path / "Images", kaggle_rows(3))
    loaded = load_caption_dataset(kaggle, images_dir=tmp_path / "Images", options=UNSPLIT)
    assert loaded["train"].num_rows == 3

    token = write_token_txt(tmp_path / "Flickr8k.token.txt", tmp_path / "Flicker8k_Dataset", {"t.jpg": ["x", "y"]})
    loaded = load_caption_dataset(token, images_dir=tmp_path / "Flicker8k_Dataset", options=UNSPLIT)
    assert loaded["train"]["captions"][:] == [["x", "y"]]

    folder = write_folder(tmp_path / "synth", [{"file_name": "0.png", "captions": ["x"], "split": "test"}])
    assert load_caption_dataset(folder)["test"].num_rows == 1
    assert load_caption_dataset(folder / "metadata.jsonl")["test"].num_rows == 1


@pytest.mark.parametrize(
    "name, message",
    [
        ("notes.txt", "Cannot detect the caption dataset format(.|\n)*Supported formats"),
        # Neither Karpathy nor COCO: read as JSON records, which name no captions.
        ("other.json", r"other.json \[train\] has no caption column: none of \['text', 'caption'"),
        ("empty_dir", "Cannot load dataset_name=.*empty_dir.*doesn't contain any data files. Give a Hub dataset id"),
    ],
)
def test_load_caption_dataset_rejects_unknown_format(tmp_path, name, message):
    path = tmp_path / name
    if name == "notes.txt":
        path.write_text("hello\n")
    elif name == "other.json":
        path.write_text(json.dumps({"images": [], "categories": []}))
    elif name == "empty_dir":
        path.mkdir()
    with pytest.raises(ValueError, match=message):
        load_caption_dataset(path)


def test_load_caption_dataset_rejects_missing_path(tmp_path):
    with pytest.raises(ValueError, match="missing.json' does not exist"):
        load_caption_dataset(tmp_path / "missing.json")


# --- bad input -----------------------------------------------------------------------------------------------------


def corrupt(path: Path, kind: str) -> None:
    if kind == "missing file":
        path.unlink()
    elif kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())


@pytest.mark.parametrize("kind", ["missing file", "truncated", "random bytes"])
def test_bad_image_is_reported_or_skipped(tmp_path, kind, caplog):
    images_dir = tmp_path / "Images"
    path = write_kaggle(tmp_path / "captions.txt", images_dir, kaggle_rows(4))
    # A noisy 8x8 JPEG still has a few hundred bytes of entropy-coded data, so cutting it in half truncates pixels.
    noise = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(noise).save(images_dir / "001.jpg", quality=95)
    corrupt(images_dir / "001.jpg", kind)

    with pytest.raises(
        ValueError,
        match=r"Bad images \(1 in total\):\n  .*001\.jpg: "
        + ("missing file" if kind == "missing file" else "unreadable image"),
    ):
        load_flickr8k_captions_txt(path, images_dir)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dataset_dict = load_flickr8k_captions_txt(path, images_dir, options=UNSPLIT_SKIP)
    assert dataset_dict["train"]["image_id"][:] == ["flickr8k/000.jpg", "flickr8k/002.jpg", "flickr8k/003.jpg"]
    assert "Skipped bad images (1 in total" in caplog.text
    assert load_flickr8k_captions_txt(path, images_dir, options=NO_IMAGE_CHECK)  # opting out does not open images


def test_bad_images_error_lists_at_most_max_report(tmp_path):
    images_dir = tmp_path / "Images"
    path = write_kaggle(tmp_path / "captions.txt", images_dir, kaggle_rows(5))
    for i in range(4):
        (images_dir / f"00{i}.jpg").unlink()
    with pytest.raises(ValueError, match=r"Bad images \(4 in total\)") as error:
        load_flickr8k_captions_txt(path, images_dir, options=LoadOptions(max_report=2))
    assert str(error.value).count("missing file") == 2 and "and 2 more" in str(error.value)


def test_validate_images_skip_keeps_splits(tmp_path):
    good, bad = make_image(tmp_path / "good.png"), tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    dataset = Dataset.from_dict(
        {"image_id": ["g", "b"], "image": [str(good), str(bad)], "captions": [["x"], ["y"]]}, features=SCHEMA_FEATURES
    )
    dataset_dict = DatasetDict({"train": dataset, "validation": dataset.select([]), "test": dataset.select([1])})
    validated = validate_images(dataset_dict, on_bad_input="skip", num_threads=1)
    assert {split: validated[split]["image_id"][:] for split in SPLITS} == {
        "train": ["g"],
        "validation": [],
        "test": [],
    }


def test_empty_captions_are_dropped_and_uncaptioned_images_are_bad(tmp_path, caplog):
    rows = [("000.jpg", "A dog"), ("000.jpg", "   "), ("001.jpg", ""), ("001.jpg", " \t"), ("002.jpg", "A cat")]
    path = write_kaggle(tmp_path / "captions.txt", tmp_path / "Images", rows)

    with pytest.raises(
        ValueError, match=r"Bad images without captions \(1 in total\):\n  flickr8k/001.jpg: no non-empty caption"
    ):
        load_flickr8k_captions_txt(path, tmp_path / "Images")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dataset_dict = load_flickr8k_captions_txt(path, tmp_path / "Images", options=UNSPLIT_SKIP)
    assert dataset_dict["train"]["captions"][:] == [["A dog"], ["A cat"]]
    assert (
        "Dropped 3 empty caption(s)" in caplog.text
        and "Skipped bad images without captions (1 in total" in caplog.text
    )


def test_non_utf8_caption_file_raises_or_is_replaced(tmp_path, caplog):
    token = write_token_txt(
        tmp_path / "Flickr8k.token.txt", tmp_path / "images", {"a.jpg": ["ok"], "b.jpg": ["A caf\u00e9"]}
    )
    token.write_bytes(token.read_bytes().replace("caf\u00e9".encode(), b"caf\xe9"))

    with pytest.raises(ValueError, match=r"Flickr8k.token.txt is not valid UTF-8: byte 0xe9 at offset 24 \(line 2\)"):
        load_flickr8k_token_txt(token, tmp_path / "images")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dataset_dict = load_flickr8k_token_txt(token, tmp_path / "images", options=UNSPLIT_SKIP)
    assert dataset_dict["train"]["captions"][:] == [["ok"], ["A caf\ufffd"]]
    assert "Replaced undecodable bytes on 1 line(s)" in caplog.text


def test_bad_policy_and_missing_files_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="on_bad_input must be one of"):
        load_flickr8k_captions_txt(tmp_path / "captions.txt", tmp_path, options=LoadOptions(on_bad_input="ignore"))
    with pytest.raises(ValueError, match="does not exist or is not a file"):
        load_flickr8k_captions_txt(tmp_path / "captions.txt", tmp_path)
    with pytest.raises(ValueError, match="images_dir .* is not a directory"):
        load_flickr8k_captions_txt(tmp_path / "captions.txt", tmp_path / "nowhere")


# --- load_rgb_image ------------------------------------------------------------------------------------------------


def pixel(image: Image.Image, tmp_path: Path, name: str) -> tuple[int, ...]:
    path = tmp_path / name
    image.save(path)
    rgb = load_rgb_image(path)
    assert rgb.mode == "RGB" and rgb.size == image.size
    return rgb.getpixel((0, 0))


def test_load_rgb_image_converts_modes(tmp_path):
    assert pixel(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), tmp_path, "cmyk.jpg") == pytest.approx(
        (0, 255, 255), abs=3
    )
    assert pixel(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), tmp_path, "white.tif") == (255, 255, 255)
    assert pixel(Image.new("L", (8, 8), 77), tmp_path, "gray.png") == (77, 77, 77)
    # Transparent pixels become white whatever color they store; opaque ones keep their color.
    assert pixel(Image.new("RGBA", (8, 8), (10, 20, 30, 0)), tmp_path, "clear.png") == (255, 255, 255)
    assert pixel(Image.new("RGBA", (8, 8), (10, 20, 30, 255)), tmp_path, "opaque.png") == (10, 20, 30)
    assert pixel(Image.new("RGBA", (8, 8), (0, 0, 0, 128)), tmp_path, "half.png") == (127, 127, 127)
    assert pixel(Image.new("LA", (8, 8), (0, 0)), tmp_path, "la.png") == (255, 255, 255)

    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0])
    palette.putpixel((1, 0), 1)
    path = tmp_path / "palette.png"
    palette.save(path, transparency=0)
    rgb = load_rgb_image(path)
    assert rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((1, 0)) == (255, 0, 0)


# Pillow writes 32-bit "I" images only as TIFF; 16-bit grayscale PNGs open as "I;16".
@pytest.mark.parametrize(("mode", "suffix"), [("I;16", ".png"), ("I", ".tif")])
def test_load_rgb_image_scales_16_bit(tmp_path, mode, suffix):
    values = np.array([[0, 32768, 65535, 257]], dtype=np.uint16 if mode == "I;16" else np.int32)
    image = Image.fromarray(values)
    assert image.mode == mode
    path = tmp_path / f"deep{suffix}"
    image.save(path)
    with Image.open(path) as reopened:
        assert reopened.mode == mode
    rgb = np.asarray(load_rgb_image(path))
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 4, 3)
    assert rgb[0, :, 0].tolist() == [0, 128, 255, 1]
    assert (rgb[..., 0] == rgb[..., 2]).all()
