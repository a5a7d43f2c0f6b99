from __future__ import annotations

import functools
import hashlib
import json
import re
import time
from collections import Counter
from pathlib import Path

import pytest
from datasets import Image

from clip_diffusionlm.data import load_image_folder
from clip_diffusionlm.demo import content_accuracy, parse_caption
from clip_diffusionlm.demo.shapes_world import (
    COLOUR_RGB,
    COLOURS,
    HARDER_WORLD,
    MAX_CAPTIONS_PER_IMAGE,
    SHAPES,
    SHAPES_WORLD_DATA_FILES,
    SIZES,
    ShapesWorldConfig,
    build_shapes_world,
    canonical_caption,
    generate_shapes_world,
)

# Every word the templates use. All are single word pieces in BERT's uncased vocabulary, which is what makes the
# word-piece estimate below exact; a new template word must be checked against the tokenizer before joining this set.
CAPTION_VOCABULARY = {
    ",", ":", "a", "above", "an", "and", "are", "at", "background", "below", "big", "black", "blue", "bottom", "box",
    "circle", "cross", "diamond", "disc", "from", "green", "image", "in", "is", "large", "left", "light", "little",
    "middle", "objects", "of", "on", "one", "orange", "picture", "pink", "purple", "red", "right", "shapes", "single",
    "small", "square", "star", "the", "there", "three", "tiny", "to", "top", "triangle", "two", "violet", "with",
    "yellow",
}  # fmt: skip

TWO_OBJECTS = [
    {"shape": "circle", "colour": "red", "size": "small", "x": 10, "y": 10},
    {"shape": "square", "colour": "blue", "size": "large", "x": 50, "y": 10},
]
ONE_OBJECT = [{"shape": "circle", "colour": "red", "size": "small", "x": 10, "y": 10}]
SMALL_WORLD = {"num_train": 12, "num_validation": 4, "num_test": 4, "num_holdout": 4}


def _pieces(caption: str) -> list[str]:
    return re.findall(r"[a-z]+|\d+|[^\sa-z\d]", caption)


@pytest.fixture(scope="module")
def examples():
    return generate_shapes_world(400, seed=0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_shapes_world(tmp_path_factory.mktemp("world"), seed=3, **SMALL_WORLD)


def test_constants():
    assert len(SHAPES) >= 5 and len(COLOURS) == 8 and SIZES == ("small", "large")


def test_same_seed_gives_identical_images_and_captions():
    first, second = generate_shapes_world(30, seed=7), generate_shapes_world(30, seed=7)
    assert [e.image.tobytes() for e in first] == [e.image.tobytes() for e in second]
    assert [(e.objects, e.captions) for e in first] == [(e.objects, e.captions) for e in second]
    other = generate_shapes_world(30, seed=8)
    assert [e.image.tobytes() for e in first] != [e.image.tobytes() for e in other]
    assert [e.captions for e in first] != [e.captions for e in other]


def test_images_and_objects_are_well_formed(examples):
    counts = Counter(len(e.objects) for e in examples)
    assert set(counts) == {1, 2, 3}
    for example in examples:
        size = ShapesWorldConfig().image_size
        assert example.image.mode == "RGB" and example.image.size == (size, size)
        assert len({(o["colour"], o["shape"]) for o in example.objects}) == len(example.objects)
        for obj in example.objects:
            assert set(obj) == {"shape", "colour", "size", "x", "y", "row", "column"}
            assert 0 < obj["x"] < size and 0 < obj["y"] < size
            assert (obj["row"], obj["column"]) == (obj["y"] * 3 // size, obj["x"] * 3 // size)
            # The object's colour is really drawn at its centre (the centre pixel is inside every shape).
            drawn = example.image.getpixel((obj["x"], obj["y"]))
            assert max(abs(a - b) for a, b in zip(drawn, COLOUR_RGB[obj["colour"]], strict=True)) < 40


def test_every_reference_caption_is_true_and_captions_are_distinct(examples):
    predictions = [caption for e in examples for caption in e.captions]
    truths = [e.objects for e in examples for _ in e.captions]
    scores = content_accuracy(predictions, truths)
    assert scores["object_accuracy"] == 1.0 and scores["exact_match"] == 1.0
    assert scores["count_accuracy"] == 1.0 and scores["hallucination_rate"] == 0.0
    for example in examples:
        assert len(set(example.captions)) == len(example.captions) == 5
    many = generate_shapes_world(60, seed=1, config=ShapesWorldConfig(captions_per_image=MAX_CAPTIONS_PER_IMAGE))
    for example in many:
        assert len(set(example.captions)) == MAX_CAPTIONS_PER_IMAGE
        assert content_accuracy(example.captions, [example.objects] * len(example.captions))["exact_match"] == 1.0


def test_first_caption_is_canonical_the_objects_in_reading_order(examples):
    for example in examples:
        assert example.captions[0] == canonical_caption(example.objects)
        cells = [(obj["y"] // 32, obj["x"] // 32) for obj in example.objects]  # 96-px images, 32-px grid cells
        assert cells == sorted(cells)  # the world lists its objects in reading order
    objects = [
        {"shape": "star", "colour": "black", "size": "large"},
        {"shape": "square", "colour": "orange", "size": "small"},
        {"shape": "circle", "colour": "orange", "size": "large"},
    ]
    assert canonical_caption(objects) == "a black star, an orange square and an orange circle"
    assert canonical_caption(objects[:1]) == "a black star"


def _mentioned_cell(cells: dict[tuple[str, str], tuple[int, int]], text: str, which: int) -> tuple[int, int]:
    """The (row, column) grid cell of the `which`-th object mentioned in `text`."""
    mention = parse_caption(text).mentions[which]
    return cells[(mention.colour, mention.shape)]


def test_spatial_words_are_true(examples):
    # content_accuracy ignores positions, so check relations and regions against the grid cells of the objects.
    relations = {"to the left of": (1, -1), "to the right of": (1, 1), "above": (0, -1), "below": (0, 1)}
    checked = Counter()
    for example in examples:
        size = example.image.size[0]
        cells = {(o["colour"], o["shape"]): (o["y"] * 3 // size, o["x"] * 3 // size) for o in example.objects}
        cell = functools.partial(_mentioned_cell, cells)
        for caption in example.captions:
            for phrase, (axis, sign) in relations.items():
                if f" {phrase} " in caption:
                    before, after = caption.split(f" {phrase} ")
                    assert (cell(after, 0)[axis] - cell(before, -1)[axis]) * sign < 0, caption
                    checked["relation"] += 1
            if caption.startswith("from "):
                axis = 1 if caption.startswith("from left") else 0
                assert [cell(caption, i)[axis] for i in range(3)] == [0, 1, 2], caption
                checked["ordering"] += 1
            if len(example.objects) == 1 and " the " in caption:
                row, column = cell(caption, 0)
                expected = [word for word in (("top", None, "bottom")[row], ("left", None, "right")[column]) if word]
                assert caption.split(" the ")[-1].split() == (expected or ["middle"]), caption
                checked["region"] += 1
    assert min(checked["relation"], checked["ordering"], checked["region"]) > 10


def test_caption_lengths_fit_small_text_models(examples):
    lengths = {1: [], 2: [], 3: []}
    for example in examples:
        for caption in example.captions:
            pieces = _pieces(caption)
            assert set(pieces) <= CAPTION_VOCABULARY, caption
            lengths[len(example.objects)].append(len(pieces) + 2)  # + [CLS] and [SEP]
            assert len(caption.split()) <= 15, caption
    assert max(lengths[1] + lengths[2]) <= 16
    assert max(lengths[3]) <= 24


def test_holdout_combinations():
    config = ShapesWorldConfig(holdout_combinations=[["purple", "triangle"]])
    assert config.holdout_combinations == (("purple", "triangle"),)
    regular = generate_shapes_world(300, seed=0, config=config)
    assert all(("purple", "triangle") != (o["colour"], o["shape"]) for e in regular for o in e.objects)
    held_out = generate_shapes_world(50, seed=0, config=config, holdout=True)
    assert all(any((o["colour"], o["shape"]) == ("purple", "triangle") for o in e.objects) for e in held_out)
    with pytest.raises(ValueError, match="holdout_combinations to be non-empty"):
        generate_shapes_world(1, config=ShapesWorldConfig(holdout_combinations=()), holdout=True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_objects": 4}, "max_objects must be between 1 and 3"),
        ({"min_objects": 0}, "min_objects must be between 1 and 4"),
        ({"max_objects": 5, "caption_style": "scene"}, "max_objects must be between 1 and 4"),
        ({"caption_style": "poem"}, "caption_style must be one of"),
        ({"repeat_probability": 1.5}, "repeat_probability must be a number between 0 and 1"),
        ({"min_objects": 3, "max_objects": 2}, "max_objects must be between 3 and 3"),
        ({"image_size": 16}, "image_size must be between 32 and 128"),
        ({"image_size": 256}, "image_size must be between 32 and 128"),
        ({"image_size": 64.0}, "image_size must be an int"),
        ({"captions_per_image": 9}, "captions_per_image must be between 1 and 8"),
        ({"holdout_combinations": [("cyan", "circle")]}, "Unknown colour 'cyan'"),
        ({"holdout_combinations": [("red", "hexagon")]}, "Unknown shape 'hexagon'"),
        ({"holdout_combinations": ["red"]}, r"\(colour, shape\) pairs"),
    ],
)
def test_bad_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ShapesWorldConfig(**kwargs)


def test_bad_generation_arguments_raise(tmp_path):
    with pytest.raises(ValueError, match="num_images must be >= 0"):
        generate_shapes_world(-1)
    with pytest.raises(ValueError, match="num_train must be an int"):
        build_shapes_world(tmp_path, num_train=1.5)
    with pytest.raises(ValueError, match="num_holdout=2 needs config.holdout_combinations"):
        build_shapes_world(tmp_path, num_holdout=2, config=ShapesWorldConfig(holdout_combinations=()))


# ----------------------------------------------------------------------------------------------------------------
# Metric on hand-made captions; the expected numbers are worked out by hand in the comments.
# ----------------------------------------------------------------------------------------------------------------


def test_harder_world_counts_relates_and_varies_its_references():
    examples = generate_shapes_world(300, seed=0, config=HARDER_WORLD)
    assert set(Counter(len(e.objects) for e in examples)) == {1, 2, 3, 4}
    repeated = [e for e in examples if len({(o["colour"], o["shape"]) for o in e.objects}) < len(e.objects)]
    assert len(repeated) > 30
    captions = [caption for e in examples for caption in e.captions]
    scores = content_accuracy(captions, [e.objects for e in examples for _ in e.captions])
    # Every reference is right in all it states: objects, counts, sizes and relations.
    assert scores["fully_correct"] == 1.0 and scores["relation_accuracy"] == 1.0
    assert scores["relations_per_caption"] > 0.15
    assert any(re.search(r"\b(two|three|four) \w+ \w+s\b", caption) for caption in captions)
    assert any(" is " in caption for caption in captions) and any(caption.startswith(("red", "blue")) for caption in captions)
    for example in examples:
        assert len(set(example.captions)) == len(example.captions) == 5
    # No canonical reference: the first caption is as varied as the others.
    assert sum(e.captions[0] == canonical_caption(e.objects) for e in examples) < len(examples) / 4
    assert max(len(_pieces(caption)) + 2 for caption in captions) <= 26


TWO_OBJECTS_IN_CELLS = [
    {"shape": "circle", "colour": "red", "size": "small", "row": 0, "column": 0},
    {"shape": "square", "colour": "blue", "size": "large", "row": 0, "column": 2},
]


@pytest.mark.parametrize(
    ("caption", "relations", "expected"),
    [
        ("a red circle to the left of a blue square", [(0, "left of", 1)], {"relation": 1.0, "fully": 1.0}),
        ("a blue square is right of a small red circle", [(0, "right of", 1)], {"relation": 1.0, "fully": 1.0}),
        # Named right, related wrong: an exact match that is not fully correct.
        ("a blue square is left of a red circle", [(0, "left of", 1)], {"relation": 0.0, "fully": 0.0}),
        ("a red circle above a blue square", [(0, "above", 1)], {"relation": 0.0, "fully": 0.0}),
        # A wrong size is a false statement, and there is no large red circle to relate.
        ("a large red circle left of a blue square", [(0, "left of", 1)], {"relation": 0.0, "fully": 0.0}),
        # Direction words with no mention on one side state no relation.
        ("from left to right: a red circle and a blue square", [], {"relation": 1.0, "fully": 1.0}),
        ("a red circle on the left and a blue square", [], {"relation": 1.0, "fully": 1.0}),
    ],
)
def test_relations_are_read_and_checked_against_the_grid(caption, relations, expected):
    parsed = parse_caption(caption)
    assert [(r.subject, r.relation, r.other) for r in parsed.relations] == relations
    scores = content_accuracy([caption], [TWO_OBJECTS_IN_CELLS])
    assert scores["exact_match"] == 1.0
    assert {"relation": scores["relation_accuracy"], "fully": scores["fully_correct"]} == expected


def test_counts_of_repeated_objects():
    objects = [*TWO_OBJECTS_IN_CELLS, {"shape": "circle", "colour": "red", "size": "large", "row": 2, "column": 1}]
    right = content_accuracy(["two red circles and a blue square"], [objects])
    assert right["fully_correct"] == right["object_accuracy"] == right["count_accuracy"] == 1.0
    wrong = content_accuracy(["three red circles and a blue square"], [objects])
    assert wrong["object_accuracy"] == 1.0 and wrong["count_accuracy"] == 0.0 and wrong["fully_correct"] == 0.0
    # The lone red circle on the bottom row is below the square: some red circle makes the statement true.
    assert content_accuracy(["a red circle below a blue square, and a red circle"], [objects])["relation_accuracy"] == 1.0
    with pytest.raises(ValueError, match=r"lacks the grid cells \('row', 'column'\)"):
        content_accuracy(["a red circle left of a blue square"], [TWO_OBJECTS])


def test_parse_caption():
    parsed = parse_caption("Three shapes: a small red circle, a big violet box and a green star.")
    assert parsed.stated_count == 3 and parsed.count == 3
    assert [(m.size, m.colour, m.shape) for m in parsed.mentions] == [
        ("small", "red", "circle"),
        ("large", "purple", "square"),
        (None, "green", "star"),
    ]
    assert [(m.colour, m.shape, m.count) for m in parse_caption("two red circles and a star").mentions] == [
        ("red", "circle", 2),
        (None, "star", 1),
    ]
    assert parse_caption("red small disc").mentions[0].size == "small"
    assert parse_caption("").mentions == ()


@pytest.mark.parametrize(
    ("caption", "truth", "expected"),
    [
        # Wrong colour: the circle is missed (1/2 objects, 1/2 colours), its mention is a hallucination (1/2).
        (
            "a small green circle and a large blue square",
            TWO_OBJECTS,
            {"object": 0.5, "shape": 1.0, "colour": 0.5, "size": 0.5, "count": 1.0, "exact": 0.0, "hall": 0.5},
        ),
        # Wrong shape: the star is hallucinated; no size words, so no size hits.
        (
            "a red star and a blue square",
            TWO_OBJECTS,
            {"object": 0.5, "shape": 0.5, "colour": 1.0, "size": 0.0, "count": 1.0, "exact": 0.0, "hall": 0.5},
        ),
        # Extra object: both objects found, 3 mentions for 2 objects, 1 of 3 mentions hallucinated.
        (
            "a red circle, a blue square and a green star",
            TWO_OBJECTS,
            {"object": 1.0, "shape": 1.0, "colour": 1.0, "size": 0.0, "count": 0.0, "exact": 0.0, "hall": 1 / 3},
        ),
        # Missing object: 1 of 2 found, nothing hallucinated.
        (
            "a small red circle",
            TWO_OBJECTS,
            {"object": 0.5, "shape": 0.5, "colour": 0.5, "size": 0.5, "count": 0.0, "exact": 0.0, "hall": 0.0},
        ),
        # Duplicate mention: the circle matches once, the second mention is an extra (1/2 hallucinated).
        (
            "a red circle and a red circle",
            ONE_OBJECT,
            {"object": 1.0, "shape": 1.0, "colour": 1.0, "size": 0.0, "count": 0.0, "exact": 0.0, "hall": 0.5},
        ),
        # Empty caption: nothing found, nothing mentioned.
        (
            "",
            TWO_OBJECTS,
            {"object": 0.0, "shape": 0.0, "colour": 0.0, "size": 0.0, "count": 0.0, "exact": 0.0, "hall": 0.0},
        ),
        # A stated count wins over the number of mentions.
        (
            "two shapes: a red circle",
            TWO_OBJECTS,
            {"object": 0.5, "shape": 0.5, "colour": 0.5, "size": 0.0, "count": 1.0, "exact": 0.0, "hall": 0.0},
        ),
        # A colourless "circle" explains the red circle's shape but not its colour.
        (
            "a circle and a large blue square",
            TWO_OBJECTS,
            {"object": 0.5, "shape": 1.0, "colour": 0.5, "size": 0.5, "count": 1.0, "exact": 0.0, "hall": 0.0},
        ),
        # "two red circles" claims two objects where there is one.
        (
            "two red circles",
            ONE_OBJECT,
            {"object": 1.0, "shape": 1.0, "colour": 1.0, "size": 0.0, "count": 0.0, "exact": 0.0, "hall": 0.5},
        ),
        # Synonyms and size-after-colour order are understood.
        (
            "a red small disc and a big blue box",
            TWO_OBJECTS,
            {"object": 1.0, "shape": 1.0, "colour": 1.0, "size": 1.0, "count": 1.0, "exact": 1.0, "hall": 0.0},
        ),
    ],
)
def test_content_accuracy_hand_made(caption, truth, expected):
    scores = content_accuracy([caption], [truth])
    names = {
        "object": "object_accuracy",
        "shape": "shape_accuracy",
        "colour": "colour_accuracy",
        "size": "size_accuracy",
        "count": "count_accuracy",
        "exact": "exact_match",
        "hall": "hallucination_rate",
    }
    assert {short: scores[name] for short, name in names.items()} == pytest.approx(expected)


def test_content_accuracy_aggregates_over_images_and_accepts_json():
    scores = content_accuracy(
        ["a small green circle and a large blue square", "a small red circle"],
        [json.dumps(TWO_OBJECTS), TWO_OBJECTS],
    )
    # Objects: (1 + 1) / 4; images: counts right in 1 of 2; mentions: 1 hallucinated out of 2 + 1.
    assert scores["object_accuracy"] == 0.5
    assert scores["count_accuracy"] == 0.5
    assert scores["exact_match"] == 0.0
    assert scores["hallucination_rate"] == pytest.approx(1 / 3)


def test_content_accuracy_bad_inputs():
    with pytest.raises(ValueError, match="same length, got 2 and 1"):
        content_accuracy(["a", "b"], [ONE_OBJECT])
    with pytest.raises(ValueError, match=r"predictions\[0\] must be a str"):
        content_accuracy([None], [ONE_OBJECT])
    with pytest.raises(ValueError, match="predictions must be a list of str"):
        content_accuracy("a red circle", [ONE_OBJECT])
    with pytest.raises(ValueError, match="must not be empty"):
        content_accuracy([], [])
    with pytest.raises(ValueError, match=r"objects\[0\] must hold dicts"):
        content_accuracy(["a"], [[{"shape": "circle", "colour": "cyan"}]])
    with pytest.raises(ValueError, match=r"objects\[0\] is not valid JSON"):
        content_accuracy(["a"], ["not json"])


# ----------------------------------------------------------------------------------------------------------------
# The world on disk
# ----------------------------------------------------------------------------------------------------------------


def _snapshot(directory: Path) -> dict[str, int]:
    return {str(path.relative_to(directory)): path.stat().st_mtime_ns for path in directory.rglob("*")}


def test_build_writes_image_folder_and_dataset(world):
    records = [json.loads(line) for line in (world / "metadata.jsonl").read_text().splitlines()]
    assert Counter(r["split"] for r in records) == {"train": 12, "validation": 4, "test": 4, "holdout": 4}
    assert sorted(p.name for p in (world / "images").iterdir()) == sorted(Path(r["file_name"]).name for r in records)
    assert set(records[0]) == {"file_name", "captions", "split", "objects"}

    # The world is an ordinary image folder: the generic loader reads it, its `split` column assigns the splits.
    dataset = load_image_folder(world)
    assert list(dataset) == ["train", "validation", "test", "holdout"]
    assert dataset["train"].column_names == ["image_id", "image", "captions", "objects"]
    assert dataset["validation"][0]["image_id"] == f"{world.name}/images/000012.png"
    hashes = {}
    for split, rows in dataset.items():
        for row in rows.cast_column("image", Image(decode=False)):
            path = Path(row["image"]["path"])
            assert path.is_absolute() and path.is_file()
            hashes[row["image_id"]] = (split, hashlib.sha256(path.read_bytes()).hexdigest())
            pairs = {(o["colour"], o["shape"]) for o in json.loads(row["objects"])}
            held_out = pairs & {("purple", "triangle"), ("green", "star")}
            assert bool(held_out) == (split == "holdout")
        scores = content_accuracy(
            [c for row in rows for c in row["captions"]], [row["objects"] for row in rows for _ in row["captions"]]
        )
        assert scores["exact_match"] == 1.0
    # Splits are disjoint down to the pixels.
    assert len({digest for _, digest in hashes.values()}) == len(hashes) == 24


def test_world_loads_from_its_data_files_without_a_folder_scan(world, monkeypatch):
    import datasets

    scanned = load_image_folder(world)

    def scan(*args, **kwargs):
        raise AssertionError("datasets scanned the folder for split names")

    monkeypatch.setattr(datasets.load, "get_data_patterns", scan)
    named = load_image_folder(world, data_files=SHAPES_WORLD_DATA_FILES)
    assert list(named) == list(scanned)
    for split in named:
        assert named[split]["image_id"] == scanned[split]["image_id"]
        assert named[split]["captions"][:] == scanned[split]["captions"][:]


def test_build_is_deterministic_across_directories(world, tmp_path):
    again = build_shapes_world(tmp_path, seed=3, **SMALL_WORLD)
    assert (again / "metadata.jsonl").read_bytes() == (world / "metadata.jsonl").read_bytes()
    assert (again / "images/000019.png").read_bytes() == (world / "images/000019.png").read_bytes()


def test_build_is_idempotent_and_regenerates_on_change(tmp_path):
    build_shapes_world(tmp_path, seed=0, **SMALL_WORLD)
    before = _snapshot(tmp_path)
    time.sleep(0.01)
    build_shapes_world(tmp_path, seed=0, **SMALL_WORLD)
    assert _snapshot(tmp_path) == before

    metadata = (tmp_path / "metadata.jsonl").read_text()
    build_shapes_world(tmp_path, seed=1, **SMALL_WORLD)
    assert (tmp_path / "metadata.jsonl").read_text() != metadata
    assert json.loads((tmp_path / "world.json").read_text())["seed"] == 1

    # Fewer images: stale images of the previous world disappear, unrelated files stay.
    (tmp_path / "images" / "notes.txt").write_text("keep me")
    build_shapes_world(tmp_path, seed=1, num_train=3, num_validation=1, num_test=1, num_holdout=0)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [
        "000000.png",
        "000001.png",
        "000002.png",
        "000003.png",
        "000004.png",
        "notes.txt",
    ]
    small_images = ShapesWorldConfig(image_size=32)
    build_shapes_world(tmp_path, seed=1, num_train=3, num_validation=1, num_test=1, num_holdout=0, config=small_images)
    assert json.loads((tmp_path / "world.json").read_text())["config"]["image_size"] == 32


def test_partial_world_is_regenerated(tmp_path):
    reference = build_shapes_world(tmp_path / "reference", seed=0, **SMALL_WORLD)
    partial = build_shapes_world(tmp_path / "partial", seed=0, **SMALL_WORLD)
    # Simulate a crash: world.json is never written, metadata and an image are cut short.
    (partial / "world.json").unlink()
    (partial / "metadata.jsonl").write_text('{"file_name": "images/000000.png"')
    (partial / "images/000005.png").write_bytes(b"\x89PNG")

    build_shapes_world(partial, seed=0, **SMALL_WORLD)
    assert (partial / "metadata.jsonl").read_bytes() == (reference / "metadata.jsonl").read_bytes()
    assert (partial / "images/000005.png").read_bytes() == (reference / "images/000005.png").read_bytes()
    assert (partial / "world.json").read_bytes() == (reference / "world.json").read_bytes()
    assert not list(partial.glob(".*tmp*"))
