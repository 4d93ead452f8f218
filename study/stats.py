"""Vote counts per task, per system and per day, grouped in the database."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
from sqlalchemy import Engine, case, func, select

from study.models import Comparison, Participant, System, Vote
from study.tasks import TASKS


@dataclass(frozen=True)
class Stats:
    """Three tables: tasks (every known task), systems (every registered one) and days with votes."""

    tasks: pd.DataFrame  # task, systems, comparisons, votes, human_votes, judge_votes, board_votes
    systems: pd.DataFrame  # task, system, source, enabled, votes (on either side)
    days: pd.DataFrame  # day (YYYY-MM-DD, UTC), task, votes

    def to_dict(self) -> dict[str, list[dict[str, Any]]]:
        """The tables as lists of records, for JSON."""
        return {name: frame.to_dict("records") for name, frame in
                (("tasks", self.tasks), ("systems", self.systems), ("days", self.days))}


def collect_stats(engine: Engine) -> Stats:
    """Count votes per task, per system and per day."""
    judge = case((Participant.kind == "judge", 1), else_=0)
    votes = (select(Comparison.task, func.count().label("votes"), func.sum(judge).label("judge_votes"),
                    func.sum(case((Vote.counts_for_board, 1), else_=0)).label("board_votes"))
             .select_from(Vote).join(Comparison, Vote.comparison_id == Comparison.id)
             .outerjoin(Participant, Vote.participant_id == Participant.id).group_by(Comparison.task))
    comparisons = select(Comparison.task, func.count().label("comparisons")).group_by(Comparison.task)
    systems = select(System.task, func.count().label("systems")).group_by(System.task)
    sides = [select(side.label("system_id"), func.count().label("votes")).select_from(Vote)
             .join(Comparison, Vote.comparison_id == Comparison.id).group_by(side)
             for side in (Comparison.system_a_id, Comparison.system_b_id)]
    # date() exists on both SQLite (text) and PostgreSQL (date); str() below makes them alike.
    day = func.date(Vote.created_at)
    days = (select(day.label("day"), Comparison.task, func.count().label("votes")).select_from(Vote)
            .join(Comparison, Vote.comparison_id == Comparison.id)
            .group_by(day, Comparison.task).order_by(day, Comparison.task))
    registered = select(System.id.label("system_id"), System.task, System.name.label("system"), System.source,
                        System.enabled).order_by(System.task, System.name)
    with engine.connect() as conn:
        frames = [_frame(conn.execute(q)) for q in (votes, comparisons, systems, *sides, days, registered)]
    votes_df, comparisons_df, systems_df, side_a, side_b, days_df, registered_df = frames

    tasks = pd.DataFrame({"task": list(TASKS)})
    for extra in (systems_df, comparisons_df, votes_df):
        tasks = tasks.merge(extra, on="task", how="left")
    tasks = tasks.fillna(0)
    tasks["human_votes"] = tasks["votes"] - tasks["judge_votes"]
    tasks = tasks[["task", "systems", "comparisons", "votes", "human_votes", "judge_votes", "board_votes"]]
    tasks = tasks.astype({c: "int64" for c in tasks.columns if c != "task"})

    per_system = pd.concat([side_a, side_b]).groupby("system_id", as_index=False)["votes"].sum()
    systems_out = registered_df.merge(per_system, on="system_id", how="left").fillna({"votes": 0})
    systems_out = systems_out.astype({"votes": "int64", "enabled": bool}).drop(columns="system_id")

    days_df["day"] = days_df["day"].astype(str)
    return Stats(tasks.reset_index(drop=True), systems_out.reset_index(drop=True),
                 days_df.astype({"votes": "int64"}))


def _frame(result) -> pd.DataFrame:
    return pd.DataFrame(result.all(), columns=list(result.keys()))
