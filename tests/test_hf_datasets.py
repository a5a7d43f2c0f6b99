"""Every layout a Hugging Face user arrives with loads into the schema, trains through examples/train.py, and bad
input ends with a clean command-line error."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import datasets
import PIL.Image
import pytest

from clip_diffusionlm.data import SCHEMA_FEATURES, load_datasets

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 30, 30), "green": (20, 150, 50), "blue": (30, 80, 220)}
SHAPES = ("square", "circle", "star")
NUM_IMAGES = 10
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def _examples() -> list[tuple[PIL.Image.Image, list[str]]]:
    """Distinct images (encoded bytes are grouped by content) with two captions each, in the test vocabulary."""
    examples = []
    for index in range(NUM_IMAGES):
        colour = list(COLOURS)[index % 3]
        shape = SHAPES[index // 3 % 3]
        image = PIL.Image.new("RGB", (16, 16), (245, 245, 245))
        image.paste(COLOURS[colour], (index, index, index + 6, index + 6))
        examples.append((image, [f"a {colour} {shape}", f"a small {colour} {shape}"]))
    return examples


def _write_images(folder: Path, prefix: str = "") -> list[tuple[str, list[str]]]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for index, (image, captions) in enumerate(_examples()):
        name = f"{prefix}{index:03d}.png"
        image.save(folder / name)
        written.append((name, captions))
    return written


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _encoded(column: str = "image", captions: str = "caption", as_list: bool = True) -> datasets.Dataset:
    examples = _examples()
    caption_feature = datasets.List(datasets.Value("string")) if as_list else datasets.Value("string")
    return datasets.Dataset.from_dict(
        {column: [image for image, _ in examples],
         captions: [texts if as_list else texts[0] for _, texts in examples]},
        features=datasets.Features({column: datasets.Image(), captions: caption_feature}),
    )


def imagefolder_with_text(root: Path) -> dict:
    """The diffusers convention: one `text` row per caption, so each image appears twice."""
    folder = root / "pets"
    rows = [{"file_name": name, "text": text} for name, texts in _write_images(folder) for text in texts]
    _jsonl(folder / "metadata.jsonl", rows)
    return {"train_data_dir": folder}


def imagefolder_with_split_folders(root: Path) -> dict:
    folder = root / "split_folder"
    examples = _examples()
    for split, indices in (("train", range(0, 6)), ("validation", range(6, 8)), ("test", range(8, 10))):
        (folder / split).mkdir(parents=True)
        rows = []
        for index in indices:
            image, captions = examples[index]
            image.save(folder / split / f"{index:03d}.png")
            rows.append({"file_name": f"{index:03d}.png", "text": captions[0]})
        _jsonl(folder / split / "metadata.jsonl", rows)
    return {"train_data_dir": folder}


def saved_dataset_dict(root: Path) -> dict:
    """`save_to_disk` of a DatasetDict whose `caption` column holds a list per image (Flickr30k on the Hub)."""
    folder = root / "saved"
    datasets.DatasetDict({"train": _encoded()}).save_to_disk(folder)
    return {"dataset_name": folder}


def parquet_with_custom_columns(root: Path) -> dict:
    path = root / "photos.parquet"
    _encoded(column="picture", captions="description", as_list=False).to_parquet(path)
    return {"dataset_name": path, "image_column": "picture", "caption_column": "description"}


def csv_with_relative_paths(root: Path) -> dict:
    written = _write_images(root / "csv" / "images")
    lines = ["file,caption"] + [f"images/{name},{text}" for name, texts in written for text in texts]
    (root / "csv" / "captions.csv").write_text("\n".join(lines) + "\n")
    return {"dataset_name": root / "csv" / "captions.csv", "image_column": "file"}


def json_lines_with_caption_lists(root: Path) -> dict:
    written = _write_images(root / "jsonl" / "images")
    _jsonl(root / "jsonl" / "data.jsonl", [{"image": f"images/{name}", "captions": texts} for name, texts in written])
    return {"dataset_name": root / "jsonl" / "data.jsonl"}


def hub_dataset_in_offline_cache(root: Path) -> dict:
    """A Hub id, as `datasets` caches it after one online load: `<cache>/<owner>___<name>/<config>/<version>/<hash>`,
    written by the Parquet builder that a Hub load uses."""
    repository = root / "hub" / "flickr-mini"
    (repository / "data").mkdir(parents=True)
    _encoded().to_parquet(repository / "data" / "train-00000-of-00001.parquet")
    builder = datasets.load_dataset_builder(str(repository))
    cache = root / "hf_cache"
    builder.download_and_prepare(output_dir=str(cache / "someone___flickr-mini" / "default" / "0.0.0" / builder.hash))
    return {"dataset_name": "someone/flickr-mini", "cache_dir": cache}


LAYOUTS = [
    imagefolder_with_text,
    imagefolder_with_split_folders,
    saved_dataset_dict,
    parquet_with_custom_columns,
    csv_with_relative_paths,
    json_lines_with_caption_lists,
    hub_dataset_in_offline_cache,
]


def _flags(source: dict) -> list[str]:
    return [part for key, value in source.items() for part in (f"--{key}", str(value))]


@pytest.fixture
def offline(monkeypatch):
    # `datasets` reads its offline switch at import; tests patch the imported value the way the variable sets it.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.__name__)
def test_layout_loads_into_the_schema_with_captions_grouped_by_image(layout, tmp_path, offline):
    source = layout(tmp_path)
    dataset = load_datasets(**source)
    assert list(dataset)[:3] == ["train", "validation", "test"]
    rows = [row for split in dataset.values() for row in split]
    assert len(rows) == NUM_IMAGES and len({row["image_id"] for row in rows}) == NUM_IMAGES
    for split in dataset.values():
        assert all(split.features[name] == feature for name, feature in SCHEMA_FEATURES.items())
    expected = {tuple(captions) for _, captions in _examples()}
    if layout is imagefolder_with_split_folders or layout is parquet_with_custom_columns:
        expected = {captions[:1] for captions in expected}  # one caption per image in these files
    assert {tuple(row["captions"]) for row in rows} == expected
    assert all(isinstance(row["image"], PIL.Image.Image) for row in rows)
    if layout is imagefolder_with_split_folders:
        assert [len(dataset[split]) for split in ("train", "validation", "test")] == [6, 2, 2]
    else:  # no splits in the source: the deterministic image-level split
        assert [len(dataset[split]) for split in ("train", "validation", "test")] == [8, 1, 1]
        assert load_datasets(**source)["test"]["image_id"] == dataset["test"]["image_id"]


def _train(tmp_path: Path, assets: dict, *flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [
        sys.executable, str(REPO / "examples" / "train.py"),
        "--output_dir", str(tmp_path / "run"), "--clip_model", str(assets["clip"]),
        "--text_backbone", str(assets["backbone"]), "--model_config", json.dumps({"caption_length": 12}),
        "--batch_size", "4", "--max_steps", "2", "--validation_steps", "0", "--checkpointing_steps", "0",
        "--report_to", "none", "--validation_images", "2", "--feature_cache_dir", str(tmp_path / "features"),
        *flags,
    ]
    return subprocess.run(
        command, capture_output=True, text=True, cwd=tmp_path, env={**os.environ, **OFFLINE, **(env or {})},
        timeout=600,
    )


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.__name__)
def test_train_two_steps_from_each_layout(layout, training_assets, tmp_path):
    result = _train(tmp_path, training_assets, *_flags(layout(tmp_path)))
    assert result.returncode == 0, result.stderr[-3000:]
    history = [json.loads(line) for line in (tmp_path / "run" / "loss_history.jsonl").read_text().splitlines()]
    assert [record["step"] for record in history] == [1, 2]
    assert (tmp_path / "run" / "model_index.json").is_file()


def _written_files(folder: Path) -> list[str]:
    """What a failed run left in its output folder, logs aside."""
    if not folder.exists():
        return []
    return sorted(
        str(path.relative_to(folder)) for path in folder.rglob("*")
        if path.is_file() and path.suffix != ".log" and "logs" not in path.relative_to(folder).parts
    )


def _corrupt_image_folder(root: Path) -> list[str]:
    flags = _flags(imagefolder_with_text(root))
    (root / "pets" / "003.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return flags


def _missing_image(root: Path) -> list[str]:
    flags = _flags(csv_with_relative_paths(root))
    (root / "csv" / "images" / "004.png").unlink()
    return flags


def _non_utf8_captions(root: Path) -> list[str]:
    _write_images(root / "images")
    (root / "captions.txt").write_bytes(b"image,caption\n000.png,a caf\xe9 square\n")
    return ["--datasets", str(root / "captions.txt"), "--images_dirs", str(root / "images")]


BAD_INPUTS = {
    "missing path": (lambda root: ["--dataset_name", str(root / "nowhere.parquet")], r"nowhere\.parquet"),
    "missing image folder": (lambda root: ["--train_data_dir", str(root / "nowhere")], r"train_data_dir .*nowhere"),
    "unknown caption column": (
        lambda root: [*_flags(parquet_with_custom_columns(root)), "--caption_column", "label"],
        r"no column 'label' \(--caption_column\); its columns are \['picture', 'description'\]",
    ),
    "unknown image column": (
        lambda root: _flags(saved_dataset_dict(root)) + ["--image_column", "photo"],
        r"no image column 'photo' \(--image_column\)",
    ),
    "corrupt image": (_corrupt_image_folder, r"Bad images \(1 in total\):\n  .*003\.png: unreadable image"),
    "missing image": (_missing_image, r"Bad images \(1 in total\):\n  .*004\.png: missing file"),
    "undecodable text": (_non_utf8_captions, r"captions\.txt is not valid UTF-8: byte 0xe9"),
    "invalid flag value": (
        lambda root: _flags(saved_dataset_dict(root)) + ["--on_bad_input", "ignore"], r"on_bad_input.*'ignore'"
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_ends_with_a_clean_error_and_writes_nothing(case, training_assets, tmp_path):
    make_flags, message = BAD_INPUTS[case]
    result = _train(tmp_path, training_assets, *make_flags(tmp_path))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    # Ours start with "error: "; argparse's own (a flag value it rejects) with "train: error: ".
    errors = [line for line in result.stderr.splitlines() if re.match(r"(train: )?error: ", line)]
    assert len(errors) == 1, result.stderr[-3000:]
    assert re.search(message, result.stderr), result.stderr[-3000:]
    assert _written_files(tmp_path / "run") == []


def test_debug_shows_the_traceback_of_a_user_error(training_assets, tmp_path):
    flags = ["--dataset_name", str(tmp_path / "nowhere.parquet")]
    assert "Traceback" in _train(tmp_path, training_assets, *flags, "--debug").stderr
    assert "Traceback" in _train(tmp_path, training_assets, *flags, env={"CLIP_DIFFUSIONLM_DEBUG": "1"}).stderr


def test_an_unknown_dataset_name_says_what_was_tried(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no waiting for a Hub this machine cannot reach
    tried = r"Tried, in order: a save_to_disk folder, a Parquet/Arrow/CSV/JSON file, a local folder .*, a Hub dataset id"
    with pytest.raises(ValueError, match=r"Cannot load dataset_name='someone/no-such-dataset'(.|\n)*" + tried):
        load_datasets(dataset_name="someone/no-such-dataset")
