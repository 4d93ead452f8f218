"""Properties of the Bradley–Terry leaderboard, and agreement with an independent scipy fit."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize
from scipy.stats import binom

from study.leaderboard import (
    OUTCOMES,
    LeaderboardConfig,
    Standing,
    _collapse,
    _newton,
    compute_leaderboard,
    fit_ratings,
)

SYSTEMS = ["A", "B", "C", "D", "E"]
FAST = LeaderboardConfig(bootstrap_rounds=50, seed=7)
SWAP_OUTCOME = {"a": "b", "b": "a", "tie": "tie", "both_bad": "both_bad"}

Row = tuple[str, str, str, int]


def frame(rows: list[Row]) -> pd.DataFrame:
    """Counts DataFrame from (system_a, system_b, outcome, n) tuples."""
    return pd.DataFrame(rows, columns=["system_a", "system_b", "outcome", "n"])


def table(standings: list[Standing]) -> pd.DataFrame:
    """Standings as a DataFrame indexed by system, for order-free comparisons."""
    return pd.DataFrame([s.__dict__ for s in standings]).set_index("system").sort_index()


def assert_same_board(left: list[Standing], right: list[Standing], atol: float = 1e-9) -> None:
    """Same systems, votes, ranks and flags; ratings and CIs equal within atol."""
    lt, rt = table(left), table(right)
    assert list(lt.index) == list(rt.index)
    for col in ("votes", "rank", "preliminary"):
        assert lt[col].tolist() == rt[col].tolist()
    for col in ("rating", "ci_low", "ci_high"):
        np.testing.assert_allclose(lt[col], rt[col], rtol=0, atol=atol)


pairs = st.lists(st.sampled_from(SYSTEMS), min_size=2, max_size=2, unique=True)
rows = st.tuples(pairs, st.sampled_from(OUTCOMES), st.integers(0, 40)).map(lambda t: (t[0][0], t[0][1], t[1], t[2]))
row_lists = st.lists(rows, min_size=1, max_size=25).filter(lambda rs: sum(r[3] for r in rs) > 0)


@settings(max_examples=60, deadline=None)
@given(row_lists)
def test_swapping_sides_changes_nothing(rs: list[Row]) -> None:
    swapped = [(b, a, SWAP_OUTCOME[o], n) for a, b, o, n in rs]
    pd.testing.assert_series_equal(
        fit_ratings(frame(rs)).sort_index(), fit_ratings(frame(swapped)).sort_index(), rtol=0, atol=1e-6
    )
    assert_same_board(compute_leaderboard(frame(rs), FAST), compute_leaderboard(frame(swapped), FAST), atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(row_lists, st.data())
def test_row_order_and_splitting_change_nothing(rs: list[Row], data: st.DataObject) -> None:
    split: list[Row] = []
    for a, b, o, n in rs:
        part = data.draw(st.integers(0, n))
        split += [(a, b, o, part), (a, b, o, n - part)]
    shuffled = data.draw(st.permutations(split))
    assert_same_board(compute_leaderboard(frame(rs), FAST), compute_leaderboard(frame(shuffled), FAST))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(pairs, st.sampled_from(["tie", "both_bad"]), st.integers(1, 40)), min_size=1, max_size=15))
def test_only_ties_give_everyone_the_base_rating(ts: list[tuple[list[str], str, int]]) -> None:
    board = compute_leaderboard(frame([(p[0], p[1], o, n) for p, o, n in ts]), FAST)
    for s in board:
        assert s.rating == pytest.approx(FAST.base_rating, abs=1e-9)
        assert s.ci_low == pytest.approx(FAST.base_rating, abs=1e-9)
        assert s.ci_high == pytest.approx(FAST.base_rating, abs=1e-9)
        assert s.rank == 1


@settings(max_examples=60, deadline=None)
@given(st.data(), st.integers(2, 4))
def test_unbeaten_system_ranks_first_and_winless_system_last(data: st.DataObject, n_middle: int) -> None:
    middle = SYSTEMS[:n_middle]
    rs: list[Row] = []
    for winner, loser in [("W", m) for m in middle + ["L"]] + [(m, "L") for m in middle]:
        n = data.draw(st.integers(1, 30))
        # Either side may hold the winner; the outcome follows the side.
        rs.append((winner, loser, "a", n) if data.draw(st.booleans()) else (loser, winner, "b", n))
    middle_pairs = st.lists(st.sampled_from(middle), min_size=2, max_size=2, unique=True)
    for pair, outcome, n in data.draw(st.lists(st.tuples(middle_pairs, st.sampled_from(OUTCOMES), st.integers(1, 30)),
                                               max_size=8)):
        rs.append((pair[0], pair[1], outcome, n))
    board = compute_leaderboard(frame(rs), FAST)
    assert board[0].system == "W" and board[0].rank == 1
    assert board[0].rating > max(s.rating for s in board[1:])
    assert board[-1].system == "L"
    assert board[-1].rating < min(s.rating for s in board[:-1])


@settings(max_examples=40, deadline=None)
@given(st.integers(3, 6), st.floats(0.4, 1.0), st.integers(300, 1000), st.floats(0.0, 0.5))
def test_ratings_follow_a_clear_strength_order(k: int, spacing: float, per_pair: int, tie_rate: float) -> None:
    strength = spacing * np.arange(k)
    rs: list[Row] = []
    for i in range(k):
        for j in range(i + 1, k):
            p_i = 1.0 / (1.0 + math.exp(strength[j] - strength[i]))
            # Ties are likelier between close systems and, as half wins, keep i's expected score at p_i.
            ties = per_pair * tie_rate * 2 * min(p_i, 1 - p_i)
            rs += [(f"s{i}", f"s{j}", "a", round(per_pair * p_i - ties / 2)),
                   (f"s{i}", f"s{j}", "b", round(per_pair * (1 - p_i) - ties / 2)),
                   (f"s{j}", f"s{i}", "tie", round(ties))]
    ratings = fit_ratings(frame(rs))
    assert list(ratings.index) == [f"s{i}" for i in reversed(range(k))]
    # Expected counts make the MLE land near the truth on the 400/ln10 scale.
    true_ratings = 400 / math.log(10) * (strength - strength.mean()) + 1000
    np.testing.assert_allclose(ratings.sort_index().to_numpy(), true_ratings, atol=400 / math.log(10) * 0.05)


@settings(max_examples=40, deadline=None)
@given(row_lists, st.data())
def test_anchor_is_pinned_to_base_rating(rs: list[Row], data: st.DataObject) -> None:
    voted = sorted({s for a, b, _, n in rs if n > 0 for s in (a, b)})
    anchor = data.draw(st.sampled_from(voted))
    config = LeaderboardConfig(bootstrap_rounds=50, anchor=anchor, base_rating=1500.0)
    assert fit_ratings(frame(rs), config)[anchor] == 1500.0
    pinned = {s.system: s for s in compute_leaderboard(frame(rs), config)}[anchor]
    assert (pinned.rating, pinned.ci_low, pinned.ci_high) == (1500.0, 1500.0, 1500.0)
    # Anchoring only shifts: rating gaps match the mean-anchored fit.
    free = fit_ratings(frame(rs)).sort_index()
    shifted = fit_ratings(frame(rs), config).sort_index()
    np.testing.assert_allclose((shifted - free).to_numpy(), 1500.0 - free[anchor], atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(row_lists, st.data())
def test_tie_and_both_bad_are_equivalent(rs: list[Row], data: st.DataObject) -> None:
    relabelled = [(a, b, data.draw(st.sampled_from(["tie", "both_bad"])) if o in ("tie", "both_bad") else o, n)
                  for a, b, o, n in rs]
    assert_same_board(compute_leaderboard(frame(rs), FAST), compute_leaderboard(frame(relabelled), FAST))


@settings(max_examples=40, deadline=None)
@given(row_lists, st.integers(0, 60), st.integers(0, 100))
def test_rank_counts_shown_systems_whose_lower_bound_beats_this_upper_bound(
    rs: list[Row], min_votes: int, preliminary_below: int
) -> None:
    config = LeaderboardConfig(bootstrap_rounds=50, min_votes=min_votes, preliminary_below=preliminary_below)
    board = compute_leaderboard(frame(rs), config)
    votes = {s: sum(n for a, b, _, n in rs if s in (a, b)) for s in SYSTEMS}
    assert {s.system for s in board} == {s for s, v in votes.items() if v > 0 and v >= min_votes}
    for s in board:
        assert s.votes == votes[s.system]
        assert s.preliminary == (s.votes < preliminary_below)
        assert s.rank == 1 + sum(o.ci_low > s.ci_high for o in board)
    assert [s.rating for s in board] == sorted((s.rating for s in board), reverse=True)


def test_overlapping_intervals_share_a_rank() -> None:
    rs = [("A", "C", "a", 180), ("A", "C", "b", 20), ("C", "B", "b", 180), ("C", "B", "a", 20),
          ("A", "B", "a", 50), ("A", "B", "b", 50)]
    board = {s.system: s for s in compute_leaderboard(frame(rs), LeaderboardConfig(bootstrap_rounds=200))}
    assert board["A"].ci_low < board["B"].ci_high and board["B"].ci_low < board["A"].ci_high
    assert (board["A"].rank, board["B"].rank, board["C"].rank) == (1, 1, 3)


def test_min_votes_hides_but_still_fits_and_ranks_among_shown() -> None:
    rs = [("D", "X", "a", 90), ("X", "Y", "a", 60), ("X", "Y", "b", 60)]
    everyone = {s.system: s for s in compute_leaderboard(frame(rs), LeaderboardConfig(bootstrap_rounds=200))}
    # Thresholds sit exactly on vote counts: Y (120) is shown, X (210) is not preliminary.
    config = LeaderboardConfig(bootstrap_rounds=200, min_votes=120, preliminary_below=210)
    shown = {s.system: s for s in compute_leaderboard(frame(rs), config)}
    assert (everyone["D"].rank, everyone["X"].rank, everyone["Y"].rank) == (1, 2, 2)
    assert set(shown) == {"X", "Y"}
    assert (shown["X"].rank, shown["Y"].rank) == (1, 1)
    assert (shown["X"].votes, shown["Y"].votes) == (210, 120)
    assert (shown["X"].preliminary, shown["Y"].preliminary) == (False, True)
    for s in "XY":
        assert shown[s].rating == everyone[s].rating


@pytest.mark.parametrize("confidence", [0.95, 0.8])
def test_interval_is_the_central_bootstrap_percentile_range(confidence: float) -> None:
    # With two systems a multinomial bootstrap round is Binomial(N, p) wins for A, and A's anchored
    # rating is monotone in those wins, so the CI ends sit at A's rating for the binomial quantiles.
    total, wins = 10_000, 6_000
    config = LeaderboardConfig(bootstrap_rounds=20_000, anchor="B", confidence=confidence)
    board = {s.system: s for s in compute_leaderboard(frame([("A", "B", "a", wins), ("B", "A", "a", total - wins)]),
                                                      config)}

    def rating_with(k: float) -> float:
        return float(fit_ratings(frame([("A", "B", "a", int(k)), ("A", "B", "b", total - int(k))]), config)["A"])

    # ±4 wins is ~4 standard errors of an empirical 2.5% quantile over 20,000 rounds, and less than
    # the ~7-win gap between the 97.5% and 96.5% quantiles.
    tail = (1 - confidence) / 2
    low_k, high_k = binom.ppf([tail, 1 - tail], total, wins / total)
    assert rating_with(low_k - 4) <= board["A"].ci_low <= rating_with(low_k + 4)
    assert rating_with(high_k - 4) <= board["A"].ci_high <= rating_with(high_k + 4)


def test_point_ratings_match_leaderboard_and_seed_matters() -> None:
    rs = [("A", "B", "a", 30), ("B", "A", "a", 12), ("A", "C", "tie", 9), ("C", "B", "b", 4), ("C", "A", "a", 7)]
    board = compute_leaderboard(frame(rs), FAST)
    ratings = fit_ratings(frame(rs))
    assert {s.system: s.rating for s in board} == ratings.to_dict()
    assert list(ratings.index) == [s.system for s in board]
    assert table(compute_leaderboard(frame(rs), FAST)).equals(table(board))
    other = compute_leaderboard(frame(rs), LeaderboardConfig(bootstrap_rounds=50, seed=8))
    assert not np.allclose(table(other)["ci_low"], table(board)["ci_low"])


def test_empty_counts_give_an_empty_board() -> None:
    empty = frame([])
    assert compute_leaderboard(empty) == []
    assert fit_ratings(empty).empty
    assert compute_leaderboard(frame([("A", "B", "a", 0)])) == []


@pytest.mark.parametrize(
    ("rows", "config", "message"),
    [
        ([("A", "B", "win", 3)], FAST, "unknown outcome"),
        ([("A", "B", "a", -1)], FAST, "negative"),
        ([("A", "B", "a", 1.5)], FAST, "whole numbers"),
        ([("A", "A", "a", 2)], FAST, "itself"),
        ([("A", "B", "a", 2)], LeaderboardConfig(bootstrap_rounds=50, anchor="Z"), "anchor 'Z'"),
    ],
)
def test_bad_input_raises_a_clear_error(rows: list[tuple[str, str, str, float]], config: LeaderboardConfig,
                                        message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compute_leaderboard(frame(rows), config)
    with pytest.raises(ValueError, match=message):
        fit_ratings(frame(rows), config)


def test_missing_column_raises() -> None:
    with pytest.raises(ValueError, match="missing column"):
        compute_leaderboard(pd.DataFrame({"system_a": ["A"], "system_b": ["B"], "n": [1]}))


@pytest.mark.parametrize(
    "kwargs",
    [{"bootstrap_rounds": 0}, {"confidence": 1.0}, {"scale": 0.0}, {"l2": 0.0}, {"max_newton_iter": 0},
     {"newton_tol": 0.0}],
)
def test_bad_config_raises(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        LeaderboardConfig(**kwargs)


def test_non_convergence_is_reported() -> None:
    with pytest.raises(RuntimeError, match="did not converge"):
        fit_ratings(frame([("A", "B", "a", 100), ("A", "B", "b", 1)]), LeaderboardConfig(max_newton_iter=1))


def test_newton_from_a_far_start_is_damped_to_the_optimum() -> None:
    # Bootstrap rounds warm-start at the point fit; a round whose data differ a lot starts on the flat
    # tail of the likelihood, where a full Newton step overshoots by thousands and must be halved.
    config = LeaderboardConfig()
    cells = _collapse(frame([("A", "B", "a", 3), ("A", "B", "b", 3), ("B", "C", "a", 4), ("C", "B", "a", 2)]))
    assert cells is not None
    wins, totals = cells.pair_totals(cells.cell_n[None, :].astype(np.float64))
    cold = _newton(wins, totals, cells, np.zeros((1, 3)), config)
    far = _newton(np.repeat(wins, 3, axis=0), np.repeat(totals, 3, axis=0), cells,
                  np.array([[10.0, -10.0, 0.0], [0.0, 0.0, 0.0], [-8.0, 0.0, 8.0]]), config)
    np.testing.assert_allclose(far, np.repeat(cold, 3, axis=0), atol=1e-8)


def reference_ratings(rs: list[Row], l2: float) -> pd.Series:
    """Mean-centred ratings from scipy's L-BFGS on the per-pair BT log-likelihood with the same ridge."""
    systems = sorted({s for a, b, _, _ in rs for s in (a, b)})
    index = {s: k for k, s in enumerate(systems)}
    wins: dict[tuple[int, int], float] = {}
    games: dict[tuple[int, int], float] = {}
    for a, b, o, n in rs:
        key = (index[a], index[b])
        games[key] = games.get(key, 0.0) + n
        wins[key] = wins.get(key, 0.0) + n * {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}[o]
    keys = list(games)
    i = np.array([k[0] for k in keys])
    j = np.array([k[1] for k in keys])
    w = np.array([wins[k] for k in keys])
    g = np.array([games[k] for k in keys])

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        d = theta[i] - theta[j]
        value = np.sum(w * np.logaddexp(0, -d) + (g - w) * np.logaddexp(0, d)) + 0.5 * l2 * theta @ theta
        r = w - g / (1 + np.exp(-d))
        grad = l2 * theta - np.bincount(i, r, len(systems)) + np.bincount(j, r, len(systems))
        return value, grad

    theta = minimize(loss, np.zeros(len(systems)), jac=True, method="L-BFGS-B",
                     options={"ftol": 1e-15, "gtol": 1e-10, "maxiter": 10_000}).x
    return pd.Series(400 / math.log(10) * (theta - theta.mean()) + 1000, index=systems)


def test_matches_independent_scipy_fit() -> None:
    rng = np.random.default_rng(3)
    names = [f"m{k}" for k in range(7)]
    rs = [(a, b, o, int(rng.integers(0, 60))) for a in names for b in names if a != b for o in OUTCOMES
          if rng.random() < 0.7]
    ours = fit_ratings(frame(rs)).sort_index()
    theirs = reference_ratings(rs, LeaderboardConfig().l2)
    np.testing.assert_allclose(ours.to_numpy(), theirs.to_numpy(), atol=0.01)
    assert ours.max() - ours.min() > 20  # the data is not degenerate, so agreement is informative
