"""Configuration of the autoregressive baseline captioner (ClipCap/BLIP-style) that CLIP-DiffusionLM is compared with."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from .modeling_clip_diffusionlm import CaptionModelConfig, backbone_config_as_dict

# The `CLIPDiffusionLMConfig` arguments that mean the same thing for the baseline: what it reads of the image and how
# long its captions are. A training run's `model_config` is shared by both model types; the other (diffusion-only)
# keys are dropped by [`CLIPCaptionerARConfig.shared_kwargs`].
SHARED_CONFIG_KEYS = (
    "caption_length",
    "condition_dim",
    "image_features",
    "vision_feature_layer",
    "patch_dim",
    "image_condition_tokens",
    "condition_hidden_act",
    "rounding_vocabulary",
    "text_backbone_name_or_path",
    "backbone_config",
)


class CLIPCaptionerARConfig(CaptionModelConfig):
    r"""
    Configuration of a [`CLIPCaptionerARForCausalLM`]: frozen CLIP features, projected into a prefix of tokens as the
    diffusion denoiser projects them, followed by the caption, read left to right by the first layers of a pretrained
    BERT-family encoder run causally (`is_decoder=True`, ClipCap-style prefix captioning).

    Args:
        caption_length (`int`, *optional*, defaults to 16):
            Longest caption in tokens, [CLS] and [SEP] included (the diffusion model's `L`): training pads/truncates
            to it and generation stops after `caption_length - 1` new tokens.
        condition_dim (`int`, *optional*, defaults to 512):
            Size of CLIP's `image_embeds` (512 for CLIP ViT-B/32).
        image_features (`str`, *optional*, defaults to `"pooled"`):
            `"pooled"` (CLIP's `image_embeds`, one vector) or `"patches"` (the vision tower's last hidden states, one
            prefix token per patch), as in [`CLIPDiffusionLMConfig`].
        vision_feature_layer (`int`, *optional*, defaults to -1):
            The vision tower's layer the patch features come from, as in [`CLIPDiffusionLMConfig`].
        patch_dim (`int`, *optional*, defaults to 768):
            Width of the patch features; only read when `image_features="patches"`.
        image_condition_tokens (`int`, *optional*, defaults to 1):
            Prefix tokens per image feature (ClipCap's prefix length for pooled features).
        condition_hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation of the conditioning MLP.
        backbone_config (`dict` or `PretrainedConfig`, *optional*):
            The text transformer (a model whose `AutoModel` runs as a decoder with `is_decoder=True`: BERT, RoBERTa,
            ELECTRA, ...). `is_decoder` is forced on. Defaults to BERT-base's shape.
        rounding_vocabulary (`list[int]`, *optional*):
            Token ids the output head may produce (the closed-domain restriction the diffusion model's rounding also
            takes): the head's matmul covers only these, every other id gets the lowest logit. `None` scores the
            whole vocabulary.
        text_backbone_name_or_path (`str`, *optional*, defaults to `"bert-base-uncased"`):
            Where the word embeddings, tokenizer and initial layers come from (provenance).
    """

    model_type = "clip_captioner_ar"
    default_backbone_type = "bert"
    default_text_backbone = "bert-base-uncased"

    def __init__(self, **kwargs):
        backbone_config = backbone_config_as_dict(kwargs.pop("backbone_config", None), self.default_backbone_type)
        # A decoder without cross-attention: the image arrives as prefix tokens, not as encoder states.
        backbone_config = {**backbone_config, "is_decoder": True, "add_cross_attention": False}
        # generate()'s special tokens default to the backbone tokenizer's [CLS]/[SEP]/[PAD] ids.
        kwargs.setdefault("bos_token_id", backbone_config.get("bos_token_id") or 101)
        kwargs.setdefault("eos_token_id", backbone_config.get("eos_token_id") or 102)
        kwargs.setdefault("pad_token_id", backbone_config.get("pad_token_id", 0))
        super().__init__(backbone_config=backbone_config, **kwargs)  # every argument is a shared one
        self.validate()

    @classmethod
    def shared_kwargs(cls, model_config: dict[str, Any]) -> dict[str, Any]:
        """The entries of a [`CLIPDiffusionLMConfig`] argument dict that this config shares (see `SHARED_CONFIG_KEYS`)."""
        return {key: value for key, value in model_config.items() if key in SHARED_CONFIG_KEYS}

    def validate(self) -> None:
        """Raises `ValueError` naming the first argument that is out of range."""
        super().validate()
        if self.rounding_vocabulary is not None:
            missing = {self.bos_token_id, self.eos_token_id, self.pad_token_id} - set(self.rounding_vocabulary)
            if missing:
                raise ValueError(f"`rounding_vocabulary` must hold the special tokens; missing {sorted(missing)}.")

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> PretrainedConfig:
        """The backbone's config: `generate()` sizes its KV cache (layers, heads) and its vocabulary from it."""
        return self.get_backbone_config()
