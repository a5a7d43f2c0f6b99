"""Tiny, random, offline components shared by the tests (hidden 32, 2 layers), built the way users build real ones."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertTokenizer, CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModelWithProjection

from clip_diffusionlm import CLIPDiffusionCaptionPipeline, CLIPDiffusionLMConfig, CLIPDiffusionLMModel
from clip_diffusionlm.diffusion import make_noise_scheduler

WORDS = "a an the small large red green blue yellow circle square triangle star left right of to and two shapes".split()
CONDITION_DIM = 16
IMAGE_SIZE = 32


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> BertTokenizer:
    vocab_file = tmp_path_factory.mktemp("tokenizer") / "vocab.txt"
    vocab_file.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return BertTokenizer(str(vocab_file))


def tiny_backbone_config(tokenizer) -> dict:
    return BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    ).to_dict()


def tiny_denoiser(tokenizer, **config_kwargs) -> CLIPDiffusionLMModel:
    config_kwargs.setdefault("caption_length", 8)
    config = CLIPDiffusionLMConfig(
        condition_dim=CONDITION_DIM, backbone_config=tiny_backbone_config(tokenizer), **config_kwargs
    )
    torch.manual_seed(0)
    return CLIPDiffusionLMModel(config).eval()


def tiny_image_encoder() -> CLIPVisionModelWithProjection:
    config = CLIPVisionConfig(
        hidden_size=32,
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
