from __future__ import annotations

import os

import pytest
import torch
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from clip_diffusionlm import feature_cache
from clip_diffusionlm.data import load_image_folder
from clip_diffusionlm.feature_cache import CLIPFeatureCache
from clip_diffusionlm.pipelines.captioning_utils import encode_images


def _encoder_and_counter(clip_dir):
    encoder = CLIPVisionModelWithProjection.from_pretrained(clip_dir).eval()
    calls = []
    encoder.register_forward_hook(lambda module, args, output: calls.append(len(output.image_embeds)))
    return encoder, calls


@pytest.fixture(scope="module")
def world(training_assets):
    return load_image_folder(training_assets["world"])


def test_features_are_cached_reused_and_resumed(training_assets, world, tmp_path, monkeypatch):
    monkeypatch.setattr(feature_cache, "SHARD_SIZE", 8)
    split = world["train"]  # 24 images → 3 shards
    processor = CLIPImageProcessor.from_pretrained(training_assets["clip"])
    encoder, calls = _encoder_and_counter(training_assets["clip"])

    features = CLIPFeatureCache(tmp_path, encoder, processor, batch_size=3, num_workers=1).image_features(split)
    assert features.shape == (24, 16) and features.dtype == torch.float16 and sum(calls) == 24
    expected = encode_images(encoder, processor, split["image"])
    torch.testing.assert_close(features, expected.half())

    calls.clear()
    again = CLIPFeatureCache(tmp_path, encoder, processor).image_features(split)
    assert calls == [] and torch.equal(again, features)

    # An interrupted run: the last shard's rows were never marked finished.
    last_marker = sorted(tmp_path.rglob("image.float16.done/*"))[-1]
    last_marker.unlink()
    resumed = CLIPFeatureCache(tmp_path, encoder, processor, batch_size=4, num_workers=0).image_features(split)
    assert sum(calls) == 8 and torch.equal(resumed, features)


def test_float32_on_request(training_assets, world, tmp_path):
    split = world["test"]
    processor = CLIPImageProcessor.from_pretrained(training_assets["clip"])
    encoder, _ = _encoder_and_counter(training_assets["clip"])
    features = CLIPFeatureCache(tmp_path, encoder, processor, dtype=torch.float32).image_features(split)
    assert features.dtype == torch.float32
    torch.testing.assert_close(features, encode_images(encoder, processor, split["image"]))
    with pytest.raises(ValueError, match="dtype"):
        CLIPFeatureCache(tmp_path, encoder, processor, dtype=torch.bfloat16)


def test_a_different_clip_gets_its_own_cache(training_assets, world, tmp_path):
    split = world["test"]
    processor = CLIPImageProcessor.from_pretrained(training_assets["clip"])
    encoder, _ = _encoder_and_counter(training_assets["clip"])
    first = CLIPFeatureCache(tmp_path, encoder, processor).image_features(split)
    with torch.no_grad():
        encoder.visual_projection.weight.mul_(-1.0)
    second = CLIPFeatureCache(tmp_path, encoder, processor).image_features(split)
    torch.testing.assert_close(second, -first)
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("clip-")]) == 2


def test_patch_features_are_cached_apart_from_pooled_ones(training_assets, world, tmp_path):
    split = world["test"]
    processor = CLIPImageProcessor.from_pretrained(training_assets["clip"])
    encoder, calls = _encoder_and_counter(training_assets["clip"])
    cache = CLIPFeatureCache(tmp_path, encoder, processor)
    pooled = cache.image_features(split)
    patches = cache.image_features(split, "patches")
    num_patches = (encoder.config.image_size // encoder.config.patch_size) ** 2
    assert pooled.ndim == 2 and patches.shape[:2] == (len(split), num_patches + 1)
    expected = encode_images(encoder, processor, split["image"], "patches")
    torch.testing.assert_close(patches.float(), expected, atol=2e-2, rtol=2e-3)

    calls.clear()
    assert torch.equal(CLIPFeatureCache(tmp_path, encoder, processor).image_features(split, "patches"), patches)
    assert calls == []
    with pytest.raises(ValueError, match="image_features"):
        cache.image_features(split, "grid")

    embeddings = cache.image_features(split, "patches", vision_feature_layer=0)
    assert embeddings.shape == patches.shape and not torch.equal(embeddings, patches)
    expected = encode_images(encoder, processor, split["image"], "patches", vision_feature_layer=0)
    torch.testing.assert_close(embeddings.float(), expected, atol=2e-2, rtol=2e-3)
    assert torch.equal(cache.image_features(split, "patches"), patches)  # each layer keeps its own file


def _resident_file_pages(path) -> int:
    """Pages of `path` mapped into this process and resident in memory, from /proc/self/smaps."""
    resident = 0
    in_mapping = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping header: address perms offset dev inode [path]
                in_mapping = len(fields) == 6 and fields[5] == str(path)
            elif in_mapping and fields[0] == "Rss:":
                resident += int(fields[1]) // 4  # kB → 4 kB pages
    return resident


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads Linux's /proc/self/smaps")
def test_cached_features_are_memory_mapped_and_batches_touch_only_their_rows(tmp_path):
    """Training indexes the rows of a batch: only those pages of the cache file may become resident."""
    num_items, row_shape = 4096, (50, 64)  # 50 tokens x 64 dims of float16 = 6,400 bytes (~1.6 pages) per row
    reference = torch.randn(num_items, *row_shape, generator=torch.Generator().manual_seed(0)).half()

    def encode(batches):
        for rows in batches:
            yield reference[rows.start : rows.stop]

    path = tmp_path / "image-patches.float16.npy"
    features = feature_cache._cached_features(path, row_shape, torch.float16, num_items, encode, batch_size=256)
    assert torch.equal(features, reference)  # reads every page once; drop them by mapping afresh
    del features
    features = feature_cache._cached_features(path, row_shape, torch.float16, num_items, encode, batch_size=256)
    assert _resident_file_pages(path.resolve()) < 8  # mapped, nothing read yet

    batch = torch.randperm(num_items, generator=torch.Generator().manual_seed(1))[:32]
    assert torch.equal(features[batch], reference[batch])
    resident = _resident_file_pages(path.resolve())
    total_pages = path.stat().st_size // 4096
    # 32 rows span at most 32 * 3 pages (plus kernel read-ahead), far below the whole 6,400-page file.
    assert 0 < resident < total_pages // 4


TWO_PROCESS_SCRIPT = """
import json, sys
from accelerate import Accelerator
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection
from clip_diffusionlm import feature_cache
from clip_diffusionlm.data import load_image_folder

clip, world, cache_dir, out = sys.argv[1:]
feature_cache.SHARD_SIZE = 4
accelerator = Accelerator(cpu=True)
encoder = CLIPVisionModelWithProjection.from_pretrained(clip).eval()
rows = []
encoder.register_forward_hook(lambda module, args, output: rows.append(len(output.image_embeds)))
cache = feature_cache.CLIPFeatureCache(
    cache_dir, encoder, CLIPImageProcessor.from_pretrained(clip), batch_size=2, num_workers=0, accelerator=accelerator
)
features = cache.image_features(load_image_folder(world)["train"])
with open(f"{out}/rank{accelerator.process_index}.json", "w") as file:
    json.dump({"encoded": sum(rows), "rows_read": len(features), "sum": float(features.float().sum())}, file)
"""


@pytest.mark.slow
def test_two_processes_each_encode_half_and_match_one_process_bit_for_bit(training_assets, world, tmp_path, monkeypatch):
    import json
    import subprocess
    import sys

    script = tmp_path / "encode.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541", str(script),
         str(training_assets["clip"]), str(training_assets["world"]), str(tmp_path / "two"), str(tmp_path)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    # 24 training images in 6 shards of 4: each process encodes 3 shards, and both read all 24 rows afterwards.
    assert [rank["encoded"] for rank in ranks] == [12, 12]
    assert [rank["rows_read"] for rank in ranks] == [24, 24] and ranks[0]["sum"] == ranks[1]["sum"]

    monkeypatch.setattr(feature_cache, "SHARD_SIZE", 4)
    encoder, calls = _encoder_and_counter(training_assets["clip"])
    processor = CLIPImageProcessor.from_pretrained(training_assets["clip"])
    CLIPFeatureCache(tmp_path / "one", encoder, processor, batch_size=2, num_workers=0).image_features(world["train"])
    assert sum(calls) == 24
    (two,) = (tmp_path / "two").rglob("image.float16.npy")
    (one,) = (tmp_path / "one").rglob("image.float16.npy")
    assert two.relative_to(tmp_path / "two") == one.relative_to(tmp_path / "one")
    assert two.read_bytes() == one.read_bytes()
