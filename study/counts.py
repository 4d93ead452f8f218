"""Aggregated vote counts straight from SQL: one row per (system_a, system_b, outcome), never per vote."""
from __future__ import annotations

import pandas as pd
from sqlalchemy import Engine, and_, func, select

from study.models import Comparison, Participant, System, Vote, VoteAspect
from study.tasks import TASK_ASPECTS, check_task

COLUMNS = ["system_a", "system_b", "outcome", "n"]


def load_counts(engine: Engine, task: str, aspect: str | None = None, *, include_judges: bool = False,
                judges_only: bool = False, board_only: bool = True) -> pd.DataFrame:
    """Counts of the task's votes (or of one aspect's choices), grouped in the database; humans' by default,
    model judges' alone for their own board."""
    check_task(task)
    if aspect is not None and aspect not in TASK_ASPECTS[task]:
        raise ValueError(f"unknown aspect {aspect!r} for {task}; use one of {', '.join(TASK_ASPECTS[task])}")
    outcome = VoteAspect.choice if aspect else Vote.choice
    query = (select(Comparison.system_a_id, Comparison.system_b_id, outcome, func.count())
             .select_from(Vote).join(Comparison, Vote.comparison_id == Comparison.id)
             # A system against itself (two seeds) says nothing about ratings.
             .where(Comparison.task == task, Comparison.system_a_id != Comparison.system_b_id)
             .group_by(Comparison.system_a_id, Comparison.system_b_id, outcome))
    if aspect:
        query = query.join(VoteAspect, and_(VoteAspect.vote_id == Vote.id, VoteAspect.aspect == aspect))
    if board_only:
        query = query.where(Vote.counts_for_board)
    # A small IN-list of judge ids is far cheaper than joining participants onto every vote.
    judges = select(Participant.id).where(Participant.kind == "judge")
    if judges_only:
        query = query.where(Vote.participant_id.in_(judges))
    elif not include_judges:
        query = query.where(Vote.participant_id.is_(None) | Vote.participant_id.not_in(judges))
    with engine.connect() as conn:
        rows = conn.execute(query).all()
        names = dict(conn.execute(select(System.id, System.name).where(System.task == task)).all())
    frame = pd.DataFrame(rows, columns=["a_id", "b_id", "outcome", "n"])
    return pd.DataFrame({"system_a": frame["a_id"].map(names), "system_b": frame["b_id"].map(names),
                         "outcome": frame["outcome"], "n": frame["n"].astype("int64")}, columns=COLUMNS)
