"""Benchmark: gallery indexing throughput against a bare batched forward pass of the same embedder.

The indexing path is `engines.gallery.build` on a folder of JPEGs: safe decoding, open_clip preprocessing,
the image tower, the LAION head, the low-level features, a thumbnail per image and the faiss index. The bare
path is `model.encode_image` alone on the same batches, preprocessed beforehand. The embedder is a real-size
open_clip architecture with random weights written to a checkpoint file (no download).

    python bench/indexing.py                                 # ViT-L-14-quickgelu, what the profiles index with
    python bench/indexing.py --model ViT-B-32 --images 256   # a small tower, where the fixed costs show most
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from PIL import Image, ImageDraw

# Run as `python bench/indexing.py`, the repository root is not on sys.path; add it so `engines` imports.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import machine  # noqa: E402
from engines.embedder import Embedder  # noqa: E402
from engines.gallery import build, folder_sources  # noqa: E402
from engines.tiny import write_tiny_laion_head  # noqa: E402

TARGET = 0.90  # indexing keeps at least 90% of the bare forward pass's images per second


@dataclass(frozen=True)
class BenchConfig:
    """Architecture, gallery size and repeats of one run."""

    model: str = "ViT-L-14-quickgelu"
    images: int = 64
    batch: int = 16
    repeats: int = 3
    seed: int = 0


def write_photos(folder: Path, count: int, seed: int) -> None:
    """Camera-sized JPEGs with shapes and noise, so decoding and resizing cost what real photos cost."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        base = rng.integers(0, 256, 3)
        pixels = np.clip(base + rng.normal(0, 30, (768, 1024, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y = rng.integers(0, 900), rng.integers(0, 650)
            draw.ellipse((x, y, x + rng.integers(40, 300), y + rng.integers(40, 300)),
                         fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        image.save(folder / f"{i:05d}.jpg", quality=90)


def random_checkpoint(model: str, path: Path, seed: int) -> Path:
    """The architecture's weights, randomly initialized, in the checkpoint format open_clip loads."""
    torch.manual_seed(seed)
    torch.save(open_clip.create_model(model, pretrained=None).state_dict(), path)
    return path


def run(bench: BenchConfig) -> dict[str, Any]:
    """Time both paths, alternating, and compare their median images per second."""
    with tempfile.TemporaryDirectory(prefix="idx_bench_") as scratch:
        root = Path(scratch)
        write_photos(root / "photos", bench.images, bench.seed)
        weights = random_checkpoint(bench.model, root / "weights.pt", bench.seed)
        embedder = Embedder({"model": bench.model, "pretrained": str(weights), "batch_size": bench.batch},
                            device="cpu", dtype="float32", home=root)
        head = write_tiny_laion_head(root / "tiny", embedder.dim)
        sources, skipped = folder_sources(root / "photos")
        tensors = [embedder.preprocess(Image.open(root / "photos" / s.name).convert("RGB")) for s in sources]
        batches = [torch.stack(tensors[i:i + bench.batch]) for i in range(0, len(tensors), bench.batch)]

        def indexing() -> float:
            start = time.perf_counter()
            build(sources, name="bench", home=root, embedder=embedder, laion_head=str(head), source="bench",
                  skipped=skipped)
            return time.perf_counter() - start

        def bare() -> float:
            start = time.perf_counter()
            with torch.inference_mode():
                for batch in batches:
                    embedder.model.encode_image(batch)
            return time.perf_counter() - start

        paths = {"indexing": indexing, "bare_forward": bare}
        for fn in paths.values():
            fn()  # warm-up: allocator, caches, first-call dispatch
        runs: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(bench.repeats):
            for name, fn in paths.items():  # alternating, so drift hits both alike
                runs[name].append(fn())
    rates = {name: bench.images / statistics.median(times) for name, times in runs.items()}
    ratio = rates["indexing"] / rates["bare_forward"]
    return {
        "bench": "gallery indexing",
        "config": asdict(bench),
        "machine": machine(torch=torch.__version__, open_clip=open_clip.__version__,
                           torch_threads=torch.get_num_threads()),
        "images_per_s": {name: round(rate, 3) for name, rate in rates.items()},
        "runs_s": {name: [round(t, 3) for t in times] for name, times in runs.items()},
        "indexing_share_of_bare": round(ratio, 4),
        "target": TARGET,
        "target_met": ratio >= TARGET,
    }


def main() -> None:
    """Parse the options, run the benchmark, print its figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = BenchConfig()
    parser.add_argument("--model", default=defaults.model)
    parser.add_argument("--images", type=int, default=defaults.images)
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--repeats", type=int, default=defaults.repeats)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    print(json.dumps(run(BenchConfig(**vars(parser.parse_args()))), indent=2))


if __name__ == "__main__":
    main()
