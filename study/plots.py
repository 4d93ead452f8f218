"""Figures for leaderboards and study reports (matplotlib, headless)."""
from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # servers and CI have no display

from matplotlib.figure import Figure  # noqa: E402

from study.leaderboard import Standing  # noqa: E402


def ratings_figure(standings: Sequence[Standing], title: str) -> Figure:
    """Ratings as points with their confidence intervals, best at the top; preliminary ones hollow."""
    rows = sorted(standings, key=lambda s: s.rating)
    figure = Figure(figsize=(7, 0.45 * max(len(rows), 2) + 1.2), layout="constrained")
    axes = figure.subplots()
    for y, row in enumerate(rows):
        axes.errorbar(row.rating, y, xerr=[[row.rating - row.ci_low], [row.ci_high - row.rating]], fmt="o",
                      color="tab:blue", capsize=4, markerfacecolor="white" if row.preliminary else "tab:blue")
    axes.set_yticks(range(len(rows)), [f"{r.system}  (#{r.rank})" for r in rows])
    axes.set_xlabel("rating (Bradley–Terry, 95% bootstrap interval)")
    axes.set_title(title if rows else f"{title}: no votes yet")
    axes.grid(axis="x", alpha=0.3)
    return figure
