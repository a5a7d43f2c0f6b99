"""CLIP-DiffusionLM denoiser: its configuration and a BERT-family encoder that restores caption word embeddings from
noise, given CLIP.

Configuration and model share this one file, which imports only torch and transformers, because it is the denoiser's
remote code in a pushed repository: `AutoModel.from_pretrained(repo_id, subfolder="denoiser", trust_remote_code=True)`
and diffusers' custom-component loading, which downloads a component's module file and nothing it imports. The noise schedule and the training objective live with the
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
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

FUSION_METHODS = ("concat", "add")
IMAGE_FEATURES = ("pooled", "patches")
PREDICTION_TYPES = ("sample", "previous_sample")
NOISE_SCHEDULES = ("squaredcos_cap_v2", "sqrt", "linear")


def check_vision_feature_layer(image_features: str, vision_feature_layer: int) -> None:
    """Raises a `ValueError` unless `vision_feature_layer` is an int, and -1 for pooled features (which come from the
    last layer's [CLS] only). Whether the vision tower has that layer is checked where it is run."""
    if not isinstance(vision_feature_layer, int) or isinstance(vision_feature_layer, bool):
        raise ValueError(f"`vision_feature_layer` must be an int, got {vision_feature_layer!r}.")
    if image_features == "pooled" and vision_feature_layer != -1:
        raise ValueError(
            f"`vision_feature_layer` = {vision_feature_layer} needs image_features='patches' (pooled features come from "
            "the last layer)."
        )


def backbone_config_as_dict(
    backbone_config: dict[str, Any] | PretrainedConfig | None, default_model_type: str
) -> dict[str, Any]:
    """The text backbone's configuration as a dict: a transformers config, a dict with a `model_type`, or `None` for
    `default_model_type`'s defaults."""
    if backbone_config is None:
        backbone_config = {"model_type": default_model_type}
    if isinstance(backbone_config, PretrainedConfig):
        backbone_config = backbone_config.to_dict()
    if not isinstance(backbone_config, dict) or "model_type" not in backbone_config:
        raise ValueError(
            "`backbone_config` must be a transformers config or a dict with a 'model_type' key (e.g. "
            f"{{'model_type': 'bert', 'hidden_size': 384}}), got {backbone_config!r}."
        )
    return backbone_config


class CaptionModelConfig(PretrainedConfig):
    r"""
    What the caption models of this package configure alike: the caption length, which CLIP features they read and
    how they are projected, the pretrained text backbone and the vocabulary their output may use. The arguments are
    documented with [`CLIPDiffusionLMConfig`]; subclasses add their own and set `default_backbone_type` and
    `default_text_backbone`.
    """

    default_backbone_type = "distilbert"
    default_text_backbone = "distilbert-base-uncased"

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
        text_backbone_name_or_path: str | None = None,
        **kwargs,
    ):
        self.caption_length = caption_length
        self.condition_dim = condition_dim
        self.image_features = image_features
        self.vision_feature_layer = vision_feature_layer
        self.patch_dim = patch_dim
        self.image_condition_tokens = image_condition_tokens
        self.condition_hidden_act = condition_hidden_act
        self.backbone_config = backbone_config_as_dict(backbone_config, default_model_type=self.default_backbone_type)
        self.rounding_vocabulary = None if rounding_vocabulary is None else sorted({int(i) for i in rounding_vocabulary})
        self.text_backbone_name_or_path = text_backbone_name_or_path or self.default_text_backbone
        super().__init__(**kwargs)

    def validate(self) -> None:
        """Raises `ValueError` naming the first shared argument that is out of range."""
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
                    f"{len(self.rounding_vocabulary)} ids ranging {self.rounding_vocabulary[:1]}..."
                    f"{self.rounding_vocabulary[-1:]}."
                )

    def get_backbone_config(self) -> PretrainedConfig:
        """The transformers config of the text transformer, rebuilt from the stored dict."""
        return AutoConfig.for_model(**self.backbone_config)


class CLIPDiffusionLMConfig(CaptionModelConfig):
    r"""
    Configuration of a [`CLIPDiffusionLMModel`], the denoiser of CLIP-DiffusionLM (Xu, 2022, arXiv 2210.04559).

    The denoiser receives a noisy caption in word-embedding space, `x_t` of shape `(caption_length, hidden_size)`,
    the timestep `t` and a frozen CLIP embedding of the image, and predicts the clean caption embeddings `x̂0` (or
    `x_{t-n}`). Defaults are the paper's final model unless noted.

    Args:
        caption_length (`int`, *optional*, defaults to 16):
            Number of token positions `L` that are denoised together, special tokens and padding included.
        condition_dim (`int`, *optional*, defaults to 512):
            Size of CLIP's joint embeddings, `image_embeds` and `text_embeds` (512 for CLIP ViT-B/32).
        image_features (`str`, *optional*, defaults to `"pooled"`):
            What the denoiser sees of the image. `"pooled"` is CLIP's `image_embeds`, one vector (the paper).
            `"patches"` is the vision tower's hidden states (of `vision_feature_layer`) under CLIP's post-LayerNorm:
            [CLS] and every patch (50 tokens for ViT-B/32), each projected into its own conditioning token, so that
            attention can read each object where it is instead of from one summary vector (as in LaDiC and BLIP).
            Needs `fusion="concat"`.
        vision_feature_layer (`int`, *optional*, defaults to -1):
            With `image_features="patches"`, the vision tower's layer whose hidden states are read, indexed like
            `hidden_states` (and LLaVA's option of this name): -1 the last layer, -2 the one before, 0 the patch
            embeddings. CLIP's contrastive loss trains only the [CLS] token of the last layer, so its patch tokens
            are a by-product; earlier layers keep each patch's own content (see the README).
        patch_dim (`int`, *optional*, defaults to 768):
            Width of the patch features, the vision tower's `hidden_size` (768 for ViT-B/32); only read when
            `image_features="patches"`.
        fusion (`str`, *optional*, defaults to `"concat"`):
            How the conditioning meets the caption. `"concat"` appends each projected CLIP feature as an extra token
            marked by a segment embedding (the paper's final choice); `"add"` adds it to every caption position.
        image_condition_tokens (`int`, *optional*, defaults to 1):
            Number of tokens each image feature (the pooled embedding, or each patch) is projected into with concat
            fusion, like ClipCap's prefix (Mokady et al., 2021): several slots let attention read different objects
            from different tokens. The paper uses 1; values above 1 need `fusion="concat"`.
        use_text_condition (`bool`, *optional*, defaults to `False`):
            Also condition on the CLIP text embedding of the caption (the paper's guidance experiment). At inference
            the text slot takes user-given `text_embeds` or the learned null condition.
        condition_drop_prob (`float`, *optional*, defaults to 0.0):
            Probability of replacing the conditioning by the learned null condition during training, which enables
            classifier-free guidance. The paper uses 0.2 when guidance is on.
        prediction_type (`str`, *optional*, defaults to `"sample"`):
            `"sample"` predicts `x0` (paper's final model); `"previous_sample"` predicts `x_{t-n}` with
            `n = prediction_step_offset` (the paper's ablation).
        prediction_step_offset (`int`, *optional*, defaults to 100):
            `n` of the `x_{t-n}` target.
        rounding_weight (`float`, *optional*, defaults to 0.3):
            `λ` in `L = L'_simple + λ·L_R`.
        dynamic_rounding_constant (`float`, *optional*):
            When set to `C`, `λ` is recomputed every step as `C · L'_simple / L_R` without gradient (the paper tries
            C ∈ {1, 3}); `rounding_weight` is then ignored.
        rounding_logit_scale (`float`, *optional*, defaults to 1.0):
            Inverse temperature `s` of the rounding head, `logits = s · x̂0 · Eᵀ`. Frozen pretrained embeddings are
            short and point in similar directions, so at `s = 1` (the paper) the softmax is nearly flat even at the
            exact embedding (MiniLM, 23 caption words: `p(word | its own embedding) ≈ 0.08`, so `L_R` cannot fall
            below ≈ 2.0) and close words such as "a" and "an" barely differ in the loss. A larger `s` makes `L_R` a
            real classification signal. Decoding (the argmax) does not depend on it.
        x1_restoring_loss (`bool`, *optional*, defaults to `True`):
            Add the restoring loss at `t = 1` (one extra forward pass) to `L'_simple`, as in the paper.
        timestep_conditioning (`bool`, *optional*, defaults to `True`):
            Feed a sinusoidal embedding of `t` to the denoiser. The original code had none; `False` reproduces it.
        self_conditioning (`bool`, *optional*, defaults to `False`):
            Feed the previous estimate of `x0` back as an extra input (Chen et al., 2022).
        gate_noisy_input (`bool`, *optional*, defaults to `False`):
            Scale the normalised `x_t` by `1 + g(t)`, `g` a linear map of the timestep embedding initialised to 0
            (improved-diffusion's scale-shift conditioning, applied to the input), so that the denoiser can silence
            `x_t` where it is all noise. Frozen word embeddings are short (per-dimension std ≈ 0.06 for MiniLM), so
            `x_t` carries its words only for `t` below ≈ 0.1·T; above, the normalised noise is larger than the
            position embeddings and blurs where each position is, which a one-step sampler (starting at `t = T − 1`)
            and a mask-predict refinement (its re-noised positions) read from. Needs `timestep_conditioning`.
        rounding_transitions (`bool`, *optional*, defaults to `False`):
            Round the whole caption jointly, as a linear-chain CRF over adjacent words (Sun et al. 2019, NAT-CRF): a
            learnt score for each ordered pair of rounding-vocabulary words is added to the rounding head's logits,
            `L_R` becomes the chain's negative log-likelihood (per position) and rounding is Viterbi decoding. One
            denoiser pass predicts each word's distribution on its own, so a per-position argmax can pair words that
            never follow each other: with "orange" at 0.4 and two colours that take "a" at 0.3 each, the article's
            argmax is "a" and the colour's "orange". The joint argmax does not. Needs `rounding_vocabulary` (the
            scores are `V × V`).
        image_transition_rank (`int`, *optional*, defaults to 0):
            With `rounding_transitions`, add to the chain's scores a term read from the image: each projected image
            token `c_p` contributes `rank` pairs of word scores, `A_image[a, b] = Σ_p Σ_k left_k(c_p)[a] ·
            right_k(c_p)[b]`, so that a patch holding a red star licenses "red" followed by "star" in this image only.
            The static scores know which words may follow each other; these know which words belong together here:
            one parallel pass hedging between two objects at the colour and at the shape position then binds the
            two to the same object instead of pairing one's colour with the other's shape. 0 (the default) keeps
            the chain image-independent. Rounding then needs the image features (`image_embeds`).
        embedding_scale (`float`, *optional*, defaults to 1.0):
            Multiplier applied to the frozen word embeddings to form `x0`. Pretrained BERT embeddings have a per-
            dimension standard deviation near 0.05, so noise swamps them early in the schedule; a scale near
            `1 / std` gives the signal unit variance like an image diffusion model. 1.0 is the paper.
        noise_schedule (`str`, *optional*, defaults to `"squaredcos_cap_v2"`):
            `"squaredcos_cap_v2"` (cosine, the paper), `"sqrt"` (Diffusion-LM) or `"linear"`.
        num_train_timesteps (`int`, *optional*, defaults to 1000):
            `T`.
        condition_hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation of the conditioning and timestep MLPs.
        backbone_config (`dict` or `PretrainedConfig`, *optional*):
            Configuration of the BERT-family transformer encoder (any model whose `AutoModel` accepts
            `inputs_embeds`: DistilBERT, BERT, RoBERTa, ...). Defaults to DistilBERT-base-uncased's shape.
        rounding_vocabulary (`list[int]`, *optional*):
            Token ids that rounding may produce (training loss and decoding), e.g. the words of a closed-domain
            dataset plus the special tokens. Cuts the lm_head cost from `vocab_size` to `len(rounding_vocabulary)`
            per position. `None` rounds over the whole vocabulary, as the paper does.
        text_backbone_name_or_path (`str`, *optional*, defaults to `"distilbert-base-uncased"`):
            Where the word embeddings, tokenizer and initial transformer weights come from; recorded for provenance
            and used by [`CLIPDiffusionLMModel.from_text_backbone`].
    """

    model_type = "clip_diffusionlm"

    def __init__(
        self,
        fusion: str = "concat",
        use_text_condition: bool = False,
        condition_drop_prob: float = 0.0,
        prediction_type: str = "sample",
        prediction_step_offset: int = 100,
        rounding_weight: float = 0.3,
        dynamic_rounding_constant: float | None = None,
        rounding_logit_scale: float = 1.0,
        x1_restoring_loss: bool = True,
        timestep_conditioning: bool = True,
        self_conditioning: bool = False,
        gate_noisy_input: bool = False,
        rounding_transitions: bool = False,
        image_transition_rank: int = 0,
        embedding_scale: float = 1.0,
        noise_schedule: str = "squaredcos_cap_v2",
        num_train_timesteps: int = 1000,
        **kwargs,
    ):
        self.fusion = fusion
        self.use_text_condition = use_text_condition
        self.condition_drop_prob = condition_drop_prob
        self.prediction_type = prediction_type
        self.prediction_step_offset = prediction_step_offset
        self.rounding_weight = rounding_weight
        self.dynamic_rounding_constant = dynamic_rounding_constant
        self.rounding_logit_scale = rounding_logit_scale
        self.x1_restoring_loss = x1_restoring_loss
        self.timestep_conditioning = timestep_conditioning
        self.self_conditioning = self_conditioning
        self.gate_noisy_input = gate_noisy_input
        self.rounding_transitions = rounding_transitions
        self.image_transition_rank = image_transition_rank
        self.embedding_scale = embedding_scale
        self.noise_schedule = noise_schedule
        self.num_train_timesteps = num_train_timesteps
        super().__init__(**kwargs)  # the shared arguments: caption length, conditioning, backbone, vocabulary
        self.validate()

    def validate(self) -> None:
        """Raises `ValueError` naming the first knob that is out of range."""
        super().validate()
        if self.fusion not in FUSION_METHODS:
            raise ValueError(f"`fusion` must be one of {FUSION_METHODS}, got {self.fusion!r}.")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}.")
        if self.noise_schedule not in NOISE_SCHEDULES:
            raise ValueError(f"`noise_schedule` must be one of {NOISE_SCHEDULES}, got {self.noise_schedule!r}.")
        if self.image_features == "patches" and self.fusion != "concat":
            raise ValueError(
                "`image_features='patches'` needs fusion='concat' (addition would sum the patches back into one)."
            )
        if self.gate_noisy_input and not self.timestep_conditioning:
            raise ValueError("`gate_noisy_input` scales x_t by a function of the timestep embedding: it needs "
                             "`timestep_conditioning=True`.")
        if self.image_condition_tokens > 1 and self.fusion != "concat":
            raise ValueError(
                f"`image_condition_tokens` = {self.image_condition_tokens} needs fusion='concat' (addition would sum the "
                "tokens back into one)."
            )
        if self.rounding_transitions and self.rounding_vocabulary is None:
            raise ValueError("`rounding_transitions` learns a score for every pair of rounding words: it needs a "
                             "`rounding_vocabulary` (the whole vocabulary would need vocab_size² scores; in training, "
                             "`restrict_rounding_vocabulary`).")
        if not isinstance(self.image_transition_rank, int) or isinstance(self.image_transition_rank, bool) or (
            self.image_transition_rank < 0
        ):
            raise ValueError(f"`image_transition_rank` must be a non-negative integer, got {self.image_transition_rank!r}.")
        if self.image_transition_rank and not self.rounding_transitions:
            raise ValueError("`image_transition_rank` adds an image's term to the chain's transition scores: it needs "
                             "`rounding_transitions=True`.")
        for name in ("num_train_timesteps", "prediction_step_offset"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.prediction_step_offset >= self.num_train_timesteps:
            raise ValueError(
                f"`prediction_step_offset` ({self.prediction_step_offset}) must be smaller than "
                f"`num_train_timesteps` ({self.num_train_timesteps})."
            )
        if not 0.0 <= self.condition_drop_prob < 1.0:
            raise ValueError(f"`condition_drop_prob` must be in [0, 1), got {self.condition_drop_prob}.")
        if self.rounding_weight < 0:
            raise ValueError(f"`rounding_weight` (λ) must be non-negative, got {self.rounding_weight}.")
        if self.dynamic_rounding_constant is not None and self.dynamic_rounding_constant <= 0:
            raise ValueError(
                f"`dynamic_rounding_constant` (C) must be positive or None, got {self.dynamic_rounding_constant}."
            )
        for name in ("embedding_scale", "rounding_logit_scale"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be positive, got {getattr(self, name)}.")


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


def jump_posterior_coefficients(
    alphas_cumprod: torch.Tensor, timesteps: torch.LongTensor, offset: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Coefficients of the posterior mean of `q(x_s | x_t, x0) = c0·x0 + ct·x_t` for the jump `s = t - offset`
    (`s < 0` means the data itself: `c0 = 1`, `ct = 0`). Shapes `(batch, 1, 1)`, or `(batch, caption_length, 1)` for
    per-position timesteps `(batch, caption_length)`.
    """
    alphas_cumprod = alphas_cumprod.to(timesteps.device)
    alpha_bar_t = alphas_cumprod[timesteps]
    earlier = timesteps - offset
    alpha_bar_s = torch.where(earlier >= 0, alphas_cumprod[earlier.clamp(min=0)], torch.ones_like(alpha_bar_t))
    alpha_ts = alpha_bar_t / alpha_bar_s
    coefficient_x0 = alpha_bar_s.sqrt() * (1 - alpha_ts) / (1 - alpha_bar_t)
    coefficient_xt = alpha_ts.sqrt() * (1 - alpha_bar_s) / (1 - alpha_bar_t)
    broadcast_shape = (*timesteps.shape, *(1,) * (3 - timesteps.ndim))
    return coefficient_x0.reshape(broadcast_shape), coefficient_xt.reshape(broadcast_shape)


def predicted_original_sample(
    config: CLIPDiffusionLMConfig,
    alphas_cumprod: torch.Tensor,
    prediction: torch.Tensor,
    noisy_embeds: torch.Tensor,
    timesteps: torch.LongTensor,
) -> torch.Tensor:
    """
    The model's estimate of `x0`: its output, or for `x_{t-n}` models, `(x̂_{t-n} - ct·x_t) / c0`. The division is
    done in float32 (`c0` is tiny at large `t`) and the result has the prediction's dtype.
    """
    if config.prediction_type == "sample":
        return prediction
    if timesteps.ndim == 0:
        timesteps = timesteps.expand(prediction.shape[0])
    coefficient_x0, coefficient_xt = jump_posterior_coefficients(
        alphas_cumprod, timesteps, config.prediction_step_offset
    )
    original = (prediction.float() - coefficient_xt * noisy_embeds.float()) / coefficient_x0
    return original.to(prediction.dtype)


def linear_chain_scores(logits: torch.Tensor, transitions: torch.Tensor, labels: torch.LongTensor) -> torch.Tensor:
    """Score of the label path under a linear-chain CRF, `Σ_k logits[k, y_k] + Σ_k A[y_k, y_k+1]`, shape `(batch,)`.
    `logits` is `(batch, length, V)`, `transitions` `A` is `(V, V)` or one per caption `(batch, V, V)` (row: this
    word, column: the next one)."""
    unary = logits.gather(-1, labels[..., None]).squeeze(-1).sum(dim=-1)
    captions = torch.arange(labels.shape[0], device=labels.device)[:, None]
    pairs = transitions.expand(labels.shape[0], -1, -1)[captions, labels[:, :-1], labels[:, 1:]]
    return unary + pairs.sum(dim=-1)


def linear_chain_log_partition(logits: torch.Tensor, transitions: torch.Tensor) -> torch.Tensor:
    """`log Σ_y exp(score(y))` over every path, by the forward algorithm, shape `(batch,)`; `transitions` as for
    [`linear_chain_scores`]."""
    forward = logits[:, 0]  # (batch, V): log-sum of the paths ending in each word
    for position in range(1, logits.shape[1]):
        forward = torch.logsumexp(forward[:, :, None] + transitions, dim=1) + logits[:, position]
    return torch.logsumexp(forward, dim=-1)


def linear_chain_best_path(logits: torch.Tensor, transitions: torch.Tensor) -> torch.LongTensor:
    """The highest-scoring path (Viterbi), shape `(batch, length)`, indices into the last dimension of `logits`;
    `transitions` as for [`linear_chain_scores`]."""
    best, backpointers = logits[:, 0], []
    for position in range(1, logits.shape[1]):
        candidates = best[:, :, None] + transitions  # (batch, previous word, next word)
        best, previous = candidates.max(dim=1)
        best = best + logits[:, position]
        backpointers.append(previous)
    path = [best.argmax(dim=-1)]
    for previous in reversed(backpointers):
        path.append(previous.gather(1, path[-1][:, None]).squeeze(1))
    return torch.stack(path[::-1], dim=1)


def first_repeated_ngram_ends(paths: torch.LongTensor, ngram_size: int, exempt: torch.BoolTensor) -> torch.LongTensor:
    """Where the first n-gram of each path that repeats an earlier one ends, shape `(batch,)`, `-1` where none does.
    `paths` is `(batch, length)`; an n-gram holding a class marked in `exempt` (`(V,)`, e.g. padding) never counts."""
    ngrams = paths.unfold(1, ngram_size, 1)  # (batch, num_ngrams, ngram_size)
    counted = ~exempt[ngrams].any(dim=-1)  # (batch, num_ngrams)
    repeats = (ngrams[:, :, None] == ngrams[:, None, :]).all(dim=-1)  # (batch, later n-gram, earlier n-gram)
    repeats = (repeats & torch.ones_like(repeats[0]).tril(diagonal=-1)).any(dim=-1) & counted  # (batch, num_ngrams)
    return torch.where(repeats.any(dim=1), repeats.int().argmax(dim=1) + ngram_size - 1, -1)


def best_path_without_repeated_ngrams(
    logits: torch.Tensor, transitions: torch.Tensor | None, ngram_size: int, exempt: torch.BoolTensor
) -> torch.LongTensor:
    """The best path, shape `(batch, length)`, in which no n-gram of `ngram_size` words occurs twice (transformers'
    `no_repeat_ngram_size`, which `generate()` applies word by word): the best path ([`linear_chain_best_path`], or
    the best word per position without `transitions`), then, while a caption repeats an n-gram, the last word of its
    first repeat is banned at that position and the caption decoded again, at most `length` times. `transitions` as
    for [`linear_chain_scores`]; `exempt` as for [`first_repeated_ngram_ends`]."""

    def best_path(logits: torch.Tensor, rows: torch.LongTensor | slice) -> torch.LongTensor:
        if transitions is None:
            return logits.argmax(dim=-1)
        return linear_chain_best_path(logits, transitions[rows] if transitions.ndim == 3 else transitions)

    paths = best_path(logits, slice(None))
    logits = logits.clone()
    rows = torch.arange(len(paths), device=paths.device)  # the captions that may still repeat
    for _ in range(logits.shape[1]):
        ends = first_repeated_ngram_ends(paths[rows], ngram_size, exempt)
        rows, ends = rows[ends >= 0], ends[ends >= 0]
        if not len(rows):
            break
        logits[rows, ends, paths[rows, ends]] = float("-inf")
        paths[rows] = best_path(logits[rows], rows)
    return paths


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
        angles = timesteps.float()[..., None] * torch.exp(exponent)  # (*timesteps.shape, half)
        features = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
        if self.hidden_size % 2:
            features = F.pad(features, (0, 1))
        features = features.to(self.linear_1.weight.dtype)
        return self.norm(self.linear_2(self.act(self.linear_1(features))))  # (*timesteps.shape, hidden)


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
            # Zero-initialised so that a self-conditioned, gated or chain-rounding model starts out identical to a
            # plain one.
            for layer in (module.self_condition_projection, module.input_gate):
                if layer is not None:
                    init.zeros_(layer.weight)
                    init.zeros_(layer.bias)
            if module.transition_scores is not None:
                init.zeros_(module.transition_scores)
            if module.image_transition_right is not None:
                init.zeros_(module.image_transition_right.weight)
                init.zeros_(module.image_transition_right.bias)


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
        self.input_gate = nn.Linear(hidden_size, hidden_size) if config.gate_noisy_input else None
        self.output_projection = nn.Linear(hidden_size, hidden_size)

        # Persistent, so that loading (which materialises buffers from the checkpoint) restores it exactly.
        rounding_token_ids = config.rounding_vocabulary if config.rounding_vocabulary is not None else []
        self.register_buffer("rounding_token_ids", torch.tensor(rounding_token_ids, dtype=torch.long))
        # Zero: the chain starts out as independent per-position rounding.
        self.transition_scores = (
            nn.Parameter(torch.zeros(len(rounding_token_ids), len(rounding_token_ids)))
            if config.rounding_transitions else None
        )
        # Each image token's scores for the first and the second word of the pairs it licenses
        # (`image_transition_rank` pairs of V scores each); the second start at zero.
        image_pair_scores = config.image_transition_rank * len(rounding_token_ids)
        self.image_transition_left = nn.Linear(hidden_size, image_pair_scores) if image_pair_scores else None
        self.image_transition_right = nn.Linear(hidden_size, image_pair_scores) if image_pair_scores else None

        self.post_init()
        self.get_input_embeddings().weight.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> CLIPDiffusionLMModel:
        model = super().from_pretrained(*args, **kwargs)
        # Loading materialises new parameters, which forgets `requires_grad`: a loaded model fine-tuned (resumed,
        # distilled) must keep its word embeddings, the diffusion space, frozen too.
        model.get_input_embeddings().weight.requires_grad_(False)
        return model

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

    def chain_transitions(self, image_embeds: torch.FloatTensor | None = None) -> torch.FloatTensor:
        """The chain's transition scores in float32 (`rounding_transitions`): `(V, V)`, or with
        `image_transition_rank` the image's term added, one matrix per image `(batch, V, V)`. `image_embeds` as for
        [`~CLIPDiffusionLMModel.forward`]; only read with `image_transition_rank`."""
        transitions = self.transition_scores.float()
        if self.image_transition_left is None:
            return transitions
        if image_embeds is None:
            raise ValueError("This model rounds with transition scores read from the image (`image_transition_rank` "
                             f"= {self.config.image_transition_rank}): pass the `image_embeds` of the captions.")
        tokens = self.image_projection(image_embeds)  # (batch, image tokens, hidden)
        batch_size, vocab_size = tokens.shape[0], transitions.shape[0]
        first = self.image_transition_left(tokens).view(batch_size, -1, vocab_size)  # (batch, tokens · rank, V)
        second = self.image_transition_right(tokens).view(batch_size, -1, vocab_size)
        return transitions + torch.einsum("bpv,bpw->bvw", first.float(), second.float())

    def round_to_indices(
        self,
        embeds: torch.FloatTensor,
        image_embeds: torch.FloatTensor | None = None,
        no_repeat_ngram_size: int = 0,
        special_token_ids: list[int] | tuple[int, ...] = (),
        length_bonus: float = 0.0,
    ) -> torch.LongTensor:
        """Rounding into the rounding head's classes, shape `embeds.shape[:-1]`: the most likely word at each
        position, or with `rounding_transitions` the most likely caption (Viterbi), under the transitions of each
        caption's image (`image_embeds`, `(batch, ...)`) with `image_transition_rank`. With `no_repeat_ngram_size`,
        no n-gram of that many words occurs twice in a caption ([`best_path_without_repeated_ngrams`]) but those
        holding one of `special_token_ids` (padding). `length_bonus` is added to the score of every word but those,
        so that a caption ends only where its end is surer than that (a word insertion bonus, as in speech
        recognition's decoders)."""
        logits = self.round_to_logits(embeds)
        special = None  # only the final rounding's options read it, not the plain rounding of every clamped step
        if no_repeat_ngram_size or length_bonus:
            special = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            special_classes = self.rounding_targets(
                torch.as_tensor(special_token_ids, dtype=torch.long, device=logits.device))
            special[special_classes[special_classes >= 0]] = True
        if length_bonus:
            if not special.any():
                raise ValueError("`length_bonus` rewards every word but the special tokens: pass their "
                                 "`special_token_ids` (e.g. `tokenizer.all_special_ids`).")
            logits = logits + length_bonus * (~special).to(logits.dtype)
        transitions = None if self.transition_scores is None else self.chain_transitions(image_embeds)
        if not no_repeat_ngram_size:
            if transitions is None:
                return logits.argmax(dim=-1)
            return linear_chain_best_path(logits.flatten(0, -3).float(), transitions).view(logits.shape[:-1])
        return best_path_without_repeated_ngrams(
            logits.flatten(0, -3).float(), transitions, no_repeat_ngram_size, special
        ).view(logits.shape[:-1])

    def round_to_token_ids(
        self,
        embeds: torch.FloatTensor,
        image_embeds: torch.FloatTensor | None = None,
        no_repeat_ngram_size: int = 0,
        special_token_ids: list[int] | tuple[int, ...] = (),
        length_bonus: float = 0.0,
    ) -> torch.LongTensor:
        """Rounding to token ids, shape `embeds.shape[:-1]` (see [`~CLIPDiffusionLMModel.round_to_indices`])."""
        best = self.round_to_indices(embeds, image_embeds, no_repeat_ngram_size, special_token_ids, length_bonus)
        return self.rounding_token_ids[best] if self.rounding_token_ids.numel() else best

    def rounding_targets(self, token_ids: torch.LongTensor) -> torch.LongTensor:
        """Token ids → class indices of the rounding head, `-1` where a token is outside `rounding_vocabulary`."""
        if not self.rounding_token_ids.numel():
            return token_ids
        index = torch.searchsorted(self.rounding_token_ids, token_ids).clamp(max=len(self.rounding_token_ids) - 1)
        return torch.where(self.rounding_token_ids[index] == token_ids, index, -1)

    def nearest_word_embeddings(
        self, embeds: torch.FloatTensor, image_embeds: torch.FloatTensor | None = None
    ) -> torch.FloatTensor:
        """Clamps each position to the embedding of its most likely word (Diffusion-LM's clamping trick); see
        [`~CLIPDiffusionLMModel.round_to_indices`]."""
        return self.embed_captions(self.round_to_token_ids(embeds, image_embeds))

    def expected_word_embeddings(self, embeds: torch.FloatTensor) -> torch.FloatTensor:
        """Each position as the rounding head's expectation of the word embedding, `softmax(logits) · E · scale`
        (CDCD's score interpolation, Dieleman et al. 2022): the model's own uncertainty over words instead of the
        regression mean; a one-hot distribution gives that word's embedding exactly."""
        weight = self.get_input_embeddings().weight
        if self.rounding_token_ids.numel():
            weight = weight[self.rounding_token_ids]
        probabilities = self.round_to_logits(embeds).softmax(dim=-1)
        return probabilities @ weight.to(probabilities.dtype) * self.config.embedding_scale

    def predicted_original_sample(
        self,
        prediction: torch.FloatTensor,
        noisy_embeds: torch.FloatTensor,
        timesteps: torch.LongTensor,
        alphas_cumprod: torch.Tensor,
    ) -> torch.FloatTensor:
        """[`predicted_original_sample`] of this model's output, for samplers that know only the model."""
        return predicted_original_sample(self.config, alphas_cumprod, prediction, noisy_embeds, timesteps)

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
            timesteps (`torch.LongTensor` of shape `(batch_size,)`, `(batch_size, caption_length)` or `()`):
                `t` of each sample, in `[0, num_train_timesteps)`, or of each position (a mask-predict refinement:
                words kept at `t = 0`, the rest re-noised).
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
        if self.timestep_embedding is not None:
            timestep_embeds = self.timestep_embedding(timesteps)
            if timesteps.ndim == 1:
                timestep_embeds = timestep_embeds[:, None, :]  # (batch, 1, hidden), or per position already
            if self.input_gate is not None:
                hidden = hidden * (1 + self.input_gate(timestep_embeds))
            hidden = hidden + timestep_embeds
        if self.self_condition_projection is not None:
            if self_conditioning_embeds is None:
                self_conditioning_embeds = torch.zeros_like(noisy_embeds)
            hidden = hidden + self.self_condition_projection(self_conditioning_embeds)

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
