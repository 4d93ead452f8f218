"""Benchmark: VP-Score's engine path (PIL images + prompts in, standardized scores out) vs a bare forward pass.

Both run the same random-weight ViT-L/16 + BERT-base VP-Score, built from the real ImageReward sizes (no
download), on the same batch; the bare pass gets tensors made beforehand. Their ratio is what preprocessing,
tokenization, batching and standardization cost on top of the model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import BertTokenizer

# Run as `python bench/scoring.py`, the repository root is not on sys.path; add it so `engines` imports.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import machine  # noqa: E402
from engines.reward import DTYPES, LoadedReward, LoadReport, RewardScorer, VPScoreConfig, VPScoreModel  # noqa: E402

# ImageReward's backbone: BLIP ViT-L/16 at 224 px and med_config.json's BERT-base with cross-attention.
VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
              patch_size=16, hidden_act="gelu", layer_norm_eps=1e-6)
TEXT = dict(vocab_size=30524, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
            max_position_embeddings=512, layer_norm_eps=1e-12, hidden_act="gelu", hidden_dropout_prob=0.1,
            attention_probs_dropout_prob=0.1, encoder_hidden_size=1024, pad_token_id=0, bos_token_id=30522,
            sep_token_id=3, eos_token_id=3)
PROMPTS = ("a photo of a red cat sitting on a windowsill at sunset, warm light, shallow depth of field",
           "an oil painting of mountains over a lake",
           "portrait of a woman in a flower field, highly detailed, 85mm, golden hour, trending on artstation",
           "a city at night in the rain",
           "a blue dog",
           "watercolor sky with birds and clouds over the sea, soft pastel colors, minimalist composition",
           "a man with an umbrella walking down a street in paris",
           "green flowers")


@dataclass(frozen=True)
class BenchConfig:
    """Batch, image size and repeats of one run."""

    batch: int = 8
    image_px: int = 512
    repeats: int = 3
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0


def bert_sized_tokenizer(folder: Path) -> BertTokenizer:
    """A BERT tokenizer with ImageReward's 30524 ids: real words, fillers, then [DEC] and [ENC] (no download)."""
    words = sorted({w.strip(",.").lower() for p in PROMPTS for w in p.split()} | {",", "."})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    vocab += [f"[unused{i}]" for i in range(TEXT["vocab_size"] - 2 - len(vocab))] + ["[DEC]", "[ENC]"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizer.from_pretrained(str(folder))


def build_scorer(bench: BenchConfig) -> RewardScorer:
    """A random-weight VP-Score of the real size, wrapped by the engine's scorer."""
    torch.manual_seed(bench.seed)
    model = VPScoreModel(VPScoreConfig(vision=VISION, text=TEXT))
    with tempfile.TemporaryDirectory(prefix="rw_bench_") as folder:
        tokenizer = bert_sized_tokenizer(Path(folder))
    names = tuple(model.state_dict())
    report = LoadReport(source="random weights from config", loaded=(), skipped=(), filled=names)
    return RewardScorer(LoadedReward(model, tokenizer, report), device=bench.device, dtype=bench.dtype,
                        batch_size=bench.batch)


def images_for(bench: BenchConfig) -> list[Image.Image]:
    """Generator-sized RGB images (square, like SD outputs), one per prompt."""
    rng = np.random.default_rng(bench.seed)
    size = (bench.image_px, bench.image_px, 3)
    return [Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)) for _ in range(bench.batch)]


def sync(device: str) -> None:
    """Wait for queued GPU work so that a timer measures it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_seconds(fns: dict[str, Callable[[], object]], repeats: int, device: str) -> dict[str, float]:
    """Median wall time of each function; the functions alternate so drift hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for name, fn in fns.items():  # warm-up: allocator, kernels, caches
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def machine_info(device: str) -> dict[str, object]:
    """Where the figures were taken."""
    return machine(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                   device=torch.cuda.get_device_name() if device.startswith("cuda") else "cpu")


def run(bench: BenchConfig) -> dict[str, object]:
    """Time the engine path, the bare forward and preprocessing alone on one batch."""
    scorer = build_scorer(bench)
    prompts = list(PROMPTS[: bench.batch]) + [PROMPTS[0]] * max(0, bench.batch - len(PROMPTS))
    images = images_for(bench)
    inputs = scorer.inputs(prompts, images)

    def bare() -> object:
        with torch.inference_mode():
            return scorer.model(**inputs)

    seconds = median_seconds({"engine": lambda: scorer.score(prompts, images), "bare": bare,
                              "preprocess": lambda: scorer.inputs(prompts, images)}, bench.repeats, bench.device)
    ratio = seconds["bare"] / seconds["engine"]
    return {
        "machine": machine_info(bench.device),
        "model": "VP-Score, random weights: BLIP ViT-L/16 224px + BERT-base (12x768, cross-attention), 5 heads",
        "parameters_m": round(sum(p.numel() for p in scorer.model.parameters()) / 1e6, 1),
        "batch": bench.batch,
        "image_px": bench.image_px,
        "repeats": bench.repeats,
        "dtype": bench.dtype,
        "engine_s": round(seconds["engine"], 4),
        "bare_s": round(seconds["bare"], 4),
        "preprocess_s": round(seconds["preprocess"], 4),
        "engine_images_per_s": round(bench.batch / seconds["engine"], 3),
        "bare_images_per_s": round(bench.batch / seconds["bare"], 3),
        "engine_over_bare_throughput": round(ratio, 4),
        "targets_met": {"engine_throughput_ge_90pct_of_bare": ratio >= 0.9},
    }


def main() -> None:
    """Parse sizes, run the benchmark, print its figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    defaults = BenchConfig()
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--image-px", type=int, default=defaults.image_px)
    parser.add_argument("--repeats", type=int, default=defaults.repeats)
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=defaults.dtype)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args()
    bench = BenchConfig(batch=args.batch, image_px=args.image_px, repeats=args.repeats, device=args.device,
                        dtype=args.dtype, seed=args.seed)
    print(json.dumps(run(bench), indent=2))


if __name__ == "__main__":
    main()
