"""What every trainer's run folder holds and how a run resumes: `checkpoints/step-N` (accelerate state) and
`run_card.json` (data hash, vote counts, settings, metrics before and after).
"""
from __future__ import annotations

import hashlib
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

CHECKPOINTS = "checkpoints"
RUN_CARD = "run_card.json"


def checkpoint_path(out: Path, step: int) -> Path:
    """Where the accelerate state after `step` optimizer steps goes."""
    return out / CHECKPOINTS / f"step-{step}"


def latest_checkpoint(out: Path) -> tuple[int, Path] | None:
    """The newest saved step of a run and its folder, or None for a fresh run."""
    steps = [(int(p.name.removeprefix("step-")), p) for p in (out / CHECKPOINTS).glob("step-*")
             if p.is_dir() and p.name.removeprefix("step-").isdigit()]
    return max(steps) if steps else None


def data_hash(pairs: pd.DataFrame) -> str:
    """A fingerprint of the votes a run trained on: their ids and choices, in any order."""
    keyed = pairs[["vote_id", "choice"]].astype(str).agg(":".join, axis=1)
    return hashlib.sha256("\n".join(sorted(keyed)).encode()).hexdigest()


def finished_at() -> str:
    """Now, in UTC, as the run card records it."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_run_card(out: Path, card: dict[str, Any]) -> dict[str, Any]:
    """Write the card as JSON into the run folder (only the main process should call this); return it as
    written, paths as strings, for the trained system's registration."""
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(card, indent=2, default=str)
    (out / RUN_CARD).write_text(text)
    return json.loads(text)


class StepTimer:
    """Wall time per optimizer step, from the end of one step to the end of the next (so the data loader counts):
    the run card's throughput figure, as a median, so the steps that also save a checkpoint do not skew it."""

    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.seconds: list[float] = []

    def tick(self) -> None:
        """Mark the end of a step."""
        now = time.perf_counter()
        self.seconds.append(now - self.last)
        self.last = now

    @property
    def median(self) -> float | None:
        """The median step time in seconds, None before any step."""
        return statistics.median(self.seconds) if self.seconds else None
