"""Inference pipelines: each module (with `captioning_utils.py`) also runs as a Hub repository's pipeline code."""

from .pipeline_clip_ar_caption import CLIPARCaptionPipeline, CLIPARCaptionPipelineOutput
from .pipeline_clip_diffusion_caption import CLIPDiffusionCaptionPipeline, CLIPDiffusionCaptionPipelineOutput

__all__ = [
    "CLIPARCaptionPipeline",
    "CLIPARCaptionPipelineOutput",
    "CLIPDiffusionCaptionPipeline",
    "CLIPDiffusionCaptionPipelineOutput",
]
