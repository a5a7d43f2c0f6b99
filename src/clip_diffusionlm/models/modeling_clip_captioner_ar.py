"""The autoregressive baseline: a ClipCap/BLIP-style prefix captioner on the same features and text layers as the
diffusion denoiser.

The frozen CLIP features go through the denoiser's own [`ConditionProjection`] into prefix tokens (segment/token type
1); the caption follows (token type 0) and the first layers of the pretrained text encoder read the whole sequence
causally (`is_decoder=True`). The output head is the denoiser's rounding head in form: a linear map, then the tied,
frozen word embeddings (`logits = W·h · Eᵀ`), optionally restricted to a closed vocabulary. It generates with
transformers' `generate()` and its KV cache (greedy, beam search, sampling).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from .configuration_clip_captioner_ar import CLIPCaptionerARConfig
from .modeling_clip_diffusionlm import (
    CLIPDiffusionLMModel,
    ConditionProjection,
    build_backbone,
    copy_backbone_weights,
    load_text_backbone,
)

IGNORE_INDEX = -100  # transformers' label value for positions without a loss
SPECIAL_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


@dataclass
class CaptionerLossOutput(ModelOutput):
    """
    Output of [`captioner_loss`], named like the diffusion objective's output so that the training loop logs both.

    Args:
        loss (`torch.FloatTensor` of shape `()`):
            Next-token cross-entropy over the caption tokens up to and including [SEP] (padding is not scored).
    """

    loss: torch.FloatTensor | None = None


class CLIPCaptionerARPreTrainedModel(PreTrainedModel):
    config_class = CLIPCaptionerARConfig
    base_model_prefix = "clip_captioner_ar"
    main_input_name = "input_ids"
    # As for the denoiser: `attn_implementation` and activation checkpointing pass through to the backbone.
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True


class CLIPCaptionerARForCausalLM(CLIPCaptionerARPreTrainedModel, GenerationMixin):
    """
    Prefix captioner: `[CLIP prefix] [CLS] w_1 … w_n [SEP]`, each token predicted from the ones before it.

    `generate(image_embeds=...)` starts from [CLS] (the config's `bos_token_id`) and stops at [SEP]; the prefix is
    computed once, in the first forward, and lives in the KV cache after that.
    """

    def __init__(self, config: CLIPCaptionerARConfig):
        super().__init__(config)
        self.backbone = build_backbone(config)
        hidden_size = self.backbone.config.hidden_size
        image_dim = config.patch_dim if config.image_features == "patches" else config.condition_dim
        self.image_projection = ConditionProjection(
            image_dim, hidden_size, config.condition_hidden_act, num_tokens=config.image_condition_tokens
        )
        self.output_projection = nn.Linear(hidden_size, hidden_size)
        rounding_token_ids = config.rounding_vocabulary if config.rounding_vocabulary is not None else []
        self.register_buffer("rounding_token_ids", torch.tensor(rounding_token_ids, dtype=torch.long))
        # True while `generate()` runs over the head's classes (see `generate`): input ids are class indices then.
        self._class_space = False
        self.post_init()
        self.get_input_embeddings().weight.requires_grad_(False)
        if self.generation_config is not None:
            # Prompt ([CLS]) included, as the denoiser's `caption_length` includes it.
            self.generation_config.max_length = config.caption_length

    # Token id → head class index (-1 outside the vocabulary): the same mapping as the denoiser's rounding head.
    rounding_targets = CLIPDiffusionLMModel.rounding_targets

    def get_input_embeddings(self) -> nn.Embedding:
        return self.backbone.get_input_embeddings()

    @property
    def vocab_size(self) -> int:
        return self.get_input_embeddings().num_embeddings

    @classmethod
    def from_text_backbone(
        cls, text_backbone_name_or_path: str, num_backbone_layers: int | None = None, **config_kwargs
    ) -> CLIPCaptionerARForCausalLM:
        """
        A captioner whose transformer layers and (frozen) word embeddings are those of a pretrained text encoder,
        run causally; [CLS]/[SEP]/[PAD] of its tokenizer become `generate()`'s start, end and padding tokens.

        Args:
            text_backbone_name_or_path (`str`):
                Hub id or local directory of a transformers BERT-family encoder with safetensors weights and a
                tokenizer.
            num_backbone_layers (`int`, *optional*):
                Keep only the first this many layers (as the denoiser does); all of them by default.
            config_kwargs:
                Any other [`CLIPCaptionerARConfig`] argument. A `backbone_config` dict here only overrides keys of
                the pretrained one, as for the denoiser.
        """
        pretrained, backbone_config = load_text_backbone(
            text_backbone_name_or_path, num_backbone_layers, config_kwargs.pop("backbone_config", None)
        )
        tokenizer = AutoTokenizer.from_pretrained(text_backbone_name_or_path)
        config_kwargs.setdefault("bos_token_id", tokenizer.cls_token_id)
        config_kwargs.setdefault("eos_token_id", tokenizer.sep_token_id)
        config_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
        config = CLIPCaptionerARConfig(
            backbone_config=backbone_config, text_backbone_name_or_path=str(text_backbone_name_or_path),
            **config_kwargs,
        )
        model = cls(config)
        copy_backbone_weights(model.backbone, pretrained, text_backbone_name_or_path)
        model.get_input_embeddings().weight.requires_grad_(False)
        return model

    def prefix_length(self, image_embeds: torch.Tensor) -> int:
        """Prefix tokens of these features: `image_condition_tokens` per feature (1 pooled, or one per patch)."""
        num_features = 1 if image_embeds.ndim == 2 else image_embeds.shape[1]
        return num_features * self.config.image_condition_tokens

    def head_logits(self, hidden_states: torch.FloatTensor) -> torch.FloatTensor:
        """Logits over the head's classes (the restricted vocabulary, or all of it): `W·h · E[vocabulary]ᵀ`."""
        weight = self.get_input_embeddings().weight
        if self.rounding_token_ids.numel():
            weight = weight[self.rounding_token_ids]
        return F.linear(self.output_projection(hidden_states), weight)

    def vocabulary_logits(self, hidden_states: torch.FloatTensor) -> torch.FloatTensor:
        """[`head_logits`] placed at their token ids, the lowest value elsewhere: what `generate()` reads."""
        logits = self.head_logits(hidden_states)
        if not self.rounding_token_ids.numel():
            return logits
        full = logits.new_full((*logits.shape[:-1], self.vocab_size), torch.finfo(logits.dtype).min)
        return full.index_copy_(-1, self.rounding_token_ids, logits)

    def forward(
        self,
        input_ids: torch.LongTensor,
        image_embeds: torch.FloatTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        return_dict: bool = True,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Caption token ids starting with [CLS]; with a `cache`, only the new ones.
            image_embeds (`torch.FloatTensor` of shape `(batch_size, condition_dim)` or `(batch_size, num_patches + 1, patch_dim)`):
                Frozen CLIP features (`config.image_features`). Read only when the cache is empty; later steps use
                them only for the prefix's length.
            attention_mask (`torch.LongTensor` of shape `(batch_size, past + sequence_length)`, *optional*):
                Over the caption tokens (what `generate()` keeps); the prefix is always attended.
            cache (`Cache`, *optional*):
                The KV cache of the prefix and the earlier tokens.
            use_cache (`bool`, *optional*):
                Return the updated cache (the backbone config's `use_cache` by default).
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Usually `input_ids` with [PAD] set to -100; the loss is the next-token cross-entropy of every caption
                position (computed over the head's classes, whatever `logits_to_keep` says).
            logits_to_keep (`int`, *optional*, defaults to 0):
                Return logits for the last this many positions only (0: all), as generation needs only the last.
            return_dict (`bool`, *optional*, defaults to `True`):
                Return a `CausalLMOutputWithPast` instead of a tuple.
        """
        past_length = cache.get_seq_length() if cache is not None else 0
        if self._class_space:
            input_ids = self.rounding_token_ids[input_ids]
        text_embeds = self.get_input_embeddings()(input_ids)  # (batch, n, hidden)
        token_type_ids = torch.zeros_like(input_ids)
        prefix_length = 0 if image_embeds is None else self.prefix_length(image_embeds)
        if past_length == 0:
            if image_embeds is None:
                raise ValueError("`image_embeds` are needed when the cache is empty (the first forward).")
            prefix = self.image_projection(image_embeds.to(text_embeds.dtype))  # (batch, prefix_length, hidden)
            text_embeds = torch.cat([prefix, text_embeds], dim=1)
            token_type_ids = torch.cat([torch.ones_like(prefix[..., 0], dtype=torch.long), token_type_ids], dim=1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(attention_mask.shape[0], prefix_length), attention_mask], 1)
        outputs = self.backbone(
            inputs_embeds=text_embeds, token_type_ids=token_type_ids, attention_mask=attention_mask, cache=cache,
            use_cache=use_cache, return_dict=True,
        )
        hidden_states = outputs.last_hidden_state[:, -input_ids.shape[1]:]  # caption positions only

        loss = None
        if labels is not None:
            targets = labels[:, 1:]
            classes = torch.where(targets == IGNORE_INDEX, IGNORE_INDEX, self.rounding_targets(targets.clamp(min=0)))
            if ((classes < 0) & (targets != IGNORE_INDEX)).any():
                raise ValueError("`labels` hold token ids outside `config.rounding_vocabulary`.")
            logits = self.head_logits(hidden_states[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), classes.flatten(), ignore_index=IGNORE_INDEX)

        kept = hidden_states[:, -logits_to_keep:]
        logits = self.head_logits(kept) if self._class_space else self.vocabulary_logits(kept)
        if not return_dict:
            return tuple(value for value in (loss, logits, outputs.cache) if value is not None)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache)


    def generate(self, *args, **kwargs):
        """
        transformers' `generate()` (greedy, beam search, sampling, with the KV cache). With a restricted vocabulary it
        runs over the head's classes: ids are mapped to class indices on the way in (prompt and special tokens) and
        back to token ids on the way out, so each step's logits, logits processors, sorting and beam bookkeeping
        cover those few classes instead of a vocabulary-wide tensor that is almost all padding (on a CPU, filling
        and scanning 30,522 logits per caption per step costs more than the two-layer decoder itself). The returned
        ids are token ids either way; `scores`/`logits`, when asked for, are over the classes. Token-id arguments
        other than the special tokens and `input_ids` (e.g. `bad_words_ids`) are not mapped.
        """
        if not self.rounding_token_ids.numel():
            return super().generate(*args, **kwargs)

        def to_classes(ids):
            if ids is None:
                return None
            classes = self.rounding_targets(torch.as_tensor(ids, device=self.rounding_token_ids.device))
            if (classes < 0).any():
                raise ValueError(f"Token ids {ids} are outside `config.rounding_vocabulary`.")
            return classes.tolist() if not isinstance(ids, torch.Tensor) else classes

        generation_config = copy.deepcopy(kwargs.pop("generation_config", None) or self.generation_config)
        # Generation arguments go into the (class-space) config; what is left are model inputs such as image_embeds.
        kwargs = generation_config.update(**kwargs)
        for name in SPECIAL_TOKEN_FIELDS:
            setattr(generation_config, name, to_classes(getattr(generation_config, name, None)))
        args = list(args)
        if args:
            args[0] = to_classes(args[0])
        elif kwargs.get("input_ids") is not None:
            kwargs["input_ids"] = to_classes(kwargs["input_ids"])
        self._class_space = True
        try:
            output = super().generate(*args, generation_config=generation_config, **kwargs)
        finally:
            self._class_space = False
        if isinstance(output, torch.Tensor):
            return self.rounding_token_ids[output]
        output.sequences = self.rounding_token_ids[output.sequences]
        return output


def captioner_loss(
    model: CLIPCaptionerARForCausalLM | torch.nn.Module,
    input_ids: torch.LongTensor,
    image_embeds: torch.FloatTensor,
    pad_token_id: int | None = None,
) -> CaptionerLossOutput:
    """
    The baseline's training objective on a batch, the counterpart of `diffusion_loss`: teacher-forced next-token
    cross-entropy of the padded captions (`[CLS] … [SEP] [PAD]…`, [PAD] not scored), one forward with gradients.

    Args:
        model (`CLIPCaptionerARForCausalLM` or a wrapper of it such as DDP):
            Called once.
        input_ids (`torch.LongTensor` of shape `(batch_size, caption_length)`):
            Padded caption token ids.
        image_embeds (`torch.FloatTensor` of shape `(batch_size, condition_dim)` or `(batch_size, num_patches + 1, patch_dim)`):
            Cached CLIP image features.
        pad_token_id (`int`, *optional*):
            Defaults to the model config's.
    """
    core: CLIPCaptionerARForCausalLM = getattr(model, "module", model)
    pad_token_id = core.config.pad_token_id if pad_token_id is None else pad_token_id
    labels = input_ids.masked_fill(input_ids == pad_token_id, IGNORE_INDEX)
    # One logit row is enough: the loss reads the head's classes of every position itself.
    output = model(input_ids, image_embeds, labels=labels, use_cache=False, logits_to_keep=1)
    return CaptionerLossOutput(loss=output.loss)
