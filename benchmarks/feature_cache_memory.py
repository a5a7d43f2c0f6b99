"""Peak memory of training-style reads from a large CLIP feature cache: memory-mapped float16 vs loaded float32.

    python benchmarks/feature_cache_memory.py --size_gb 2 --output benchmarks/results/feature_cache_memory.json

Writes a synthetic cache of patch features (rows of 50 x 768, ViT-B/32's shape) through the cache's own writer, then
in a fresh process per mode reads random batches of rows the way the training loop indexes them and reports the
peak resident set size (`VmHWM`, which counts the file pages a mapping has touched; `ru_maxrss` would carry over
the parent's peak across fork):

- `mmap_float16`: what `CLIPFeatureCache` returns now, a memory-mapped float16 array.
- `in_memory_float32`: what it returned before, every feature loaded into RAM as float32.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROW_SHAPE = (50, 768)  # ViT-B/32 at 224 px: [CLS] + 49 patches, hidden size 768


def build_cache(path: Path, size_gb: float) -> int:
    from clip_diffusionlm.feature_cache import _cached_features

    num_rows = int(size_gb * 2**30 / (np.prod(ROW_SHAPE) * 2))
    generator = torch.Generator().manual_seed(0)

    def encode(batches):
        for rows in batches:
            yield torch.randn(len(rows), *ROW_SHAPE, generator=generator)

    _cached_features(path, ROW_SHAPE, torch.float16, num_rows, encode, batch_size=256)
    return num_rows


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def read_batches(path: Path, mode: str, num_batches: int, batch_size: int) -> dict:
    """Runs in its own process so that the peak is this mode's alone."""
    from clip_diffusionlm.feature_cache import open_features

    baseline = _status_mb("VmRSS")
    started = time.perf_counter()
    if mode == "mmap_float16":
        features = open_features(path)
    else:
        features = torch.from_numpy(np.load(path).astype(np.float32))
    generator = torch.Generator().manual_seed(1)
    checksum = 0.0
    for _ in range(num_batches):
        rows = torch.randint(len(features), (batch_size,), generator=generator)
        checksum += features[rows].float().sum().item()  # what the loop does: index, cast, move
    peak = _status_mb("VmHWM")
    return {
        "mode": mode,
        "peak_rss_mb": round(peak, 1),
        "rss_above_start_mb": round(peak - baseline, 1),
        "anonymous_rss_mb": round(_status_mb("RssAnon"), 1),
        "seconds": round(time.perf_counter() - started, 2),
        "checksum": checksum,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size_gb", type=float, default=2.0, help="Size of the float16 cache file.")
    parser.add_argument("--workdir", default="outputs/benchmarks/feature_cache_memory")
    parser.add_argument("--num_batches", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--output", default="benchmarks/results/feature_cache_memory.json")
    parser.add_argument("--read", nargs=2, metavar=("PATH", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.read:
        print(json.dumps(read_batches(Path(args.read[0]), args.read[1], args.num_batches, args.batch_size)))
        return

    path = Path(args.workdir) / "image-patches.float16.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    num_rows = build_cache(path, args.size_gb)
    build_seconds = time.perf_counter() - started
    rows = []
    for mode in ("mmap_float16", "in_memory_float32"):
        command = [sys.executable, __file__, "--read", str(path), mode, "--num_batches", str(args.num_batches),
                   "--batch_size", str(args.batch_size)]
        rows.append(json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout))

    file_gb = path.stat().st_size / 2**30
    print(f"cache: {num_rows} rows x {ROW_SHAPE} float16 = {file_gb:.2f} GiB (written in {build_seconds:.0f} s); "
          f"{args.num_batches} random batches of {args.batch_size} rows\n")
    print("| storage | peak RSS (MB) | RSS above start (MB) | anonymous RSS at end (MB) | read time (s) |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['mode']} | {row['peak_rss_mb']:,.0f} | {row['rss_above_start_mb']:,.0f} | "
              f"{row['anonymous_rss_mb']:,.0f} | {row['seconds']} |")
    result = {
        "num_rows": num_rows, "row_shape": ROW_SHAPE, "file_gib": round(file_gb, 3), "num_batches": args.num_batches,
        "batch_size": args.batch_size, "results": rows, "machine": platform.platform(), "torch": torch.__version__,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    path.unlink()
    for marker in path.with_suffix(".done").iterdir():
        marker.unlink()


if __name__ == "__main__":
    main()
