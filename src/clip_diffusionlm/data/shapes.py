"""The "shapes world": a deterministic synthetic image-captioning dataset, written as an ordinary image folder.

Real images and pretrained CLIP weights cannot be downloaded everywhere, so the package ships a tiny world whose
captions can be checked automatically. Every image shows 1-3 coloured shapes on a plain light background, placed in
distinct cells of a 3x3 grid so that they never overlap and spatial relations (left/right/above/below) are exact.
Every reference caption is generated from the ground-truth objects and is therefore true of its image. The first
reference of every image is its canonical caption ([`canonical_caption`]), the others vary templates, object order,
sizes and synonyms like human annotations.

The words the captions use for shapes, colours and sizes come from small synonym tables (`SHAPE_SYNONYMS`,
`COLOUR_SYNONYMS`, `SIZE_SYNONYMS`) that [`~clip_diffusionlm.metrics.content_accuracy`] shares, so the metric
understands every word the generator uses. A world loads like any image folder, e.g. with
[`~clip_diffusionlm.data.load_image_folder`].
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from datasets import DatasetDict
from PIL import Image, ImageDraw

from .hf_datasets import load_image_folder

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "black")
SIZES: tuple[str, ...] = ("small", "large")

# Chosen to stay far apart from each other and from the light background, so a small CNN/ViT can tell them apart.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 0),
    "yellow": (235, 205, 0),
    "green": (20, 150, 50),
    "blue": (30, 80, 220),
    "purple": (130, 40, 170),
    "pink": (250, 120, 200),
    "black": (25, 25, 25),
}

# The first word of each entry is the canonical one. Every word is a single word piece in BERT's uncased vocabulary,
# which keeps the captions short in tokens.
SHAPE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "star": ("star",),
    "cross": ("cross",),
    "diamond": ("diamond",),
}
COLOUR_SYNONYMS: dict[str, tuple[str, ...]] = {
    "red": ("red",),
    "orange": ("orange",),
    "yellow": ("yellow",),
    "green": ("green",),
    "blue": ("blue",),
    "purple": ("purple", "violet"),
    "pink": ("pink",),
    "black": ("black",),
}
SIZE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little", "tiny"),
    "large": ("large", "big"),
}

MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 128
MAX_OBJECTS = 3
# The canonical caption plus the smallest caption-template pool (see `_caption_templates`), less the one template that
# can coincide with the canonical caption, so the captions of one image are always distinct.
MAX_CAPTIONS_PER_IMAGE = 8
# Bump whenever the generator's output changes, so worlds already on disk are rebuilt instead of silently reused.
SHAPES_WORLD_VERSION = 4
# The files of a world on disk, as `datasets.load_dataset`'s `data_files` (the `split` column assigns the splits).
SHAPES_WORLD_DATA_FILES = {"train": ["metadata.jsonl", "images/*.png"]}

_GRID = 3
# Object extents as a fraction of the image side; a large object still fits inside one grid cell (1/3).
_SIZE_FRACTION = {"small": 0.18, "large": 0.29}
_BACKGROUND_LEVEL = 245
_MAX_BACKGROUND_TINT = 40
# Drawing at a multiple of the final size and box-filtering down anti-aliases the polygon edges.
_SUPERSAMPLE = 4
# Also matches the `<split>-<index>.png` names of version-2 worlds, so rebuilding over one removes its images.
_IMAGE_NAME = re.compile(r"^((train|validation|test|holdout)-)?\d{6}\.png$")

_ROW_WORDS = ("top", "middle", "bottom")
_COLUMN_WORDS = ("left", "middle", "right")


def plural(word: str) -> str:
    """The plural of a shape word ("circle" → "circles", "box" → "boxes")."""
    return word + "es" if word.endswith(("s", "x")) else word + "s"


@dataclass
class ShapesWorldConfig:
    """
    Configuration of the shapes world generator.

    Args:
        image_size (`int`, *optional*, defaults to 96):
            Side of the square RGB images in pixels, between 32 and 128. A multiple of 3 makes the 3x3 grid cells
            whole pixels, so a ViT whose patch is one cell (96 px with 32-px patches) sees each object in one patch.
        min_objects (`int`, *optional*, defaults to 1):
            Fewest objects in an image, between 1 and `max_objects`.
        max_objects (`int`, *optional*, defaults to 3):
            Most objects in an image, between `min_objects` and 3.
        captions_per_image (`int`, *optional*, defaults to 5):
            Number of distinct reference captions per image, between 1 and `MAX_CAPTIONS_PER_IMAGE` (8).
        background_tint (`int`, *optional*, defaults to 12):
            Largest per-channel amount (0-40) subtracted from the light grey background (245, 245, 245); each image
            draws its own tint from its seed.
        position_jitter (`float`, *optional*, defaults to 0.25):
            How far an object may stray from the middle of its grid cell, as a fraction (0-1) of the room that keeps
            it inside the cell; 0 centres every object. With the whole room (1.0) a toy ViT trained for minutes
            could not tell the shapes apart (measured in the README); a quarter keeps some variety.
        holdout_combinations (`tuple[tuple[str, str], ...]`, *optional*, defaults to `(("purple", "triangle"), ("green", "star"))`):
            `(colour, shape)` pairs that never appear in the train/validation/test splits and instead make up the
            "holdout" split, to measure compositional generalisation. Lists are accepted and converted to tuples.
    """

    image_size: int = 96
    min_objects: int = 1
    max_objects: int = 3
    captions_per_image: int = 5
    background_tint: int = 12
    position_jitter: float = 0.25
    holdout_combinations: tuple[tuple[str, str], ...] = field(
        default_factory=lambda: (("purple", "triangle"), ("green", "star"))
    )

    def __post_init__(self):
        _check_int("image_size", self.image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
        _check_int("min_objects", self.min_objects, 1, MAX_OBJECTS)
        _check_int("max_objects", self.max_objects, self.min_objects, MAX_OBJECTS)
        _check_int("captions_per_image", self.captions_per_image, 1, MAX_CAPTIONS_PER_IMAGE)
        _check_int("background_tint", self.background_tint, 0, _MAX_BACKGROUND_TINT)
        if isinstance(self.position_jitter, bool) or not isinstance(self.position_jitter, (int, float)) or not (
            0.0 <= self.position_jitter <= 1.0
        ):
            raise ValueError(f"position_jitter must be a number between 0 and 1, got {self.position_jitter!r}.")
        combinations = []
        for pair in self.holdout_combinations:
            if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
                raise ValueError(f"holdout_combinations must hold (colour, shape) pairs, got {pair!r}.")
            colour, shape = pair
            if colour not in COLOURS:
                raise ValueError(f"Unknown colour {colour!r} in holdout_combinations; expected one of {COLOURS}.")
            if shape not in SHAPES:
                raise ValueError(f"Unknown shape {shape!r} in holdout_combinations; expected one of {SHAPES}.")
            combinations.append((colour, shape))
        self.holdout_combinations = tuple(combinations)
        if len(self.allowed_combinations()) < self.max_objects:
            raise ValueError(
                f"holdout_combinations leaves fewer than max_objects={self.max_objects} (colour, shape) pairs for "
                "the train/validation/test images."
            )

    def allowed_combinations(self) -> list[tuple[str, str]]:
        """Returns the `(colour, shape)` pairs that may appear in train/validation/test images."""
        held_out = set(self.holdout_combinations)
        return [(colour, shape) for colour in COLOURS for shape in SHAPES if (colour, shape) not in held_out]


@dataclass
class ShapesExample:
    """
    One generated image with its ground truth.

    Args:
        image (`PIL.Image.Image`):
            The RGB image.
        objects (`list[dict[str, Any]]`):
            The objects in row-major grid order, each a dict with `shape`, `colour` and `size` (names from `SHAPES`,
            `COLOURS`, `SIZES`) and `x`, `y` (integer pixel coordinates of its centre; `y` grows downwards).
        captions (`list[str]`):
            Distinct lowercase reference captions, all true of the image; the first is [`canonical_caption`].
    """

    image: Image.Image
    objects: list[dict[str, Any]]
    captions: list[str]


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}.")
    if value < low or (high is not None and value > high):
        expected = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {expected}, got {value}.")


# ----------------------------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------------------------


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        # Narrower than tall so it does not read as a rotated square.
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if shape == "cross":
        a = 0.36 * r
        return [
            (cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a), (cx + r, cy + a), (cx + a, cy + a),
            (cx + a, cy + r), (cx - a, cy + r), (cx - a, cy + a), (cx - r, cy + a), (cx - r, cy - a), (cx - a, cy - a),
        ]  # fmt: skip
    if shape == "star":
        # A fat inner radius keeps the points visible on small stars; the lower points reach only 0.81 r, so the
        # star is shifted down by 0.1 r to sit centred in its box.
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else 0.48 * r
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + 0.1 * r + radius * math.sin(angle)))
        return points
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}.")


def _draw(objects: list[dict[str, Any]], background: tuple[int, int, int], image_size: int) -> Image.Image:
    canvas = Image.new("RGB", (image_size * _SUPERSAMPLE, image_size * _SUPERSAMPLE), background)
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        cx, cy = obj["x"] * _SUPERSAMPLE, obj["y"] * _SUPERSAMPLE
        r = _SIZE_FRACTION[obj["size"]] * image_size * _SUPERSAMPLE / 2
        fill = COLOUR_RGB[obj["colour"]]
        if obj["shape"] == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_shape_polygon(obj["shape"], cx, cy, r), fill=fill)
    return canvas.resize((image_size, image_size), Image.Resampling.BOX)


# ----------------------------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------------------------


def _word(rng: random.Random, synonyms: tuple[str, ...]) -> str:
    # Canonical words dominate so the vocabulary stays focused, synonyms add human-like variety.
    if len(synonyms) == 1 or rng.random() < 0.7:
        return synonyms[0]
    return rng.choice(synonyms[1:])


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _bare_phrase(obj: dict[str, Any], rng: random.Random, with_size: bool) -> str:
    words = [_word(rng, COLOUR_SYNONYMS[obj["colour"]]), _word(rng, SHAPE_SYNONYMS[obj["shape"]])]
    if with_size:
        words.insert(0, _word(rng, SIZE_SYNONYMS[obj["size"]]))
    return " ".join(words)


def _phrase(obj: dict[str, Any], rng: random.Random, with_size: bool | None = None) -> str:
    """`a [size] colour shape`; `with_size=None` flips a coin."""
    bare = _bare_phrase(obj, rng, rng.random() < 0.5 if with_size is None else with_size)
    return f"{_article(bare)} {bare}"


def _region(cell: tuple[int, int]) -> str:
    row, column = cell
    if row == 1 and column == 1:
        return "in the middle"
    if row == 1:
        return f"on the {_COLUMN_WORDS[column]}"
    if column == 1:
        return f"at the {_ROW_WORDS[row]}"
    return f"in the {_ROW_WORDS[row]} {_COLUMN_WORDS[column]}"


def _relations(
    a: dict[str, Any], b: dict[str, Any], cells: dict[int, tuple[int, int]]
) -> list[tuple[dict, str, dict]]:
    """True `(subject, relation, object)` statements; objects in different grid columns/rows never overlap in x/y."""
    (row_a, col_a), (row_b, col_b) = cells[id(a)], cells[id(b)]
    statements = []
    if col_a != col_b:
        left, right = (a, b) if col_a < col_b else (b, a)
        statements += [(left, "to the left of", right), (right, "to the right of", left)]
    if row_a != row_b:
        top, bottom = (a, b) if row_a < row_b else (b, a)
        statements += [(top, "above", bottom), (bottom, "below", top)]
    return statements


def _series(phrases: list[str]) -> str:
    """`a`, `a and b`, `a, b and c`."""
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def contradicting_words() -> dict[str, list[str]]:
    """
    Every colour and shape word of the captions → the words of the other colours, or of the other shapes in the same
    grammatical number: swapping one makes a caption false (hard negatives for CLIP pre-training).
    """
    def swaps(synonyms: dict[str, tuple[str, ...]], form: Callable[[str], str]) -> dict[str, list[str]]:
        return {
            form(word): [form(other) for rival, rivals in synonyms.items() if rival != name for other in rivals]
            for name, words in synonyms.items()
            for word in words
        }

    def singular(word: str) -> str:
        return word

    return {**swaps(COLOUR_SYNONYMS, singular), **swaps(SHAPE_SYNONYMS, singular), **swaps(SHAPE_SYNONYMS, plural)}


def canonical_caption(objects: Sequence[Mapping[str, Any]]) -> str:
    """
    The one caption of an image that a captioner can learn as a function of it: canonical words, no sizes or
    positions, the objects in the order given, which for a world's `ShapesExample.objects` is reading order (row by
    row, left to right): "a blue star, a red circle and a black square".

    Reading order rather than a sort by colour: the k-th phrase then names the k-th occupied grid cell, and no caption
    slot carries a prior on colours. Sorted by colour, the first slot is mostly an early colour, and a two-layer
    denoiser trained for the demo's few hundred steps named held-out colour-shape pairs 3-8 points less accurately
    (see the README).
    """
    phrases = [f"{_article(obj['colour'])} {obj['colour']} {obj['shape']}" for obj in objects]
    return _series(phrases)


def _caption_templates(
    objects: list[dict[str, Any]], cells: dict[int, tuple[int, int]], rng: random.Random
) -> list[Callable[[], str]]:
    """Builds one caption maker per template. Templates differ in their fixed words, so their captions are distinct."""
    if len(objects) == 1:
        (obj,) = objects
        region = _region(cells[id(obj)])
        return [
            lambda: _phrase(obj, rng, with_size=True),
            lambda: f"{_phrase(obj, rng)} on a light background",
            lambda: f"there is {_phrase(obj, rng, with_size=True)}",
            lambda: f"a single {_bare_phrase(obj, rng, with_size=True)}",
            lambda: f"one {_bare_phrase(obj, rng, rng.random() < 0.5)} {region}",
            lambda: f"a picture of {_phrase(obj, rng)}",
            lambda: f"{_phrase(obj, rng)} {region}",
            lambda: f"an image with one {_bare_phrase(obj, rng, rng.random() < 0.5)}",
        ]

    def listed(with_size: bool | None) -> str:
        order = rng.sample(objects, len(objects))
        phrases = [_phrase(obj, rng, with_size) for obj in order]
        return _series(phrases)

    def one_each() -> str:
        phrases = [f"one {_bare_phrase(obj, rng, rng.random() < 0.5)}" for obj in rng.sample(objects, len(objects))]
        return _series(phrases)

    if len(objects) == 2:
        a, b = objects
        templates: list[Callable[[], str]] = [
            lambda: f"two shapes: {listed(None)}",
            lambda: listed(None),
            lambda: f"a picture of {listed(None)}",
            lambda: f"two objects: {listed(None)}",
            lambda: f"{listed(False)} on a light background",
            one_each,
        ]
        for subject, relation, other in _relations(a, b, cells):
            templates.append(
                lambda subject=subject, relation=relation, other=other: (
                    f"{_phrase(subject, rng)} {relation} {_phrase(other, rng)}"
                )
            )
        return templates

    pairs = [(objects[i], objects[j]) for i in range(len(objects)) for j in range(i + 1, len(objects))]

    def related() -> str:
        # Naming the third object after a comma keeps the relation from reading as if it applied to both.
        a, b = rng.choice(pairs)
        subject, relation, other = rng.choice(_relations(a, b, cells))
        (third,) = [obj for obj in objects if obj is not subject and obj is not other]
        return (
            f"{_phrase(subject, rng, False)} {relation} {_phrase(other, rng, False)}, and {_phrase(third, rng, False)}"
        )

    # Three-object captions name sizes less often to stay within 24 word pieces.
    templates = [
        lambda: f"three shapes: {listed(None)}",
        lambda: listed(None),
        lambda: f"three objects: {listed(None)}",
        related,
        one_each,
        lambda: f"{listed(False)} on a light background",
        lambda: f"a picture of {listed(False)}",
        lambda: f"there are three shapes: {listed(False)}",
    ]
    for axis, words in ((1, "from left to right"), (0, "from top to bottom")):
        if len({cells[id(obj)][axis] for obj in objects}) == len(objects):
            ordered = sorted(objects, key=lambda obj, axis=axis: cells[id(obj)][axis])

            def along(ordered: list[dict[str, Any]] = ordered, words: str = words) -> str:
                phrases = [_phrase(obj, rng, False) for obj in ordered]
                return f"{words}: " + _series(phrases)

            templates.append(along)
    return templates


# ----------------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------------


def _generate_example(config: ShapesWorldConfig, rng: random.Random, holdout: bool) -> ShapesExample:
    num_objects = rng.randint(config.min_objects, config.max_objects)
    if holdout:
        first = rng.choice(config.holdout_combinations)
        others = [(colour, shape) for colour in COLOURS for shape in SHAPES if (colour, shape) != first]
        combinations = [first, *rng.sample(others, num_objects - 1)]
    else:
        combinations = rng.sample(config.allowed_combinations(), num_objects)
    grid_cells = sorted(rng.sample(range(_GRID * _GRID), num_objects))
    # Otherwise a held-out object would always take the first cell in reading order.
    rng.shuffle(combinations)

    cell_size = config.image_size / _GRID
    objects: list[dict[str, Any]] = []
    cells: dict[int, tuple[int, int]] = {}
    for (colour, shape), index in zip(combinations, grid_cells, strict=True):
        row, column = divmod(index, _GRID)
        size = rng.choice(SIZES)
        half_extent = _SIZE_FRACTION[size] * config.image_size / 2

        def centre(start: float, half_extent: float = half_extent) -> int:
            # Any integer centre within `room` of the cell's middle keeps the whole shape inside its grid cell.
            middle = start + cell_size / 2
            room = max(0.0, cell_size / 2 - half_extent) * config.position_jitter
            low, high = math.ceil(middle - room), math.floor(middle + room)
            return rng.randint(low, high) if low <= high else round(middle)

        obj = {
            "shape": shape,
            "colour": colour,
            "size": size,
            "x": centre(column * cell_size),
            "y": centre(row * cell_size),
        }
        objects.append(obj)
        cells[id(obj)] = (row, column)

    background = tuple(_BACKGROUND_LEVEL - rng.randint(0, config.background_tint) for _ in range(3))
    image = _draw(objects, background, config.image_size)
    templates = _caption_templates(objects, cells, rng)
    captions = [canonical_caption(objects)]
    for make in rng.sample(templates, len(templates)):
        if len(captions) == config.captions_per_image:
            break
        caption = make()
        if caption not in captions:  # a plain listing can happen to equal the canonical caption
            captions.append(caption)
    return ShapesExample(image=image, objects=objects, captions=captions)


def _generate(
    num_images: int, seed: int, config: ShapesWorldConfig, holdout: bool, stream: str
) -> list[ShapesExample]:
    _check_int("num_images", num_images, 0)
    _check_int("seed", seed, -(2**63))
    if holdout and not config.holdout_combinations:
        raise ValueError("Holdout images need config.holdout_combinations to be non-empty.")
    # One generator per image, seeded from a string (hashed with SHA-512, independent of PYTHONHASHSEED), so each
    # image depends only on (seed, stream, index) and a split's images do not change when another split grows.
    return [
        _generate_example(config, random.Random(f"shapes-world:{seed}:{stream}:{holdout}:{index}"), holdout)
        for index in range(num_images)
    ]


def generate_shapes_world(
    num_images: int, seed: int = 0, config: ShapesWorldConfig | None = None, *, holdout: bool = False
) -> list[ShapesExample]:
    """
    Generates shapes-world images with their objects and reference captions, deterministically.

    Args:
        num_images (`int`):
            Number of images to generate.
        seed (`int`, *optional*, defaults to 0):
            Same seed (and config) gives identical pixels, objects and captions.
        config (`ShapesWorldConfig`, *optional*):
            Generator settings; defaults to `ShapesWorldConfig()`.
        holdout (`bool`, *optional*, defaults to `False`):
            If `False`, no image contains a `(colour, shape)` pair from `config.holdout_combinations`. If `True`, every
            image contains at least one such pair (its other objects may be any pair).

    Returns:
        `list[ShapesExample]`: The generated examples.
    """
    return _generate(num_images, seed, config or ShapesWorldConfig(), holdout, stream="")


def _world_parameters(seed: int, sizes: dict[str, int], config: ShapesWorldConfig) -> dict[str, Any]:
    parameters = {"version": SHAPES_WORLD_VERSION, "seed": seed, "sizes": sizes, "config": asdict(config)}
    # A JSON round trip turns tuples into lists, so the result compares equal to what `world.json` holds.
    return json.loads(json.dumps(parameters))


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def _read_world(output_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((output_dir / "world.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def build_shapes_world(
    output_dir: str | os.PathLike,
    num_train: int = 10000,
    num_validation: int = 1000,
    num_test: int = 1000,
    num_holdout: int = 500,
    seed: int = 0,
    config: ShapesWorldConfig | None = None,
) -> Path:
    """
    Writes a shapes world to disk as an image folder, or reuses the one already there.

    The layout is an ordinary image folder: `output_dir/images/<index>.png` plus `output_dir/metadata.jsonl` with
    one JSON line per image, `{"file_name": "images/...png", "captions": [...], "split": ..., "objects": "<JSON list
    of objects>"}`, in the order train, validation, test, holdout. The `split` column assigns the splits (file names
    carry no split word, which `datasets` would read as a split of its own). `output_dir/world.json` records the parameters and is written last,
    atomically, so its presence marks a complete world: if it matches the requested parameters nothing is written,
    otherwise the world is regenerated (stale images of a previous world are deleted; other files are left alone).
    Do not call this from several processes at once on the same directory: build on one process first.

    Args:
        output_dir (`str` or `os.PathLike`):
            Directory of the world; created if missing.
        num_train (`int`, *optional*, defaults to 10000):
            Number of training images.
        num_validation (`int`, *optional*, defaults to 1000):
            Number of validation images.
        num_test (`int`, *optional*, defaults to 1000):
            Number of test images.
        num_holdout (`int`, *optional*, defaults to 500):
            Number of images containing a held-out `(colour, shape)` pair; must be 0 if
            `config.holdout_combinations` is empty.
        seed (`int`, *optional*, defaults to 0):
            Seed of the whole world; each split uses its own stream derived from it.
        config (`ShapesWorldConfig`, *optional*):
            Generator settings; defaults to `ShapesWorldConfig()`.

    Returns:
        `pathlib.Path`: `output_dir`.
    """
    config = config or ShapesWorldConfig()
    sizes = {"train": num_train, "validation": num_validation, "test": num_test, "holdout": num_holdout}
    for split, size in sizes.items():
        _check_int(f"num_{split}", size, 0)
    _check_int("seed", seed, -(2**63))
    if num_holdout and not config.holdout_combinations:
        raise ValueError(f"num_holdout={num_holdout} needs config.holdout_combinations to be non-empty.")

    output_dir = Path(output_dir)
    parameters = _world_parameters(seed, sizes, config)
    if _read_world(output_dir) == parameters and (output_dir / "metadata.jsonl").is_file():
        return output_dir

    image_dir = output_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    # Drop the completeness marker first: if we crash from here on, the next call regenerates.
    (output_dir / "world.json").unlink(missing_ok=True)
    for stale in image_dir.iterdir():
        if _IMAGE_NAME.match(stale.name):
            stale.unlink()

    lines = []
    for split, size in sizes.items():
        for example in _generate(size, seed, config, holdout=split == "holdout", stream=split):
            file_name = f"images/{len(lines):06d}.png"
            example.image.save(output_dir / file_name, format="PNG")
            record = {
                "file_name": file_name,
                "captions": example.captions,
                "split": split,
                "objects": json.dumps(example.objects),
            }
            lines.append(json.dumps(record) + "\n")
    _write_atomically(output_dir / "metadata.jsonl", "".join(lines))
    _write_atomically(output_dir / "world.json", json.dumps(parameters, indent=2) + "\n")
    return output_dir


def load_shapes_world(output_dir: str | os.PathLike) -> DatasetDict:
    """A world written by [`build_shapes_world`], in the package's caption schema: [`load_image_folder`] with the
    world's files named (`SHAPES_WORLD_DATA_FILES`), so that `datasets` does not scan the folder for split names."""
    return load_image_folder(output_dir, data_files=SHAPES_WORLD_DATA_FILES)
