"""CLIP-DiffusionLM: image captioning with a continuous diffusion language model conditioned on CLIP."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from . import hub  # noqa: F401  (registers the model card and Endpoint files with `pipe.push_to_hub`)
from .diffusion import diffusion_loss, make_noise_scheduler
from .models import (
    CLIPCaptionerARConfig,
    CLIPCaptionerARForCausalLM,
    CLIPDiffusionLMConfig,
    CLIPDiffusionLMModel,
    CLIPDiffusionLMOutput,
    captioner_loss,
)
from .pipelines import (
    CLIPARCaptionPipeline,
    CLIPARCaptionPipelineOutput,
    CLIPDiffusionCaptionPipeline,
    CLIPDiffusionCaptionPipelineOutput,
)

__version__ = "0.1.0"

AutoConfig.register(CLIPDiffusionLMConfig.model_type, CLIPDiffusionLMConfig, exist_ok=True)
AutoModel.register(CLIPDiffusionLMConfig, CLIPDiffusionLMModel, exist_ok=True)
# save_pretrained then copies the two modeling files next to the weights and writes `auto_map`, so the checkpoint
# also loads with `trust_remote_code=True` where this package is not installed.
CLIPDiffusionLMConfig.register_for_auto_class()
CLIPDiffusionLMModel.register_for_auto_class("AutoModel")
# The autoregressive baseline likewise, through AutoModelForCausalLM.
AutoConfig.register(CLIPCaptionerARConfig.model_type, CLIPCaptionerARConfig, exist_ok=True)
AutoModelForCausalLM.register(CLIPCaptionerARConfig, CLIPCaptionerARForCausalLM, exist_ok=True)
CLIPCaptionerARConfig.register_for_auto_class()
CLIPCaptionerARForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "CLIPARCaptionPipeline",
    "CLIPARCaptionPipelineOutput",
    "CLIPCaptionerARConfig",
    "CLIPCaptionerARForCausalLM",
    "CLIPDiffusionCaptionPipeline",
    "CLIPDiffusionCaptionPipelineOutput",
    "CLIPDiffusionLMConfig",
    "CLIPDiffusionLMModel",
    "CLIPDiffusionLMOutput",
    "captioner_loss",
    "diffusion_loss",
    "make_noise_scheduler",
]
