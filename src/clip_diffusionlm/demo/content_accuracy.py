"""Content accuracy: whether what captions state is true of their shapes-world images.

[`parse_caption`] reads the objects, counts and spatial relations a caption states with the word tables the
shapes-world generator (:mod:`clip_diffusionlm.demo.shapes_world`) writes captions from, so the metric understands every
word the generator uses; [`content_accuracy`] compares them with the ground-truth objects stored in the world's
`objects` column.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .shapes_world import (
    COLOUR_SYNONYMS,
    COLOURS,
    RELATION_WORDS,
    SHAPE_SYNONYMS,
    SHAPES,
    SIZE_SYNONYMS,
    plural,
    relations_between,
)

__all__ = ["ObjectMention", "ParsedCaption", "RelationMention", "content_accuracy", "parse_caption"]

_NUMBER_WORDS = {"one": 1, "single": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8}
_GENERIC_NOUNS = frozenset({"shape", "shapes", "object", "objects", "thing", "things", "item", "items"})
_SHAPE_LOOKUP = {
    form: shape for shape, words in SHAPE_SYNONYMS.items() for word in words for form in (word, plural(word))
}
_COLOUR_LOOKUP = {word: colour for colour, words in COLOUR_SYNONYMS.items() for word in words}
_SIZE_LOOKUP = {word: size for size, words in SIZE_SYNONYMS.items() for word in words}
_TOKEN = re.compile(r"[a-z]+|\d+")


@dataclass(frozen=True)
class ObjectMention:
    """
    One object named in a caption.

    Args:
        shape (`str`):
            Canonical shape name from `SHAPES`.
        colour (`str`, *optional*):
            Canonical colour name from `COLOURS`, or `None` if the caption gave none.
        size (`str`, *optional*):
            Canonical size name from `SIZES`, or `None` if the caption gave none.
        count (`int`, *optional*, defaults to 1):
            Multiplicity given by a number word right before the mention ("two red circles").
    """

    shape: str
    colour: str | None = None
    size: str | None = None
    count: int = 1


@dataclass(frozen=True)
class RelationMention:
    """
    One spatial relation stated in a caption: `mentions[subject]` is `relation` `mentions[other]`.

    Args:
        subject (`int`):
            Index of the subject's mention in [`ParsedCaption`]'s `mentions`.
        relation (`str`):
            "left of", "right of", "above" or "below".
        other (`int`):
            Index of the other object's mention.
    """

    subject: int
    relation: str
    other: int


@dataclass(frozen=True)
class ParsedCaption:
    """
    The content of a caption as read by [`parse_caption`].

    Args:
        mentions (`tuple[ObjectMention, ...]`):
            Object mentions in caption order.
        stated_count (`int`, *optional*):
            Total given explicitly as "<number> shapes/objects/things/items", or `None`.
        relations (`tuple[RelationMention, ...]`, *optional*, defaults to `()`):
            Spatial relations between mentions, in caption order.
    """

    mentions: tuple[ObjectMention, ...]
    stated_count: int | None = None
    relations: tuple[RelationMention, ...] = ()

    @property
    def count(self) -> int:
        """The stated total if any, otherwise the number of mentioned objects (multiplicities included)."""
        return self.stated_count if self.stated_count is not None else sum(m.count for m in self.mentions)


def _number(token: str) -> int | None:
    return int(token) if token.isdigit() else _NUMBER_WORDS.get(token)


def parse_caption(caption: str) -> ParsedCaption:
    """
    Reads the objects a caption names, using the shared synonym tables.

    Parsing rules:
        1. The caption is lowercased and split into tokens of letters or of digits; punctuation only separates.
        2. Every shape word (a synonym from `SHAPE_SYNONYMS`, singular or plural: "circle", "discs", "boxes") starts a
           mention. The tokens right before it are scanned backwards while they are colour or size words (any order,
           so "small red circle" and "red small circle" both work); the nearest colour word and the nearest size word
           become the mention's colour and size. A shape word without a colour word still counts as a mention, with
           no colour.
        3. A number word ("one", "single", "two", ..., "eight") or number directly before that attribute span sets
           the mention's multiplicity ("two red circles" names two objects); otherwise it is 1, plural or not.
        4. A number word directly followed by "shape(s)", "object(s)", "thing(s)" or "item(s)" ("three shapes: ...")
           states the total count; the first such statement wins.
        5. A direction word ("left of", "right of", "above", "over", "below", "under") between two mentions states a
           relation of the mention before it to the mention after it ("a red circle is to the left of a blue square").
           One with no mention on either side ("from left to right: ...") states none, nor do "left" and "right"
           without "of" ("a red circle on the left").
        Attributes after the noun ("a circle that is red"), coreference ("... the circle is small") and negation are
        not understood: every mention is read as a separate object claim.

    Args:
        caption (`str`):
            The caption to parse.

    Returns:
        [`ParsedCaption`]: The mentions and the explicitly stated count.
    """
    if not isinstance(caption, str):
        raise ValueError(f"caption must be a str, got {type(caption).__name__}.")
    tokens = _TOKEN.findall(caption.lower())
    mentions = []
    # Token positions where each mention starts (its number or first attribute) and ends (its shape word).
    spans: list[tuple[int, int]] = []
    stated_count = None
    for position, token in enumerate(tokens):
        if token in _GENERIC_NOUNS and position > 0 and stated_count is None:
            stated_count = _number(tokens[position - 1])
        shape = _SHAPE_LOOKUP.get(token)
        if shape is None:
            continue
        colour = size = None
        start = position - 1
        while start >= 0 and (tokens[start] in _COLOUR_LOOKUP or tokens[start] in _SIZE_LOOKUP):
            colour = colour or _COLOUR_LOOKUP.get(tokens[start])
            size = size or _SIZE_LOOKUP.get(tokens[start])
            start -= 1
        count = _number(tokens[start]) if start >= 0 else None
        mentions.append(ObjectMention(shape=shape, colour=colour, size=size, count=1 if count is None else count))
        spans.append((start if count is not None else start + 1, position))
    relations = []
    for position, token in enumerate(tokens):
        # "left"/"right" relate only as "(to the) left of": "on the left" names a region of the image.
        if token not in RELATION_WORDS or token in ("left", "right") and tokens[position + 1:position + 2] != ["of"]:
            continue
        before = [index for index, (_, end) in enumerate(spans) if end < position]
        after = [index for index, (begin, _) in enumerate(spans) if begin > position]
        if before and after:
            relations.append(RelationMention(subject=before[-1], relation=RELATION_WORDS[token], other=after[0]))
    return ParsedCaption(mentions=tuple(mentions), stated_count=stated_count, relations=tuple(relations))


def _fits(obj: Mapping[str, Any], mention: ObjectMention) -> bool:
    return obj["shape"] == mention.shape and all(
        stated is None or obj.get(key) == stated for key, stated in (("colour", mention.colour), ("size", mention.size))
    )


def relation_holds(parsed: ParsedCaption, relation: RelationMention, objects: Sequence[Mapping[str, Any]]) -> bool:
    """Whether some object fitting the subject's mention (its shape, and its colour and size where stated) stands in
    the stated relation to some other object fitting the other mention, by their grid cells (`row`, `column`)."""
    subject, other = parsed.mentions[relation.subject], parsed.mentions[relation.other]
    return any(
        relation.relation in relations_between(a, b)
        for a in objects if _fits(a, subject)
        for b in objects if b is not a and _fits(b, other)
    )


def _ground_truth(index: int, objects: Sequence[Mapping[str, Any]] | str) -> list[Mapping[str, Any]]:
    if isinstance(objects, str):
        try:
            objects = json.loads(objects)
        except json.JSONDecodeError as error:
            raise ValueError(f"objects[{index}] is not valid JSON: {error}.") from error
    if not isinstance(objects, Sequence) or isinstance(objects, str):
        raise ValueError(f"objects[{index}] must be a list of object dicts or its JSON string, got {objects!r}.")
    for obj in objects:
        if not isinstance(obj, Mapping) or obj.get("shape") not in SHAPES or obj.get("colour") not in COLOURS:
            raise ValueError(
                f"objects[{index}] must hold dicts with a 'shape' in {SHAPES} and a 'colour' in {COLOURS}, got {obj!r}."
            )
    return list(objects)


def _overlap(a: Counter, b: Counter) -> int:
    return sum((a & b).values())


def content_accuracy(
    predictions: Sequence[str], objects: Sequence[Sequence[Mapping[str, Any]] | str]
) -> dict[str, float]:
    """
    Scores how well captions name the objects of their shapes-world images.

    Each caption is read with [`parse_caption`] and compared, per image, with its ground-truth objects as multisets
    (so "a red circle and a red circle" for one red circle matches once, and the second mention is an extra).

    Args:
        predictions (`Sequence[str]`):
            One generated caption per image.
        objects (`Sequence[list[dict] | str]`):
            Per image, the ground-truth objects (dicts with at least `shape` and `colour`, and `size` for
            `size_accuracy`), or their JSON string as stored in `metadata.jsonl`.

    Returns:
        `dict[str, float]`:
        - `object_accuracy`: fraction of all ground-truth objects named with the right colour and shape.
        - `shape_accuracy`: fraction of ground-truth objects whose shape is named (with or without a colour).
        - `colour_accuracy`: fraction of ground-truth objects whose colour is named on some shape.
        - `size_accuracy`: fraction of ground-truth objects named with the right size, colour and shape (mentions
          without a size word do not count, so reference captions that leave out sizes score below 1).
        - `count_accuracy`: fraction of images whose caption count (the stated "<n> shapes" or else the number of
          mentioned objects) equals the number of objects.
        - `exact_match`: fraction of images where every object is named with the right colour and shape and nothing
          else is mentioned.
        - `relation_accuracy`: stated spatial relations that hold ([`relation_holds`]) over all stated relations; 1
          when no caption states one (nothing stated is false), so read it with `relations_per_caption`.
        - `relations_per_caption`: stated relations over captions.
        - `fully_correct`: fraction of images whose caption is an exact match, states the right count, and whose every
          stated size and relation is true: the caption is right in all it states.
        - `hallucination_rate`: mentioned objects that match no ground-truth object (by colour and shape, or by shape
          for mentions without a colour, matching as multisets) over all mentioned objects; 0 if nothing is mentioned.
    """
    if isinstance(predictions, str) or not isinstance(predictions, Sequence):
        raise ValueError(f"predictions must be a list of str, got {type(predictions).__name__}.")
    if isinstance(objects, str) or not isinstance(objects, Sequence):
        raise ValueError(f"objects must be a list with one entry per prediction, got {type(objects).__name__}.")
    if len(predictions) != len(objects):
        raise ValueError(
            f"predictions and objects must have the same length, got {len(predictions)} and {len(objects)}."
        )
    if not predictions:
        raise ValueError("predictions must not be empty.")
    for index, prediction in enumerate(predictions):
        if not isinstance(prediction, str):
            raise ValueError(f"predictions[{index}] must be a str, got {type(prediction).__name__}.")

    totals = Counter()
    for index, (prediction, truth) in enumerate(zip(predictions, objects, strict=True)):
        truth = _ground_truth(index, truth)
        parsed = parse_caption(prediction)
        true_pairs = Counter((obj["colour"], obj["shape"]) for obj in truth)
        true_triples = Counter((obj.get("size"), obj["colour"], obj["shape"]) for obj in truth)
        named_pairs, named_triples, bare_shapes = Counter(), Counter(), Counter()
        for mention in parsed.mentions:
            if mention.colour is None:
                bare_shapes[mention.shape] += mention.count
            else:
                named_pairs[(mention.colour, mention.shape)] += mention.count
                if mention.size is not None:
                    named_triples[(mention.size, mention.colour, mention.shape)] += mention.count
        num_mentions = sum(named_pairs.values()) + sum(bare_shapes.values())

        matched = _overlap(true_pairs, named_pairs)
        # Colourless mentions can only explain objects that no coloured mention already matched.
        unmatched_shapes = Counter(shape for _, shape in (true_pairs - named_pairs).elements())
        explained = matched + _overlap(unmatched_shapes, bare_shapes)
        named_shapes = Counter(shape for _, shape in named_pairs.elements()) + bare_shapes
        named_colours = Counter(colour for colour, _ in named_pairs.elements())

        totals["objects"] += len(truth)
        totals["object_hits"] += matched
        totals["shape_hits"] += _overlap(Counter(obj["shape"] for obj in truth), named_shapes)
        totals["colour_hits"] += _overlap(Counter(obj["colour"] for obj in truth), named_colours)
        totals["size_hits"] += _overlap(true_triples, named_triples)
        count_right = parsed.count == len(truth)
        exact = matched == len(truth) and num_mentions == len(truth)
        if parsed.relations and not all({"row", "column"} <= obj.keys() for obj in truth):
            raise ValueError(
                f"predictions[{index}] states a spatial relation, but objects[{index}] lacks the grid cells ('row', "
                "'column') to check it; worlds written before version 5 lack them and build_shapes_world rebuilds them."
            )
        true_relations = sum(relation_holds(parsed, relation, truth) for relation in parsed.relations)
        sizes_right = not named_triples - true_triples
        totals["count_hits"] += count_right
        totals["exact_hits"] += exact
        totals["mentions"] += num_mentions
        totals["hallucinations"] += num_mentions - explained
        totals["relations"] += len(parsed.relations)
        totals["relation_hits"] += true_relations
        totals["fully_correct"] += exact and count_right and sizes_right and true_relations == len(parsed.relations)

    num_objects = max(totals["objects"], 1)
    return {
        "object_accuracy": totals["object_hits"] / num_objects,
        "shape_accuracy": totals["shape_hits"] / num_objects,
        "colour_accuracy": totals["colour_hits"] / num_objects,
        "size_accuracy": totals["size_hits"] / num_objects,
        "count_accuracy": totals["count_hits"] / len(predictions),
        "exact_match": totals["exact_hits"] / len(predictions),
        "hallucination_rate": totals["hallucinations"] / totals["mentions"] if totals["mentions"] else 0.0,
        "relation_accuracy": totals["relation_hits"] / totals["relations"] if totals["relations"] else 1.0,
        "relations_per_caption": totals["relations"] / len(predictions),
        "fully_correct": totals["fully_correct"] / len(predictions),
    }
