"""Training CLIP-DiffusionLM with Accelerate: cached CLIP features in, a saved captioning pipeline out.

One function, [`train`], driven by one dataclass, [`TrainingConfig`]. It runs the same on one process, under
`accelerate launch` or `torchrun` (data parallel), and resumes exactly: a resumed run sees the same batches and the
same random draws as one that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from datasets import Dataset
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader, Sampler, TensorDataset
from tqdm.auto import tqdm
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

from .configuration_clip_diffusionlm import CLIPDiffusionLMConfig
from .data import load_datasets
from .diffusion import diffusion_loss, make_noise_scheduler
from .evaluation import caption_embeddings, score_split
from .feature_cache import CLIPFeatureCache
from .hub import write_model_card
from .modeling_clip_diffusionlm import CLIPDiffusionLMModel
from .pipeline_clip_diffusion_caption import CLIPDiffusionCaptionPipeline

logger = logging.getLogger("clip_diffusionlm.training")

LR_SCHEDULES = ("constant", "linear", "log", "cosine", "cosine_restarts")
CHECKPOINT_PREFIX = "checkpoint-"
VALIDATION_SAMPLES_LOGGED = 8  # captions per validation written to validation_samples.jsonl
LOSS_TERMS = ("loss", "restoring_loss", "x1_restoring_loss", "rounding_loss", "rounding_weight")


@dataclass
class TrainingConfig:
    """
    Everything a training run needs. Every field is also a `--flag` of `examples/train.py`; a JSON file of fields
    (see `examples/configs/`) gives defaults that flags override.

    Data: `datasets` (paths in any format of `clip_diffusionlm.data`, combined split-wise; a shapes world folder
    works too), `images_dirs` (one for all datasets or one each), `on_bad_input` ("error" stops before training and lists offending files, "skip" drops
    them and logs counts), `feature_cache_dir`, `captions_per_image` (train on only the first k references of each
    image, e.g. 1 for the shapes world's canonical caption; evaluation always uses them all).
    Models: `clip_model` (a CLIP checkpoint; its image tower is frozen), `text_backbone` (a BERT-family encoder for
    word embeddings, tokenizer and initial layers), `init_backbone_weights` (False keeps only the embeddings
    pretrained, as the original code did), `text_backbone_layers` (keep only the first k layers),
    `restrict_rounding_vocabulary` (round only to tokens of the training captions; a closed-domain speed-up),
    `model_config` (any `CLIPDiffusionLMConfig` argument).
    Optimisation: AdamW at `learning_rate`; `lr_schedule` one of constant, linear (to `lr_end`), log (fast then
    slow decay to `lr_end`), cosine (to `lr_end`), cosine_restarts (every `lr_restart_epochs` epochs); linear
    `warmup_steps`; `timesteps_per_caption` independent `t` per caption per step (the paper samples 100 of 1000).
    """

    output_dir: str = "outputs/clip-diffusionlm"
    datasets: list[str] = field(default_factory=list)
    images_dirs: list[str] = field(default_factory=list)
    on_bad_input: str = "error"
    feature_cache_dir: str | None = None
    captions_per_image: int | None = None

    clip_model: str = "openai/clip-vit-base-patch32"
    text_backbone: str = "distilbert-base-uncased"
    init_backbone_weights: bool = True
    text_backbone_layers: int | None = None
    restrict_rounding_vocabulary: bool = False
    model_config: dict[str, Any] = field(default_factory=dict)

    seed: int = 0
    num_epochs: int = 15
    max_steps: int | None = None
    batch_size: int = 64
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    lr_schedule: str = "constant"
    lr_end: float = 5e-5
    lr_restart_epochs: int = 5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    timesteps_per_caption: int = 1
    mixed_precision: str = "no"
    ema_decay: float | None = None

    validation_steps: int = 500
    validation_images: int = 256
    validation_inference_steps: int = 5
    validation_guidance_scale: float = 1.0
    early_stopping_metric: str = "CIDEr"
    early_stopping_patience: int | None = None

    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = 3
    resume_from_checkpoint: str | None = None

    report_to: str = "tensorboard"
    logging_steps: int = 10
    push_to_hub: bool = False
    hub_model_id: str | None = None
    paper_reference: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.datasets, str):
            self.datasets = [self.datasets]
        if not self.datasets:
            raise ValueError("`datasets` is empty; give at least one dataset path (or a shapes world folder).")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"`lr_schedule` must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}.")
        if self.on_bad_input not in ("error", "skip"):
            raise ValueError(f"`on_bad_input` must be 'error' or 'skip', got {self.on_bad_input!r}.")
        for name in ("batch_size", "gradient_accumulation_steps", "timesteps_per_caption", "num_epochs",
                     "captions_per_image"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}.")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("`push_to_hub` needs `hub_model_id` ('user/repo').")
        CLIPDiffusionLMConfig(**self.model_config)  # fails early on an unknown value


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


def lr_factor(config: TrainingConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Multiplier of `learning_rate` at an optimizer step, for the paper's five schedules plus linear warm-up."""
    warmup = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    floor = config.lr_end / config.learning_rate
    progress = min(1.0, step / max(1, total_steps))
    if config.lr_schedule == "constant":
        shape = 1.0
    elif config.lr_schedule == "linear":
        shape = 1.0 - progress
    elif config.lr_schedule == "log":
        shape = 1.0 - math.log1p((math.e - 1.0) * progress)  # steep at first, flat near the end
    elif config.lr_schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        cycle = max(1, config.lr_restart_epochs * steps_per_epoch)
        shape = 0.5 * (1.0 + math.cos(math.pi * (step % cycle) / cycle))
    if config.lr_schedule != "constant":
        shape = floor + (1.0 - floor) * shape
    return warmup * shape


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


def _checkpoints(output_dir: Path) -> list[Path]:
    found = [path for path in output_dir.glob(f"{CHECKPOINT_PREFIX}*") if path.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda path: int(path.name[len(CHECKPOINT_PREFIX):]))


def _resolve_checkpoint(config: TrainingConfig, output_dir: Path) -> Path | None:
    if config.resume_from_checkpoint is None:
        return None
    if config.resume_from_checkpoint == "latest":
        found = _checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(config.resume_from_checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"`resume_from_checkpoint` {str(path)!r} is not a checkpoint directory.")
    return path


def _truncate_history(path: Path, last_step: int) -> None:
    """Drops loss records after the checkpoint being resumed, so the history stays one consistent curve."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
    temporary = path.with_suffix(".tmp")
    temporary.write_text("".join(line + "\n" for line in kept))
    os.replace(temporary, path)


class _StopRequest:
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


def build_denoiser(
    config: TrainingConfig, image_encoder: CLIPVisionModelWithProjection, rounding_vocabulary: list[int] | None = None
) -> CLIPDiffusionLMModel:
    model_kwargs = {
        "condition_dim": image_encoder.config.projection_dim,
        "patch_dim": image_encoder.config.hidden_size,
        "rounding_vocabulary": rounding_vocabulary,
        **config.model_config,
    }
    pretrained = CLIPDiffusionLMModel.from_text_backbone(
        config.text_backbone, num_backbone_layers=config.text_backbone_layers, **model_kwargs
    )
    if config.init_backbone_weights:
        return pretrained
    # The original code's set-up: pretrained (frozen) word embeddings, randomly initialised transformer layers.
    model = CLIPDiffusionLMModel(pretrained.config)
    model.get_input_embeddings().weight.data.copy_(pretrained.get_input_embeddings().weight)
    return model


def train(config: TrainingConfig) -> Path:
    """
    Trains a denoiser on cached CLIP features and saves a [`CLIPDiffusionCaptionPipeline`] (safetensors) with a model
    card in `config.output_dir`. Returns that directory.
    """
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        # Accelerate only forms a multi-process CPU group (gloo) when told it runs on CPU.
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    set_seed(config.seed, device_specific=True)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "training_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))

    # Data and frozen CLIP features: computed once by the main process, read from the cache by the others.
    dataset = load_datasets(config.datasets, config.images_dirs, config.on_bad_input)
    image_encoder = CLIPVisionModelWithProjection.from_pretrained(config.clip_model, use_safetensors=True)
    image_processor = CLIPImageProcessor.from_pretrained(config.clip_model)
    model_config = CLIPDiffusionLMConfig(**config.model_config)
    text_encoder = text_tokenizer = None
    if model_config.use_text_condition:
        text_encoder = CLIPTextModelWithProjection.from_pretrained(config.clip_model, use_safetensors=True)
        text_tokenizer = AutoTokenizer.from_pretrained(config.clip_model)
    cache = CLIPFeatureCache(
        config.feature_cache_dir or output_dir / "feature_cache", image_encoder, image_processor, text_encoder,
        text_tokenizer,
    )
    train_split = dataset["train"]
    validation_split = dataset["validation"].select(range(min(config.validation_images, len(dataset["validation"]))))
    train_captions, train_image_index = caption_pairs(train_split, config.captions_per_image)
    with accelerator.main_process_first():
        train_image_embeds = cache.image_features(train_split["image_path"], model_config.image_features)
        validation_image_embeds = cache.image_features(validation_split["image_path"], model_config.image_features)
        train_text_embeds = cache.text_features(train_captions) if text_encoder is not None else None

    tokenizer = AutoTokenizer.from_pretrained(config.text_backbone)
    caption_length = model_config.caption_length
    train_ids = tokenize_captions(tokenizer, train_captions, caption_length)
    rounding_vocabulary = None
    if config.restrict_rounding_vocabulary:
        rounding_vocabulary = sorted(set(train_ids.unique().tolist()) | set(tokenizer.all_special_ids))
    denoiser = build_denoiser(config, image_encoder, rounding_vocabulary)
    tensors = [train_ids, train_image_index] + ([train_text_embeds] if train_text_embeds is not None else [])
    sampler = EpochShuffleSampler(len(train_ids), config.seed)
    # A private generator: creating a DataLoader iterator draws a seed from it, and drawing from the global RNG
    # instead would shift every random draw after a resume.
    dataloader = DataLoader(
        TensorDataset(*tensors), batch_size=config.batch_size, sampler=sampler,
        generator=torch.Generator().manual_seed(config.seed),
    )

    optimizer = torch.optim.AdamW(
        [p for p in denoiser.parameters() if p.requires_grad], lr=config.learning_rate,
        weight_decay=config.weight_decay,
    )
    steps_per_epoch = math.ceil(
        math.ceil(len(train_ids) / (config.batch_size * accelerator.num_processes)) / config.gradient_accumulation_steps
    )
    total_steps = config.max_steps or steps_per_epoch * config.num_epochs
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(config, step, total_steps, steps_per_epoch)
    )
    # The LR scheduler stays outside `prepare`: Accelerate would step it once per process, and `lr_factor` counts
    # optimizer updates.
    denoiser, optimizer, dataloader = accelerator.prepare(denoiser, optimizer, dataloader)
    accelerator.register_for_checkpointing(lr_scheduler)
    noise_scheduler = make_noise_scheduler(accelerator.unwrap_model(denoiser).config, DDPMScheduler)
    ema = None
    if config.ema_decay is not None:
        ema = EMAModel(accelerator.unwrap_model(denoiser).parameters(), decay=config.ema_decay)
        accelerator.register_for_checkpointing(ema)
    state = TrainingState()
    accelerator.register_for_checkpointing(state)

    history_path = output_dir / "loss_history.jsonl"
    checkpoint = _resolve_checkpoint(config, output_dir)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        if accelerator.is_main_process:
            _truncate_history(history_path, state.global_step)
        logger.info("Resumed from %s at step %d.", checkpoint, state.global_step)
    elif accelerator.is_main_process and history_path.exists():
        history_path.unlink()

    train_image_embeds = train_image_embeds.to(accelerator.device)
    if accelerator.is_main_process:
        accelerator.init_trackers("clip_diffusionlm", config={"lr_schedule": config.lr_schedule})

    def pipeline_for_validation() -> CLIPDiffusionCaptionPipeline:
        pipe = CLIPDiffusionCaptionPipeline(
            denoiser=accelerator.unwrap_model(denoiser),
            scheduler=make_noise_scheduler(accelerator.unwrap_model(denoiser).config),
            image_encoder=image_encoder,
            image_processor=image_processor,
            tokenizer=tokenizer,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def save_checkpoint() -> None:
        """Writes to a temporary folder, then renames: a kill mid-write never damages an existing checkpoint."""
        final = output_dir / f"{CHECKPOINT_PREFIX}{state.global_step}"
        temporary = output_dir / f".tmp-{CHECKPOINT_PREFIX}{state.global_step}"
        if accelerator.is_main_process and temporary.exists():
            shutil.rmtree(temporary)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(temporary))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            os.replace(temporary, final)
            if config.checkpoints_total_limit is not None:
                for old in _checkpoints(output_dir)[: -config.checkpoints_total_limit]:
                    shutil.rmtree(old)
        accelerator.wait_for_everyone()

    def validate() -> dict[str, float]:
        """Validation loss, sampled captions and the caption metric, on the main process with EMA weights."""
        model = accelerator.unwrap_model(denoiser)
        if ema is not None:
            ema.store(model.parameters())
            ema.copy_to(model.parameters())
        model.eval()
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(config.seed)
            ids = tokenize_captions(tokenizer, [c[0] for c in validation_split["captions"]],
                                    model.config.caption_length).to(accelerator.device)
            # Words never seen in training count as [UNK].
            ids = torch.where(model.rounding_targets(ids) < 0, tokenizer.unk_token_id, ids)
            loss = diffusion_loss(model, noise_scheduler, ids, validation_image_embeds.to(accelerator.device)).loss
            captions = caption_embeddings(
                pipeline_for_validation(), validation_image_embeds, config.validation_inference_steps,
                config.validation_guidance_scale,
            )
        metrics = {"validation_loss": loss.item(), **score_split(captions, validation_split)}
        with (output_dir / "validation_samples.jsonl").open("a") as samples:
            for image_id, generated, references in list(
                zip(validation_split["image_id"], captions, validation_split["captions"])
            )[:VALIDATION_SAMPLES_LOGGED]:
                record = {"step": state.global_step, "image_id": image_id, "caption": generated[0],
                          "reference": references[0]}
                samples.write(json.dumps(record) + "\n")
        if ema is not None:
            ema.restore(model.parameters())
        model.train()
        return metrics

    start_time = time.monotonic() - state.training_seconds
    progress = tqdm(total=total_steps, initial=state.global_step, disable=not accelerator.is_local_main_process,
                    desc="training")
    denoiser.train()
    stop_reason = None
    with _StopRequest() as stop_request:
        while stop_reason is None and state.global_step < total_steps:
            sampler.epoch = state.epoch
            batches = dataloader
            if state.batches_done_in_epoch:
                batches = accelerator.skip_first_batches(dataloader, state.batches_done_in_epoch)
            for batch in batches:
                input_ids, image_index = batch[0], batch[1]
                text_embeds = batch[2] if len(batch) > 2 else None
                with accelerator.accumulate(denoiser):
                    output = diffusion_loss(
                        denoiser, noise_scheduler, input_ids, train_image_embeds[image_index], text_embeds,
                        timesteps_per_caption=config.timesteps_per_caption,
                    )
                    flags = torch.tensor(
                        [float(not torch.isfinite(output.loss)), float(stop_request.requested)],
                        device=accelerator.device,
                    )
                    flags = accelerator.reduce(flags, reduction="sum")
                    if flags[0] > 0:
                        raise TrainingDivergedError(
                            f"The loss became {output.loss.item()} at step {state.global_step + 1}; stopping. The "
                            f"last good checkpoint is kept in {output_dir} (lower the learning rate or enable "
                            "gradient clipping, then resume with --resume_from_checkpoint latest)."
                        )
                    accelerator.backward(output.loss)
                    if accelerator.sync_gradients and config.max_grad_norm:
                        accelerator.clip_grad_norm_(denoiser.parameters(), config.max_grad_norm)
                    optimizer.step()
                    if accelerator.sync_gradients:
                        lr_scheduler.step()
                    optimizer.zero_grad()
                state.batches_done_in_epoch += 1
                if not accelerator.sync_gradients:
                    continue

                state.global_step += 1
                if ema is not None:
                    ema.step(accelerator.unwrap_model(denoiser).parameters())
                progress.update(1)
                # One collective for all terms instead of one per term.
                stacked = torch.stack([getattr(output, name).detach().float() for name in LOSS_TERMS])
                terms = dict(zip(LOSS_TERMS, accelerator.reduce(stacked, "mean").tolist()))
                terms["lr"] = lr_scheduler.get_last_lr()[0]
                terms["seconds"] = round(time.monotonic() - start_time, 3)
                progress.set_postfix(loss=f"{terms['loss']:.4f}", rounding=f"{terms['rounding_loss']:.3f}")
                if accelerator.is_main_process:
                    with history_path.open("a") as history:
                        history.write(json.dumps({"step": state.global_step, **terms}) + "\n")
                    if state.global_step % config.logging_steps == 0:
                        accelerator.log(terms, step=state.global_step)

                if config.validation_steps and state.global_step % config.validation_steps == 0:
                    stop_reason = _validate_and_maybe_stop(accelerator, config, state, validate)
                if flags[1] > 0:
                    stop_reason = "interrupted"
                if stop_reason == "interrupted" or (
                    config.checkpointing_steps and state.global_step % config.checkpointing_steps == 0
                ):
                    state.training_seconds = time.monotonic() - start_time
                    save_checkpoint()
                if stop_reason is not None or state.global_step >= total_steps:
                    break
            else:
                state.epoch += 1
                state.batches_done_in_epoch = 0
    progress.close()
    state.training_seconds = time.monotonic() - start_time
    if stop_reason == "interrupted":
        logger.warning("Interrupted: checkpoint saved at step %d; resume with --resume_from_checkpoint latest.",
                       state.global_step)
        accelerator.end_training()
        return output_dir

    final_metrics = validate() if accelerator.is_main_process and len(validation_split) else {}
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(denoiser)
        if ema is not None:
            ema.copy_to(model.parameters())
        pipe = pipeline_for_validation()
        pipe.save_pretrained(output_dir)
        write_model_card(
            output_dir, config, model, final_metrics, state, dataset, len(train_captions), accelerator.num_processes
        )
        if config.push_to_hub:
            from .hub import push_pipeline_to_hub

            push_pipeline_to_hub(output_dir, config.hub_model_id)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return output_dir


def _validate_and_maybe_stop(accelerator, config: TrainingConfig, state: TrainingState, validate) -> str | None:
    """Runs validation on the main process, logs it, and decides early stopping for every process."""
    stop = torch.zeros(1, device=accelerator.device)
    if accelerator.is_main_process:
        metrics = validate()
        accelerator.log({f"validation/{key}": value for key, value in metrics.items()
                         if isinstance(value, (int, float))}, step=state.global_step)
        logger.info("step %d validation: %s", state.global_step, metrics)
        value = metrics.get(config.early_stopping_metric)
        if value is not None:
            if state.best_metric is None or value > state.best_metric:
                state.best_metric, state.validations_without_improvement = value, 0
            else:
                state.validations_without_improvement += 1
            patience = config.early_stopping_patience
            if patience is not None and state.validations_without_improvement >= patience:
                stop += 1
    stop = accelerator.reduce(stop, reduction="sum")
    return "early stopping" if stop.item() > 0 else None


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def training_config_from_args(argv: list[str] | None = None) -> TrainingConfig:
    """
    `--config FILE.json` (fields of [`TrainingConfig`]) then one `--field value` flag per field, flags winning.
    Lists take several values (`--datasets a b`), dicts a JSON string (`--model_config '{"fusion": "add"}'`).
    """
    import argparse

    parser = argparse.ArgumentParser(description="Train CLIP-DiffusionLM.", prog="train")
    parser.add_argument("--config", help="JSON file of TrainingConfig fields (see examples/configs/).")
    for spec in dataclasses.fields(TrainingConfig):
        default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
        kind = spec.type if isinstance(spec.type, str) else str(spec.type)
        if kind.startswith("list"):
            parser.add_argument(f"--{spec.name}", nargs="+", default=argparse.SUPPRESS)
        elif kind.startswith("dict"):
            parser.add_argument(f"--{spec.name}", type=json.loads, default=argparse.SUPPRESS)
        elif kind.startswith("bool"):
            parser.add_argument(f"--{spec.name}", type=_parse_bool, nargs="?", const=True, default=argparse.SUPPRESS)
        elif isinstance(default, (int, float)) and not isinstance(default, bool) or kind.startswith(("int", "float")):
            number = float if "float" in kind else int
            parser.add_argument(f"--{spec.name}", type=number, default=argparse.SUPPRESS)
        else:
            parser.add_argument(f"--{spec.name}", default=argparse.SUPPRESS)
    args = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    config_file = args.pop("config", None)
    if config_file:
        values.update(json.loads(Path(config_file).read_text()))
        values.pop("description", None)
    values.update(args)
    unknown = set(values) - {spec.name for spec in dataclasses.fields(TrainingConfig)}
    if unknown:
        raise ValueError(f"Unknown training options in {config_file}: {sorted(unknown)}.")
    return TrainingConfig(**values)
