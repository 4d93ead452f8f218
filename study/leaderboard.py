"""Bradley–Terry leaderboard with seeded bootstrap confidence intervals, fitted on aggregated vote counts."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

OUTCOMES: tuple[str, ...] = ("a", "b", "tie", "both_bad")
COLUMNS: tuple[str, ...] = ("system_a", "system_b", "outcome", "n")

# Share of a vote that goes to side A; tie and both_bad are half a win each, as in Chatbot Arena.
_SHARE_FOR_A: dict[str, float] = {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}

# A descent step that fails to lower the objective is halved at most this often; 2**-40 is far below
# any step that could still matter, so the loop cannot spin forever on rounding noise.
_MAX_HALVINGS = 40

# Rounding slack when comparing objectives of ~1e6 votes, so that a step which is exact up to float
# noise is not mistaken for an uphill one near the optimum.
_RELATIVE_SLACK = 1e-11


@dataclass(frozen=True)
class LeaderboardConfig:
    """Leaderboard settings; `l2` adds an explicit ridge (l2/2)·Σθ² to the BT likelihood so ratings stay finite."""

    bootstrap_rounds: int = 1000
    seed: int = 0
    confidence: float = 0.95
    min_votes: int = 0
    preliminary_below: int = 300
    anchor: str | None = None
    base_rating: float = 1000.0
    scale: float = 400.0
    # A system that never loses has an MLE at +inf; the ridge keeps it finite (and fixes the
    # otherwise free shift of θ). With hundreds of votes per system it moves ratings by ≪ 0.01 points.
    l2: float = 1e-4
    max_newton_iter: int = 100
    newton_tol: float = 1e-9

    def __post_init__(self) -> None:
        if self.bootstrap_rounds < 1:
            raise ValueError(f"bootstrap_rounds must be >= 1, got {self.bootstrap_rounds}")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.scale <= 0.0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if self.l2 <= 0.0:
            raise ValueError(f"l2 must be > 0 (it keeps unbeaten systems finite), got {self.l2}")
        if self.max_newton_iter < 1 or self.newton_tol <= 0.0:
            raise ValueError("max_newton_iter must be >= 1 and newton_tol > 0")


@dataclass(frozen=True)
class Standing:
    """One row of the leaderboard."""

    system: str
    rating: float
    ci_low: float
    ci_high: float
    votes: int
    rank: int
    preliminary: bool


@dataclass(frozen=True)
class _Cells:
    """Counts collapsed to unordered pairs (i < j) and win shares of i, in a canonical order."""

    systems: np.ndarray  # (K,) names, sorted
    pair_i: np.ndarray  # (P,) index of the lower-named system of each pair
    pair_j: np.ndarray  # (P,)
    pair_start: np.ndarray  # (P,) first cell of each pair, for np.add.reduceat
    cell_share: np.ndarray  # (C,) win share of pair_i in this cell: 0, 0.5 or 1
    cell_n: np.ndarray  # (C,) int64 votes
    votes: np.ndarray  # (K,) int64 votes involving each system

    def pair_totals(self, cell_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Wins of pair_i and totals per pair from per-cell counts of shape (R, C)."""
        wins = np.add.reduceat(cell_counts * self.cell_share, self.pair_start, axis=1)
        totals = np.add.reduceat(cell_counts, self.pair_start, axis=1).astype(np.float64)
        return wins, totals


def _validate(counts: pd.DataFrame) -> None:
    """Raise ValueError on missing columns, unknown outcomes, self-pairs, or non-integer/negative counts."""
    missing = [c for c in COLUMNS if c not in counts.columns]
    if missing:
        raise ValueError(f"counts is missing column(s) {missing}; expected {list(COLUMNS)}")
    unknown = sorted(set(counts["outcome"].astype(str).unique()) - set(OUTCOMES))
    if unknown:
        raise ValueError(f"unknown outcome value(s) {unknown}; expected one of {list(OUTCOMES)}")
    n = pd.to_numeric(counts["n"], errors="coerce").to_numpy(dtype=np.float64)
    if np.isnan(n).any() or (n != np.floor(n)).any():
        raise ValueError("counts column 'n' must hold whole numbers")
    if (n < 0).any():
        raise ValueError("counts column 'n' must not be negative")
    same = counts["system_a"].astype(str).to_numpy() == counts["system_b"].astype(str).to_numpy()
    if same.any():
        raise ValueError(f"a system cannot be compared with itself: {counts.loc[same, 'system_a'].iloc[0]!r}")


def _collapse(counts: pd.DataFrame) -> _Cells | None:
    """Sum duplicate rows and fold sides into unordered pairs; None when no votes remain."""
    if len(counts) == 0:
        return None
    _validate(counts)
    n = counts["n"].to_numpy(dtype=np.int64)
    keep = n > 0
    if not keep.any():
        return None
    side_a = counts["system_a"].astype(str).to_numpy()[keep]
    side_b = counts["system_b"].astype(str).to_numpy()[keep]
    share_a = counts["outcome"].astype(str).map(_SHARE_FOR_A).to_numpy(dtype=np.float64)[keep]
    n = n[keep]

    systems = np.unique(np.concatenate([side_a, side_b]))
    k = len(systems)
    ia = np.searchsorted(systems, side_a)
    ib = np.searchsorted(systems, side_b)
    lo, hi = np.minimum(ia, ib), np.maximum(ia, ib)
    # The share is stored for the lower index, so a row and its side-swapped mirror land in one cell.
    share_lo = np.where(ia < ib, share_a, 1.0 - share_a)
    cell_key = (lo * k + hi) * 3 + np.rint(share_lo * 2).astype(np.int64)

    # A canonical cell order makes the seeded bootstrap independent of row order and row splitting.
    order = np.argsort(cell_key, kind="stable")
    sorted_key = cell_key[order]
    starts = np.flatnonzero(np.r_[True, sorted_key[1:] != sorted_key[:-1]])
    cell_key = sorted_key[starts]
    cell_n = np.add.reduceat(n[order], starts)

    pair_key = cell_key // 3
    pair_start = np.flatnonzero(np.r_[True, pair_key[1:] != pair_key[:-1]])
    pair_i, pair_j = np.divmod(pair_key[pair_start], k)

    votes = np.zeros(k, dtype=np.int64)
    cell_i, cell_j = np.divmod(pair_key, k)
    np.add.at(votes, cell_i, cell_n)
    np.add.at(votes, cell_j, cell_n)
    return _Cells(
        systems=systems,
        pair_i=pair_i,
        pair_j=pair_j,
        pair_start=pair_start,
        cell_share=(cell_key % 3) / 2.0,
        cell_n=cell_n,
        votes=votes,
    )


def _evaluate(
    theta: np.ndarray, wins: np.ndarray, totals: np.ndarray, pair_i: np.ndarray, pair_j: np.ndarray, l2: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Penalized negative log-likelihood per round, and P(i beats j), P(j beats i) per pair."""
    diff = theta[:, pair_i] - theta[:, pair_j]
    # Both probabilities come from exp(-|d|) so that a near-certain win keeps full relative precision
    # in its loss probability; 1 - p would round it away and stall Newton for unbeaten systems.
    e = np.exp(-np.abs(diff))
    big = 1.0 / (1.0 + e)
    small = e * big
    positive = diff >= 0
    p_win = np.where(positive, big, small)
    p_loss = np.where(positive, small, big)
    softplus_core = np.log1p(e)
    nll = wins * (softplus_core + np.maximum(-diff, 0.0)) + (totals - wins) * (softplus_core + np.maximum(diff, 0.0))
    objective = nll.sum(axis=1) + 0.5 * l2 * np.einsum("rk,rk->r", theta, theta)
    return objective, p_win, p_loss


def _newton(
    wins: np.ndarray, totals: np.ndarray, cells: _Cells, theta0: np.ndarray, config: LeaderboardConfig
) -> np.ndarray:
    """Fit centred θ of shape (R, K) for R rounds of pair wins/totals at once by damped batched Newton."""
    rounds, k = theta0.shape
    pair_i, pair_j, l2 = cells.pair_i, cells.pair_j, config.l2
    n_pairs = len(pair_i)
    incidence = np.zeros((n_pairs, k))
    incidence[np.arange(n_pairs), pair_i] = 1.0
    incidence[np.arange(n_pairs), pair_j] = -1.0
    abs_incidence = np.abs(incidence)
    diag = np.arange(k)

    theta = theta0 - theta0.mean(axis=1, keepdims=True)
    objective, p_win, p_loss = _evaluate(theta, wins, totals, pair_i, pair_j, l2)
    for _ in range(config.max_newton_iter):
        residual = wins * p_loss - (totals - wins) * p_win
        grad = l2 * theta - residual @ incidence
        curvature = totals * p_win * p_loss
        hess = np.zeros((rounds, k, k))
        hess[:, pair_i, pair_j] = -curvature
        hess[:, pair_j, pair_i] = -curvature
        hess_diag = curvature @ abs_incidence + l2
        hess[:, diag, diag] = hess_diag
        # The likelihood is flat along θ + c·1, leaving only the tiny ridge there; adding a rank-one
        # term on that direction keeps the solve well conditioned without changing the step, since
        # the gradient of centred θ has no component along 1.
        hess += (hess_diag.mean(axis=1) / k)[:, None, None]
        step = -np.linalg.solve(hess, grad[..., None])[..., 0]
        step -= step.mean(axis=1, keepdims=True)
        theta, objective, p_win, p_loss = _line_search(theta, step, objective, wins, totals, cells, l2)
        if np.abs(step).max() < config.newton_tol:
            return theta
    raise RuntimeError(
        f"Bradley–Terry fit did not converge in {config.max_newton_iter} Newton iterations "
        f"(max step {np.abs(step).max():.3g} > tol {config.newton_tol:g})"
    )


def _line_search(
    theta: np.ndarray,
    step: np.ndarray,
    objective: np.ndarray,
    wins: np.ndarray,
    totals: np.ndarray,
    cells: _Cells,
    l2: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Take the full Newton step, halving it only in rounds where it would raise the objective."""
    new_theta = theta + step
    new_obj, p_win, p_loss = _evaluate(new_theta, wins, totals, cells.pair_i, cells.pair_j, l2)
    slack = _RELATIVE_SLACK * (1.0 + np.abs(objective))
    uphill = np.flatnonzero(new_obj > objective + slack)
    alpha = 1.0
    for _ in range(_MAX_HALVINGS):
        if uphill.size == 0:
            break
        alpha *= 0.5
        new_theta[uphill] = theta[uphill] + alpha * step[uphill]
        obj_u, pw_u, pl_u = _evaluate(
            new_theta[uphill], wins[uphill], totals[uphill], cells.pair_i, cells.pair_j, l2
        )
        new_obj[uphill], p_win[uphill], p_loss[uphill] = obj_u, pw_u, pl_u
        uphill = uphill[obj_u > objective[uphill] + slack[uphill]]
    return new_theta, new_obj, p_win, p_loss


def _to_ratings(theta: np.ndarray, anchor_index: int | None, config: LeaderboardConfig) -> np.ndarray:
    """Map θ of shape (R, K) to the rating scale, pinning the anchor (or the mean) at base_rating."""
    if anchor_index is None:
        shifted = theta - theta.mean(axis=1, keepdims=True)
    else:
        shifted = theta - theta[:, anchor_index : anchor_index + 1]
    return config.scale / math.log(10.0) * shifted + config.base_rating


def _anchor_index(cells: _Cells, config: LeaderboardConfig) -> int | None:
    """Position of the anchor system, or None when ratings are mean-anchored."""
    if config.anchor is None:
        return None
    hits = np.flatnonzero(cells.systems == config.anchor)
    if hits.size == 0:
        raise ValueError(f"anchor {config.anchor!r} is not a system with votes in counts")
    return int(hits[0])


def _point_theta(cells: _Cells, config: LeaderboardConfig) -> np.ndarray:
    """θ of the point fit on all votes, shape (1, K)."""
    wins, totals = cells.pair_totals(cells.cell_n[None, :].astype(np.float64))
    return _newton(wins, totals, cells, np.zeros((1, len(cells.systems))), config)


def fit_ratings(counts: pd.DataFrame, config: LeaderboardConfig = LeaderboardConfig()) -> pd.Series:
    """Point Bradley–Terry ratings (no bootstrap), indexed by system and sorted best first."""
    cells = _collapse(counts)
    if cells is None:
        return pd.Series(dtype=np.float64, name="rating")
    anchor = _anchor_index(cells, config)
    ratings = _to_ratings(_point_theta(cells, config), anchor, config)[0]
    series = pd.Series(ratings, index=pd.Index(cells.systems, name="system"), name="rating")
    return series.sort_values(ascending=False, kind="stable")


def compute_leaderboard(counts: pd.DataFrame, config: LeaderboardConfig = LeaderboardConfig()) -> list[Standing]:
    """Ratings, bootstrap CIs, votes, CI-based ranks and preliminary flags, sorted by rating."""
    cells = _collapse(counts)
    if cells is None:
        return []
    anchor = _anchor_index(cells, config)
    point = _point_theta(cells, config)

    rng = np.random.default_rng(config.seed)
    total = int(cells.cell_n.sum())
    draws = rng.multinomial(total, cells.cell_n / total, size=config.bootstrap_rounds)
    wins, totals = cells.pair_totals(draws.astype(np.float64))
    # Warm-starting every round at the point fit cuts Newton to a handful of iterations.
    boot = _newton(wins, totals, cells, np.repeat(point, config.bootstrap_rounds, axis=0), config)

    ratings = _to_ratings(point, anchor, config)[0]
    tail = (1.0 - config.confidence) / 2.0 * 100.0
    ci_low, ci_high = np.percentile(_to_ratings(boot, anchor, config), [tail, 100.0 - tail], axis=0)

    shown = np.flatnonzero(cells.votes >= config.min_votes)
    rank = 1 + (ci_low[shown][None, :] > ci_high[shown][:, None]).sum(axis=1)
    standings = [
        Standing(
            system=str(cells.systems[s]),
            rating=float(ratings[s]),
            ci_low=float(ci_low[s]),
            ci_high=float(ci_high[s]),
            votes=int(cells.votes[s]),
            rank=int(r),
            preliminary=bool(cells.votes[s] < config.preliminary_below),
        )
        for s, r in zip(shown, rank)
    ]
    return sorted(standings, key=lambda st: (-st.rating, st.system))
