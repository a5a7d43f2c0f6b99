"""`TrainingConfig`: every option of a training run, one `--flag` each (with help) through `HfArgumentParser`.

Flag names follow diffusers' training examples where they have one (`--train_batch_size`, `--lr_scheduler`,
`--lr_warmup_steps`, `--dataset_name`, ...), as aliases of the fields. A JSON or YAML file of fields (`--config`, see
`examples/configs/`) gives defaults that flags override.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

from .diffusion import INFERENCE_SCHEDULERS, WEIGHTING_SCHEMES, TimestepSampling, TimeWarping
from .models.modeling_clip_diffusionlm import CLIPDiffusionLMConfig
from .pipelines.pipeline_clip_diffusion_caption import RECOMMENDED_INFERENCE_STEPS

LR_SCHEDULES = ("constant", "linear", "log", "cosine", "cosine_restarts")
MIXED_PRECISION = ("no", "fp16", "bf16")
LOG_LEVELS = ("debug", "info", "warning", "error")
MODEL_TYPES = ("diffusion", "ar")
# What `teacher_captions` passes to a `caption_teacher` itself: its features, plain captions, and a seeded generator.
TEACHER_ARGUMENTS_SET_BY_TRAINING = {"images", "image_embeds", "output_type", "return_dict", "generator"}


def _option(default: Any = dataclasses.MISSING, help: str = "", aliases: tuple[str, ...] = (), **kwargs) -> Any:
    """A dataclass field whose `help` (and diffusers-style `aliases`) `HfArgumentParser` turns into its flag."""
    metadata = {"help": help, **({"aliases": list(aliases)} if aliases else {}), **kwargs}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainingConfig:
    """
    Everything a training run needs; each field is a flag of `examples/train.py` and `clip-diffusionlm train`, and
    `--help` documents all of them.
    """

    output_dir: str = _option("outputs/clip-diffusionlm", "Where checkpoints, logs and the saved pipeline go.")

    # Data
    datasets: list[str] = _option(
        [], "Dataset files or folders in a format of `clip_diffusionlm.data` (Karpathy JSON, Flickr8k captions.txt, "
        "COCO captions JSON, an image folder with metadata); several are combined split-wise."
    )
    images_dirs: list[str] = _option([], "Image folder of the `datasets`: one for all, or one per dataset.")
    dataset_name: str | None = _option(
        None, "A Hugging Face dataset: a Hub id, a path `datasets.load_dataset` reads (Parquet/Arrow/CSV/JSON), or a "
        "`save_to_disk` folder."
    )
    dataset_config_name: str | None = _option(None, "The configuration of `dataset_name`, if it has several.")
    cache_dir: str | None = _option(None, "Where `datasets` caches downloads and prepared data.")
    train_data_dir: str | None = _option(
        None, "An `imagefolder` (images + metadata.jsonl/csv, optionally in train/validation/test sub-folders)."
    )
    image_column: str = _option("image", "The image column of `dataset_name` / `train_data_dir`.")
    caption_column: str | None = _option(
        None, "The caption column (a string or a list of strings per row); default: `text`, then `caption`, "
        "`captions` or `sentences`."
    )
    on_bad_input: str = _option(
        "error", "Corrupt or missing images, empty or undecodable captions: `error` stops before training and lists "
        "them, `skip` drops them and logs counts.", choices=["error", "skip"]
    )
    feature_cache_dir: str | None = _option(
        None, "Folder of the cached frozen CLIP features (default: `output_dir/feature_cache`); shareable."
    )
    captions_per_image: int | None = _option(
        None, "Train on only the first k references of each image (evaluation always uses all of them)."
    )
    dataloader_num_workers: int = _option(0, "Worker processes that read training batches.")

    # Models
    model_type: str = _option(
        "diffusion", "`diffusion` trains the CLIP-DiffusionLM denoiser; `ar` trains the autoregressive baseline "
        "(`CLIPCaptionerARForCausalLM`: the same CLIP features as a prefix, the same first backbone layers run causally, "
        "the same output vocabulary) with the same data, schedule and loop, to compare the two. `model_config` keys "
        "the baseline does not have (noise, fusion, losses) are ignored for it.", choices=list(MODEL_TYPES),
    )
    distill_from: str | None = _option(
        None, "A trained CLIP-DiffusionLM pipeline (folder or Hub id) to distil: the run trains a copy of its denoiser "
        "so that one denoising step does what `distillation_teacher_steps` of its DDIM steps do (step distillation). "
        "The model is the teacher's, so `model_config` must be empty and `text_backbone` the teacher's."
    )
    distillation_teacher_steps: int = _option(2, "Teacher DDIM steps that one student step learns to match.")
    caption_teacher: str | None = _option(
        None, "A trained captioning pipeline of this package (folder or Hub id: the AR baseline or a diffusion model, "
        "reading the same CLIP features) whose caption of each training image replaces its references: sequence-level "
        "knowledge distillation (Kim & Rush 2016), the usual cure for a non-autoregressive model that averages "
        "references phrased in different words and orders. Not with `captions_per_image`."
    )
    caption_teacher_kwargs: dict | str | None = _option(
        {}, "Arguments of the `caption_teacher`'s `__call__` when it captions the training images, as JSON: "
        "'{\"num_beams\": 3}' distils the AR baseline's beam search, as Kim & Rush (2016) do; default: its defaults."
    )
    clip_model: str = _option("openai/clip-vit-base-patch32", "The CLIP checkpoint; its towers are frozen.")
    text_backbone: str = _option(
        "distilbert-base-uncased", "A BERT-family encoder: word embeddings (frozen), tokenizer and initial layers."
    )
    init_backbone_weights: bool = _option(
        True, "Start from the backbone's pretrained layers; false keeps only its embeddings (the original code)."
    )
    text_backbone_layers: int | None = _option(None, "Keep only the backbone's first k transformer layers.")
    restrict_rounding_vocabulary: bool = _option(
        False, "Round only to tokens of the training captions (a closed-domain speed-up)."
    )
    model_config: dict | str | None = _option(
        {}, "Any `CLIPDiffusionLMConfig` argument, as JSON: '{\"fusion\": \"add\", \"rounding_weight\": 0.5}'; "
        "its `backbone_config` overrides keys of the text backbone's config, e.g. '{\"backbone_config\": "
        "{\"hidden_dropout_prob\": 0.0}}'."
    )
    attn_implementation: str | None = _option(
        None, "The backbone's attention: `eager`, `sdpa` or `flash_attention_2` (default: transformers' choice)."
    )
    gradient_checkpointing: bool = _option(False, "Recompute activations in the backward pass to save memory.")

    # Optimisation
    seed: int = _option(0, "Seed of the data order, the noise and the initialisation.")
    num_epochs: int = _option(15, "Epochs over the training captions (unless `max_steps`).", aliases=("--num_train_epochs",))
    max_steps: int | None = _option(None, "Optimizer steps; overrides `num_epochs`.", aliases=("--max_train_steps",))
    batch_size: int = _option(64, "Captions per process per step.", aliases=("--train_batch_size",))
    gradient_accumulation_steps: int = _option(1, "Batches accumulated into one optimizer step.")
    learning_rate: float = _option(1e-4, "AdamW's peak learning rate.")
    lr_schedule: str = _option(
        "constant", "`constant`, `linear` (to `lr_end`), `log` (fast, then slow decay to `lr_end`), `cosine` (to "
        "`lr_end`) or `cosine_restarts` (to 0, restarting every `lr_restart_epochs`).", aliases=("--lr_scheduler",),
        choices=list(LR_SCHEDULES),
    )
    lr_end: float = _option(5e-5, "Final learning rate of the decaying schedules.")
    lr_restart_epochs: int = _option(5, "Epochs per cycle of `cosine_restarts`.")
    warmup_steps: int = _option(0, "Linear warm-up steps.", aliases=("--lr_warmup_steps",))
    weight_decay: float = _option(0.0, "AdamW weight decay.", aliases=("--adam_weight_decay",))
    adam_beta1: float = _option(0.9, "AdamW's β1.")
    adam_beta2: float = _option(0.999, "AdamW's β2; lower (0.95-0.98) adapts the step size faster.")
    adam_epsilon: float = _option(1e-8, "AdamW's ε.")
    max_grad_norm: float = _option(1.0, "Gradient clipping norm; 0 turns clipping off.")
    timesteps_per_caption: int = _option(
        1, "Independent timesteps each caption is trained on per step (the paper samples 100 of 1000)."
    )
    weighting_scheme: str = _option(
        "none", "How training draws the timestep t: uniformly (`none`, the paper), from SD3's `logit_normal` / "
        "`mode` densities over t/T (diffusers' flag names), or `time_warping` (CDCD: a density learnt during "
        "training, proportional to how fast the rounding cross-entropy grows with t).", choices=list(WEIGHTING_SCHEMES),
    )
    logit_mean: float = _option(0.0, "Mean of `logit_normal`; above 0 trains more at high noise.")
    logit_std: float = _option(1.0, "Standard deviation of `logit_normal`.")
    mode_scale: float = _option(1.29, "Scale of the `mode` weighting scheme.")
    draft_prob: float = _option(
        0.0, "Share of each batch noised from the model's own one-step draft instead of the caption (step-unrolled "
        "denoising, SUNDAE): trains the denoiser to correct its drafts, for the pipeline's `refinement_timestep`.",
    )
    mask_predict_prob: float = _option(
        0.0, "Share of each batch trained as a mask-predict refinement: a random share of the positions is pure "
        "noise, the others are the caption's words at t = 0. For the pipeline's `refinement_ratio`, which re-noises "
        "only the words the model is least sure of.",
    )
    reference_selection: bool = _option(
        False, "Train each caption towards whichever of its image's references the model's prediction is closest to "
        "(lowest loss), not the one it was noised from: reference selection (Shao et al. 2022). A one-pass model "
        "then settles on one wording and word order per image instead of averaging them. Needs several references "
        "per image (not `captions_per_image=1`); with `caption_teacher`, the teacher's caption is one of them.",
    )
    mixed_precision: str | None = _option(
        None, "`no`, `fp16` or `bf16`; default: what `accelerate config` / `accelerate launch --mixed_precision` say."
    )
    ema_decay: float | None = _option(None, "Keep an exponential moving average of the weights with this decay.")

    # Validation
    validation_steps: int = _option(500, "Validate every this many steps (0: only at the end).")
    validation_images: int = _option(256, "Validation images captioned each time.")
    validation_inference_steps: int = _option(
        RECOMMENDED_INFERENCE_STEPS, "Denoising steps of validation captions (and of the card's examples)."
    )
    validation_guidance_scale: float = _option(1.0, "Classifier-free guidance of validation captions.")
    inference_scheduler: str = _option(
        "ddim", "Sampler of validation and of the saved pipeline: `ddim` (deterministic) or `ddpm` (ancestral: fresh "
        "noise at each step lets later steps revise words the first got wrong; the demo's choice).",
        choices=list(INFERENCE_SCHEDULERS),
    )
    early_stopping_metric: str = _option("CIDEr", "Validation metric that early stopping watches (higher is better).")
    early_stopping_patience: int | None = _option(None, "Stop after this many validations without improvement.")

    # Checkpoints
    checkpointing_steps: int = _option(500, "Save a resumable checkpoint every this many steps (0: never).")
    checkpoints_total_limit: int | None = _option(3, "Keep only the newest this many checkpoints.")
    resume_from_checkpoint: str | None = _option(None, "A checkpoint folder, or `latest` in `output_dir`.")

    # Logging and publishing
    report_to: str = _option("tensorboard", "Tracker for losses and validation: `tensorboard`, `wandb`, ... or `none`.")
    logging_steps: int = _option(10, "Send the loss terms to the tracker every this many steps.")
    log_level: str = _option("info", "Verbosity of the main process's log.", choices=list(LOG_LEVELS))
    push_to_hub: bool = _option(False, "Upload the saved pipeline to `hub_model_id` at the end.")
    hub_model_id: str | None = _option(None, "The Hub repository ('user/repo') for `push_to_hub`.")
    hub_token: str | None = _option(None, "Hub token (default: the logged-in one).")
    hub_private_repo: bool = _option(False, "Create the Hub repository as private.")
    paper_reference: dict | str | None = _option({}, "The paper's figures for this configuration (for the model card).")

    def __post_init__(self):
        for name in ("model_config", "caption_teacher_kwargs", "paper_reference"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    setattr(self, name, json.loads(value))
                except json.JSONDecodeError as error:
                    raise ValueError(f"`{name}` must be a JSON object, got {value!r}: {error}.") from None
            elif value is None:
                setattr(self, name, {})
        if isinstance(self.datasets, str):
            self.datasets = [self.datasets]
        if not (self.datasets or self.dataset_name or self.train_data_dir):
            raise ValueError(
                "No training data: give `datasets` (files or folders), `dataset_name` (a Hugging Face dataset) or "
                "`train_data_dir` (an image folder)."
            )
        checks = {
            "lr_schedule": LR_SCHEDULES,
            "on_bad_input": ("error", "skip"),
            "mixed_precision": (None, *MIXED_PRECISION),
            "log_level": LOG_LEVELS,
            "model_type": MODEL_TYPES,
            "inference_scheduler": tuple(INFERENCE_SCHEDULERS),
        }
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}, got {getattr(self, name)!r}.")
        for name in ("batch_size", "gradient_accumulation_steps", "timesteps_per_caption", "num_epochs",
                     "captions_per_image", "max_steps", "logging_steps", "distillation_teacher_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}.")
        if self.distill_from is not None and (self.model_type != "diffusion" or self.model_config):
            raise ValueError(
                "`distill_from` trains a copy of a diffusion model: it needs model_type='diffusion' and an empty "
                f"`model_config`, got model_type={self.model_type!r} and model_config={self.model_config!r}."
            )
        for name in ("draft_prob", "mask_predict_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"`{name}` must be in [0, 1], got {getattr(self, name)}.")
            if getattr(self, name) > 0 and (self.model_type != "diffusion" or self.distill_from is not None):
                raise ValueError(
                    f"`{name}` is a term of the diffusion objective: it needs model_type='diffusion' and no "
                    f"`distill_from`, got model_type={self.model_type!r} and distill_from={self.distill_from!r}."
                )
        if self.weighting_scheme == "time_warping" and (self.model_type != "diffusion" or self.mask_predict_prob > 0):
            raise ValueError(
                "`weighting_scheme='time_warping'` learns where the diffusion loss changes with t: it needs "
                f"model_type='diffusion' and no `mask_predict_prob` (its rows mix timesteps), got "
                f"model_type={self.model_type!r} and mask_predict_prob={self.mask_predict_prob}."
            )
        if self.reference_selection and (self.model_type != "diffusion" or self.distill_from is not None
                                         or self.captions_per_image == 1):
            raise ValueError(
                "`reference_selection` picks the target of the diffusion objective among several references per "
                "image: it needs model_type='diffusion', no `distill_from` and `captions_per_image` unset or above 1, "
                f"got model_type={self.model_type!r}, distill_from={self.distill_from!r} and "
                f"captions_per_image={self.captions_per_image}."
            )
        if self.caption_teacher is not None and self.captions_per_image is not None:
            raise ValueError(
                "`caption_teacher` trains on one caption per image, the teacher's: leave `captions_per_image` unset, "
                f"got {self.captions_per_image}."
            )
        if self.caption_teacher_kwargs and self.caption_teacher is None:
            raise ValueError(f"`caption_teacher_kwargs` ({self.caption_teacher_kwargs}) are read only with a "
                             "`caption_teacher`: name the teacher, or leave them out.")
        fixed_by_training = set(self.caption_teacher_kwargs) & TEACHER_ARGUMENTS_SET_BY_TRAINING
        if fixed_by_training:
            raise ValueError(f"`caption_teacher_kwargs` may not set {sorted(fixed_by_training)}: training passes the "
                             "images' features and reads the captions as text.")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("`push_to_hub` needs `hub_model_id` ('user/repo').")
        # Fails early on an unknown value; `backbone_config` only overrides keys of the text backbone's config, and a
        # restricted rounding vocabulary is read from the captions later (a placeholder stands in for it here).
        model_config = {key: value for key, value in self.model_config.items() if key != "backbone_config"}
        if self.restrict_rounding_vocabulary:
            model_config.setdefault("rounding_vocabulary", [0, 1])
        CLIPDiffusionLMConfig(**model_config)
        _ = self.timestep_sampling  # and on a bad weighting scheme or spread

    @property
    def timestep_sampling(self) -> TimestepSampling | TimeWarping:
        """The training timesteps' distribution, from `weighting_scheme` and its parameters; a new, untrained
        [`TimeWarping`] for `time_warping`."""
        if self.weighting_scheme == "time_warping":
            return TimeWarping()
        return TimestepSampling(self.weighting_scheme, self.logit_mean, self.logit_std, self.mode_scale)


def _read_config_file(path: str) -> dict[str, Any]:
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith((".yaml", ".yml")):
        import yaml

        values = yaml.safe_load(text)
    else:
        values = json.loads(text)
    if not isinstance(values, dict):
        raise ValueError(f"The config file {path} must hold an object of TrainingConfig fields.")
    values.pop("description", None)
    unknown = set(values) - {spec.name for spec in dataclasses.fields(TrainingConfig)}
    if unknown:
        raise ValueError(f"Unknown training options in {path}: {sorted(unknown)}.")
    return values


def training_config_from_args(argv: list[str] | None = None) -> TrainingConfig:
    """
    `--config FILE` (a JSON or YAML object of [`TrainingConfig`] fields) then one flag per field, flags winning.
    Lists take several values (`--datasets a b`), dicts a JSON string (`--model_config '{"fusion": "add"}'`).
    """
    parser = HfArgumentParser(TrainingConfig, prog="train", description="Train CLIP-DiffusionLM.")
    parser.add_argument("--config", help="A JSON or YAML file of the fields below (see examples/configs/).")
    known, _ = parser.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**_read_config_file(known.config))
    # The leftover namespace holds only `--config`, already applied.
    config, _ = parser.parse_args_into_dataclasses(argv, look_for_args_file=False)
    return config
