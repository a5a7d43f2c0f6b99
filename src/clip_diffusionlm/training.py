"""Training CLIP-DiffusionLM with Accelerate: cached CLIP features in, a saved captioning pipeline out.

[`train`] reads top to bottom as the run goes: make the accelerator → prepare the data and the frozen CLIP features
→ build the denoiser → build the optimiser and learning-rate schedule → the loop (one [`training_step`] per batch,
[`run_validation`] and [`save_checkpoint`] beside it) → [`save_pipeline`]. Each step is a module-level function over a
[`TrainingRun`], testable alone. The same code runs on one process, under `accelerate launch` or `torchrun` (data
parallel), and resumes exactly: a resumed run sees the same batches and the same random draws as one that was never
interrupted, and validation never shifts the training random stream. With `model_type="ar"` the same loop trains the
autoregressive baseline: what differs (the model, its loss, its pipeline and validation captions, the saved extras) is
the run's [`~clip_diffusionlm.model_families.ModelFamily`].
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import diffusers
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from datasets import Dataset, DatasetDict
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    CLIPTextModelWithProjection,
    CLIPVisionModelWithProjection,
    PreTrainedModel,
    get_constant_schedule_with_warmup,
    get_cosine_with_hard_restarts_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_polynomial_decay_schedule_with_warmup,
)
from transformers.image_processing_utils import BaseImageProcessor

from .cli_errors import InterruptedCleanly
from .data import load_datasets
from .diffusion import DiffusionLossOutput, TimestepSampling, TimeWarping
from .evaluation import score_split
from .feature_cache import CLIPFeatureCache
from .hub.model_card import write_training_record
from .hub.repository import check_hub_repo, push_folder_to_hub
from .model_families import ModelFamily, model_family
from .models.modeling_clip_captioner_ar import CaptionerLossOutput
from .pipelines import load_captioning_pipeline
from .training_args import TEACHER_ARGUMENTS_SET_BY_TRAINING, TrainingConfig, training_config_from_args

logger = get_logger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
VALIDATION_SAMPLES_LOGGED = 8  # captions per validation written to validation_samples.jsonl and the tracker
LOSS_TERMS = ("loss", "restoring_loss", "x1_restoring_loss", "rounding_loss", "rounding_weight")
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

__all__ = ["TrainingConfig", "TrainingDivergedError", "train", "training_config_from_args"]


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class EpochShuffleSampler(Sampler[int]):
    """
    A permutation per epoch drawn from `(seed, epoch)` alone, so the data order survives a resume. The training loop
    sets `epoch` itself; there is deliberately no `set_epoch`, which Accelerate would call with its own count of
    iterations (zero again after a resume).
    """

    def __init__(self, num_items: int, seed: int):
        self.num_items, self.seed, self.epoch = num_items, seed, 0

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return iter(torch.randperm(self.num_items, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_items


class CaptionFeatureDataset(torch.utils.data.Dataset):
    """(caption ids, its image's CLIP features[, its CLIP text features][, all its image's references]) per training
    caption. Features are read by row from the (possibly memory-mapped, float16) cache, so only the rows of a batch
    are touched."""

    def __init__(self, input_ids: torch.LongTensor, image_index: torch.LongTensor, image_features: torch.Tensor,
                 text_features: torch.Tensor | None = None, image_references: torch.LongTensor | None = None):
        self.input_ids, self.image_index = input_ids, image_index
        self.image_features, self.text_features = image_features, text_features
        self.image_references = image_references

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = self.image_index[index]
        item = {"input_ids": self.input_ids[index], "image_embeds": self.image_features[image]}
        if self.text_features is not None:
            item["text_embeds"] = self.text_features[index]
        if self.image_references is not None:
            item["reference_ids"] = self.image_references[image]
        return item


def references_by_image(input_ids: torch.LongTensor, image_index: torch.LongTensor) -> torch.LongTensor:
    """Every image's captions `(num_images, most_references, caption_length)` from the (caption, image) pairs; an image
    with fewer captions repeats its first (a repeat cannot change which is closest)."""
    rows_of_image: dict[int, list[int]] = {}
    for row, image in enumerate(image_index.tolist()):
        rows_of_image.setdefault(image, []).append(row)
    most = max(map(len, rows_of_image.values()))
    references = torch.empty(int(image_index.max()) + 1, most, input_ids.shape[1], dtype=input_ids.dtype)
    for image, rows in rows_of_image.items():
        references[image] = input_ids[rows + rows[:1] * (most - len(rows))]
    return references


@dataclass
class TrainingState:
    """Progress saved in every checkpoint beside the model, optimizer, scheduler and RNG states."""

    global_step: int = 0
    epoch: int = 0
    batches_done_in_epoch: int = 0
    best_metric: float | None = None
    validations_without_improvement: int = 0
    training_seconds: float = 0.0

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@dataclass
class TrainingData:
    """What [`prepare_data`] produces: the dataset, the frozen CLIP parts and the training/validation tensors."""

    dataset: DatasetDict
    image_encoder: CLIPVisionModelWithProjection
    image_processor: BaseImageProcessor
    tokenizer: Any
    denoiser: PreTrainedModel  # the AR baseline when `model_type="ar"`
    train_set: CaptionFeatureDataset
    validation_split: Dataset
    validation_features: torch.Tensor
    validation_ids: torch.LongTensor  # first reference of each validation image; unseen words as [UNK]


@dataclass
class TrainingRun:
    """The objects every step of the loop works on; [`train`] builds it once."""

    config: TrainingConfig
    accelerator: Accelerator
    data: TrainingData
    denoiser: torch.nn.Module  # prepared (e.g. DDP-wrapped)
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    dataloader: DataLoader
    sampler: EpochShuffleSampler
    noise_scheduler: DDPMScheduler | None  # None for the AR baseline
    timestep_sampling: TimestepSampling | TimeWarping  # one per run: time warping learns as the run goes
    family: ModelFamily
    ema: EMAModel | None
    state: TrainingState
    total_steps: int
    # (global step, metrics) of the latest validation, so that a run ending on a validation step is not validated twice.
    latest_validation: tuple[int, dict[str, Any]] | None = None

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def model(self) -> PreTrainedModel:
        return self.accelerator.unwrap_model(self.denoiser)


# ---------------------------------------------------------------------------------------------------------- set-up


def make_accelerator(config: TrainingConfig) -> Accelerator:
    """The run's `Accelerator`; `mixed_precision=None` lets `accelerate config` / `accelerate launch` decide."""
    output_dir = Path(config.output_dir)
    return Accelerator(
        # Accelerate only forms a multi-process CPU group (gloo) when told it runs on CPU.
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )


def configure_logging(accelerator: Accelerator, log_level: str) -> None:
    """`log_level` for this package on the main process; other processes log warnings only and silence the
    libraries (the main process keeps the verbosity its caller chose)."""
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S")
    if accelerator.is_local_main_process:
        logging.getLogger("clip_diffusionlm").setLevel(getattr(logging, log_level.upper()))
        return
    logging.getLogger("clip_diffusionlm").setLevel(logging.WARNING)
    for library in (datasets, transformers, diffusers):
        library.utils.logging.set_verbosity_error()


def weight_dtype(accelerator: Accelerator) -> torch.dtype:
    """The dtype frozen modules run in: half precision under fp16/bf16 mixed precision."""
    return WEIGHT_DTYPES.get(accelerator.mixed_precision, torch.float32)


def tokenize_captions(tokenizer, captions: list[str], caption_length: int) -> torch.LongTensor:
    """`(num_captions, caption_length)` padded ids; longer captions are truncated and counted in the log."""
    too_long = sum(len(ids) > caption_length for ids in tokenizer(captions)["input_ids"])
    if too_long:
        logger.warning("%d of %d captions are longer than %d tokens and were truncated.", too_long, len(captions),
                       caption_length)
    return tokenizer(
        captions, padding="max_length", truncation=True, max_length=caption_length, return_tensors="pt"
    ).input_ids


def caption_pairs(split: Dataset, captions_per_image: int | None = None) -> tuple[list[str], torch.LongTensor]:
    """The (image, caption) pairs of a split, the first `captions_per_image` (all if `None`) of each image: the
    captions and the row index of their image."""
    captions, image_index = [], []
    for row, image_captions in enumerate(split["captions"]):
        image_captions = image_captions[:captions_per_image]
        captions.extend(image_captions)
        image_index.extend([row] * len(image_captions))
    return captions, torch.tensor(image_index, dtype=torch.long)


@torch.inference_mode()
def teacher_captions(
    config: TrainingConfig, image_encoder: CLIPVisionModelWithProjection, model: PreTrainedModel,
    image_features: torch.Tensor, device: torch.device, batch_size: int = 256,
) -> list[str]:
    """`config.caption_teacher`'s caption of every training image, from the features cached for the student (the
    teacher must read the same CLIP, and the same kind of features), called with `config.caption_teacher_kwargs`; a
    diffusion teacher samples with `config.seed`."""
    teacher = load_captioning_pipeline(config.caption_teacher).to(device)
    teacher.set_progress_bar_config(disable=True)
    teacher_config = getattr(teacher, teacher.model_component).config
    feature_kind = (model.config.image_features, model.config.vision_feature_layer)
    same_clip = all(torch.equal(mine, theirs.to(mine)) for mine, theirs in zip(
        image_encoder.state_dict().values(), teacher.image_encoder.state_dict().values(), strict=True))
    if not same_clip or (teacher_config.image_features, teacher_config.vision_feature_layer) != feature_kind:
        raise ValueError(
            f"caption_teacher={config.caption_teacher!r} must read the run's CLIP ({config.clip_model}) and its "
            f"features {feature_kind}; it reads {'another CLIP' if not same_clip else 'other features'}."
        )
    parameters = inspect.signature(teacher.__call__).parameters
    takes_any = any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values())
    unknown = sorted(set(config.caption_teacher_kwargs) - set(parameters)) if not takes_any else []
    if unknown:
        raise ValueError(f"`caption_teacher_kwargs` names {unknown}, which {type(teacher).__name__} does not take; "
                         f"it takes {sorted(set(parameters) - TEACHER_ARGUMENTS_SET_BY_TRAINING)}.")
    options = {"generator": torch.Generator().manual_seed(config.seed)} if "generator" in parameters else {}
    options.update(config.caption_teacher_kwargs)
    return [caption for start in range(0, len(image_features), batch_size)
            for caption in teacher(image_embeds=image_features[start:start + batch_size].to(device), **options).captions]


def prepare_data(
    config: TrainingConfig, accelerator: Accelerator, dataset: DatasetDict | None = None,
    family: ModelFamily | None = None,
) -> TrainingData:
    """
    Loads the dataset (unless given), the frozen CLIP towers (on the run's device, in its weight dtype) and the
    tokenizer, builds the denoiser (its vocabulary and feature kind decide what to cache), and reads or computes the
    CLIP features: once, on the main process; the others read the cache.
    """
    if dataset is None:
        dataset = load_datasets(
            config.datasets, config.images_dirs, config.on_bad_input, dataset_name=config.dataset_name,
            dataset_config_name=config.dataset_config_name, cache_dir=config.cache_dir,
            train_data_dir=config.train_data_dir, image_column=config.image_column,
            caption_column=config.caption_column,
        )
    dtype = weight_dtype(accelerator)
    image_encoder = CLIPVisionModelWithProjection.from_pretrained(config.clip_model, use_safetensors=True)
    image_encoder.to(accelerator.device, dtype=dtype).requires_grad_(False)
    image_processor = AutoImageProcessor.from_pretrained(config.clip_model)
    tokenizer = AutoTokenizer.from_pretrained(config.text_backbone)

    train_split = dataset["train"]
    train_captions, image_index = caption_pairs(train_split, config.captions_per_image)
    rounding_vocabulary = None
    if config.restrict_rounding_vocabulary:
        words = {token for ids in tokenizer(train_captions)["input_ids"] for token in ids}
        rounding_vocabulary = sorted(words | set(tokenizer.all_special_ids))
    denoiser = (family or model_family(config)).build(config, image_encoder, rounding_vocabulary)
    model_config = denoiser.config

    text_encoder = text_tokenizer = None
    if getattr(model_config, "use_text_condition", False):
        text_encoder = CLIPTextModelWithProjection.from_pretrained(config.clip_model, use_safetensors=True)
        text_encoder.to(accelerator.device, dtype=dtype).requires_grad_(False)
        text_tokenizer = AutoTokenizer.from_pretrained(config.clip_model)
    cache = CLIPFeatureCache(
        config.feature_cache_dir or Path(config.output_dir) / "feature_cache", image_encoder, image_processor,
        text_encoder, text_tokenizer, show_progress=config.log_level in ("debug", "info"), accelerator=accelerator,
    )
    validation_split = dataset["validation"].select(range(min(config.validation_images, len(dataset["validation"]))))
    # Every process encodes its share of the missing shards, then all read the whole cache (a barrier in between).
    feature_kind = (model_config.image_features, model_config.vision_feature_layer)
    train_features = cache.image_features(train_split, *feature_kind)
    validation_features = cache.image_features(validation_split, *feature_kind)
    reference_captions, reference_index = train_captions, image_index
    if config.caption_teacher is not None:
        train_captions = teacher_captions(config, image_encoder, denoiser, train_features, accelerator.device)
        image_index = torch.arange(len(train_captions))
        # Under reference selection the teacher's caption joins each image's references: the model may keep to the
        # teacher's or settle on a reference it leans to (diverse distillation with reference selection).
        reference_captions = train_captions + reference_captions
        reference_index = torch.cat([image_index, reference_index])
    text_features = cache.text_features(train_captions) if text_encoder is not None else None

    input_ids = tokenize_captions(tokenizer, train_captions, model_config.caption_length)
    if config.caption_teacher is not None and (denoiser.rounding_targets(input_ids) < 0).any():
        raise ValueError(
            f"caption_teacher={config.caption_teacher!r} writes words that no reference uses, outside the restricted "
            "rounding vocabulary: train without `restrict_rounding_vocabulary`."
        )
    image_references = None
    if config.reference_selection:
        reference_ids = tokenize_captions(tokenizer, reference_captions, model_config.caption_length)
        image_references = references_by_image(reference_ids, reference_index)
    validation_ids = tokenize_captions(
        tokenizer, [captions[0] for captions in validation_split["captions"]], model_config.caption_length
    )
    # Words never seen in training count as [UNK].
    validation_ids = torch.where(denoiser.rounding_targets(validation_ids) < 0, tokenizer.unk_token_id, validation_ids)
    return TrainingData(
        dataset=dataset,
        image_encoder=image_encoder,
        image_processor=image_processor,
        tokenizer=tokenizer,
        denoiser=denoiser,
        train_set=CaptionFeatureDataset(input_ids, image_index, train_features, text_features, image_references),
        validation_split=validation_split,
        validation_features=validation_features,
        validation_ids=validation_ids,
    )


def log_decay_lambda(progress_floor: float, warmup_steps: int, total_steps: int):
    """The paper's "log" schedule (no library has it): steep at first, flat near the end, from 1 to `progress_floor`,
    after a linear warm-up. A module-level function of the step so that the scheduler's state can be saved."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return progress_floor + (1.0 - progress_floor) * (1.0 - math.log1p((math.e - 1.0) * progress))

    return factor


def build_optimizer_and_schedule(
    config: TrainingConfig, denoiser: torch.nn.Module, total_steps: int, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over the trainable parameters and the learning-rate schedule, from transformers' schedules but "log"."""
    optimizer = torch.optim.AdamW(
        [p for p in denoiser.parameters() if p.requires_grad], lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon, weight_decay=config.weight_decay,
    )
    warmup = config.warmup_steps
    if config.lr_schedule == "constant":
        return optimizer, get_constant_schedule_with_warmup(optimizer, warmup)
    if config.lr_schedule == "linear":
        return optimizer, get_polynomial_decay_schedule_with_warmup(
            optimizer, warmup, total_steps, lr_end=config.lr_end, power=1.0
        )
    if config.lr_schedule == "cosine":
        return optimizer, get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, warmup, total_steps, min_lr=config.lr_end
        )
    if config.lr_schedule == "cosine_restarts":
        cycles = max(1, round(total_steps / max(1, config.lr_restart_epochs * steps_per_epoch)))
        return optimizer, get_cosine_with_hard_restarts_schedule_with_warmup(optimizer, warmup, total_steps, cycles)
    floor = config.lr_end / config.learning_rate
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, log_decay_lambda(floor, warmup, total_steps))


# ------------------------------------------------------------------------------------------- the steps of the loop


@contextlib.contextmanager
def forked_rng(accelerator: Accelerator, seed: int) -> Iterator[None]:
    """Seeded random draws for validation that leave the training stream untouched on the CPU and the run's GPU."""
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        if devices:
            torch.cuda.manual_seed(seed)  # this device only; `torch.manual_seed` would re-seed all of them
        yield


def any_process(accelerator: Accelerator, *flags: bool) -> list[bool]:
    """Whether each flag is set on any process (one collective for all of them)."""
    summed = accelerator.reduce(torch.tensor([float(flag) for flag in flags], device=accelerator.device), "sum")
    return [value > 0 for value in summed.tolist()]


def training_step(
    run: TrainingRun, batch: dict[str, torch.Tensor], stop_requested: bool
) -> tuple[DiffusionLossOutput | CaptionerLossOutput, bool]:
    """
    One forward/backward pass (and an optimizer step once gradients are accumulated). Raises
    [`TrainingDivergedError`] before touching the weights when the loss is not finite on any process; returns the loss
    terms and whether any process was asked to stop.
    """
    accelerator, denoiser = run.accelerator, run.denoiser
    dtype = run.model.dtype
    text_embeds = batch.get("text_embeds")
    with accelerator.accumulate(denoiser):
        output = run.family.loss(
            run, denoiser, batch["input_ids"], batch["image_embeds"].to(dtype),
            None if text_embeds is None else text_embeds.to(dtype), batch.get("reference_ids"),
        )
        diverged, stop_requested = any_process(accelerator, not torch.isfinite(output.loss).item(), stop_requested)
        if diverged:
            raise TrainingDivergedError(
                f"The loss became {output.loss.item()} at step {run.state.global_step + 1}; stopping. The last good "
                f"checkpoint is kept in {run.output_dir} (lower the learning rate or enable gradient clipping, then "
                "resume with --resume_from_checkpoint latest)."
            )
        accelerator.backward(output.loss)
        if accelerator.sync_gradients and run.config.max_grad_norm:
            accelerator.clip_grad_norm_(denoiser.parameters(), run.config.max_grad_norm)
        run.optimizer.step()
        if accelerator.sync_gradients:
            run.lr_scheduler.step()
        run.optimizer.zero_grad()
    return output, stop_requested


def log_step(
    run: TrainingRun, output: DiffusionLossOutput | CaptionerLossOutput, start_time: float, progress: tqdm
) -> None:
    """Averages the loss terms over processes, appends them to `loss_history.jsonl` and sends them to the tracker."""
    names = [name for name in LOSS_TERMS if getattr(output, name, None) is not None]  # the AR loss has one term
    stacked = torch.stack([getattr(output, name).detach().float() for name in names])
    terms = dict(zip(names, run.accelerator.reduce(stacked, "mean").tolist()))
    terms["lr"] = run.lr_scheduler.get_last_lr()[0]
    terms["seconds"] = round(time.monotonic() - start_time, 3)
    progress.update(1)
    progress.set_postfix({name: f"{terms[name]:.4f}" for name in ("loss", "rounding_loss") if name in terms})
    if run.accelerator.is_main_process:
        with (run.output_dir / "loss_history.jsonl").open("a") as history:
            history.write(json.dumps({"step": run.state.global_step, **terms}) + "\n")
        if run.state.global_step % run.config.logging_steps == 0:
            run.accelerator.log(terms, step=run.state.global_step)


@contextlib.contextmanager
def ema_weights(run: TrainingRun) -> Iterator[None]:
    """The EMA weights in the model for the duration (when EMA is on), the training weights restored after."""
    if run.ema is None:
        yield
        return
    run.ema.store(run.model.parameters())
    run.ema.copy_to(run.model.parameters())
    try:
        yield
    finally:
        run.ema.restore(run.model.parameters())


def run_validation(run: TrainingRun) -> dict[str, Any]:
    """Validation loss, sampled captions and the caption metric, on the main process with EMA weights; writes the
    first captions to `validation_samples.jsonl` and the tracker."""
    model, device, split = run.model, run.accelerator.device, run.data.validation_split
    features = run.data.validation_features
    model.eval()
    with ema_weights(run), forked_rng(run.accelerator, run.config.seed), torch.no_grad():
        ids = run.data.validation_ids.to(device)
        loss = run.family.loss(run, model, ids, features.to(device, model.dtype)).loss
        captions = run.family.validation_captions(run, features)
    model.train()
    metrics = {"validation_loss": loss.item(), **score_split(captions, split)}
    samples = [
        {"step": run.state.global_step, "image_id": image_id, "caption": generated[0], "reference": references[0]}
        for image_id, generated, references in zip(split["image_id"], captions, split["captions"])
    ][:VALIDATION_SAMPLES_LOGGED]
    with (run.output_dir / "validation_samples.jsonl").open("a") as file:
        file.writelines(json.dumps(sample) + "\n" for sample in samples)
    run.accelerator.log(
        {f"validation/{key}": value for key, value in metrics.items() if isinstance(value, (int, float))},
        step=run.state.global_step,
    )
    if run.config.report_to == "tensorboard":
        table = "\n".join(f"| {s['image_id']} | {s['caption']} | {s['reference']} |" for s in samples)
        run.accelerator.get_tracker("tensorboard").writer.add_text(
            "validation/captions", "| image | generated | reference |\n|---|---|---|\n" + table, run.state.global_step
        )
    logger.info("step %d validation: %s", run.state.global_step, metrics)
    run.latest_validation = (run.state.global_step, metrics)
    return metrics


def validate_and_decide_stop(run: TrainingRun) -> bool:
    """Runs validation on the main process and tells every process whether early stopping triggered."""
    stop = False
    if run.accelerator.is_main_process:
        value = run_validation(run).get(run.config.early_stopping_metric)
        state = run.state
        if value is not None:
            if state.best_metric is None or value > state.best_metric:
                state.best_metric, state.validations_without_improvement = value, 0
            else:
                state.validations_without_improvement += 1
            patience = run.config.early_stopping_patience
            stop = patience is not None and state.validations_without_improvement >= patience
    return any_process(run.accelerator, stop)[0]


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (temporary folders of an interrupted write are never listed)."""
    found = [path for path in output_dir.glob(f"{CHECKPOINT_PREFIX}*") if path.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda path: int(path.name[len(CHECKPOINT_PREFIX):]))


def save_checkpoint(run: TrainingRun) -> None:
    """
    Writes to a temporary folder, then renames: a kill mid-write never damages an existing checkpoint, and "latest"
    never picks a half-written one (why Accelerate's automatic checkpoint naming, which writes in place, is not used).
    Keeps the newest `checkpoints_total_limit`.
    """
    accelerator, output_dir = run.accelerator, run.output_dir
    final = output_dir / f"{CHECKPOINT_PREFIX}{run.state.global_step}"
    temporary = output_dir / f".tmp-{CHECKPOINT_PREFIX}{run.state.global_step}"
    if accelerator.is_main_process and temporary.exists():
        shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        if run.config.checkpoints_total_limit is not None:
            for old in list_checkpoints(output_dir)[: -run.config.checkpoints_total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


def resume_if_asked(run: TrainingRun) -> None:
    """Loads `resume_from_checkpoint` (a folder or "latest") and trims the loss history to it; a fresh run starts a
    fresh history."""
    config, history = run.config, run.output_dir / "loss_history.jsonl"
    checkpoint = None
    if config.resume_from_checkpoint == "latest":
        found = list_checkpoints(run.output_dir)
        checkpoint = found[-1] if found else None
    elif config.resume_from_checkpoint is not None:
        checkpoint = Path(config.resume_from_checkpoint)
        if not checkpoint.is_dir():
            raise FileNotFoundError(f"`resume_from_checkpoint` {str(checkpoint)!r} is not a checkpoint directory.")
    if checkpoint is not None:
        run.accelerator.load_state(str(checkpoint))
        logger.info("Resumed from %s at step %d.", checkpoint, run.state.global_step)
    if not run.accelerator.is_main_process or not history.exists():
        return
    if checkpoint is None:
        history.unlink()
        return
    kept = [line for line in history.read_text().splitlines() if line and json.loads(line)["step"] <= run.state.global_step]
    temporary = history.with_suffix(".tmp")
    temporary.write_text("".join(line + "\n" for line in kept))
    os.replace(temporary, history)


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the next step boundary and exits cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def tracker_hyperparameters(config: TrainingConfig) -> dict[str, int | float | str | bool]:
    """Every field, flattened to the scalar types trackers accept (`model_config.fusion`, lists as text, ...)."""
    flat: dict[str, Any] = {}
    for name, value in dataclasses.asdict(config).items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for key, item in items:
            label = name if key is None else f"{name}.{key}"
            flat[label] = item if isinstance(item, (int, float, str, bool)) else json.dumps(item)
    return flat


def save_pipeline(run: TrainingRun, metrics: dict[str, Any]) -> None:
    """The final pipeline (EMA weights when EMA is on) as safetensors with its model card; pushed when asked."""
    if run.ema is not None:
        run.ema.copy_to(run.model.parameters())
    run.model.eval()  # the card's examples are captioned as a user would caption them: no dropout
    pipe = run.family.pipeline(run)
    pipe.save_pretrained(run.output_dir)
    write_training_record(
        run.output_dir, run.config, run.model, metrics, run.state, run.data.dataset, len(run.data.train_set),
        run.accelerator.num_processes,
    )
    run.family.write_extras(run, pipe)
    if run.config.push_to_hub:
        push_folder_to_hub(
            run.output_dir,
            run.config.hub_model_id,
            token=run.config.hub_token,
            private=run.config.hub_private_repo,
            commit_message=f"Training run: {run.state.global_step} steps",
        )


# ----------------------------------------------------------------------------------------------------- the run


def build_run(config: TrainingConfig, dataset: DatasetDict | None = None) -> TrainingRun:
    """Everything the loop works on: the accelerator, data and features, model, optimiser, schedule and EMA, prepared
    by Accelerate and registered for checkpointing; resumed from a checkpoint when asked."""
    accelerator = make_accelerator(config)
    configure_logging(accelerator, config.log_level)
    if config.push_to_hub and accelerator.is_main_process:
        # A bad token or repository id fails here, in seconds, instead of after training.
        config.hub_model_id = check_hub_repo(
            config.hub_model_id, token=config.hub_token, private=config.hub_private_repo
        )
    set_seed(config.seed, device_specific=True)
    # Bad data fails inside `prepare_data`, before anything but the feature cache is written.
    family = model_family(config)
    data = prepare_data(config, accelerator, dataset, family)
    if accelerator.is_main_process:
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(config.output_dir) / "training_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
    sampler = EpochShuffleSampler(len(data.train_set), config.seed)
    # A private generator: creating a DataLoader iterator draws a seed from it, and drawing from the global RNG
    # instead would shift every random draw after a resume.
    dataloader = DataLoader(
        data.train_set, batch_size=config.batch_size, sampler=sampler, num_workers=config.dataloader_num_workers,
        generator=torch.Generator().manual_seed(config.seed),
    )
    batches_per_process = math.ceil(len(data.train_set) / (config.batch_size * accelerator.num_processes))
    steps_per_epoch = math.ceil(batches_per_process / config.gradient_accumulation_steps)
    total_steps = config.max_steps or steps_per_epoch * config.num_epochs
    optimizer, lr_scheduler = build_optimizer_and_schedule(config, data.denoiser, total_steps, steps_per_epoch)
    # The LR scheduler stays outside `prepare`: Accelerate would step it once per process, and it counts optimizer
    # updates.
    denoiser, optimizer, dataloader = accelerator.prepare(data.denoiser, optimizer, dataloader)
    ema = None
    if config.ema_decay is not None:
        ema = EMAModel(accelerator.unwrap_model(denoiser).parameters(), decay=config.ema_decay)
    run = TrainingRun(
        config=config, accelerator=accelerator, data=data, denoiser=denoiser, optimizer=optimizer,
        lr_scheduler=lr_scheduler, dataloader=dataloader, sampler=sampler, ema=ema, state=TrainingState(),
        noise_scheduler=family.noise_scheduler(data.denoiser), family=family,
        timestep_sampling=config.timestep_sampling, total_steps=total_steps,
    )
    timestep_density = run.timestep_sampling if isinstance(run.timestep_sampling, TimeWarping) else None
    for stateful in (lr_scheduler, ema, run.state, timestep_density):
        if stateful is not None:
            accelerator.register_for_checkpointing(stateful)
    resume_if_asked(run)
    return run


def run_loop(run: TrainingRun) -> str | None:
    """Steps until `total_steps`, early stopping or an interrupt, validating and checkpointing on schedule; returns
    why it stopped early (`"early stopping"`, `"interrupted"`) or `None`."""
    config, accelerator, state = run.config, run.accelerator, run.state
    start_time = time.monotonic() - state.training_seconds
    progress = tqdm(total=run.total_steps, initial=state.global_step, disable=not accelerator.is_local_main_process,
                    desc="training")
    run.denoiser.train()
    stop_reason = None
    with StopRequest() as stop_request:
        while stop_reason is None and state.global_step < run.total_steps:
            run.sampler.epoch = state.epoch
            batches = run.dataloader
            if state.batches_done_in_epoch:
                batches = accelerator.skip_first_batches(run.dataloader, state.batches_done_in_epoch)
            for batch in batches:
                output, stop_requested = training_step(run, batch, stop_request.requested)
                state.batches_done_in_epoch += 1
                if not accelerator.sync_gradients:
                    continue
                state.global_step += 1
                if run.ema is not None:
                    run.ema.step(run.model.parameters())
                log_step(run, output, start_time, progress)

                if config.validation_steps and state.global_step % config.validation_steps == 0:
                    stop_reason = "early stopping" if validate_and_decide_stop(run) else None
                if stop_requested:
                    stop_reason = "interrupted"
                if stop_reason == "interrupted" or (
                    config.checkpointing_steps and state.global_step % config.checkpointing_steps == 0
                ):
                    state.training_seconds = time.monotonic() - start_time
                    save_checkpoint(run)
                if stop_reason is not None or state.global_step >= run.total_steps:
                    break
            else:
                state.epoch += 1
                state.batches_done_in_epoch = 0
    progress.close()
    state.training_seconds = time.monotonic() - start_time
    return stop_reason


def train(config: TrainingConfig, dataset: DatasetDict | None = None) -> Path:
    """
    Trains a denoiser (or the AR baseline) on cached CLIP features and saves its pipeline (safetensors) with a model
    card in `config.output_dir`. Returns that directory.

    Args:
        config (`TrainingConfig`):
            The run: data sources, model, optimisation, validation, checkpointing, Hub.
        dataset (`datasets.DatasetDict`, *optional*):
            The caption dataset already loaded, in the package's schema (what `clip_diffusionlm.data.load_datasets`
            returns); `config`'s data sources are then not read again. Loading a folder of 8,900 images takes
            `datasets` about 10 s, which the demo saves this way.

    Raises:
        [`~clip_diffusionlm.cli_errors.InterruptedCleanly`]: after SIGINT or SIGTERM, once the checkpoint to resume
            from is saved (the command line then exits 0); the pipeline is not saved.
    """
    run = build_run(config, dataset)
    if run.accelerator.is_main_process:
        run.accelerator.init_trackers("clip_diffusionlm", config=tracker_hyperparameters(config))
    stop_reason = run_loop(run)
    if stop_reason != "interrupted" and run.accelerator.is_main_process:
        metrics = {}
        if run.latest_validation is not None and run.latest_validation[0] == run.state.global_step:
            metrics = run.latest_validation[1]
        elif len(run.data.validation_split):
            metrics = run_validation(run)
        save_pipeline(run, metrics)
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    if stop_reason == "interrupted":
        raise InterruptedCleanly(
            f"checkpoint saved in {run.output_dir} at step {run.state.global_step}; resume with "
            "--resume_from_checkpoint latest."
        )
    return run.output_dir
