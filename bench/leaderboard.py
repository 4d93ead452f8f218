"""Benchmark: count-based vectorized BT leaderboard vs a per-vote sklearn logistic-regression reference."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sparse
from scipy.stats import spearmanr
from sklearn.linear_model import LogisticRegression

# Run as `python bench/leaderboard.py`, the repository root is not on sys.path; add it so `study` imports.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import machine  # noqa: E402
from study.counts import load_counts  # noqa: E402
from study.db import make_engine, upgrade  # noqa: E402
from study.importer import import_votes  # noqa: E402
from study.leaderboard import LeaderboardConfig, compute_leaderboard, fit_ratings  # noqa: E402

WINNERS = np.array(["a", "b", "tie", "both_bad"])


@dataclass(frozen=True)
class BenchConfig:
    """Sizes and repeats of one benchmark run."""

    votes: int = 1_000_000
    systems: int = 30
    rounds: int = 1000
    reference_rounds: int = 3
    repeats: int = 5
    seed: int = 0


def synthetic_votes(n_votes: int, n_systems: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Per-vote frame (system_a, system_b, winner) drawn from known strengths, and those strengths θ."""
    rng = np.random.default_rng(seed)
    # Adjacent systems differ by ~0.07 in θ (~30 rating points): modest, but resolvable with 1M votes.
    # The permutation keeps strength uncorrelated with name order, so sorting by name cannot fake a fit.
    true_theta = rng.permutation(np.linspace(-1.0, 1.0, n_systems))
    side_a = rng.integers(n_systems, size=n_votes)
    side_b = (side_a + rng.integers(1, n_systems, size=n_votes)) % n_systems
    gap = true_theta[side_a] - true_theta[side_b]
    # Ties are likelier between close systems (~10% overall); both_bad is a flat 5%.
    p_tie = 0.185 * np.exp(-np.abs(gap))
    p_both_bad = 0.05
    p_a = (1.0 - p_tie - p_both_bad) / (1.0 + np.exp(-gap))
    u = rng.random(n_votes)
    winner = np.select([u < p_a, u < 1.0 - p_tie - p_both_bad, u < 1.0 - p_both_bad], [0, 1, 2], default=3)
    names = np.array([f"sys{k:02d}" for k in range(n_systems)])
    votes = pd.DataFrame({"system_a": names[side_a], "system_b": names[side_b], "winner": WINNERS[winner]})
    return votes, true_theta


def aggregate(votes: pd.DataFrame) -> pd.DataFrame:
    """Per-vote frame -> counts frame (system_a, system_b, outcome, n), as the DB query will return."""
    counts = votes.groupby(["system_a", "system_b", "winner"], sort=False).size()
    return counts.reset_index(name="n").rename(columns={"winner": "outcome"})


def database_stage(votes: pd.DataFrame, counts: pd.DataFrame, repeats: int) -> dict[str, object]:
    """Import the votes into a fresh SQLite file as `python -m study import-votes` does, then aggregate in SQL."""
    with tempfile.TemporaryDirectory() as home:
        path = Path(home) / "votes.jsonl"
        votes.assign(task="generation").to_json(path, orient="records", lines=True)
        engine = make_engine(f"sqlite:///{home}/bench.db")
        upgrade(engine)
        start = time.perf_counter()
        report = import_votes(engine, path, home=Path(home))
        import_s = time.perf_counter() - start
        aggregate_db_s, from_db = timed(lambda: load_counts(engine, "generation"), repeats)
        engine.dispose()
    same = from_db.sort_values(["system_a", "system_b", "outcome"]).reset_index(drop=True).equals(
        counts.sort_values(["system_a", "system_b", "outcome"]).reset_index(drop=True).astype(from_db.dtypes))
    return {"import_sqlite_s": import_s, "imported": report.imported, "aggregate_sqlite_s": aggregate_db_s,
            "db_counts_equal_pandas_counts": same}


def reference_design(votes: pd.DataFrame, systems: pd.Index) -> tuple[sparse.csr_matrix, np.ndarray]:
    """FastChat's old compute_mle_elo design: votes doubled, ±ln10 columns, a tie = one A win + one B win."""
    n = len(votes)
    col_a = systems.get_indexer(votes["system_a"])
    col_b = systems.get_indexer(votes["system_b"])
    rows = np.arange(2 * n)
    data = np.r_[np.full(2 * n, math.log(10.0)), np.full(2 * n, -math.log(10.0))]
    design = sparse.csr_matrix(
        (data, (np.r_[rows, rows], np.r_[col_a, col_a, col_b, col_b])), shape=(2 * n, len(systems))
    )
    winner = votes["winner"].to_numpy()
    tie = (winner == "tie") | (winner == "both_bad")
    y = np.r_[winner == "a", (winner == "a") | tie].astype(np.float64)
    return design, y


def reference_ratings(votes: pd.DataFrame, systems: pd.Index) -> np.ndarray:
    """Mean-centred ratings from one per-vote sklearn logistic regression (coefficients are log10 units)."""
    design, y = reference_design(votes, systems)
    # C=inf is sklearn's non-deprecated spelling of penalty=None: an unregularized MLE.
    model = LogisticRegression(fit_intercept=False, C=np.inf, tol=1e-8, max_iter=1000)
    coef = model.fit(design, y).coef_[0]
    return 400.0 * (coef - coef.mean()) + 1000.0


def reference_bootstrap(votes: pd.DataFrame, systems: pd.Index, rounds: int, seed: int) -> np.ndarray:
    """Per-vote bootstrap as FastChat did it: resample votes with replacement and refit, round by round."""
    rng = np.random.default_rng(seed)
    return np.stack(
        [reference_ratings(votes.iloc[rng.integers(len(votes), size=len(votes))], systems) for _ in range(rounds)]
    )


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median wall time of fn over repeats, and its last result."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def machine_info() -> dict[str, object]:
    """Where the figures were taken."""
    return machine(numpy=np.__version__)


def run(bench: BenchConfig) -> dict[str, object]:
    """Time both paths on the same synthetic votes and check them against each other and the truth."""
    votes, true_theta = synthetic_votes(bench.votes, bench.systems, bench.seed)
    systems = pd.Index(sorted(pd.unique(votes[["system_a", "system_b"]].to_numpy().ravel())))

    aggregate_s, counts = timed(lambda: aggregate(votes), bench.repeats)
    config = LeaderboardConfig(bootstrap_rounds=bench.rounds, seed=bench.seed)
    fit_ci_s, board = timed(lambda: compute_leaderboard(counts, config), bench.repeats)
    ours = fit_ratings(counts, config).reindex(systems).to_numpy()

    database = database_stage(votes, counts, bench.repeats)
    reference_fit_s, reference = timed(lambda: reference_ratings(votes, systems), 1)
    start = time.perf_counter()
    reference_bootstrap(votes, systems, bench.reference_rounds, bench.seed)
    per_round_s = (time.perf_counter() - start) / bench.reference_rounds
    reference_total_s_scaled = reference_fit_s + per_round_s * bench.rounds

    names = [f"sys{k:02d}" for k in range(bench.systems)]
    truth = pd.Series(true_theta, index=names).reindex(systems).to_numpy()
    spearman = float(spearmanr(ours, truth).statistic)
    max_diff = float(np.max(np.abs(ours - reference)))
    speedup = reference_total_s_scaled / fit_ci_s
    return {
        "machine": machine_info(),
        "votes": bench.votes,
        "systems": bench.systems,
        "rounds": bench.rounds,
        "count_rows": len(counts),
        "repeats": bench.repeats,
        "aggregate_s": aggregate_s,
        **database,
        "fit_ci_s": fit_ci_s,
        "reference_fit_s": reference_fit_s,
        "reference_rounds_run": bench.reference_rounds,
        "reference_scaled": f"point fit + per-round bootstrap time x {bench.rounds} (measured on "
        f"{bench.reference_rounds} rounds)",
        "reference_total_s_scaled": reference_total_s_scaled,
        "speedup": speedup,
        "spearman_vs_true": spearman,
        "max_abs_rating_diff_vs_reference": max_diff,
        "median_ci_width": float(statistics.median(s.ci_high - s.ci_low for s in board)),
        "targets_met": {
            "fit_ci_s_lt_1": fit_ci_s < 1.0,
            "spearman_ge_0.99": spearman >= 0.99,
            "speedup_ge_50": speedup >= 50.0,
            "max_diff_lt_1_point": max_diff < 1.0,
            "import_1m_sqlite_lt_60s": database["import_sqlite_s"] < 60.0,
            "aggregate_sqlite_lt_2s": database["aggregate_sqlite_s"] < 2.0,
        },
    }


def main() -> None:
    """Parse sizes, run the benchmark, print its figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    defaults = BenchConfig()
    parser.add_argument("--votes", type=int, default=defaults.votes)
    parser.add_argument("--systems", type=int, default=defaults.systems)
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--reference-rounds", type=int, default=defaults.reference_rounds)
    parser.add_argument("--repeats", type=int, default=defaults.repeats)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args()
    bench = BenchConfig(
        votes=args.votes,
        systems=args.systems,
        rounds=args.rounds,
        reference_rounds=args.reference_rounds,
        repeats=args.repeats,
        seed=args.seed,
    )
    print(json.dumps(run(bench), indent=2))


if __name__ == "__main__":
    main()
