"""The denoiser and the autoregressive baseline: configuration + modeling pairs that import only each other, torch and
transformers (each pair also runs as a Hub repository's remote code)."""

from .configuration_clip_captioner_ar import CLIPCaptionerARConfig
from .modeling_clip_captioner_ar import CaptionerLossOutput, CLIPCaptionerARForCausalLM, captioner_loss
from .modeling_clip_diffusionlm import CLIPDiffusionLMConfig, CLIPDiffusionLMModel, CLIPDiffusionLMOutput

__all__ = [
    "CLIPCaptionerARConfig",
    "CLIPCaptionerARForCausalLM",
    "CLIPDiffusionLMConfig",
    "CLIPDiffusionLMModel",
    "CLIPDiffusionLMOutput",
    "CaptionerLossOutput",
    "captioner_loss",
]
