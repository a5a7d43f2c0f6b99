"""Inference pipelines: each module (with `captioning_utils.py`) also runs as a Hub repository's pipeline code."""

from diffusers import DiffusionPipeline

from .pipeline_clip_ar_caption import CLIPARCaptionPipeline, CLIPARCaptionPipelineOutput
from .pipeline_clip_diffusion_caption import CLIPDiffusionCaptionPipeline, CLIPDiffusionCaptionPipelineOutput

CAPTIONING_PIPELINES = {cls.__name__: cls for cls in (CLIPDiffusionCaptionPipeline, CLIPARCaptionPipeline)}


def load_captioning_pipeline(name_or_path: str, **kwargs) -> CLIPDiffusionCaptionPipeline | CLIPARCaptionPipeline:
    """A saved pipeline of either family (folder or Hub id), as the class its `model_index.json` names."""
    class_name = DiffusionPipeline.load_config(name_or_path, **kwargs)["_class_name"]
    class_name = class_name[-1] if isinstance(class_name, list) else class_name
    if class_name not in CAPTIONING_PIPELINES:
        raise ValueError(
            f"{name_or_path!r} holds a {class_name}, not a captioning pipeline of this package "
            f"({', '.join(CAPTIONING_PIPELINES)})."
        )
    return CAPTIONING_PIPELINES[class_name].from_pretrained(name_or_path, **kwargs)


__all__ = [
    "CAPTIONING_PIPELINES",
    "CLIPARCaptionPipeline",
    "CLIPARCaptionPipelineOutput",
    "CLIPDiffusionCaptionPipeline",
    "CLIPDiffusionCaptionPipelineOutput",
    "load_captioning_pipeline",
]
