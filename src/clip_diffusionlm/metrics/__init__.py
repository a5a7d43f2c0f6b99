"""Offline caption evaluation: COCO-caption metrics (plain function and `evaluate` metric) and diversity measures.
The shapes world's content accuracy is the demo's (`clip_diffusionlm.demo.content_accuracy`)."""

from __future__ import annotations

from pathlib import Path

from .caption_metrics import compute_caption_metrics, normalize_caption
from .diversity import compute_diversity

# `evaluate.load` takes a directory holding a script of the same name; it ships inside the package (package_data).
CAPTION_METRIC_PATH = str(Path(__file__).resolve().parent / "caption_scores")

__all__ = [
    "CAPTION_METRIC_PATH",
    "compute_caption_metrics",
    "compute_diversity",
    "normalize_caption",
]
