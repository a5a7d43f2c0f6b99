"""Configuration of the autoregressive baseline captioner (ClipCap/BLIP-style) that CLIP-DiffusionLM is compared with."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig

from .modeling_clip_diffusionlm import IMAGE_FEATURES, backbone_config_as_dict, check_vision_feature_layer

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


class CLIPCaptionerARConfig(PretrainedConfig):
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

    def __init__(
        self,
        caption_length: int = 16,
        condition_dim: int = 512,
        image_features: str = "pooled",
        vision_feature_layer: int = -1,
        patch_dim: int = 768,
        image_condition_tokens: int = 1,
        condition_hidden_act: str = "gelu",
        backbone_config: dict[str, Any] | PretrainedConfig | None = None,
        rounding_vocabulary: list[int] | None = None,
        text_backbone_name_or_path: str = "bert-base-uncased",
        **kwargs,
    ):
        backbone_config = backbone_config_as_dict(backbone_config, default_model_type="bert")
        # A decoder without cross-attention: the image arrives as prefix tokens, not as encoder states.
        backbone_config = {**backbone_config, "is_decoder": True, "add_cross_attention": False}
        self.caption_length = caption_length
        self.condition_dim = condition_dim
        self.image_features = image_features
        self.vision_feature_layer = vision_feature_layer
        self.patch_dim = patch_dim
        self.image_condition_tokens = image_condition_tokens
        self.condition_hidden_act = condition_hidden_act
        self.backbone_config = backbone_config
        self.rounding_vocabulary = None if rounding_vocabulary is None else sorted({int(i) for i in rounding_vocabulary})
        self.text_backbone_name_or_path = text_backbone_name_or_path
        # generate()'s special tokens default to the backbone tokenizer's [CLS]/[SEP]/[PAD] ids.
        kwargs.setdefault("bos_token_id", backbone_config.get("bos_token_id") or 101)
        kwargs.setdefault("eos_token_id", backbone_config.get("eos_token_id") or 102)
        kwargs.setdefault("pad_token_id", backbone_config.get("pad_token_id", 0))
        super().__init__(**kwargs)
        self.validate()

    @classmethod
    def shared_kwargs(cls, model_config: dict[str, Any]) -> dict[str, Any]:
        """The entries of a [`CLIPDiffusionLMConfig`] argument dict that this config shares (see `SHARED_CONFIG_KEYS`)."""
        return {key: value for key, value in model_config.items() if key in SHARED_CONFIG_KEYS}

    def validate(self) -> None:
        """Raises `ValueError` naming the first argument that is out of range."""
        if self.image_features not in IMAGE_FEATURES:
            raise ValueError(f"`image_features` must be one of {IMAGE_FEATURES}, got {self.image_features!r}.")
        check_vision_feature_layer(self.image_features, self.vision_feature_layer)
        for name in ("caption_length", "condition_dim", "patch_dim", "image_condition_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.caption_length < 2:
            raise ValueError(f"`caption_length` must be at least 2 ([CLS] and [SEP]), got {self.caption_length}.")
        if self.rounding_vocabulary is not None:
            vocab_size = self.backbone_config.get("vocab_size")
            if len(self.rounding_vocabulary) < 2 or self.rounding_vocabulary[0] < 0 or (
                vocab_size is not None and self.rounding_vocabulary[-1] >= vocab_size
            ):
                raise ValueError(
                    f"`rounding_vocabulary` must hold at least 2 token ids in [0, vocab_size={vocab_size}), got "
                    f"{len(self.rounding_vocabulary)} ids."
                )
            missing = {self.bos_token_id, self.eos_token_id, self.pad_token_id} - set(self.rounding_vocabulary)
            if missing:
                raise ValueError(f"`rounding_vocabulary` must hold the special tokens; missing {sorted(missing)}.")

    def get_backbone_config(self) -> PretrainedConfig:
        """The transformers config of the causal text transformer."""
        return AutoConfig.for_model(**self.backbone_config)

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> PretrainedConfig:
        """The backbone's config: `generate()` sizes its KV cache (layers, heads) and its vocabulary from it."""
        return self.get_backbone_config()
