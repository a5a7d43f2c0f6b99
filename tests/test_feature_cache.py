from __future__ import annotations

import pytest
import torch
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from clip_diffusionlm import feature_cache
from clip_diffusionlm.clip_features import encode_images
from clip_diffusionlm.data import load_rgb_image, shapes_world_dataset
from clip_diffusionlm.feature_cache import CLIPFeatureCache


def _encoder_and_counter(clip_dir):
    encoder = CLIPVisionModelWithProjection.from_pretrained(clip_dir).eval()
    calls = []
    encoder.register_forward_hook(lambda module, args, output: calls.append(len(output.image_embeds)))
    return encoder, calls


def test_features_are_cached_reused_and_resumed(training_assets, tmp_path, monkeypatch):
    monkeypatch.setattr(feature_cache, "SHARD_SIZE", 8)
    paths = shapes_world_dataset(training_assets["world"])["train"]["image_path"]  # 24 images → 3 shards
    processor = CLIPImageProcessor.from_pretrained(training_assets["clip"])
    encoder, calls = _encoder_and_counter(training_assets["clip"])

    features = CLIPFeatureCache(tmp_path, encoder, processor, batch_size=4).image_features(paths)
    assert features.shape == (24, 16) and sum(calls) == 24
    expected = encode_images(encoder, processor, [load_rgb_image(path) for path in paths])
    torch.testing.assert_close(features, expected)

    calls.clear()
    again = CLIPFeatureCache(tmp_path, encoder, processor).image_features(paths)
    assert calls == [] and torch.equal(again, features)

    # An interrupted run: the last shard never got renamed into place.
    last_shard = sorted(tmp_path.rglob("image-*.safetensors"))[-1]
    last_shard.rename(last_shard.with_suffix(".tmp"))
    resumed = CLIPFeatureCache(tmp_path, encoder, processor, batch_size=4).image_features(paths)
    assert sum(calls) == 8 and torch.equal(resumed, features)


def test_a_different_clip_gets_its_own_cache(training_assets, tmp_path):
    paths = shapes_world_dataset(training_assets["world"])["test"]["image_path"]
    processor = CLIPImageProcessor.from_pretrained(training_assets["clip"])
    encoder, _ = _encoder_and_counter(training_assets["clip"])
    first = CLIPFeatureCache(tmp_path, encoder, processor).image_features(paths)
    with torch.no_grad():
        encoder.visual_projection.weight.mul_(-1.0)
    second = CLIPFeatureCache(tmp_path, encoder, processor).image_features(paths)
    torch.testing.assert_close(second, -first)
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("clip-")]) == 2


def test_patch_features_are_cached_apart_from_pooled_ones(training_assets, tmp_path):
    paths = shapes_world_dataset(training_assets["world"])["test"]["image_path"]
    processor = CLIPImageProcessor.from_pretrained(training_assets["clip"])
    encoder, calls = _encoder_and_counter(training_assets["clip"])
    cache = CLIPFeatureCache(tmp_path, encoder, processor)
    pooled = cache.image_features(paths)
    patches = cache.image_features(paths, "patches")
    num_patches = (encoder.config.image_size // encoder.config.patch_size) ** 2
    assert pooled.ndim == 2 and patches.shape[:2] == (len(paths), num_patches + 1)
    expected = encode_images(encoder, processor, [load_rgb_image(path) for path in paths], "patches")
    torch.testing.assert_close(patches, expected)

    calls.clear()
    assert torch.equal(CLIPFeatureCache(tmp_path, encoder, processor).image_features(paths, "patches"), patches)
    assert calls == []
    with pytest.raises(ValueError, match="image_features"):
        cache.image_features(paths, "grid")
