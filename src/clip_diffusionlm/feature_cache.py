"""An on-disk cache of frozen CLIP features, so that training reads embeddings instead of running CLIP every step.

Layout: `cache_dir/<clip fingerprint>/<data fingerprint>/{image,image-patches,text}-<shard>.safetensors`. The CLIP
fingerprint hashes the encoder's weights (a retrained CLIP never reuses stale features); the data fingerprint hashes
the ordered image paths with their sizes and modification times (or the caption texts). Shards are written to a temporary name
and renamed, so an interrupted run keeps every finished shard and resumes after the last one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .clip_features import check_image_features, encode_image_files, encode_texts

logger = logging.getLogger("clip_diffusionlm.data")

SHARD_SIZE = 512


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of a model's config and weights, shortened; identical weights give the same cache folder."""
    digest = hashlib.sha256(model.config.to_json_string(use_diff=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _data_fingerprint(kind: str, items: Sequence[str], with_file_stats: bool) -> str:
    digest = hashlib.sha256(kind.encode())
    for item in items:
        digest.update(item.encode())
        if with_file_stats:
            stat = os.stat(item)
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _cached_features(
    folder: Path,
    kind: str,
    items: Sequence[str],
    encode_batch: Callable[[Sequence[str]], torch.Tensor],
    batch_size: int,
) -> torch.FloatTensor:
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    num_shards = (len(items) + SHARD_SIZE - 1) // SHARD_SIZE
    done = sum((folder / f"{kind}-{index:05d}.safetensors").exists() for index in range(num_shards))
    progress = tqdm(total=len(items), desc=f"CLIP {kind} features", initial=min(done * SHARD_SIZE, len(items)))
    for shard_index in range(num_shards):
        shard_path = folder / f"{kind}-{shard_index:05d}.safetensors"
        if shard_path.exists():
            shards.append(load_file(shard_path)["embeds"])
            continue
        shard_items = items[shard_index * SHARD_SIZE : (shard_index + 1) * SHARD_SIZE]
        parts = []
        for start in range(0, len(shard_items), batch_size):
            batch = shard_items[start : start + batch_size]
            parts.append(encode_batch(batch).float().cpu())
            progress.update(len(batch))
        shard = torch.cat(parts)
        temporary = shard_path.with_suffix(".tmp")
        save_file({"embeds": shard.contiguous()}, str(temporary))
        os.replace(temporary, shard_path)
        shards.append(shard)
    progress.close()
    return torch.cat(shards) if shards else torch.empty(0)


class CLIPFeatureCache:
    """
    Computes and stores L2-normalised CLIP embeddings of images and captions.

    Args:
        cache_dir (`str` or `os.PathLike`):
            Root folder of the cache; safe to share between runs and datasets.
        image_encoder (`CLIPVisionModelWithProjection`):
            The frozen CLIP image tower.
        image_processor (`CLIPImageProcessor`):
            Its preprocessing.
        text_encoder (`CLIPTextModelWithProjection`, *optional*):
            The frozen CLIP text tower, for text-feature conditioning.
        text_tokenizer (*optional*):
            Its tokenizer.
        batch_size (`int`, *optional*, defaults to 64):
            Images or captions encoded per CLIP forward pass.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        image_encoder,
        image_processor,
        text_encoder=None,
        text_tokenizer=None,
        batch_size: int = 64,
    ):
        self.cache_dir = Path(cache_dir)
        self.image_encoder = image_encoder.eval()
        self.image_processor = image_processor
        self.text_encoder = None if text_encoder is None else text_encoder.eval()
        self.text_tokenizer = text_tokenizer
        self.batch_size = batch_size
        self.image_key = model_fingerprint(image_encoder)
        self.text_key = None if text_encoder is None else model_fingerprint(text_encoder)

    def image_features(self, image_paths: Sequence[str], image_features: str = "pooled") -> torch.FloatTensor:
        """
        Features of images, in the given order: `(len(image_paths), projection_dim)` embeddings, or with
        `image_features="patches"` `(len(image_paths), num_patches + 1, hidden_size)` patch features (see
        [`encode_images`]).
        """
        check_image_features(image_features)
        return self._features(
            "image" if image_features == "pooled" else f"image-{image_features}",
            self.image_key,
            list(image_paths),
            lambda paths: encode_image_files(self.image_encoder, self.image_processor, paths, len(paths), image_features),
        )

    def text_features(self, captions: Sequence[str]) -> torch.FloatTensor:
        """`(len(captions), projection_dim)` embeddings of caption texts, in the given order."""
        if self.text_encoder is None:
            raise ValueError("This cache has no `text_encoder`; pass one to compute text features.")
        return self._features(
            "text", self.text_key, list(captions), lambda texts: encode_texts(self.text_encoder, self.text_tokenizer, texts)
        )

    def _features(
        self, kind: str, model_key: str, items: list[str], encode_batch: Callable[[Sequence[str]], torch.Tensor]
    ) -> torch.FloatTensor:
        # Image files are keyed with their size and mtime too, so an edited image is encoded again.
        data_key = _data_fingerprint(kind, items, with_file_stats=kind.startswith("image"))
        folder = self.cache_dir / f"clip-{model_key}" / data_key
        self._write_manifest(folder, {"kind": kind, "num_items": len(items)})
        return _cached_features(folder, kind, items, encode_batch, self.batch_size)

    @staticmethod
    def _write_manifest(folder: Path, manifest: dict) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "manifest.json"
        if not path.exists():
            temporary = path.with_suffix(".tmp")
            temporary.write_text(json.dumps({**manifest, "shard_size": SHARD_SIZE}, indent=2))
            os.replace(temporary, path)
