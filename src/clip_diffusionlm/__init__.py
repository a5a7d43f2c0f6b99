"""CLIP-DiffusionLM: image captioning with a continuous diffusion language model conditioned on CLIP."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_clip_captioner_ar import CLIPCaptionerARConfig
from .configuration_clip_diffusionlm import CLIPDiffusionLMConfig
from .diffusion import diffusion_loss, make_noise_scheduler
from .modeling_clip_captioner_ar import CLIPCaptionerARForCausalLM, captioner_loss
from .modeling_clip_diffusionlm import CLIPDiffusionLMModel, CLIPDiffusionLMOutput
from .pipeline_clip_ar_caption import CLIPARCaptionPipeline, CLIPARCaptionPipelineOutput
from .pipeline_clip_diffusion_caption import CLIPDiffusionCaptionPipeline, CLIPDiffusionCaptionPipelineOutput

__version__ = "0.1.0"

AutoConfig.register(CLIPDiffusionLMConfig.model_type, CLIPDiffusionLMConfig, exist_ok=True)
AutoModel.register(CLIPDiffusionLMConfig, CLIPDiffusionLMModel, exist_ok=True)
# save_pretrained then copies the two modeling files next to the weights and writes `auto_map`, so the checkpoint
# also loads with `trust_remote_code=True` where this package is not installed.
CLIPDiffusionLMConfig.register_for_auto_class()
CLIPDiffusionLMModel.register_for_auto_class("AutoModel")
# The autoregressive baseline loads through the Auto classes where this package is installed.
AutoConfig.register(CLIPCaptionerARConfig.model_type, CLIPCaptionerARConfig, exist_ok=True)
AutoModelForCausalLM.register(CLIPCaptionerARConfig, CLIPCaptionerARForCausalLM, exist_ok=True)

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
