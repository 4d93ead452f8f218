"""Benchmark: the generation tab's engine path (validate, seed, generate, PNG) vs a bare diffusers pipeline call.

Both paths run on the same loaded pipeline with the same seed each round, so the only difference is what the
engine adds; the run also checks that both paths produce the same pixels. Cases: the tiny pipeline, and a
random-weight pipeline of Stable Diffusion 1.5's sizes (UNet, VAE, ViT-L/14 text encoder) at 256 px.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch

# Run as `python bench/generation.py`, the repository root is not on sys.path; add it so `engines` imports.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import machine  # noqa: E402
from engines.generator import Generator  # noqa: E402
from engines.tiny import write_random_sd_pipeline, write_tiny_pipeline  # noqa: E402

PROMPT = "a photo of the cat on a chair in the garden"
# Stable Diffusion 1.5's architecture; sample_size 32 latents decode to 256 px through the 8x VAE.
SD15_UNET = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8, sample_size=32)
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=256,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SD15_TEXT_ENCODER = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         projection_dim=768, vocab_size=49408)
TARGET_OVERHEAD = 0.05


@dataclass(frozen=True)
class BenchConfig:
    """What to run and how often."""

    device: str = "cpu"
    dtype: str = "float32"
    steps: int = 2
    tiny_rounds: int = 100
    sd15_rounds: int = 5
    warmup: int = 2


def machine_info(device: str) -> dict[str, object]:
    """Where the figures were taken."""
    return machine(torch=torch.__version__, torch_threads=torch.get_num_threads(), diffusers=diffusers.__version__,
                   accelerator=torch.cuda.get_device_name() if device.startswith("cuda") else None)


def compare(generator: Generator, bench: BenchConfig, rounds: int) -> dict[str, Any]:
    """Alternate the engine path and the bare call, same seed per round; medians, images/s and a pixel check."""
    pipe, config = generator.pipeline, generator.config

    def engine(seed: int) -> np.ndarray:
        result = generator.generate(PROMPT, seed=seed, progress=lambda step, total: None)  # as the tab calls it
        result.png()  # the tab stores the PNG as the comparison's blob
        return np.asarray(result.image)

    def bare(seed: int) -> np.ndarray:
        rng = torch.Generator(device=pipe.device).manual_seed(seed)
        return np.asarray(pipe(PROMPT, num_inference_steps=config.steps, guidance_scale=config.guidance_scale,
                               generator=rng).images[0])

    for seed in range(bench.warmup):
        engine(seed), bare(seed)
    times: dict[str, list[float]] = {"engine": [], "bare": []}
    same_pixels = True
    for seed in range(rounds):
        # Alternating who goes first cancels a drift (thermal, a neighbour's load) between the two paths.
        order = (("engine", engine), ("bare", bare)) if seed % 2 == 0 else (("bare", bare), ("engine", engine))
        images = {}
        for name, path in order:
            start = time.perf_counter()
            images[name] = path(seed)
            times[name].append(time.perf_counter() - start)
        same_pixels &= bool(np.array_equal(images["engine"], images["bare"]))
    engine_s, bare_s = statistics.median(times["engine"]), statistics.median(times["bare"])
    return {
        "rounds": rounds,
        "steps": config.steps,
        "guidance_scale": config.guidance_scale,
        "size": [images["engine"].shape[1], images["engine"].shape[0]],
        "engine_median_s": engine_s,
        "bare_median_s": bare_s,
        "engine_images_per_s": 1.0 / engine_s,
        "bare_images_per_s": 1.0 / bare_s,
        "overhead": engine_s / bare_s - 1.0,
        "paired_overhead_median": statistics.median(e / b - 1.0 for e, b in zip(times["engine"], times["bare"])),
        "same_pixels": same_pixels,
    }


def run(bench: BenchConfig, workdir: Path) -> dict[str, Any]:
    """Build both pipelines under `workdir` (reused when already there), then time the two paths on each."""
    folders = {
        "tiny": write_tiny_pipeline(workdir / "tiny"),
        "sd15_size_256px": write_random_sd_pipeline(workdir / "sd15-random", unet=SD15_UNET, vae=SD15_VAE,
                                                    text_encoder=SD15_TEXT_ENCODER),
    }
    rounds = {"tiny": bench.tiny_rounds, "sd15_size_256px": bench.sd15_rounds}
    cases = {}
    for name, folder in folders.items():
        generator = Generator({"model": str(folder), "steps": bench.steps}, device=bench.device, dtype=bench.dtype,
                              home=workdir)
        generator.pipeline.set_progress_bar_config(disable=True)  # the bars would only add noise to both paths
        cases[name] = compare(generator, bench, rounds[name])
    return {
        "machine": machine_info(bench.device),
        "device": bench.device,
        "dtype": bench.dtype,
        "cases": cases,
        "load_average_at_end": os.getloadavg(),
        "targets_met": {
            **{f"{name}_overhead_le_5pct": case["overhead"] <= TARGET_OVERHEAD for name, case in cases.items()},
            "same_pixels": all(case["same_pixels"] for case in cases.values()),
        },
    }


def main() -> None:
    """Parse options, run the benchmark, print its figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    defaults = BenchConfig()
    parser.add_argument("--device", default=defaults.device, help="cpu or cuda")
    parser.add_argument("--dtype", default=defaults.dtype, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--tiny-rounds", type=int, default=defaults.tiny_rounds)
    parser.add_argument("--sd15-rounds", type=int, default=defaults.sd15_rounds)
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--workdir", type=Path, help="keep the pipelines (~4 GB) here for the next run")
    args = vars(parser.parse_args())
    workdir = args.pop("workdir")
    bench = BenchConfig(**args)
    if workdir is not None:
        print(json.dumps(run(bench, workdir), indent=2))
        return
    with tempfile.TemporaryDirectory(prefix="gen_bench_") as scratch:
        print(json.dumps(run(bench, Path(scratch)), indent=2))


if __name__ == "__main__":
    main()
