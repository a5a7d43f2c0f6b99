"""Publishing: the model card (with a `model-index` of evaluation results) and the upload of a saved pipeline."""

from __future__ import annotations

import os
import string
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData, upload_folder

# metric key → the `metric_type` id the Hub knows for it
HUB_METRIC_TYPES = {
    "BLEU-1": "bleu",
    "BLEU-4": "bleu",
    "METEOR": "meteor",
    "ROUGE-L": "rouge",
    "CIDEr": "cider",
    "object_accuracy": "accuracy",
}
UPLOAD_IGNORE = ["checkpoint-*/**", ".tmp-checkpoint-*/**", "logs/**", "feature_cache/**", "*.jsonl"]


def eval_results_from_metrics(
    metrics: dict[str, Any], dataset_name: str, dataset_type: str, dataset_split: str = "validation"
) -> list[EvalResult]:
    """One `EvalResult` per numeric caption metric, for a model card's `model-index`; unavailable metrics are left out."""
    return [
        EvalResult(
            task_type="image-to-text",
            task_name="Image Captioning",
            dataset_type=dataset_type,
            dataset_name=dataset_name,
            dataset_split=dataset_split,
            metric_type=metric_type,
            metric_name=name,
            metric_value=round(float(metrics[name]), 4),
        )
        for name, metric_type in HUB_METRIC_TYPES.items()
        if isinstance(metrics.get(name), (int, float))
    ]


def _metrics_table(metrics: dict[str, Any]) -> str:
    rows = [(name, value) for name, value in metrics.items() if isinstance(value, (int, float))]
    if not rows:
        return "No validation split was available."
    return "\n".join(["| metric | value |", "|---|---:|", *(f"| {name} | {value:.4f} |" for name, value in rows)])


def write_model_card(
    output_dir: str | os.PathLike,
    config,
    denoiser,
    metrics: dict[str, Any],
    state,
    dataset,
    num_train_captions: int,
    num_processes: int = 1,
) -> ModelCard:
    """
    Fills the package's model card template from a finished training run and saves it as `README.md` in `output_dir`.

    Args:
        output_dir (`str` or `os.PathLike`):
            The saved pipeline's folder.
        config (`TrainingConfig`):
            The run's configuration.
        denoiser (`CLIPDiffusionLMModel`):
            The trained denoiser.
        metrics (`dict`):
            Final validation metrics (may be empty).
        state (`TrainingState`):
            Steps and training time.
        dataset (`datasets.DatasetDict`):
            The training data, for its sizes.
        num_train_captions (`int`):
            Captions trained on (fewer than the split holds with `config.captions_per_image`).
        num_processes (`int`, *optional*, defaults to 1):
            Data-parallel processes of the run.
    """
    output_dir = Path(output_dir)
    model_config = denoiser.config
    dataset_name = ", ".join(Path(path).name for path in config.datasets)
    repo_id = config.hub_model_id or output_dir.name
    paper = config.paper_reference
    paper_line = (
        f"\nThe paper reports BLEU-4 {paper['bleu4']} for this configuration ({paper.get('note', '')}), measured the "
        "original code's way (see above), so it is not directly comparable.\n"
        if paper.get("bleu4") is not None
        else ""
    )
    body = string.Template(resources.files(__package__).joinpath("templates/model_card.md").read_text()).substitute(
        model_name=repo_id,
        repo_id=repo_id,
        clip_model=config.clip_model,
        text_backbone=config.text_backbone,
        caption_length=model_config.caption_length,
        image_features=(
            "CLIP's patch features ([CLS] and every patch), one token each"
            if model_config.image_features == "patches"
            else "CLIP's pooled image embedding"
        ),
        fusion=model_config.fusion,
        prediction_type="x0" if model_config.prediction_type == "sample" else f"x_(t-{model_config.prediction_step_offset})",
        rounding_weight=(
            f"dynamic, C = {model_config.dynamic_rounding_constant}"
            if model_config.dynamic_rounding_constant is not None
            else model_config.rounding_weight
        ),
        condition_drop_prob=model_config.condition_drop_prob,
        noise_schedule=model_config.noise_schedule,
        num_train_timesteps=model_config.num_train_timesteps,
        trainable_parameters=f"{sum(p.numel() for p in denoiser.parameters() if p.requires_grad):,}",
        datasets=dataset_name,
        num_train_images=len(dataset["train"]),
        num_train_captions=num_train_captions,
        num_validation_images=len(dataset["validation"]),
        global_step=state.global_step,
        batch_size=config.batch_size,
        num_processes=num_processes,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        lr_schedule=config.lr_schedule,
        timesteps_per_caption=config.timesteps_per_caption,
        training_minutes=f"{state.training_seconds / 60:.1f}",
        validation_inference_steps=config.validation_inference_steps,
        metrics_table=_metrics_table(metrics),
        paper_reference=paper_line,
    )
    card_data = ModelCardData(
        library_name="clip-diffusionlm",
        pipeline_tag="image-to-text",
        license="apache-2.0",
        tags=["image-captioning", "diffusion", "clip-diffusionlm", "diffusers"],
        model_name=repo_id,
        eval_results=eval_results_from_metrics(metrics, dataset_name, dataset_name) or None,
    )
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")
    card.save(output_dir / "README.md")
    return card


def push_pipeline_to_hub(folder: str | os.PathLike, repo_id: str, token: str | None = None) -> str:
    """Uploads a saved pipeline folder (weights, configs, model card) to `repo_id`, without checkpoints or logs."""
    from huggingface_hub import create_repo

    create_repo(repo_id, exist_ok=True, token=token)
    return upload_folder(repo_id=repo_id, folder_path=str(folder), ignore_patterns=UPLOAD_IGNORE, token=token)
