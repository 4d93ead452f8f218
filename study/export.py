"""Export votes per task as parquet (`DIR/<task>.parquet`) or as a `datasets` folder (`DIR/<task>`).

Every vote is exported, judges' and off-board ones included; `is_judge` and `counts_for_board` say which.
Times are naive UTC. Aspect choices are a struct with one field per aspect of the task (null = not judged).

generation: Pick-a-Pic's columns, so PickScore and Diffusion-DPO tooling reads the file unchanged:
  caption (the prompt), created_at, ranking_id (the comparison id), user_id (participant id, null when
  anonymous), image_0_uid / image_1_uid (the images' sha256 in the blob store), jpg_0 / jpg_1 (the stored
  image bytes, PNG or WebP despite the name; null when a vote has no stored output, e.g. an imported one),
  model_0 / model_1 (system names), label_0 / label_1 (1/0 for a win, 0.5/0.5 for tie *and* both_bad),
  best_image_uid (null unless a or b won), are_different (false only when both sides are the same image),
  has_label (always true), num_example_per_prompt (votes in this export with the same caption); then
  choice (a | b | tie | both_bad, so consumers can drop both_bad), aspects, is_judge, counts_for_board.

retrieval, critique: comparison_id, created_at, task, prompt, system_a, system_b, choice, aspects, reason,
  latency_ms, confidence (1–5 or null), participant (id, never the pseudonym), is_judge, counts_for_board,
  output_a / output_b (the stored text, or the JSON text of a ranking; null for other media or no output),
  output_a_sha256 / output_b_sha256.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import Engine, Select, case, func, select
from sqlalchemy.orm import aliased

from study.blobs import BlobStore
from study.models import Blob, Comparison, Participant, System, Vote, VoteAspect
from study.tasks import TASK_ASPECTS, TASKS

FORMATS = ("parquet", "hf")
# Votes per query and per parquet row group; generation chunks carry two images per vote.
CHUNK_ROWS = 2000
LABELS = {"a": (1.0, 0.0), "b": (0.0, 1.0), "tie": (0.5, 0.5), "both_bad": (0.5, 0.5)}


class ExportError(ValueError):
    """The export cannot be written; nothing at the destination was replaced."""


@dataclass(frozen=True)
class Written:
    """One exported task."""

    task: str
    path: Path
    rows: int


def schema(task: str) -> pa.Schema:
    """The columns and types of `task`'s export."""
    aspects = pa.struct([(aspect, pa.string()) for aspect in TASK_ASPECTS[task]])
    tail = [("choice", pa.string()), ("aspects", aspects)]
    flags = [("is_judge", pa.bool_()), ("counts_for_board", pa.bool_())]
    if task == "generation":
        return pa.schema([
            ("caption", pa.string()), ("created_at", pa.timestamp("us")), ("ranking_id", pa.int64()),
            ("user_id", pa.int64()), ("image_0_uid", pa.string()), ("image_1_uid", pa.string()),
            ("jpg_0", pa.binary()), ("jpg_1", pa.binary()), ("model_0", pa.string()), ("model_1", pa.string()),
            ("label_0", pa.float64()), ("label_1", pa.float64()), ("best_image_uid", pa.string()),
            ("are_different", pa.bool_()), ("has_label", pa.bool_()), ("num_example_per_prompt", pa.int64()),
            *tail, *flags])
    return pa.schema([
        ("comparison_id", pa.int64()), ("created_at", pa.timestamp("us")), ("task", pa.string()),
        ("prompt", pa.string()), ("system_a", pa.string()), ("system_b", pa.string()), *tail,
        ("reason", pa.string()), ("latency_ms", pa.int64()), ("confidence", pa.int64()), ("participant", pa.int64()),
        *flags,
        ("output_a", pa.string()), ("output_b", pa.string()), ("output_a_sha256", pa.string()),
        ("output_b_sha256", pa.string())])


def export_votes(engine: Engine, blobs: BlobStore, out: Path, fmt: str = "parquet",
                 task: str | None = None) -> list[Written]:
    """Write each task with votes (or only `task`) to `out`, replacing an earlier export of that task."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    if task is not None and task not in TASKS:
        raise ExportError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    written = []
    for name in [task] if task else TASKS:
        if not _vote_count(engine, name):
            continue
        out.mkdir(parents=True, exist_ok=True)
        # Build beside the target, then swap it in, so a failed export leaves the previous one intact.
        with tempfile.TemporaryDirectory(dir=out, prefix=f".{name}-") as tmp:
            parquet = Path(tmp) / f"{name}.parquet"
            rows = _write_parquet(engine, blobs, name, parquet)
            if fmt == "parquet":
                target = out / f"{name}.parquet"
                os.replace(parquet, target)
            else:
                target = out / name
                _save_dataset(parquet, name, Path(tmp))
                if target.exists():
                    os.replace(target, Path(tmp) / "previous")
                os.replace(Path(tmp) / "dataset", target)
        written.append(Written(name, target, rows))
    return written


def _save_dataset(parquet: Path, task: str, tmp: Path) -> None:
    """Convert the parquet file to a `datasets` folder at tmp/dataset, streaming through a private cache."""
    import datasets  # heavy, and only this format needs it

    features = datasets.Features.from_arrow_schema(schema(task))
    dataset = datasets.Dataset.from_parquet(str(parquet), features=features, cache_dir=str(tmp / "cache"))
    dataset.save_to_disk(str(tmp / "dataset"))


def _vote_count(engine: Engine, task: str) -> int:
    query = select(func.count()).select_from(Vote).join(Comparison, Vote.comparison_id == Comparison.id)
    with engine.connect() as conn:
        return conn.execute(query.where(Comparison.task == task)).scalar_one()


def _votes_query(task: str) -> Select:
    """Every vote of the task in id order, with its systems, outputs' media types and aspect choices."""
    a, b, blob_a, blob_b = aliased(System), aliased(System), aliased(Blob), aliased(Blob)
    # One column per aspect, pivoted in SQL, so the votes stream out of a single query.
    pivot = select(VoteAspect.vote_id, *[
        func.max(case((VoteAspect.aspect == aspect, VoteAspect.choice))).label(f"aspect_{aspect}")
        for aspect in TASK_ASPECTS[task]]).group_by(VoteAspect.vote_id).subquery()
    return (select(Vote.id.label("vote_id"), Comparison.id.label("comparison_id"), Vote.created_at,
                   Comparison.prompt, a.name.label("system_a"), b.name.label("system_b"), Vote.choice, Vote.reason,
                   Vote.latency_ms, Vote.confidence, Vote.participant_id, Participant.kind, Vote.counts_for_board,
                   Comparison.output_a, blob_a.media_type.label("media_a"),
                   Comparison.output_b, blob_b.media_type.label("media_b"),
                   *[pivot.c[f"aspect_{aspect}"] for aspect in TASK_ASPECTS[task]])
            .join(Comparison, Vote.comparison_id == Comparison.id)
            .join(a, Comparison.system_a_id == a.id).join(b, Comparison.system_b_id == b.id)
            .outerjoin(Participant, Vote.participant_id == Participant.id)
            .outerjoin(blob_a, Comparison.output_a == blob_a.sha256)
            .outerjoin(blob_b, Comparison.output_b == blob_b.sha256)
            .outerjoin(pivot, pivot.c.vote_id == Vote.id)
            .where(Comparison.task == task).order_by(Vote.id))


def _chunks(engine: Engine, task: str) -> Iterator[pd.DataFrame]:
    """The task's votes, CHUNK_ROWS at a time from one streamed query (a server-side cursor on PostgreSQL)."""
    with engine.connect() as conn:
        result = conn.execution_options(yield_per=CHUNK_ROWS).execute(_votes_query(task))
        for rows in result.partitions():
            yield pd.DataFrame(rows, columns=list(result.keys()))


def _write_parquet(engine: Engine, blobs: BlobStore, task: str, path: Path) -> int:
    """Stream the task's votes into one parquet file; returns the number of rows."""
    target, rows = schema(task), 0
    per_prompt = _votes_per_prompt(engine, task) if task == "generation" else {}
    with pq.ParquetWriter(path, target) as writer:
        for chunk in _chunks(engine, task):
            columns = _pick_a_pic(chunk, blobs, per_prompt) if task == "generation" else _plain(chunk, blobs, task)
            choices = {aspect: _nones(chunk[f"aspect_{aspect}"]) for aspect in TASK_ASPECTS[task]}
            columns["aspects"] = [dict(zip(choices, row)) for row in zip(*choices.values())]
            columns["choice"] = chunk["choice"].tolist()
            columns["is_judge"] = chunk["kind"].eq("judge").tolist()
            columns["counts_for_board"] = chunk["counts_for_board"].astype(bool).tolist()
            writer.write_table(pa.Table.from_pydict(columns, schema=target))
            rows += len(chunk)
    return rows


def _votes_per_prompt(engine: Engine, task: str) -> dict[str | None, int]:
    query = (select(Comparison.prompt, func.count()).select_from(Vote)
             .join(Comparison, Vote.comparison_id == Comparison.id)
             .where(Comparison.task == task).group_by(Comparison.prompt))
    with engine.connect() as conn:
        return dict(conn.execute(query).all())


def _ids(series: pd.Series) -> list[int | None]:
    return [None if pd.isna(v) else int(v) for v in series]


def _pick_a_pic(chunk: pd.DataFrame, blobs: BlobStore, per_prompt: dict[str | None, int]) -> dict[str, list]:
    first, second = _nones(chunk["output_a"]), _nones(chunk["output_b"])
    choices = chunk["choice"].tolist()
    prompts = _nones(chunk["prompt"])
    return {
        "caption": prompts,
        "created_at": chunk["created_at"].tolist(),
        "ranking_id": chunk["comparison_id"].tolist(),
        "user_id": _ids(chunk["participant_id"]),
        "image_0_uid": first,
        "image_1_uid": second,
        "jpg_0": [_blob(blobs, sha) for sha in first],
        "jpg_1": [_blob(blobs, sha) for sha in second],
        "model_0": chunk["system_a"].tolist(),
        "model_1": chunk["system_b"].tolist(),
        "label_0": [LABELS[c][0] for c in choices],
        "label_1": [LABELS[c][1] for c in choices],
        "best_image_uid": [{"a": a, "b": b}.get(c) for a, b, c in zip(first, second, choices)],
        "are_different": [a is None or a != b for a, b in zip(first, second)],
        "has_label": [True] * len(chunk),
        "num_example_per_prompt": [per_prompt.get(p, 0) for p in prompts],
    }


def _plain(chunk: pd.DataFrame, blobs: BlobStore, task: str) -> dict[str, list]:
    first, second = _nones(chunk["output_a"]), _nones(chunk["output_b"])
    return {
        "comparison_id": chunk["comparison_id"].tolist(),
        "created_at": chunk["created_at"].tolist(),
        "task": [task] * len(chunk),
        "prompt": _nones(chunk["prompt"]),
        "system_a": chunk["system_a"].tolist(),
        "system_b": chunk["system_b"].tolist(),
        "reason": _nones(chunk["reason"]),
        "latency_ms": _ids(chunk["latency_ms"]),
        "confidence": _ids(chunk["confidence"]),
        "participant": _ids(chunk["participant_id"]),
        "output_a": [_text(blobs, sha, media) for sha, media in zip(first, _nones(chunk["media_a"]))],
        "output_b": [_text(blobs, sha, media) for sha, media in zip(second, _nones(chunk["media_b"]))],
        "output_a_sha256": first,
        "output_b_sha256": second,
    }


def _nones(series: pd.Series) -> list:
    """Values with None for SQL NULLs (pandas turns them into NaN in object and str columns)."""
    return [None if pd.isna(v) else v for v in series.astype(object)]


def _blob(blobs: BlobStore, sha: str | None) -> bytes | None:
    if sha is None:
        return None
    try:
        return blobs.get(sha)
    except FileNotFoundError:
        raise ExportError(f"output {sha} is recorded in the database but missing from {blobs.root}") from None


def _text(blobs: BlobStore, sha: str | None, media_type: str | None) -> str | None:
    """A text or JSON output as text; None for images and missing outputs."""
    if sha is None or not media_type:
        return None
    if not (media_type.startswith("text/") or media_type == "application/json" or media_type.endswith("+json")):
        return None
    data = _blob(blobs, sha)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ExportError(f"output {sha} is stored as {media_type} but is not UTF-8") from None
