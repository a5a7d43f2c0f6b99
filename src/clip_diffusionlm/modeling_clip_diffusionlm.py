"""CLIP-DiffusionLM denoiser: a BERT-family encoder that restores caption word embeddings from noise, given CLIP.

This file imports only its configuration, torch and transformers so that it also works as Hub remote code
(`AutoModel.from_pretrained(path, trust_remote_code=True)`). The noise schedule and the training objective live with the
diffusers scheduler in `diffusion.py`, not here: the model sees `x_t`, `t` and the conditioning and returns its
prediction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

from .configuration_clip_diffusionlm import CLIPDiffusionLMConfig


@dataclass
class CLIPDiffusionLMOutput(ModelOutput):
    """
    Output of [`CLIPDiffusionLMModel`].

    Args:
        prediction (`torch.FloatTensor` of shape `(batch_size, caption_length, hidden_size)`):
            The predicted `x0` (or `x_{t-n}` when `config.prediction_type == "previous_sample"`), in the scaled
            embedding space. [`~CLIPDiffusionLMModel.round_to_logits`] turns it into word logits.
    """

    prediction: torch.FloatTensor | None = None


def build_backbone(config: PretrainedConfig) -> PreTrainedModel:
    """The transformer encoder of `config.backbone_config`, randomly initialised, with the model's attention
    implementation and without a pooler (unused; it would leave parameters without gradient under DDP)."""
    backbone = AutoModel.from_config(config.get_backbone_config(), attn_implementation=config._attn_implementation)
    if getattr(backbone, "pooler", None) is not None:
        backbone.pooler = None
    return backbone


def load_text_backbone(
    name_or_path: str, num_layers: int | None = None, overrides: dict[str, Any] | None = None
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """A pretrained BERT-family encoder (safetensors) and its config as a dict, cut to its first `num_layers` layers
    when given and with `overrides` (e.g. `{"hidden_dropout_prob": 0.0}`) on top, for a model built from that config
    to take the kept layers' weights ([`copy_backbone_weights`])."""
    pretrained = AutoModel.from_pretrained(name_or_path, use_safetensors=True)
    backbone_config = {**pretrained.config.to_dict(), **(overrides or {})}
    if num_layers is not None:
        layer_key = "n_layers" if "n_layers" in backbone_config else "num_hidden_layers"
        if not 1 <= num_layers <= backbone_config[layer_key]:
            raise ValueError(f"`num_backbone_layers` must be in [1, {backbone_config[layer_key]}], got {num_layers}.")
        backbone_config[layer_key] = num_layers
    return pretrained, backbone_config


def copy_backbone_weights(backbone: nn.Module, pretrained: PreTrainedModel, name_or_path: str) -> None:
    """Loads the pretrained encoder's weights into `backbone` (its extra layers, if any, are left out)."""
    result = backbone.load_state_dict(pretrained.state_dict(), strict=False)
    if result.missing_keys:
        raise ValueError(
            f"The pretrained text model at {name_or_path!r} lacks backbone weights: {result.missing_keys[:5]}."
        )


class SinusoidalTimestepEmbedding(nn.Module):
    """`t` → `[sin(t·ω_k), cos(t·ω_k)]` with geometric frequencies, then a two-layer MLP (as in DDPM)."""

    def __init__(self, hidden_size: int, hidden_act: str, max_period: float = 10000.0):
        super().__init__()
        self.hidden_size = hidden_size
        self.max_period = max_period
        self.linear_1 = nn.Linear(hidden_size, hidden_size)
        self.act = ACT2FN[hidden_act]
        self.linear_2 = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        half = self.hidden_size // 2
        exponent = -math.log(self.max_period) * torch.arange(half, device=timesteps.device) / half
        angles = timesteps.float()[:, None] * torch.exp(exponent)[None, :]  # (batch, half)
        features = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
        if self.hidden_size % 2:
            features = F.pad(features, (0, 1))
        features = features.to(self.linear_1.weight.dtype)
        return self.norm(self.linear_2(self.act(self.linear_1(features))))  # (batch, hidden)


class ConditionProjection(nn.Module):
    """
    The paper's MLP that maps a CLIP feature (`condition_dim`) into the word-embedding space (`hidden_size`), ending
    in a LayerNorm so that the conditioning enters at the same scale as the normalised noisy caption. Each input
    feature becomes `num_tokens` tokens.
    """

    def __init__(self, condition_dim: int, hidden_size: int, hidden_act: str, num_tokens: int = 1):
        super().__init__()
        self.num_tokens = num_tokens
        self.linear_1 = nn.Linear(condition_dim, hidden_size)
        self.act = ACT2FN[hidden_act]
        self.linear_2 = nn.Linear(hidden_size, num_tokens * hidden_size)
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        """`(batch, condition_dim)` or `(batch, num_features, condition_dim)` → `(batch, num_features · num_tokens,
        hidden_size)`."""
        if condition.ndim == 2:
            condition = condition[:, None]
        tokens = self.linear_2(self.act(self.linear_1(condition)))  # (batch, num_features, num_tokens · hidden)
        return self.norm(tokens.view(condition.shape[0], condition.shape[1] * self.num_tokens, -1))


class CLIPDiffusionLMPreTrainedModel(PreTrainedModel):
    config_class = CLIPDiffusionLMConfig
    base_model_prefix = "clip_diffusionlm"
    main_input_name = "noisy_embeds"
    # The backbone is any transformers encoder: these switches pass `attn_implementation` and activation
    # checkpointing through to it (a backbone without SDPA or flash attention raises when asked for them).
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, CLIPDiffusionLMModel):
            init.normal_(module.null_condition, mean=0.0, std=0.02)
            # Zero-initialised so that a self-conditioned model starts out identical to a plain one.
            if module.self_condition_projection is not None:
                init.zeros_(module.self_condition_projection.weight)
                init.zeros_(module.self_condition_projection.bias)


class CLIPDiffusionLMModel(CLIPDiffusionLMPreTrainedModel):
    """
    The denoiser `f(x_t, t, c)`. Input tokens are the noisy caption embeddings plus timestep embedding (and the
    self-conditioning estimate); the CLIP conditioning is fused by concatenation (extra tokens with a segment
    embedding) or addition. A BERT-family encoder (DistilBERT by default) transforms the sequence and a linear head
    reads out the prediction for the caption positions. The backbone's own word embeddings `E` are frozen: they
    define `x0 = E[ids]·scale` and, tied, the rounding head `logits = x̂0 · Eᵀ / scale`.
    """

    def __init__(self, config: CLIPDiffusionLMConfig):
        super().__init__(config)
        self.backbone = build_backbone(config)
        hidden_size = self.backbone.config.hidden_size
        act = config.condition_hidden_act

        image_dim = config.patch_dim if config.image_features == "patches" else config.condition_dim
        self.image_projection = ConditionProjection(image_dim, hidden_size, act, num_tokens=config.image_condition_tokens)
        self.text_projection = (
            ConditionProjection(config.condition_dim, hidden_size, act) if config.use_text_condition else None
        )
        num_condition_slots = config.image_condition_tokens + (1 if config.use_text_condition else 0)
        # One learned "∅" per conditioning slot, in the projected space: used for classifier-free guidance. Every
        # patch shares the image's slots.
        self.null_condition = nn.Parameter(torch.zeros(num_condition_slots, hidden_size))
        self.segment_embedding = nn.Embedding(2, hidden_size) if config.fusion == "concat" else None
        self.timestep_embedding = (
            SinusoidalTimestepEmbedding(hidden_size, act) if config.timestep_conditioning else None
        )
        self.self_condition_projection = nn.Linear(hidden_size, hidden_size) if config.self_conditioning else None
        # x_t's norm grows ~20x from t = 0 to t = T; normalising it (like the conditioning and timestep streams)
        # keeps any one input from drowning the others before the backbone's own embedding LayerNorm.
        self.input_norm = nn.LayerNorm(hidden_size)
        self.output_projection = nn.Linear(hidden_size, hidden_size)

        # Persistent, so that loading (which materialises buffers from the checkpoint) restores it exactly.
        rounding_token_ids = config.rounding_vocabulary if config.rounding_vocabulary is not None else []
        self.register_buffer("rounding_token_ids", torch.tensor(rounding_token_ids, dtype=torch.long))

        self.post_init()
        self.get_input_embeddings().weight.requires_grad_(False)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.backbone.get_input_embeddings()

    @property
    def hidden_size(self) -> int:
        return self.backbone.config.hidden_size

    @classmethod
    def from_text_backbone(
        cls, text_backbone_name_or_path: str, num_backbone_layers: int | None = None, **config_kwargs
    ) -> CLIPDiffusionLMModel:
        """
        Builds a denoiser whose transformer layers and (frozen) word embeddings are those of a pretrained text model,
        as the paper intends (DistilBERT-base-uncased there; any BERT-family encoder works).

        Args:
            text_backbone_name_or_path (`str`):
                Hub id or local directory of a transformers text encoder with safetensors weights.
            num_backbone_layers (`int`, *optional*):
                Keep only the first this many transformer layers (a cheaper denoiser); all of them by default.
            config_kwargs:
                Any other [`CLIPDiffusionLMConfig`] argument. A `backbone_config` dict here only overrides keys of
                the pretrained one, e.g. `backbone_config={"hidden_dropout_prob": 0.0}`.
        """
        pretrained, backbone_config = load_text_backbone(
            text_backbone_name_or_path, num_backbone_layers, config_kwargs.pop("backbone_config", None)
        )
        config = CLIPDiffusionLMConfig(
            backbone_config=backbone_config,
            text_backbone_name_or_path=str(text_backbone_name_or_path),
            **config_kwargs,
        )
        model = cls(config)
        copy_backbone_weights(model.backbone, pretrained, text_backbone_name_or_path)
        model.get_input_embeddings().weight.requires_grad_(False)
        return model

    def embed_captions(self, input_ids: torch.LongTensor) -> torch.FloatTensor:
        """`x0 = E[ids] · scale`, shape `(batch, caption_length, hidden)`."""
        return self.get_input_embeddings()(input_ids) * self.config.embedding_scale

    def round_to_logits(self, embeds: torch.FloatTensor) -> torch.FloatTensor:
        """The tied, frozen lm_head: `s · (embeds / scale) · Eᵀ` (`s = rounding_logit_scale`), shape
        `(..., rounding_vocab_size)`."""
        weight = self.get_input_embeddings().weight
        if self.rounding_token_ids.numel():
            weight = weight[self.rounding_token_ids]
        return F.linear(embeds * (self.config.rounding_logit_scale / self.config.embedding_scale), weight)

    def round_to_token_ids(self, embeds: torch.FloatTensor) -> torch.LongTensor:
        """Rounding: the most likely token id at each position, shape `embeds.shape[:-1]`."""
        best = self.round_to_logits(embeds).argmax(dim=-1)
        return self.rounding_token_ids[best] if self.rounding_token_ids.numel() else best

    def rounding_targets(self, token_ids: torch.LongTensor) -> torch.LongTensor:
        """Token ids → class indices of the rounding head, `-1` where a token is outside `rounding_vocabulary`."""
        if not self.rounding_token_ids.numel():
            return token_ids
        index = torch.searchsorted(self.rounding_token_ids, token_ids).clamp(max=len(self.rounding_token_ids) - 1)
        return torch.where(self.rounding_token_ids[index] == token_ids, index, -1)

    def nearest_word_embeddings(self, embeds: torch.FloatTensor) -> torch.FloatTensor:
        """Clamps each position to the embedding of its most likely word (Diffusion-LM's clamping trick)."""
        return self.embed_captions(self.round_to_token_ids(embeds))

    def _condition_tokens(
        self,
        image_embeds: torch.FloatTensor,
        text_embeds: torch.FloatTensor | None,
        drop_condition: torch.BoolTensor | None,
    ) -> torch.FloatTensor:
        """Projected conditioning, the image's tokens then text's, shape `(batch, image_tokens [+ 1], hidden)`."""
        batch_size = image_embeds.shape[0]
        image_tokens = self.image_projection(image_embeds)  # (batch, num_features · k, hidden)
        image_slots = self.config.image_condition_tokens
        tokens = [image_tokens]
        if self.text_projection is not None:
            if text_embeds is None:
                tokens.append(self.null_condition[image_slots:].expand(batch_size, -1, -1))
            else:
                tokens.append(self.text_projection(text_embeds))
        tokens = torch.cat(tokens, dim=1)
        if drop_condition is not None:
            # Every image feature takes the image's null slots; the text slot (if any) keeps its own.
            num_features = image_tokens.shape[1] // image_slots
            null = torch.cat([self.null_condition[:image_slots].repeat(num_features, 1), self.null_condition[image_slots:]])
            tokens = torch.where(drop_condition[:, None, None], null[None].to(tokens.dtype), tokens)
        return tokens

    def forward(
        self,
        noisy_embeds: torch.FloatTensor,
        timesteps: torch.LongTensor,
        image_embeds: torch.FloatTensor,
        text_embeds: torch.FloatTensor | None = None,
        self_conditioning_embeds: torch.FloatTensor | None = None,
        drop_condition: torch.BoolTensor | None = None,
        return_dict: bool = True,
    ) -> CLIPDiffusionLMOutput | tuple:
        r"""
        `f(x_t, t, c)`. The training objective around it lives in `clip_diffusionlm.diffusion.diffusion_loss`, with the
        noise schedule it needs.

        Args:
            noisy_embeds (`torch.FloatTensor` of shape `(batch_size, caption_length, hidden_size)`):
                `x_t`, noisy caption embeddings in the scaled embedding space.
            timesteps (`torch.LongTensor` of shape `(batch_size,)` or `()`):
                `t` of each sample, in `[0, num_train_timesteps)`.
            image_embeds (`torch.FloatTensor` of shape `(batch_size, condition_dim)` or `(batch_size, num_patches + 1, patch_dim)`):
                Frozen CLIP image features: `image_embeds`, or the patch features when
                `config.image_features == "patches"`.
            text_embeds (`torch.FloatTensor` of shape `(batch_size, condition_dim)`, *optional*):
                Frozen CLIP text embeddings; only read when `config.use_text_condition`. `None` uses the null
                condition for the text slot.
            self_conditioning_embeds (`torch.FloatTensor` of shape `(batch_size, caption_length, hidden_size)`, *optional*):
                The previous estimate of `x0` (self-conditioning); `None` means zeros.
            drop_condition (`torch.BoolTensor` of shape `(batch_size,)`, *optional*):
                `True` replaces that sample's conditioning by the learned null condition (`f(x|∅)`).
            return_dict (`bool`, *optional*, defaults to `True`):
                Return a [`CLIPDiffusionLMOutput`] instead of a tuple.
        """
        batch_size, caption_length, _ = noisy_embeds.shape
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(batch_size)

        hidden = self.input_norm(noisy_embeds)
        if self.self_condition_projection is not None:
            if self_conditioning_embeds is None:
                self_conditioning_embeds = torch.zeros_like(noisy_embeds)
            hidden = hidden + self.self_condition_projection(self_conditioning_embeds)
        if self.timestep_embedding is not None:
            hidden = hidden + self.timestep_embedding(timesteps)[:, None, :]

        condition = self._condition_tokens(image_embeds, text_embeds, drop_condition)  # (batch, slots, hidden)
        if self.segment_embedding is not None:
            hidden = torch.cat(
                [hidden + self.segment_embedding.weight[0], condition + self.segment_embedding.weight[1]], dim=1
            )
        else:
            hidden = hidden + condition.sum(dim=1, keepdim=True)

        sequence = self.backbone(inputs_embeds=hidden).last_hidden_state  # (batch, caption_length + k, hidden)
        prediction = self.output_projection(sequence[:, :caption_length])
        return CLIPDiffusionLMOutput(prediction=prediction) if return_dict else (prediction,)
