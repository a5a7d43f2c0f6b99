"""Evaluating a caption pipeline on a dataset split: predictions, the field's metrics, and a table.

[`evaluate_pipeline`] sweeps `num_inference_steps` × `guidance_scale` in one run and writes `predictions.jsonl`
(image id, caption(s), references), `metrics.json` and `metrics.md` into an output folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from .clip_features import encode_dataset_images
from .data import load_datasets
from .feature_cache import CLIPFeatureCache
from .metrics import compute_caption_metrics, compute_diversity
from .pipelines.pipeline_clip_diffusion_caption import (
    RECOMMENDED_INFERENCE_STEPS,
    RECOMMENDED_LENGTH_BONUS,
    RECOMMENDED_NO_REPEAT_NGRAM_SIZE,
    CLIPDiffusionCaptionPipeline,
)

TABLE_COLUMNS = ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "object_accuracy", "exact_match", "self_bleu_4")


def caption_embeddings(
    pipe: CLIPDiffusionCaptionPipeline,
    image_embeds: torch.FloatTensor,
    num_inference_steps: int = RECOMMENDED_INFERENCE_STEPS,
    guidance_scale: float = 1.0,
    num_captions_per_image: int = 1,
    batch_size: int = 64,
    seed: int = 0,
    show_progress: bool = False,
    no_repeat_ngram_size: int = RECOMMENDED_NO_REPEAT_NGRAM_SIZE,
    length_bonus: float = RECOMMENDED_LENGTH_BONUS,
) -> list[list[str]]:
    """Captions for precomputed image embeddings, `num_captions_per_image` per image, reproducible for a `seed`."""
    generator = torch.Generator().manual_seed(seed)
    captions: list[list[str]] = []
    starts = range(0, len(image_embeds), batch_size)
    for start in tqdm(starts, desc="captioning", disable=not show_progress):
        flat = pipe(
            image_embeds=image_embeds[start : start + batch_size],
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            num_captions_per_image=num_captions_per_image,
            no_repeat_ngram_size=no_repeat_ngram_size,
            length_bonus=length_bonus,
            generator=generator,
        ).captions
        captions.extend(flat[i : i + num_captions_per_image] for i in range(0, len(flat), num_captions_per_image))
    return captions


# Metrics of datasets that know more than their captions: a column name → `metric(first_captions, column)`, scored
# wherever a split has that column. The demo registers the shapes world's content accuracy for its "objects".
COLUMN_METRICS: dict[str, Callable[[list[str], list], dict[str, float]]] = {}


def score_split(captions: Sequence[Sequence[str]], split: Dataset) -> dict[str, Any]:
    """
    COCO caption metrics of the first caption of each image against the split's references; diversity when there
    are several captions per image; the [`COLUMN_METRICS`] of the columns the split has.
    """
    first = [image_captions[0] for image_captions in captions]
    metrics = compute_caption_metrics(first, split["captions"])
    if any(len(image_captions) > 1 for image_captions in captions):
        metrics.update(compute_diversity(captions))
    for column, metric in COLUMN_METRICS.items():
        if column in split.column_names:
            metrics.update(metric(first, split[column]))
    return metrics


def metrics_table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table, one row per (steps, guidance) setting, with the columns each row has."""
    columns = [column for column in TABLE_COLUMNS if any(row.get(column) is not None for row in rows)]
    lines = [
        "| steps | guidance | " + " | ".join(columns) + " |",
        "|---:|---:|" + "---:|" * len(columns),
    ]
    for row in rows:
        cells = [f"{row[column]:.4f}" if isinstance(row.get(column), float) else "–" for column in columns]
        lines.append(f"| {row['num_inference_steps']} | {row['guidance_scale']:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def evaluate_pipeline(
    pipe: CLIPDiffusionCaptionPipeline,
    split: Dataset,
    output_dir: str | os.PathLike,
    image_embeds: torch.FloatTensor | None = None,
    num_inference_steps: Sequence[int] = (RECOMMENDED_INFERENCE_STEPS,),
    guidance_scales: Sequence[float] = (1.0,),
    num_captions_per_image: int = 1,
    batch_size: int = 64,
    seed: int = 0,
    show_progress: bool = True,
    no_repeat_ngram_size: int = RECOMMENDED_NO_REPEAT_NGRAM_SIZE,
    length_bonus: float = RECOMMENDED_LENGTH_BONUS,
) -> list[dict[str, Any]]:
    """
    Captions every image of `split` for each setting and writes the results.

    Args:
        pipe (`CLIPDiffusionCaptionPipeline`):
            The pipeline to evaluate.
        split (`datasets.Dataset`):
            Rows with `image_id`, `image`, `captions` (and `objects` for the shapes world).
        output_dir (`str` or `os.PathLike`):
            Receives `predictions.jsonl`, `metrics.json` and `metrics.md`.
        image_embeds (`torch.FloatTensor` of shape `(len(split), condition_dim)` or `(len(split), num_patches + 1, patch_dim)`, *optional*):
            Cached CLIP features of the split's images, of the kind the denoiser reads (`config.image_features`); computed with the pipeline's encoder when omitted.
        num_inference_steps (`Sequence[int]`, *optional*, defaults to `(RECOMMENDED_INFERENCE_STEPS,)`):
            Step counts to sweep.
        guidance_scales (`Sequence[float]`, *optional*, defaults to `(1.0,)`):
            Guidance weights to sweep.
        num_captions_per_image (`int`, *optional*, defaults to 1):
            Samples per image; more than one adds the diversity measures.
        batch_size (`int`, *optional*, defaults to 64):
            Images per pipeline call.
        seed (`int`, *optional*, defaults to 0):
            Seed of every setting's sampling.
        show_progress (`bool`, *optional*, defaults to `True`):
            Show a progress bar per setting.
        no_repeat_ngram_size (`int`, *optional*, defaults to `RECOMMENDED_NO_REPEAT_NGRAM_SIZE` = 3):
            The pipeline's n-gram blocking in every setting (0: off, the rounding of the paper); recorded in each row.
        length_bonus (`float`, *optional*, defaults to `RECOMMENDED_LENGTH_BONUS` = 1.0):
            The pipeline's word bonus in every setting (0: off, the rounding of the paper); recorded in each row.

    Returns:
        `list[dict]`: One metrics row per setting, as in `metrics.json`.
    """
    if len(split) == 0:
        raise ValueError("The evaluation split is empty.")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if image_embeds is None:
        config = pipe.denoiser.config
        image_embeds = encode_dataset_images(
            pipe.image_encoder, pipe.image_processor, split, batch_size, config.image_features,
            vision_feature_layer=config.vision_feature_layer,
        )
    if len(image_embeds) != len(split):
        raise ValueError(f"`image_embeds` has {len(image_embeds)} rows but the split has {len(split)} images.")

    rows, predictions = [], []
    for steps in num_inference_steps:
        for guidance in guidance_scales:
            captions = caption_embeddings(
                pipe, image_embeds, steps, guidance, num_captions_per_image, batch_size, seed, show_progress,
                no_repeat_ngram_size, length_bonus,
            )
            rows.append({"num_inference_steps": steps, "guidance_scale": guidance,
                         "no_repeat_ngram_size": no_repeat_ngram_size, "length_bonus": length_bonus,
                         **score_split(captions, split)})
            for image_id, image_captions, references in zip(split["image_id"], captions, split["captions"]):
                predictions.append({
                    "image_id": image_id,
                    "num_inference_steps": steps,
                    "guidance_scale": guidance,
                    "captions": image_captions,
                    "references": references,
                })

    with (output_dir / "predictions.jsonl").open("w", encoding="utf-8") as file:
        file.writelines(json.dumps(record) + "\n" for record in predictions)
    (output_dir / "metrics.json").write_text(json.dumps(rows, indent=2))
    (output_dir / "metrics.md").write_text(metrics_table(rows))
    return rows


def best_device() -> str:
    """`cuda` when a GPU is available, else `mps` on Apple silicon, else `cpu`."""
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


@dataclass
class EvaluationArguments:
    """The flags of `examples/evaluate.py` and `clip-diffusionlm evaluate`."""

    model: str = field(metadata={"help": "Pipeline directory or Hub repository id."})
    output_dir: str = field(metadata={"help": "Receives predictions.jsonl, metrics.json and metrics.md."})
    datasets: list[str] = field(default_factory=list, metadata={
        "help": "Dataset files or folders (any format of `clip_diffusionlm.data`), combined split-wise."
    })
    images_dirs: list[str] = field(default_factory=list, metadata={"help": "Image folder(s), one for all or one each."})
    dataset_name: str | None = field(default=None, metadata={
        "help": "A Hugging Face dataset (Hub id, a path `datasets.load_dataset` reads, or a `save_to_disk` folder)."
    })
    dataset_config_name: str | None = field(default=None, metadata={"help": "The configuration of `dataset_name`."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where `datasets` caches downloads."})
    train_data_dir: str | None = field(default=None, metadata={"help": "An `imagefolder` with metadata."})
    image_column: str = field(default="image", metadata={"help": "The image column."})
    caption_column: str | None = field(default=None, metadata={
        "help": "The caption column; default: `text`, then `caption`, `captions` or `sentences`."
    })
    split: str = field(default="test", metadata={"help": "Split to evaluate."})
    num_inference_steps: list[int] = field(
        default_factory=lambda: [RECOMMENDED_INFERENCE_STEPS], metadata={"help": "Step counts to sweep."}
    )
    guidance_scale: list[float] = field(default_factory=lambda: [1.0], metadata={
        "help": "Classifier-free guidance scales to sweep."
    })
    num_captions_per_image: int = field(default=1, metadata={"help": "Captions per image (diversity metrics > 1)."})
    no_repeat_ngram_size: int = field(default=RECOMMENDED_NO_REPEAT_NGRAM_SIZE, metadata={
        "help": "No n-gram of this many words twice in a caption (the pipeline's default; 0: off, as in the paper)."
    })
    length_bonus: float = field(default=RECOMMENDED_LENGTH_BONUS, metadata={
        "help": "Added to every word's rounding score, so captions end later (the pipeline's default; 0: off, as in "
                "the paper)."
    })
    batch_size: int = field(default=64, metadata={"help": "Images per pipeline call."})
    max_images: int | None = field(default=None, metadata={"help": "Evaluate only the first this many images."})
    seed: int = field(default=0, metadata={"help": "Seed of the sampling noise."})
    feature_cache_dir: str | None = field(default=None, metadata={
        "help": "Reuse cached CLIP features (e.g. training's)."
    })
    device: str | None = field(default=None, metadata={"help": "`cuda`, `mps` or `cpu` (default: the best available)."})


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    """`examples/evaluate.py` / `clip-diffusionlm evaluate`: pipeline + dataset split → predictions and metrics."""
    parser = HfArgumentParser(EvaluationArguments, prog="evaluate", description=evaluate_main.__doc__)
    (args,) = parser.parse_args_into_dataclasses(argv)
    dataset = load_datasets(
        args.datasets, args.images_dirs, dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name,
        cache_dir=args.cache_dir, train_data_dir=args.train_data_dir, image_column=args.image_column,
        caption_column=args.caption_column,
    )
    if args.split not in dataset:
        raise ValueError(f"Split {args.split!r} not found; the dataset has {sorted(dataset)}.")
    split = dataset[args.split]
    if args.max_images is not None:
        split = split.select(range(min(args.max_images, len(split))))
    pipe = CLIPDiffusionCaptionPipeline.from_pretrained(args.model).to(args.device or best_device())
    pipe.set_progress_bar_config(disable=True)
    image_embeds = None
    if args.feature_cache_dir:
        cache = CLIPFeatureCache(args.feature_cache_dir, pipe.image_encoder, pipe.image_processor)
        image_embeds = cache.image_features(
            split, pipe.denoiser.config.image_features, pipe.denoiser.config.vision_feature_layer
        )
    rows = evaluate_pipeline(
        pipe, split, args.output_dir, image_embeds, args.num_inference_steps, args.guidance_scale,
        args.num_captions_per_image, args.batch_size, args.seed, no_repeat_ngram_size=args.no_repeat_ngram_size,
        length_bonus=args.length_bonus,
    )
    print(metrics_table(rows))
    return 0
