"""
The embedded default: the synthetic shapes world, its content accuracy, the toy CLIP pre-trained on it, and the
one-command demo that trains and evaluates CLIP-DiffusionLM on both. Nothing else in the package imports it; importing
it registers the world's content accuracy as the metric of every split with an "objects" column.
"""

from ..evaluation import COLUMN_METRICS
from .content_accuracy import content_accuracy, parse_caption
from .run import STEP_DISTILLATION, TINY_BACKBONE, DemoConfig, build_tiny_assets, default_text_backbone, run_demo
from .shapes_world import HARDER_WORLD, ShapesWorldConfig, build_shapes_world, canonical_caption, load_shapes_world

COLUMN_METRICS["objects"] = content_accuracy

__all__ = [
    "HARDER_WORLD",
    "STEP_DISTILLATION",
    "TINY_BACKBONE",
    "DemoConfig",
    "ShapesWorldConfig",
    "build_shapes_world",
    "build_tiny_assets",
    "canonical_caption",
    "content_accuracy",
    "default_text_backbone",
    "load_shapes_world",
    "parse_caption",
    "run_demo",
]
