"""Vote-store benchmark: record_vote throughput and latency under concurrent writers, and no acknowledged vote
lost or doubled when the writer process is SIGKILLed, on SQLite and PostgreSQL.

    python bench/votes.py [--writers 32] [--seconds 30] [--backends sqlite,postgresql] [--kill-after 10]

Prints one JSON document on stdout; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script from anywhere

import psycopg  # noqa: E402
import sqlalchemy  # noqa: E402
from sqlalchemy import func, select  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from bench.machine import machine  # noqa: E402
from study.blobs import BlobStore, Output  # noqa: E402
from study.db import make_engine, upgrade  # noqa: E402
from study.models import Comparison, Vote, VoteAspect  # noqa: E402
from study.pgtemp import TempPostgres  # noqa: E402
from study.tasks import CHOICES, TASK_ASPECTS  # noqa: E402
from study.votes import ConflictingVote, Matchup, VoteService  # noqa: E402

TASK = "generation"
ASPECTS = TASK_ASPECTS[TASK]
OUTPUT_VARIANTS = 16
MATCHUP_DRAWS = 256

StoredVote = tuple[str, int, dict[str, str]]  # choice, vote id, per-aspect choices


@dataclass(frozen=True)
class BenchConfig:
    """What to run; the shares are fractions of the writers' operations."""

    writers: int = 32
    seconds: float = 30.0
    backends: tuple[str, ...] = ("sqlite", "postgresql")
    kill_after: float = 10.0
    systems: int = 8
    duplicate_share: float = 0.05  # identical re-vote of an acknowledged token: must come back repeated
    conflict_share: float = 0.01  # different re-vote of an acknowledged token: must be refused
    double_submit_share: float = 0.01  # a new vote sent by two writers at once, as a double click does
    # Sizes the pool of comparisons opened before the timed window; a shortfall is opened in the window
    # (untimed, but it eats into votes/s) and reported as `opened_in_window`.
    expected_votes_per_s: dict[str, float] = field(
        default_factory=lambda: {"sqlite": 3500.0, "postgresql": 2000.0})
    openers: int = 4
    seed: int = 0


@dataclass(frozen=True)
class WorkerSpec:
    """What one writer process needs; handed over as a JSON file."""

    url: str
    blobs: str
    tokens: str
    ack_log: str
    writers: int
    seconds: float
    duplicate_share: float
    conflict_share: float
    double_submit_share: float
    seed: int
    matchups: list[tuple[str, str, str]]  # for opening in the window, should the pool run dry


@dataclass
class WriterStats:
    """One writer thread's tallies; merged after the run, so the hot loop takes no lock."""

    new_latency_ms: list[float] = field(default_factory=list)
    repeat_latency_ms: list[float] = field(default_factory=list)
    unexpected_repeats: int = 0
    duplicates: int = 0
    duplicate_violations: int = 0
    conflicts: int = 0
    conflicts_refused: int = 0
    conflict_violations: int = 0
    double_submits: int = 0
    double_submits_overlapping: int = 0
    opened_in_window: int = 0
    errors: collections.Counter = field(default_factory=collections.Counter)
    first_error: dict[str, str] = field(default_factory=dict)


@dataclass
class Twin:
    """A new vote handed to a second writer to submit again; `done` is set once the first submit returns."""

    token: str
    choice: str
    aspects: dict[str, str]
    done: bool = False


@dataclass
class Shared:
    """State the writer threads share; deque and list operations are atomic under the GIL."""

    tokens: collections.deque[str]
    acked: list[tuple[str, str, dict[str, str], int]]
    twins: collections.deque[Twin]
    ack_fd: int
    deadline: float
    matchups: list[Matchup]


# ---------------------------------------------------------------- setup


def outputs() -> list[Output]:
    """A few small text outputs; reused so the blob store writes (and fsyncs) each only once."""
    return [Output(f"generated caption variant {i}".encode(), "text/plain") for i in range(OUTPUT_VARIANTS)]


def open_one(service: VoteService, matchups: list[Matchup], rng: random.Random) -> str:
    """Open one comparison the way a tab does and return its token."""
    pool = outputs()
    return service.open_comparison(rng.choice(matchups), "a bench prompt", rng.choice(pool), rng.choice(pool)).token


@contextmanager
def database(backend: str, workdir: Path) -> Iterator[tuple[str, str]]:
    """An empty database of this backend: yields (url, server version)."""
    if backend == "sqlite":
        yield f"sqlite:///{workdir / 'votes.db'}", sqlite3.sqlite_version
        return
    server = TempPostgres.start()
    try:
        engine = make_engine(server.url, pool_size=1)
        with engine.connect() as conn:
            version = conn.exec_driver_sql("SHOW server_version").scalar_one()
        engine.dispose()
        yield server.url, version
    finally:
        server.stop()


def setup(url: str, blobs: Path, systems: int) -> list[Matchup]:
    """Migrate, register the systems, store every output blob once, and draw the matchups to cycle through."""
    engine = make_engine(url, pool_size=1)
    try:
        upgrade(engine)
        service = VoteService(engine, BlobStore(blobs))
        for i in range(systems):
            service.register_system(TASK, f"generator-{i}", engine="bench")
        # pick_matchup re-reads the systems on every call, which would double the pre-opening time;
        # a few hundred draws keep its distribution without that cost.
        matchups = [service.pick_matchup(TASK) for _ in range(MATCHUP_DRAWS)]
        # Concurrent open_comparison calls that both see a new blob both insert its row and one fails,
        # so every blob row is created here, one at a time, before the openers run in parallel.
        for output in outputs():
            service.open_comparison(matchups[0], "a bench prompt", output, output)
        return matchups
    finally:
        engine.dispose()


def preopen(url: str, blobs: Path, matchups: list[Matchup], count: int, openers: int, seed: int) -> list[str]:
    """Open `count` comparisons with a few threads and return their tokens."""
    engine = make_engine(url, pool_size=openers)
    service = VoteService(engine, BlobStore(blobs))
    shares = [count // openers + (i < count % openers) for i in range(openers)]

    def run(i: int) -> list[str]:
        rng = random.Random(f"{seed}-open-{i}")
        return [open_one(service, matchups, rng) for _ in range(shares[i])]

    try:
        with ThreadPoolExecutor(openers) as pool:
            return [token for part in pool.map(run, range(openers)) for token in part]
    finally:
        engine.dispose()  # the writer process and, after a kill, the verifier must be the only ones holding the DB


# ---------------------------------------------------------------- writer process


def random_vote(rng: random.Random) -> tuple[str, dict[str, str]]:
    """A random choice and per-aspect choices, as a participant might give."""
    return rng.choice(CHOICES), {aspect: rng.choice(CHOICES) for aspect in ASPECTS}


def acknowledge(shared: Shared, token: str, choice: str, aspects: dict[str, str], vote_id: int) -> None:
    """Log the ack with one unbuffered O_APPEND write, so nothing acknowledged is lost to a SIGKILL."""
    line = f"{token} {choice} {vote_id} {','.join(aspects[a] for a in ASPECTS)}\n"
    os.write(shared.ack_fd, line.encode())
    shared.acked.append((token, choice, aspects, vote_id))


def vote_new(service: VoteService, shared: Shared, stats: WriterStats, token: str, choice: str,
             aspects: dict[str, str], rng: random.Random) -> bool:
    """Submit a vote on a token that may have none yet; True when this call stored it."""
    start = time.perf_counter()
    receipt = service.record_vote(token, choice, aspects=aspects, latency_ms=rng.randrange(500, 60_000))
    elapsed_ms = (time.perf_counter() - start) * 1000
    if receipt.repeated:
        stats.repeat_latency_ms.append(elapsed_ms)
        return False
    acknowledge(shared, token, choice, aspects, receipt.vote_id)
    stats.new_latency_ms.append(elapsed_ms)
    return True


def revote(service: VoteService, shared: Shared, stats: WriterStats, rng: random.Random, conflicting: bool) -> None:
    """Vote again on an acknowledged token: the same vote must be repeated, a different one refused."""
    token, choice, aspects, vote_id = rng.choice(shared.acked)
    if conflicting:
        stats.conflicts += 1
        try:
            service.record_vote(token, rng.choice([c for c in CHOICES if c != choice]), aspects=aspects)
        except ConflictingVote:
            stats.conflicts_refused += 1
        else:
            stats.conflict_violations += 1
        return
    stats.duplicates += 1
    start = time.perf_counter()
    receipt = service.record_vote(token, choice, aspects=aspects)
    stats.repeat_latency_ms.append((time.perf_counter() - start) * 1000)
    if not receipt.repeated or receipt.vote_id != vote_id:
        stats.duplicate_violations += 1


def next_token(service: VoteService, shared: Shared, stats: WriterStats, rng: random.Random) -> str:
    """A pre-opened token, or a freshly opened one when the pool ran dry."""
    try:
        return shared.tokens.popleft()
    except IndexError:
        stats.opened_in_window += 1
        return open_one(service, shared.matchups, rng)


def step(service: VoteService, shared: Shared, stats: WriterStats, rng: random.Random, spec: WorkerSpec) -> None:
    """One operation: a waiting double submit, a re-vote, or a new vote."""
    try:
        twin = shared.twins.popleft()
    except IndexError:
        twin = None
    if twin is not None:
        stats.double_submits += 1
        stats.double_submits_overlapping += not twin.done
        vote_new(service, shared, stats, twin.token, twin.choice, twin.aspects, rng)
        return
    draw = rng.random()
    if draw < spec.duplicate_share + spec.conflict_share and shared.acked:
        revote(service, shared, stats, rng, conflicting=draw >= spec.duplicate_share)
        return
    token = next_token(service, shared, stats, rng)
    choice, aspects = random_vote(rng)
    if draw > 1 - spec.double_submit_share:
        twin = Twin(token, choice, aspects)
        shared.twins.append(twin)
    if not vote_new(service, shared, stats, token, choice, aspects, rng) and twin is None:
        stats.unexpected_repeats += 1  # a token nobody else has voted on came back as a repeat
    if twin is not None:
        twin.done = True


def writer(service: VoteService, shared: Shared, stats: WriterStats, seed: str, spec: WorkerSpec,
           barrier: threading.Barrier) -> None:
    """Loop until the deadline; an unexpected exception is tallied, and that token is never acknowledged."""
    rng = random.Random(seed)
    barrier.wait()
    while time.perf_counter() < shared.deadline:
        try:
            step(service, shared, stats, rng, spec)
        except Exception as error:  # noqa: BLE001 - tallied and reported; the run goes on
            name = type(error).__name__
            stats.errors[name] += 1
            stats.first_error.setdefault(name, str(error)[:300])


def quantiles(values: list[float]) -> dict[str, float | None]:
    """p50, p99 and max in ms."""
    if len(values) < 2:
        return {"p50": None, "p99": None, "max": max(values, default=None)}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": round(cuts[49], 3), "p99": round(cuts[98], 3), "max": round(max(values), 3)}


def summarize(stats: list[WriterStats], elapsed: float, preopened: int) -> dict:
    """The writer process's figures: throughput, latency and idempotence tallies."""
    new = [ms for s in stats for ms in s.new_latency_ms]
    repeat = [ms for s in stats for ms in s.repeat_latency_ms]
    errors = sum((s.errors for s in stats), collections.Counter())

    def total(name: str) -> int:
        return sum(getattr(s, name) for s in stats)

    return {
        "elapsed_s": round(elapsed, 3),
        "acked_new_votes": len(new),
        "votes_per_s": round(len(new) / elapsed, 1),
        "record_vote_ms": {"new": quantiles(new), "repeat": quantiles(repeat)},
        "preopened": preopened,
        "opened_in_window": total("opened_in_window"),
        "duplicates": {"sent": total("duplicates"), "violations": total("duplicate_violations")},
        "conflicts": {"sent": total("conflicts"), "refused": total("conflicts_refused"),
                      "violations": total("conflict_violations")},
        "double_submits": {"sent": total("double_submits"), "overlapping": total("double_submits_overlapping")},
        "unexpected_repeats": total("unexpected_repeats"),
        "errors": dict(errors),
        "first_error": {k: v for s in stats for k, v in s.first_error.items()},
    }


def worker_main(spec_path: str) -> None:
    """The writer process: threads vote until the deadline, then print a JSON summary line."""
    spec = WorkerSpec(**json.loads(Path(spec_path).read_text()))
    engine = make_engine(spec.url, pool_size=spec.writers)
    service = VoteService(engine, BlobStore(Path(spec.blobs)))
    tokens = collections.deque(Path(spec.tokens).read_text().split())
    preopened = len(tokens)
    # Connect every pooled connection now, so connecting is not timed as voting.
    warm = [engine.connect() for _ in range(spec.writers)]
    for conn in warm:
        conn.close()
    matchups = [Matchup(*m) for m in spec.matchups]
    ack_fd = os.open(spec.ack_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    shared = Shared(tokens, [], collections.deque(), ack_fd, float("inf"), matchups)
    stats = [WriterStats() for _ in range(spec.writers)]
    barrier = threading.Barrier(spec.writers + 1)
    threads = [threading.Thread(target=writer, args=(service, shared, stats[i], f"{spec.seed}-w{i}", spec, barrier))
               for i in range(spec.writers)]
    for thread in threads:
        thread.start()
    start = time.perf_counter()
    shared.deadline = start + spec.seconds
    barrier.wait()
    print("started", flush=True)  # the parent times the kill from here
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    os.close(ack_fd)
    engine.dispose()
    print(json.dumps(summarize(stats, elapsed, preopened)), flush=True)


# ---------------------------------------------------------------- driving and verifying


def run_writers(spec: WorkerSpec, workdir: Path, name: str, kill_after: float | None) -> dict | None:
    """Run the writer process; SIGKILL it `kill_after` s into its run, else return its summary."""
    spec_path = workdir / f"{name}.spec.json"
    spec_path.write_text(json.dumps(asdict(spec)))
    stderr_path = workdir / f"{name}.stderr"
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen([sys.executable, __file__, "--worker", str(spec_path)],
                                stdout=subprocess.PIPE, stderr=stderr, text=True)
        if proc.stdout.readline().strip() != "started":
            proc.kill()
            raise RuntimeError(f"the writer process did not start: {stderr_path.read_text()}")
        if kill_after is not None:
            time.sleep(kill_after)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
            return None
        out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"the writer process failed ({proc.returncode}): {stderr_path.read_text()}")
    return json.loads(out.strip().splitlines()[-1])


def read_acks(paths: list[Path]) -> tuple[dict[str, StoredVote], int, int]:
    """The acknowledged votes by token, how many tokens were acknowledged twice, and torn lines."""
    acks: dict[str, StoredVote] = {}
    double_acked = torn = 0
    for path in paths:
        for line in path.read_text().splitlines():
            parts = line.split(" ")
            if len(parts) != 4 or len(parts[3].split(",")) != len(ASPECTS):
                torn += 1
                continue
            token, choice, vote_id, aspects = parts
            double_acked += token in acks
            acks[token] = (choice, int(vote_id), dict(zip(ASPECTS, aspects.split(","))))
    return acks, double_acked, torn


def stored_votes(url: str, blobs: Path) -> tuple[dict[str, StoredVote], dict]:
    """Every vote in the database by token, and the health checks of a freshly opened engine."""
    engine = make_engine(url, pool_size=1)
    try:
        with engine.connect() as conn:
            health: dict = {"opens": True}
            if make_url(url).get_backend_name() == "sqlite":
                health["integrity_check"] = conn.exec_driver_sql("PRAGMA integrity_check").scalars().all()
            else:
                health["server_answers"] = conn.exec_driver_sql("SELECT 1").scalar_one() == 1
            health["comparisons_with_several_votes"] = len(conn.execute(
                select(Vote.comparison_id).group_by(Vote.comparison_id).having(func.count() > 1)).all())
            aspects: dict[int, dict[str, str]] = collections.defaultdict(dict)
            aspect_rows = conn.execute(select(VoteAspect.vote_id, VoteAspect.aspect, VoteAspect.choice))
            for vote_id, aspect, choice in aspect_rows:
                aspects[vote_id][aspect] = choice
            rows = conn.execute(select(Comparison.token, Vote.id, Vote.choice)
                                .join(Vote, Vote.comparison_id == Comparison.id)).all()
        health["votes_in_db"] = VoteService(engine, BlobStore(blobs)).count_votes(TASK)
        return {token: (choice, vote_id, aspects.get(vote_id, {})) for token, vote_id, choice in rows}, health
    finally:
        engine.dispose()


def verify(url: str, blobs: Path, ack_logs: list[Path]) -> dict:
    """Compare every ack logged so far with the database."""
    acks, double_acked, torn = read_acks(ack_logs)
    stored, health = stored_votes(url, blobs)
    lost = [t for t in acks if t not in stored]
    wrong = [t for t in acks if t in stored and stored[t] != acks[t]]
    return {
        **health,
        "acks": len(acks),
        "double_acked": double_acked,
        "torn_ack_lines": torn,
        "lost": len(lost),
        "wrong_choice_id_or_aspects": len(wrong),
        "committed_unacked": len(stored.keys() - acks.keys()),
        "votes_missing_aspects": sum(len(a) != len(ASPECTS) for _, _, a in stored.values()),
        "examples": {"lost": lost[:3], "wrong": wrong[:3]},
    }


def acked_intact(check: dict) -> bool:
    """No acknowledged vote lost, altered or doubled, and no half-written vote."""
    return (check["lost"] == check["wrong_choice_id_or_aspects"] == check["double_acked"] == check["torn_ack_lines"]
            == check["comparisons_with_several_votes"] == check["votes_missing_aspects"] == 0)


def bench_backend(backend: str, config: BenchConfig) -> dict:
    """Both phases on one backend: a timed steady run, then a run killed midway."""
    workdir = Path(tempfile.mkdtemp(prefix="bvotes_"))
    blobs = workdir / "blobs"
    try:
        with database(backend, workdir) as (url, version):
            matchups = setup(url, blobs, config.systems)
            result: dict = {"server_version": version}
            logs: list[Path] = []
            rate = config.expected_votes_per_s[backend]
            # The kill run is given far longer than it lives, so the SIGKILL lands mid-run.
            for phase, seconds, kill_after in (("steady", config.seconds, None),
                                               ("kill", config.kill_after * 3 + 10, config.kill_after)):
                # Pool for the timed window; the kill run only needs enough to still be voting when killed.
                count = int(rate * (seconds if kill_after is None else kill_after * 1.5))
                log(f"{backend} {phase}: pre-opening {count} comparisons")
                start = time.perf_counter()
                tokens = preopen(url, blobs, matchups, count, config.openers, config.seed)
                preopen_s = time.perf_counter() - start
                tokens_path = workdir / f"{phase}.tokens"
                tokens_path.write_text("\n".join(tokens))
                logs.append(workdir / f"{phase}.acks")
                spec = WorkerSpec(url, str(blobs), str(tokens_path), str(logs[-1]), config.writers, seconds,
                                  config.duplicate_share, config.conflict_share, config.double_submit_share,
                                  config.seed, [(m.task, m.system_a, m.system_b) for m in matchups])
                log(f"{backend} {phase}: writing with {config.writers} threads"
                    + (f", SIGKILL after {kill_after} s" if kill_after else f" for {seconds} s"))
                summary = run_writers(spec, workdir, phase, kill_after)
                figures = summary or {"killed_after_s": kill_after, "preopened": len(tokens),
                                      "acked_before_kill": len(logs[-1].read_text().splitlines())}
                figures["preopen_per_s"] = round(len(tokens) / preopen_s, 1)
                figures["verify"] = verify(url, blobs, logs)
                if summary:
                    rate = summary["votes_per_s"]
                result[phase] = figures
            return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def machine_info() -> dict:
    """Where the figures were taken."""
    return machine(sqlite=sqlite3.sqlite_version, sqlalchemy=sqlalchemy.__version__, psycopg=psycopg.__version__,
                   tmp_filesystem=filesystem_of(Path(tempfile.gettempdir())))


def filesystem_of(path: Path) -> str:
    """The filesystem type that holds `path`: durability and fsync cost depend on it."""
    best, kind = "", "unknown"
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mount, fstype, *_ = line.split()
        if str(path.resolve()).startswith(mount) and len(mount) > len(best):
            best, kind = mount, fstype
    return kind


def targets(backends: dict) -> dict[str, bool]:
    """The bar the vote store must clear."""
    steady = [r["steady"] for r in backends.values()]
    kill = [r["kill"] for r in backends.values()]
    met = {
        "no_acked_vote_lost_or_doubled": all(acked_intact(p["verify"]) for p in steady + kill)
        and all(p["verify"]["committed_unacked"] == 0 and p["verify"]["votes_in_db"] == p["verify"]["acks"]
                for p in steady),
        "idempotent_under_load": all(p["duplicates"]["violations"] == p["conflicts"]["violations"]
                                     == p["unexpected_repeats"] == 0 for p in steady),
        "db_opens_cleanly_after_kill": all(
            p["verify"]["opens"] and p["verify"].get("integrity_check", ["ok"]) == ["ok"]
            and p["verify"].get("server_answers", True) for p in kill),
    }
    if "sqlite" in backends:
        met["sqlite_votes_per_s_ge_1000"] = backends["sqlite"]["steady"]["votes_per_s"] >= 1000
    return met


def log(message: str) -> None:
    """Progress on stderr, so stdout stays one JSON document."""
    print(f"[bench/votes] {message}", file=sys.stderr, flush=True)


def parse_args() -> BenchConfig | str:
    """The config from the command line, or the spec path when this process is a writer."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=BenchConfig.writers)
    parser.add_argument("--seconds", type=float, default=BenchConfig.seconds)
    parser.add_argument("--backends", default=",".join(BenchConfig.backends))
    parser.add_argument("--kill-after", type=float, default=BenchConfig.kill_after)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run as the writer process
    args = parser.parse_args()
    if args.worker:
        return args.worker
    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    unknown = set(backends) - {"sqlite", "postgresql"}
    if unknown:
        parser.error(f"unknown backends {sorted(unknown)}; use sqlite and/or postgresql")
    return BenchConfig(writers=args.writers, seconds=args.seconds, backends=backends, kill_after=args.kill_after)


def main() -> None:
    """Run every backend and print the figures as JSON."""
    config = parse_args()
    if isinstance(config, str):
        worker_main(config)
        return
    info = machine_info()
    results = {backend: bench_backend(backend, config) for backend in config.backends}
    info["postgresql"] = results.get("postgresql", {}).get("server_version")
    print(json.dumps({
        "bench": "votes",
        "config": asdict(config),
        "machine": info,
        "method": ("comparisons pre-opened with open_comparison before the timed window (any shortfall opened "
                   "in it, untimed, see opened_in_window); latency times the record_vote call only; votes_per_s "
                   "= acknowledged new votes / window; writers are threads of one child process; acks are "
                   "os.write O_APPEND lines written before the next operation"),
        "backends": results,
        "targets_met": targets(results),
    }, indent=2))


if __name__ == "__main__":
    main()
