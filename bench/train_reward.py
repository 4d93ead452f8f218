"""Benchmark: the VP-Score trainer's step against a bare forward + backward + AdamW step of the same model and batch.

The trainer's step is what `train.reward` spends per step once set up (data loader, preprocessing from cached
pixels, tokenization, the per-head loss, accelerate's backward, optimizer, progress): the time of a run of
`long` steps minus a run of `short` steps, divided by the difference, so loading and saving cancel out. The
bare step runs the same model, frozen the same way, on tensors made beforehand. A first trainer run warms up
(imports, allocator, first calls) untimed; then short, long and bare alternate `repeats` times and the medians
count, so a slow patch of a shared machine hits every path.

    python bench/train.py --trainer reward     # ImageReward-size VP-Score (ViT-L/16 + BERT-base), random weights
    python bench/train_reward.py --size tiny --short 5 --long 25
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# Run as `python bench/train_reward.py`, the repository root is not on sys.path; add it so `engines` imports.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import machine  # noqa: E402
from bench.scoring import PROMPTS, TEXT, VISION, bert_sized_tokenizer  # noqa: E402
from engines.reward import VPScore, VPScoreConfig, VPScoreModel, save_vpscore  # noqa: E402
from study.blobs import BlobStore, Output  # noqa: E402
from study.db import default_url, make_engine, upgrade  # noqa: E402
from study.votes import Matchup, VoteService  # noqa: E402
from train.data import PairFilter  # noqa: E402
from train.reward import RewardTrainConfig, freeze_like_imagereward, train  # noqa: E402

TARGET = 0.85  # the trainer keeps at least 85% of the bare step's throughput


@dataclass(frozen=True)
class BenchConfig:
    """Model size, data, batch and step counts of one run."""

    size: str = "imagereward"
    pairs: int = 64
    batch: int = 4
    short: int = 2
    long: int = 6
    bare_steps: int = 4
    repeats: int = 2
    seed: int = 0


def _png(rng: np.random.Generator, side: int = 256) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _store(home: Path, pairs: int, seed: int) -> None:
    engine = make_engine(default_url(home))
    upgrade(engine)
    votes = VoteService(engine, BlobStore(home / "blobs"))
    for name in ("x", "y"):
        votes.register_system("generation", name)
    rng = np.random.default_rng(seed)
    for i in range(pairs):
        opened = votes.open_comparison(Matchup("generation", "x", "y"), PROMPTS[i % len(PROMPTS)],
                                       Output(_png(rng), "image/png"), Output(_png(rng), "image/png"))
        votes.record_vote(opened.token, "ab"[i % 2])


def _scorer_settings(bench: BenchConfig, home: Path) -> dict[str, Any]:
    if bench.size == "tiny":
        return {"checkpoint": "tiny", "format": "imagereward"}
    torch.manual_seed(bench.seed)
    folder = home / "vpscore-random"
    folder.mkdir()
    save_vpscore(folder, VPScoreModel(VPScoreConfig(vision=VISION, text=TEXT)), bert_sized_tokenizer(folder))
    return {"checkpoint": str(folder), "format": "vpscore"}


def _trainer_seconds(bench: BenchConfig, home: Path, scorer: dict[str, Any], steps: int) -> float:
    config = RewardTrainConfig(home, home / f"run-{steps}-{time.monotonic_ns()}", scorer=scorer, steps=steps,
                               batch_size=bench.batch, checkpoint_every=10**6, seed=bench.seed,
                               filters=PairFilter(test_share=0.0))
    start = time.perf_counter()
    train(config)
    return time.perf_counter() - start


def _bare_step_seconds(bench: BenchConfig, home: Path, scorer_settings: dict[str, Any]) -> float:
    scorer = VPScore(scorer_settings, device="cpu", dtype="float32", home=home)
    model = scorer.model.train()
    freeze_like_imagereward(model, 0.7)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    rng = np.random.default_rng(bench.seed)
    images = [Image.open(io.BytesIO(_png(rng))).convert("RGB") for _ in range(2 * bench.batch)]
    inputs = scorer.inputs([PROMPTS[i % len(PROMPTS)] for i in range(2 * bench.batch)], images)
    times = []
    for _ in range(bench.bare_steps + 1):  # the first is a warm-up
        start = time.perf_counter()
        better, worse = model(**inputs)["overall"].chunk(2)
        (-F.logsigmoid(better - worse).mean()).backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def run(bench: BenchConfig) -> dict[str, Any]:
    """Trainer step time from two run lengths, the bare step, and their ratio."""
    with tempfile.TemporaryDirectory(prefix="train_bench_") as folder:
        home = Path(folder)
        _store(home, bench.pairs, bench.seed)
        scorer = _scorer_settings(bench, home)
        _trainer_seconds(bench, home, scorer, bench.short)
        runs: dict[str, list[float]] = {"short": [], "long": [], "bare": []}
        for _ in range(bench.repeats):
            runs["short"].append(_trainer_seconds(bench, home, scorer, bench.short))
            runs["long"].append(_trainer_seconds(bench, home, scorer, bench.long))
            runs["bare"].append(_bare_step_seconds(bench, home, scorer))
    short, long, bare = (statistics.median(runs[name]) for name in ("short", "long", "bare"))
    trainer_step = (long - short) / (bench.long - bench.short)
    share = bare / trainer_step
    return {"bench": "VP-Score training step", "config": asdict(bench),
            "machine": machine(torch=torch.__version__, torch_threads=torch.get_num_threads()),
            "runs_s": {name: [round(t, 3) for t in times] for name, times in runs.items()},
            "trainer_step_s": round(trainer_step, 4), "bare_step_s": round(bare, 4),
            "trainer_share_of_bare": round(share, 4), "target": TARGET, "target_met": share >= TARGET}


def main(argv: list[str] | None = None) -> None:
    """Parse the options, run the benchmark, print its figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = BenchConfig()
    parser.add_argument("--size", choices=("tiny", "imagereward"), default=defaults.size)
    for option in ("pairs", "batch", "short", "long", "bare_steps", "repeats", "seed"):
        parser.add_argument(f"--{option.replace('_', '-')}", type=int, default=getattr(defaults, option))
    print(json.dumps(run(BenchConfig(**vars(parser.parse_args(argv)))), indent=2))


if __name__ == "__main__":
    main()
