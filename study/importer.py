"""Bulk import of pairwise votes from JSON lines or parquet: validate every row, then insert all in one transaction.

Rows (one JSON object per line, a JSON array of objects, or one parquet row each):

- native: `task, system_a, system_b, winner` with winner in a | b | tie | both_bad (`choice` is read when
  `winner` is absent, so this module reads what `study.export` writes for retrieval and critique);
- Chatbot Arena: `model_a, model_b, winner` with winner in model_a | model_b | tie | tie (bothbad); the task
  comes from the row or from `default_task`. Arena's `tstamp` is read as the timestamp and `anony: false`
  keeps the vote off the public board (only anonymous battles count). Arena's `judge` names its *human*
  voter, so it is not read as a model judge.

Optional per row: `prompt`; `aspects` {aspect: choice} (an object, a parquet struct or map, or a JSON string);
`timestamp` (ISO 8601, naive = UTC, or epoch seconds; default: the import time); `judge`, the name of a model
judge, whose votes go to a participant of kind "judge" and never count as human votes; `reason`;
`latency_ms`; `counts_for_board` (default true). Other fields are ignored.

Imported systems get source "imported" and are disabled: they have no engine, so they must not be drawn
into new matchups. Each row becomes one comparison (random token, no outputs, no expiry) and one vote.
"""
from __future__ import annotations

import gc
import json
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import Connection, Engine, insert, literal_column, select

from study.models import Comparison, Participant, System, Vote, VoteAspect
from study.participants import judge_pseudonym, load_secret
from study.tasks import CHOICES, TASK_ASPECTS, TASKS
from study.votes import VoteConfig

# Arena's winner values map onto ours; the two sets only share "tie", which means the same in both.
WINNERS: dict[str, str] = {
    **{choice: choice for choice in CHOICES},
    "model_a": "a",
    "model_b": "b",
    "tie (bothbad)": "both_bad",
}
FIELDS = ("task", "system_a", "system_b", "model_a", "model_b", "winner", "choice", "prompt", "aspects",
          "timestamp", "tstamp", "judge", "reason", "latency_ms", "counts_for_board", "anony")
# What pandas' infer_dtype reports for columns whose values are all of one kind (missing ones skipped).
UNIFORM_KINDS = frozenset({"empty", "string", "integer", "floating", "mixed-integer-float", "boolean", "datetime",
                           "datetime64", "date", "bytes", "decimal", "complex", "timedelta", "time", "period",
                           "interval", "categorical"})
MAX_NAME_CHARS = 200  # systems.name is VARCHAR(200); judge names share the limit
MAX_LISTED = 20
CHUNK_ROWS = 50_000
# Columns without a default that may be left out of an insert when no row sets them.
NULLABLE = frozenset({"prompt", "reason", "latency_ms", "participant_id"})
# Random tokens land all over the unique index; a 256 MiB page cache keeps it in memory (~3x faster at 1M rows).
SQLITE_IMPORT_CACHE_KIB = 256 * 1024


@dataclass(frozen=True)
class BadRow:
    """A refused row: its 1-based line (JSON lines) or row (parquet, JSON array) number and why."""

    number: int
    reason: str


@dataclass(frozen=True)
class ImportReport:
    """What an import stored, and the bad rows it skipped (only with skip_bad)."""

    path: Path
    unit: str
    imported: int
    per_task: dict[str, int]
    judge_votes: int
    new_systems: tuple[str, ...]
    skipped: tuple[BadRow, ...] = ()


class ImportFailed(ValueError):
    """The file was refused and nothing was imported; the message lists the bad rows."""

    def __init__(self, message: str, bad: tuple[BadRow, ...] = ()) -> None:
        super().__init__(message)
        self.bad = bad


def describe_bad(bad: tuple[BadRow, ...], unit: str, limit: int = MAX_LISTED) -> str:
    """The first `limit` bad rows, one per line, and how many more there are."""
    lines = [f"  {unit} {row.number}: {row.reason}" for row in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"  … and {len(bad) - limit} more bad {unit}s")
    return "\n".join(lines)


def import_votes(engine: Engine, path: Path | str, *, home: Path, skip_bad: bool = False,
                 default_task: str | None = None, config: VoteConfig = VoteConfig()) -> ImportReport:
    """Validate every row of `path` and import them in one transaction; any bad row refuses the file unless skip_bad."""
    with _no_gc():
        return _import(engine, Path(path), home, skip_bad, default_task, config)


def _import(engine: Engine, path: Path, home: Path, skip_bad: bool, default_task: str | None,
            config: VoteConfig) -> ImportReport:
    if default_task is not None and default_task not in TASKS:
        raise ImportFailed(f"unknown task {default_task!r}; known tasks: {', '.join(TASKS)}")
    columns, numbers, unreadable, unit = _read_rows(path)
    frame, reasons, aspects = _validate(columns, len(numbers), default_task, config)
    refused = reasons.notna().to_numpy()
    bad = tuple(sorted(unreadable + [BadRow(int(n), r) for n, r in zip(numbers[refused], reasons[refused])],
                       key=lambda row: row.number))
    total = len(numbers) + len(unreadable)
    if not total:
        raise ImportFailed(f"{path} holds no rows")
    if bad and (not skip_bad or len(bad) == total):
        hint = "" if skip_bad else " (--skip-bad imports the rest)"
        raise ImportFailed(f"{len(bad)} of {total} {unit}s in {path} are bad; nothing was imported{hint}:\n"
                           f"{describe_bad(bad, unit)}", bad)
    good = ~refused
    frame = frame[good].reset_index(drop=True)
    # Aspect rows point at rows of the whole file; renumber them to rows of the good ones.
    aspects = aspects[good[aspects["row"].to_numpy()]]
    aspects = aspects.assign(row=np.cumsum(good)[aspects["row"].to_numpy()] - 1)
    new_systems, judge_votes = _store(engine, frame, aspects, home)
    per_task = {task: int(n) for task, n in frame["task"].value_counts().sort_index().items()}
    return ImportReport(path, unit, len(frame), per_task, judge_votes, new_systems, bad)


# reading


def _read_rows(path: Path) -> tuple[dict[str, list[Any]], np.ndarray, list[BadRow], str]:
    """The known fields as columns of Python values, each good row's number, unparseable rows, and the unit."""
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".ndjson", ".json", ".parquet"):
        raise ImportFailed(f"cannot import {path}: use a .jsonl/.ndjson/.json or .parquet file")
    if not path.is_file():
        raise ImportFailed(f"no such file: {path}")
    if suffix == ".parquet":
        columns, count = _read_parquet(path)
        return columns, np.arange(1, count + 1), [], "row"
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ImportFailed(f"cannot read {path}: {error.strerror}") from None
    if data.lstrip()[:1] == b"[":
        rows, numbers, bad = _read_json_array(path, data)
        unit = "row"
    else:
        rows, numbers, bad = _read_json_lines(data)
        unit = "line"
    present = set().union(*map(dict.keys, rows)) if rows else set()
    columns = {name: [row.get(name) for row in rows] for name in FIELDS if name in present}
    return columns, np.asarray(numbers, dtype=np.int64), bad, unit


@contextmanager
def _no_gc() -> Iterator[None]:
    """Pause the cyclic GC: millions of fresh rows and dicts trigger full collections that find nothing to free."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _read_json_lines(data: bytes) -> tuple[list[dict], list[int], list[BadRow]]:
    rows, numbers, bad = [], [], []
    for number, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            bad.append(BadRow(number, f"not valid JSON: {error.msg} at column {error.colno}"))
            continue
        except UnicodeDecodeError:
            bad.append(BadRow(number, "not valid UTF-8"))
            continue
        if isinstance(row, dict):
            rows.append(row)
            numbers.append(number)
        else:
            bad.append(BadRow(number, f"expected a JSON object, got {type(row).__name__}"))
    return rows, numbers, bad


def _read_json_array(path: Path, data: bytes) -> tuple[list[dict], list[int], list[BadRow]]:
    try:
        items = json.loads(data)
    except json.JSONDecodeError as error:
        raise ImportFailed(f"{path} is not valid JSON: {error.msg} at line {error.lineno} "
                           f"column {error.colno}") from None
    except UnicodeDecodeError:
        raise ImportFailed(f"{path} is not valid UTF-8") from None
    rows, numbers, bad = [], [], []
    for number, item in enumerate(items, 1):
        if isinstance(item, dict):
            rows.append(item)
            numbers.append(number)
        else:
            bad.append(BadRow(number, f"expected a JSON object, got {type(item).__name__}"))
    return rows, numbers, bad


def _read_parquet(path: Path) -> tuple[dict[str, list[Any]], int]:
    try:
        table = pq.read_table(path, columns=[n for n in FIELDS if n in pq.read_schema(path).names])
        return {name: table.column(name).to_pylist() for name in table.column_names}, table.num_rows
    except (pa.ArrowException, OSError, ValueError) as error:
        raise ImportFailed(f"cannot read {path} as parquet: {error}") from None


# validation


class _Reasons:
    """The first reason each row is refused for; later checks never overwrite an earlier one."""

    def __init__(self, n: int) -> None:
        self.values = np.full(n, None, dtype=object)
        self.refused = np.zeros(n, dtype=bool)

    def add(self, rows: np.ndarray, messages: list[str]) -> None:
        """Refuse `rows` with one message each, keeping the reason of rows refused before."""
        for row, message in zip(rows, messages):
            if not self.refused[row]:
                self.values[row], self.refused[row] = message, True

    def flag(self, mask: np.ndarray | pd.Series, message: str, values: pd.Series | None = None) -> None:
        """Refuse the rows in `mask`; `{}` in `message` is filled with each row's value, shortened."""
        rows = np.flatnonzero(np.asarray(mask, dtype=bool) & ~self.refused)
        self.refused[rows] = True
        if values is None:
            self.values[rows] = message
        else:
            self.values[rows] = [message.format(_short(v)) for v in values.to_numpy()[rows]]

    def series(self) -> pd.Series:
        """The reasons, None for good rows."""
        return pd.Series(self.values, dtype=object)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _column(columns: dict[str, list[Any]], name: str, n: int) -> pd.Series:
    return pd.Series(columns[name], dtype=object) if name in columns else pd.Series([None] * n, dtype=object)


def _either(columns: dict[str, list[Any]], first: str, second: str, n: int) -> pd.Series:
    """`first`, falling back to `second` where `first` is missing."""
    primary = _column(columns, first, n)
    return primary.where(primary.notna(), _column(columns, second, n)) if second in columns else primary


def _of_type(col: pd.Series, kinds: tuple[str, ...], test: Callable[[Any], bool]) -> np.ndarray:
    """Where the values pass `test`; pandas' one-pass type inference decides whole columns without a Python loop."""
    kind = pd.api.types.infer_dtype(col, skipna=True)
    if kind in kinds:
        return col.notna().to_numpy()
    if kind in UNIFORM_KINDS:  # every value is of one other kind, or there are none
        return np.zeros(len(col), dtype=bool)
    return np.fromiter(map(test, col), dtype=bool, count=len(col))


def _is_str(col: pd.Series) -> np.ndarray:
    return _of_type(col, ("string",), lambda v: isinstance(v, str))


def _is_number(col: pd.Series) -> np.ndarray:
    # bool is an int subclass, but true/false is never a time or a latency.
    return _of_type(col, ("integer", "floating", "mixed-integer-float"),
                    lambda v: isinstance(v, (int, float)) and not isinstance(v, bool))


def _text(col: pd.Series, name: str, reasons: _Reasons, limit: int | None = None) -> pd.Series:
    """An optional string field, checked for type and length; anything else becomes missing."""
    ok = _is_str(col)
    reasons.flag(col.notna().to_numpy() & ~ok, f"{name} must be a string, got {{}}", col)
    # The arrow-backed string dtype runs the checks below in C++, ~10x faster than on Python objects.
    text = pd.Series(np.where(ok, col.to_numpy(), None), dtype="str")
    if limit is not None:
        reasons.flag(text.str.len().gt(limit), f"{name} is longer than {limit} characters")
    return text


def _validate(columns: dict[str, list[Any]], n: int, default_task: str | None,
              config: VoteConfig) -> tuple[pd.DataFrame, pd.Series, pd.DataFrame]:
    """Clean columns, the refusal reason per row (None = good), and the aspect choices as (row, aspect, choice)."""
    reasons = _Reasons(n)

    raw_task = _column(columns, "task", n)
    if default_task is not None:
        raw_task = raw_task.where(raw_task.notna(), default_task)
    reasons.flag(raw_task.isna(), "missing task (add a task field or pass --task)")
    task = _text(raw_task, "task", reasons)
    reasons.flag(~task.isin(TASKS), f"unknown task {{}}; known tasks: {', '.join(TASKS)}", raw_task)

    arena = (_column(columns, "system_a", n).isna() & _column(columns, "model_a", n).notna()).to_numpy()
    sides = {}
    for side in ("a", "b"):
        name = _text(_either(columns, f"system_{side}", f"model_{side}", n), f"system_{side}", reasons,
                     MAX_NAME_CHARS).str.strip()
        reasons.flag(name.isna(), f"missing system_{side} (or model_{side})")
        reasons.flag(name.eq(""), f"system_{side} is empty")
        sides[side] = name
    reasons.flag(sides["a"].eq(sides["b"]), "system_a and system_b are the same system: {}", sides["a"])

    raw_winner = _either(columns, "winner", "choice", n)
    reasons.flag(raw_winner.isna(), "missing winner")
    choice = _text(raw_winner, "winner", reasons).map(WINNERS)
    reasons.flag(choice.isna(), "unknown winner {}; use a, b, tie, both_bad "
                 "(or Chatbot Arena's model_a, model_b, tie, tie (bothbad))", raw_winner)

    prompt = _text(_column(columns, "prompt", n), "prompt", reasons, config.max_prompt_chars)
    reason = _text(_column(columns, "reason", n), "reason", reasons, config.max_reason_chars).str.strip()
    judge = _text(_column(columns, "judge", n).where(~arena), "judge", reasons, MAX_NAME_CHARS).str.strip()
    reasons.flag(judge.eq(""), "judge is empty")

    frame = pd.DataFrame({"task": task, "system_a": sides["a"], "system_b": sides["b"], "choice": choice,
                          "prompt": prompt, "reason": reason.where(reason.ne("")),
                          "judge": judge, "latency_ms": _latency(_column(columns, "latency_ms", n), config, reasons),
                          "counts_for_board": _board(_either(columns, "counts_for_board", "anony", n), reasons),
                          "created_at": _timestamps(_either(columns, "timestamp", "tstamp", n), reasons)})
    aspects = _aspects(_column(columns, "aspects", n), task, reasons)
    return frame, reasons.series(), aspects


def _latency(col: pd.Series, config: VoteConfig, reasons: _Reasons) -> pd.Series:
    """Whole milliseconds in range; parquet reads an int column with nulls as floats, so 12.0 is fine."""
    number = _is_number(col)
    reasons.flag(col.notna().to_numpy() & ~number, "latency_ms must be a number, got {}", col)
    value = pd.to_numeric(col.where(number), errors="coerce").astype("float64")
    ok = value.eq(value.round()) & value.between(0, config.max_latency_ms)
    reasons.flag(value.notna() & ~ok,
                 f"latency_ms must be a whole number from 0 to {config.max_latency_ms}, got {{}}", col)
    return value.where(ok).astype("Int64")


def _board(col: pd.Series, reasons: _Reasons) -> pd.Series:
    """Whether each vote counts for the public board; true unless the row says otherwise."""
    is_bool = _of_type(col, ("boolean",), lambda v: isinstance(v, bool))
    reasons.flag(col.notna().to_numpy() & ~is_bool, "counts_for_board must be true or false, got {}", col)
    return pd.Series(np.where(is_bool, col.to_numpy(), True).astype(bool))


def _timestamps(col: pd.Series, reasons: _Reasons) -> pd.Series:
    """Naive UTC times from ISO 8601 strings (naive = UTC), epoch seconds or datetimes; missing = now."""
    now = pd.Timestamp.now(tz="UTC")
    parsed = pd.Series(pd.NaT, index=col.index, dtype="datetime64[us, UTC]")
    present = col.notna().to_numpy()
    strings, numbers = _is_str(col), _is_number(col)
    datetimes = _of_type(col, ("datetime", "datetime64"), lambda v: isinstance(v, datetime))
    if strings.any():
        parsed[strings] = pd.to_datetime(col[strings], format="ISO8601", utc=True, errors="coerce")
    if numbers.any():
        parsed[numbers] = pd.to_datetime(col[numbers].astype(float), unit="s", utc=True, errors="coerce")
    if datetimes.any():
        parsed[datetimes] = pd.to_datetime(col[datetimes], utc=True, errors="coerce")
    reasons.flag(present & ~(strings | numbers | datetimes), "timestamp must be ISO 8601 or epoch seconds, got {}",
                 col)
    reasons.flag(present & parsed.isna().to_numpy(), "timestamp is not a valid date: {}", col)
    # Epoch milliseconds read as seconds land far in the future; refuse them rather than guess.
    reasons.flag(parsed.lt(pd.Timestamp("1970-01-01", tz="UTC")) | parsed.gt(now + timedelta(days=1)),
                 "timestamp is out of range (1970 to now): {}", col)
    return parsed.fillna(now).dt.tz_convert(None)


def _aspects(col: pd.Series, task: pd.Series, reasons: _Reasons) -> pd.DataFrame:
    """Explode per-row aspect choices into (row, aspect, choice), refusing rows with bad ones."""
    rows, names, choices, malformed = [], [], [], []
    for row, value in zip(np.flatnonzero(col.notna().to_numpy()), col.dropna()):
        found = _as_dict(value)
        if found is None:
            malformed.append(row)
            continue
        for name, choice in found.items():
            if choice is not None:  # struct columns fill the aspects a row did not judge with null
                rows.append(row)
                names.append(name)
                choices.append(choice)
    reasons.add(np.asarray(malformed, dtype=np.int64),
                [f"aspects must be an object {{aspect: choice}}, got {_short(col.iloc[r])}" for r in malformed])
    found = pd.DataFrame({"row": np.asarray(rows, dtype=np.int64), "aspect": pd.Series(names, dtype=object),
                          "choice": pd.Series(choices, dtype=object)})
    row_task = task.to_numpy()[found["row"].to_numpy()]
    # Python loops, not isin: a value may be anything JSON holds, lists included, which do not hash.
    known = np.fromiter((isinstance(t, str) and a in TASK_ASPECTS.get(t, ())
                         for t, a in zip(row_task, found["aspect"])), dtype=bool, count=len(found))
    valid = np.fromiter((isinstance(c, str) and c in CHOICES for c in found["choice"]), dtype=bool, count=len(found))
    reasons.add(found["row"].to_numpy()[~known], [
        f"unknown aspect {_short(a)} for {t}; use one of {', '.join(TASK_ASPECTS.get(t, ()))}"
        for a, t in zip(found["aspect"][~known], row_task[~known])])
    reasons.add(found["row"].to_numpy()[~valid], [
        f"unknown choice {_short(c)} for aspect {_short(a)}; use one of {', '.join(CHOICES)}"
        for a, c in zip(found["aspect"][~valid], found["choice"][~valid])])
    return found


def _as_dict(value: Any) -> dict | None:
    """Aspects as a dict from an object, a JSON string or a parquet map's [(key, value), ...]; None if neither."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if isinstance(value, list):
        try:
            value = dict(value)
        except (TypeError, ValueError):
            return None
    return value if isinstance(value, dict) else None


# storing


def _store(engine: Engine, frame: pd.DataFrame, aspects: pd.DataFrame, home: Path) -> tuple[tuple[str, ...], int]:
    """Insert systems, judges, comparisons, votes and aspect choices in one transaction; all or nothing."""
    judges = frame["judge"].dropna().unique().tolist()
    secret = load_secret(home) if judges else b""
    created = frame["created_at"].dt.to_pydatetime().tolist()
    with engine.begin() as conn, _bulk_settings(conn):
        systems, new_systems = _ensure_systems(conn, frame)
        participant = frame["judge"].map(_ensure_judges(conn, judges, secret))
        who = _nullable(participant)
        side_ids = {side: frame[["task", side]].merge(systems, how="left", left_on=["task", side],
                                                      right_on=["task", "name"])["id"].tolist()
                    for side in ("system_a", "system_b")}
        # RETURNING without sort_by_parameter_order lets both backends batch rows into multi-row INSERTs; the
        # rows come back in no promised order, so they are matched by token (and votes by comparison id).
        # meta is a constant SQL literal: binding it would JSON-encode the same `{}` once per row.
        tokens = _tokens(len(frame))
        found = _insert_rows(conn, insert(Comparison).values(meta=literal_column("'{}'"))
                             .returning(Comparison.token, Comparison.id), {
            "token": tokens, "task": frame["task"].tolist(), "prompt": _nullable(frame["prompt"]),
            "system_a_id": side_ids["system_a"], "system_b_id": side_ids["system_b"], "participant_id": who,
            "created_at": created})
        comparisons = pd.Series(dict(found)).reindex(tokens).to_numpy(dtype=np.int64)
        votes = insert(Vote).returning(Vote.comparison_id, Vote.id) if len(aspects) else insert(Vote)
        found = _insert_rows(conn, votes, {
            "comparison_id": comparisons.tolist(), "choice": frame["choice"].tolist(),
            "reason": _nullable(frame["reason"]), "latency_ms": _nullable(frame["latency_ms"]),
            "participant_id": who, "counts_for_board": frame["counts_for_board"].tolist(), "created_at": created})
        if len(aspects):
            vote_ids = pd.Series(dict(found)).reindex(comparisons).to_numpy(dtype=np.int64)
            _insert_rows(conn, insert(VoteAspect), {"vote_id": vote_ids[aspects["row"].to_numpy()].tolist(),
                                                    "aspect": aspects["aspect"].tolist(),
                                                    "choice": aspects["choice"].tolist()})
    return new_systems, int(participant.notna().sum())


@contextmanager
def _bulk_settings(conn: Connection) -> Iterator[None]:
    """A large SQLite page cache for the import, restored afterwards for whoever reuses the connection."""
    if conn.dialect.name != "sqlite":
        yield
        return
    before = conn.exec_driver_sql("PRAGMA cache_size").scalar()
    conn.exec_driver_sql(f"PRAGMA cache_size=-{SQLITE_IMPORT_CACHE_KIB}")
    try:
        yield
    finally:
        conn.exec_driver_sql(f"PRAGMA cache_size={int(before)}")


def _ensure_systems(conn: Connection, frame: pd.DataFrame) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """(task, name, id) of every system the rows name, creating unknown ones as disabled imported systems."""
    sides = [frame[["task", side]].set_axis(["task", "name"], axis=1) for side in ("system_a", "system_b")]
    wanted = pd.concat(sides).drop_duplicates().astype(object)
    query = select(System.task, System.name, System.id).where(System.task.in_(wanted["task"].unique().tolist()))
    known = pd.DataFrame(conn.execute(query).all(), columns=["task", "name", "id"]).astype({"task": object,
                                                                                          "name": object})
    missing = wanted.merge(known, how="left", on=["task", "name"])
    missing = missing[missing["id"].isna()].sort_values(["task", "name"])
    if len(missing):
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        conn.execute(insert(System), [
            {"task": task, "name": name, "engine": "", "config": {}, "version": "1", "source": "imported",
             "parent_id": None, "enabled": False, "weight": 1.0, "created_at": now}
            for task, name in zip(missing["task"], missing["name"])])
        known = pd.DataFrame(conn.execute(query).all(), columns=["task", "name", "id"])
    return known, tuple(f"{task}/{name}" for task, name in zip(missing["task"], missing["name"]))


def _ensure_judges(conn: Connection, judges: list[str], secret: bytes) -> dict[str, int]:
    """Participant ids of the named model judges, created with kind "judge" on first sight."""
    if not judges:
        return {}
    by_pseudonym = {judge_pseudonym(secret, name): name for name in judges}
    query = select(Participant.pseudonym, Participant.id).where(Participant.pseudonym.in_(list(by_pseudonym)))
    found = dict(conn.execute(query).all())
    missing = [p for p in by_pseudonym if p not in found]
    if missing:
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        conn.execute(insert(Participant), [{"pseudonym": p, "kind": "judge", "created_at": now} for p in missing])
        found = dict(conn.execute(query).all())
    return {by_pseudonym[p]: pid for p, pid in found.items()}


def _tokens(n: int) -> list[str]:
    """Fresh unguessable tokens, sorted so the unique index grows at its end (2x faster on SQLite at 1M rows)."""
    return sorted(secrets.token_urlsafe(32) for _ in range(n))


def _nullable(series: pd.Series) -> list[Any]:
    """Python values with None for missing ones, as the DB drivers want them."""
    return series.astype(object).where(series.notna(), None).tolist()


def _insert_rows(conn: Connection, statement, columns: dict[str, list[Any]]) -> list[tuple]:
    """Core executemany in chunks, so the per-row dicts of a million-row import never all exist at once."""
    # A nullable column that no row sets is left out: one bind less per row.
    columns = {k: v for k, v in columns.items() if k not in NULLABLE or any(x is not None for x in v)}
    keys, returned = list(columns), []
    for start in range(0, len(next(iter(columns.values()))), CHUNK_ROWS):
        part = slice(start, start + CHUNK_ROWS)
        result = conn.execute(statement, [dict(zip(keys, row)) for row in zip(*(c[part] for c in columns.values()))])
        if result.returns_rows:
            returned += result.all()
    return returned
