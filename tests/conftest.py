"""Tiny, random, offline components shared by the tests (hidden 32, 2 layers), built the way users build real ones."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BertConfig,
    BertTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from clip_diffusionlm import CLIPDiffusionCaptionPipeline, CLIPDiffusionLMConfig, CLIPDiffusionLMModel
from clip_diffusionlm.demo import TINY_BACKBONE, build_tiny_assets
from clip_diffusionlm.diffusion import make_noise_scheduler

WORDS = "a an the small large red green blue yellow circle square triangle star left right of to and two shapes".split()
CONDITION_DIM = 16
PATCH_DIM = 32  # the tiny CLIP's vision hidden size
IMAGE_SIZE = 32


class ModelCalls:
    """Records the keyword arguments and prediction of every denoiser call (a forward hook: the real model runs)."""

    def __init__(self, model):
        self.calls: list[dict] = []
        model.register_forward_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs, output):
        names = ("noisy_embeds", "timesteps", "image_embeds", "text_embeds", "self_conditioning_embeds", "drop_condition")
        self.calls.append({**dict(zip(names, args)), **kwargs, "prediction": output.prediction.detach()})


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> BertTokenizer:
    vocab_file = tmp_path_factory.mktemp("tokenizer") / "vocab.txt"
    vocab_file.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return BertTokenizer(str(vocab_file))


def tiny_backbone_config(tokenizer) -> dict:
    return BertConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=64, **TINY_BACKBONE).to_dict()


def tiny_denoiser(tokenizer, **config_kwargs) -> CLIPDiffusionLMModel:
    config_kwargs.setdefault("caption_length", 8)
    config = CLIPDiffusionLMConfig(
        condition_dim=CONDITION_DIM, backbone_config=tiny_backbone_config(tokenizer), **config_kwargs
    )
    torch.manual_seed(0)
    return CLIPDiffusionLMModel(config).eval()


def tiny_image_encoder() -> CLIPVisionModelWithProjection:
    config = CLIPVisionConfig(
        hidden_size=PATCH_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=8,
        projection_dim=CONDITION_DIM,
    )
    torch.manual_seed(0)
    return CLIPVisionModelWithProjection(config).eval()


def tiny_image_processor() -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def tiny_pipeline(tokenizer, **config_kwargs) -> CLIPDiffusionCaptionPipeline:
    denoiser = tiny_denoiser(tokenizer, **config_kwargs)
    return CLIPDiffusionCaptionPipeline(
        denoiser=denoiser,
        scheduler=make_noise_scheduler(denoiser.config),
        image_encoder=tiny_image_encoder(),
        image_processor=tiny_image_processor(),
        tokenizer=tokenizer,
    )


@pytest.fixture
def pipeline(tokenizer) -> CLIPDiffusionCaptionPipeline:
    pipe = tiny_pipeline(tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def training_assets(tmp_path_factory):
    """A tiny shapes world, a WordPiece tokenizer covering it, a tiny BERT backbone and a tiny (untrained) CLIP,
    all saved to disk the way real checkpoints are (the helper the benchmarks' `--tiny` runs use too)."""
    return build_tiny_assets(tmp_path_factory.mktemp("assets"))


def tiny_training_config(assets, output_dir, **overrides):
    from clip_diffusionlm.training import TrainingConfig

    values = {
        "output_dir": str(output_dir),
        "datasets": [str(assets["world"])],
        "clip_model": str(assets["clip"]),
        "text_backbone": str(assets["backbone"]),
        "model_config": {"caption_length": 12},
        "batch_size": 8,
        "max_steps": 6,
        "learning_rate": 1e-3,
        "validation_steps": 0,
        "checkpointing_steps": 3,
        "report_to": "none",
        "validation_images": 4,
    }
    values.update(overrides)
    return TrainingConfig(**values)


@pytest.fixture(scope="session")
def pipeline_from_assets(training_assets, tmp_path_factory):
    """A pipeline trained for two steps on the tiny shapes world (CLIP and tokenizer from `training_assets`)."""
    from clip_diffusionlm.training import train

    return train(tiny_training_config(training_assets, tmp_path_factory.mktemp("trained"), max_steps=2))
