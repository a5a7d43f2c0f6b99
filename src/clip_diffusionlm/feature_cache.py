"""An on-disk cache of frozen CLIP features, so that training reads embeddings instead of running CLIP every step.

Layout: `cache_dir/clip-<clip fingerprint>/<data fingerprint>/<kind>.<dtype>.npy`, one `.npy` array per kind
(`image`, `image-patches`, `image-patches-layer<k>`, `text`) with one row per image or caption, and `<kind>.<dtype>.done/<shard>` markers.
The CLIP fingerprint hashes the encoder's weights (a retrained CLIP never reuses stale features); the data fingerprint
hashes each image's file path with its size and modification time, or its encoded bytes (or the caption texts).

Scale: features are stored in float16 by default (half the disk and page cache of float32; CLIP's pooled and patch
features are far inside its range), and read back memory-mapped, so training touches only the rows of its batches
instead of holding e.g. COCO's 19 GB of patch features in RAM. Rows are encoded `SHARD_SIZE` at a time; a shard's
marker is written only after its rows are flushed, so an interrupted run keeps every finished shard and encodes only
the rest. Under `accelerate launch` every process encodes its own share of the missing shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from .clip_features import (
    check_image_features,
    encode_pixel_values,
    encode_texts,
    image_feature_shape,
    image_loader,
)

logger = logging.getLogger("clip_diffusionlm.data")

SHARD_SIZE = 512
DTYPES = {torch.float16: np.float16, torch.float32: np.float32}
_FINGERPRINT_BATCH = 1000

# Yields the features of each of the given batches of row indices, in order.
BatchEncoder = Callable[[Sequence[range]], Iterator[torch.Tensor]]


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of a model's config and weights, shortened; identical weights give the same cache folder."""
    digest = hashlib.sha256(model.config.to_json_string(use_diff=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _image_fingerprint(kind: str, split: datasets.Dataset) -> str:
    """Hashes every image reference: a file by its path, size and mtime (an edited image is encoded again), encoded
    bytes by their content."""
    digest = hashlib.sha256(kind.encode())
    references = split.select_columns(["image"]).cast_column("image", datasets.Image(decode=False))
    for batch in references.iter(batch_size=_FINGERPRINT_BATCH):
        for reference in batch["image"]:
            if reference.get("bytes"):
                digest.update(hashlib.sha256(reference["bytes"]).digest())
            else:
                stat = os.stat(reference["path"])
                digest.update(f"{reference['path']}:{stat.st_size}:{stat.st_mtime_ns}".encode())
            digest.update(b"\0")
    return digest.hexdigest()[:16]


def _text_fingerprint(kind: str, texts: Sequence[str]) -> str:
    digest = hashlib.sha256(kind.encode())
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _barrier(accelerator) -> None:
    if accelerator is not None:
        accelerator.wait_for_everyone()


def _shard_batches(shards: Sequence[int], num_items: int, batch_size: int) -> list[range]:
    """Batches of row indices that never cross a shard boundary, so each shard completes on its own."""
    batches = []
    for shard in shards:
        stop = min((shard + 1) * SHARD_SIZE, num_items)
        batches.extend(range(start, min(start + batch_size, stop)) for start in range(shard * SHARD_SIZE, stop, batch_size))
    return batches


def _cached_features(
    path: Path,
    row_shape: tuple[int, ...],
    dtype: torch.dtype,
    num_items: int,
    encode: BatchEncoder,
    batch_size: int,
    accelerator=None,
    show_progress: bool = True,
) -> torch.Tensor:
    """Fills the missing shards of the `(num_items, *row_shape)` array at `path` and returns it memory-mapped."""
    if num_items == 0:
        return torch.empty((0, *row_shape), dtype=dtype)
    done_dir = path.with_suffix(".done")
    if accelerator is None or accelerator.is_main_process:
        done_dir.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            # Created at full size under a temporary name: a crash never leaves a short array behind.
            temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
            np.lib.format.open_memmap(temporary, mode="w+", dtype=DTYPES[dtype], shape=(num_items, *row_shape)).flush()
            os.replace(temporary, path)
    _barrier(accelerator)

    num_shards = (num_items + SHARD_SIZE - 1) // SHARD_SIZE
    missing = [shard for shard in range(num_shards) if not (done_dir / f"{shard:05d}").exists()]
    rank, world_size = (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)
    batches = _shard_batches(missing[rank::world_size], num_items, batch_size)
    if batches:
        array = np.load(path, mmap_mode="r+")
        remaining = {shard: 0 for shard in missing[rank::world_size]}
        for rows in batches:
            remaining[rows.start // SHARD_SIZE] += len(rows)
        progress = tqdm(
            total=sum(map(len, batches)), desc=f"CLIP features ({path.stem})",
            disable=not show_progress or (accelerator is not None and not accelerator.is_main_process),
        )
        for rows, features in zip(batches, encode(batches), strict=True):
            features = features.to("cpu", dtype)
            if not torch.isfinite(features).all():
                raise ValueError(f"CLIP features of rows {rows.start}-{rows.stop - 1} overflow {dtype}; pass "
                                 "dtype=torch.float32 to the CLIPFeatureCache.")
            array[rows.start : rows.stop] = features.numpy()
            progress.update(len(rows))
            shard = rows.start // SHARD_SIZE
            remaining[shard] -= len(rows)
            if not remaining[shard]:
                array.flush()
                (done_dir / f"{shard:05d}").touch()
        progress.close()
        del array
    _barrier(accelerator)
    return open_features(path)


def open_features(path: str | os.PathLike) -> torch.Tensor:
    """
    A cached `.npy` feature array as a memory-mapped tensor: the file's pages are read only when a batch indexes
    their rows. The mapping is copy-on-write (writes never reach the file) and advised as random access, which turns
    off the kernel's read-around and fault-around, so a batch maps the pages of its own rows and not their
    neighbours'.
    """
    with open(path, "rb") as file:
        version = np.lib.format.read_magic(file)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(file)
        offset = file.tell()
        if fortran_order:
            raise ValueError(f"{path} is a Fortran-ordered array; the feature cache writes C order.")
        mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    if hasattr(mmap, "MADV_RANDOM"):
        mapping.madvise(mmap.MADV_RANDOM)
    return torch.from_numpy(np.ndarray(shape, dtype=dtype, buffer=mapping, offset=offset))


class CLIPFeatureCache:
    """
    Computes and stores L2-normalised CLIP embeddings of images and captions (see the module docstring for the
    layout).

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
        dtype (`torch.dtype`, *optional*, defaults to `torch.float16`):
            Storage type of the features, `torch.float16` or `torch.float32`.
        num_workers (`int`, *optional*):
            Worker processes that decode and preprocess images; defaults to all cores but one, at most 8.
        accelerator (`accelerate.Accelerator`, *optional*):
            Under `accelerate launch`, every process encodes its share of the shards. Call the feature methods on
            every process (not inside `main_process_first`): they synchronise the processes themselves.
        show_progress (`bool`, *optional*, defaults to `True`):
            Show a progress bar while features are computed.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        image_encoder,
        image_processor,
        text_encoder=None,
        text_tokenizer=None,
        batch_size: int = 64,
        *,
        dtype: torch.dtype = torch.float16,
        num_workers: int | None = None,
        accelerator=None,
        show_progress: bool = True,
    ):
        if dtype not in DTYPES:
            raise ValueError(f"`dtype` must be one of {list(DTYPES)}, got {dtype!r}.")
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be at least 1, got {batch_size}.")
        self.cache_dir = Path(cache_dir)
        self.image_encoder = image_encoder.eval()
        self.image_processor = image_processor
        self.text_encoder = None if text_encoder is None else text_encoder.eval()
        self.text_tokenizer = text_tokenizer
        self.batch_size = batch_size
        self.dtype = dtype
        self.num_workers = num_workers
        self.accelerator = accelerator
        self.show_progress = show_progress
        self.image_key = model_fingerprint(image_encoder)
        self.text_key = None if text_encoder is None else model_fingerprint(text_encoder)

    def image_features(
        self, split: datasets.Dataset, image_features: str = "pooled", vision_feature_layer: int = -1
    ) -> torch.Tensor:
        """
        Features of the images of a caption dataset (its `image` column), in row order: `(len(split), projection_dim)`
        embeddings, or with `image_features="patches"` `(len(split), num_patches + 1, hidden_size)` patch features
        of layer `vision_feature_layer` (see [`encode_pixel_values`]). The tensor has the cache's `dtype` and is
        memory-mapped: index the rows of a batch, then move them to the device and dtype the model needs.
        """
        check_image_features(image_features, vision_feature_layer, self.image_encoder)
        if not isinstance(split, datasets.Dataset):
            raise ValueError(f"`split` must be a datasets.Dataset with an 'image' column, got {type(split).__name__}.")
        kind = "image" if image_features == "pooled" else f"image-{image_features}"
        if vision_feature_layer != -1:
            kind += f"-layer{vision_feature_layer}"

        def encode(batches: Sequence[range]) -> Iterator[torch.Tensor]:
            for pixel_values in image_loader(split, self.image_processor, batches, self.num_workers):
                yield encode_pixel_values(self.image_encoder, pixel_values, image_features, vision_feature_layer)

        return self._features(
            kind, self.image_key, _image_fingerprint(kind, split), len(split),
            image_feature_shape(self.image_encoder, image_features), encode,
        )

    def text_features(self, captions: Sequence[str]) -> torch.Tensor:
        """`(len(captions), projection_dim)` embeddings of caption texts, in the given order, memory-mapped."""
        if self.text_encoder is None:
            raise ValueError("This cache has no `text_encoder`; pass one to compute text features.")
        captions = list(captions)

        def encode(batches: Sequence[range]) -> Iterator[torch.Tensor]:
            for rows in batches:
                yield encode_texts(self.text_encoder, self.text_tokenizer, captions[rows.start : rows.stop])

        return self._features(
            "text", self.text_key, _text_fingerprint("text", captions), len(captions),
            (self.text_encoder.config.projection_dim,), encode,
        )

    def _features(
        self, kind: str, model_key: str, data_key: str, num_items: int, row_shape: tuple[int, ...], encode: BatchEncoder
    ) -> torch.Tensor:
        folder = self.cache_dir / f"clip-{model_key}" / data_key
        dtype_name = str(self.dtype).removeprefix("torch.")
        if self.accelerator is None or self.accelerator.is_main_process:
            self._write_manifest(folder, {"kind": kind, "num_items": num_items, "row_shape": list(row_shape)})
        return _cached_features(
            folder / f"{kind}.{dtype_name}.npy", row_shape, self.dtype, num_items, encode, self.batch_size,
            self.accelerator, self.show_progress,
        )

    @staticmethod
    def _write_manifest(folder: Path, manifest: dict) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "manifest.json"
        if not path.exists():
            temporary = path.with_suffix(".tmp")
            temporary.write_text(json.dumps({**manifest, "shard_size": SHARD_SIZE}, indent=2))
            os.replace(temporary, path)
