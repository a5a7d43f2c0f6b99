"""CLIP-DiffusionLM configuration."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig

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


class CLIPDiffusionLMConfig(PretrainedConfig):
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
        caption_length: int = 16,
        condition_dim: int = 512,
        fusion: str = "concat",
        image_features: str = "pooled",
        vision_feature_layer: int = -1,
        patch_dim: int = 768,
        image_condition_tokens: int = 1,
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
        embedding_scale: float = 1.0,
        noise_schedule: str = "squaredcos_cap_v2",
        num_train_timesteps: int = 1000,
        condition_hidden_act: str = "gelu",
        backbone_config: dict[str, Any] | PretrainedConfig | None = None,
        rounding_vocabulary: list[int] | None = None,
        text_backbone_name_or_path: str = "distilbert-base-uncased",
        **kwargs,
    ):
        backbone_config = backbone_config_as_dict(backbone_config, default_model_type="distilbert")

        self.caption_length = caption_length
        self.condition_dim = condition_dim
        self.fusion = fusion
        self.image_features = image_features
        self.vision_feature_layer = vision_feature_layer
        self.patch_dim = patch_dim
        self.image_condition_tokens = image_condition_tokens
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
        self.embedding_scale = embedding_scale
        self.noise_schedule = noise_schedule
        self.num_train_timesteps = num_train_timesteps
        self.condition_hidden_act = condition_hidden_act
        self.backbone_config = backbone_config
        self.rounding_vocabulary = None if rounding_vocabulary is None else sorted({int(i) for i in rounding_vocabulary})
        self.text_backbone_name_or_path = text_backbone_name_or_path
        super().__init__(**kwargs)
        self.validate()

    def validate(self) -> None:
        """Raises `ValueError` naming the first knob that is out of range."""
        if self.fusion not in FUSION_METHODS:
            raise ValueError(f"`fusion` must be one of {FUSION_METHODS}, got {self.fusion!r}.")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}.")
        if self.noise_schedule not in NOISE_SCHEDULES:
            raise ValueError(f"`noise_schedule` must be one of {NOISE_SCHEDULES}, got {self.noise_schedule!r}.")
        if self.image_features not in IMAGE_FEATURES:
            raise ValueError(f"`image_features` must be one of {IMAGE_FEATURES}, got {self.image_features!r}.")
        check_vision_feature_layer(self.image_features, self.vision_feature_layer)
        if self.image_features == "patches" and self.fusion != "concat":
            raise ValueError(
                "`image_features='patches'` needs fusion='concat' (addition would sum the patches back into one)."
            )
        if self.image_condition_tokens > 1 and self.fusion != "concat":
            raise ValueError(
                f"`image_condition_tokens` = {self.image_condition_tokens} needs fusion='concat' (addition would sum the "
                "tokens back into one)."
            )
        for name in ("caption_length", "condition_dim", "patch_dim", "num_train_timesteps", "prediction_step_offset",
                     "image_condition_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.caption_length < 2:
            raise ValueError(f"`caption_length` must be at least 2 ([CLS] and [SEP]), got {self.caption_length}.")
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
        for name in ("embedding_scale", "rounding_logit_scale"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be positive, got {getattr(self, name)}.")

    def get_backbone_config(self) -> PretrainedConfig:
        """The transformers config of the transformer encoder, rebuilt from the stored dict."""
        return AutoConfig.for_model(**self.backbone_config)
