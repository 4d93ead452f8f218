"""Aggregation from the database: the counts the leaderboard is fitted on, on both backends."""
from __future__ import annotations

import pytest

from study.blobs import Output
from study.counts import load_counts
from study.votes import Matchup, VoteService


def _vote(service: VoteService, a: str, b: str, choice: str, aspects: dict | None = None,
          participant: int | None = None, board: bool = True) -> None:
    opened = service.open_comparison(Matchup("generation", a, b), "p", Output(b"x", "text/plain"),
                                     Output(b"y", "text/plain"), participant_id=participant)
    service.record_vote(opened.token, choice, aspects, participant_id=participant, counts_for_board=board)


def _as_dict(frame) -> dict[tuple[str, str, str], int]:
    return {(r.system_a, r.system_b, r.outcome): r.n for r in frame.itertuples()}


@pytest.fixture
def filled(service: VoteService) -> VoteService:
    for name in ("x", "y", "z"):
        service.register_system("generation", name)
    judge = service.participant("j" * 64, kind="judge")
    human = service.participant("h" * 64)
    _vote(service, "x", "y", "a", {"aesthetic": "b"})
    _vote(service, "x", "y", "a", participant=human)
    _vote(service, "y", "x", "both_bad", {"aesthetic": "tie"})
    _vote(service, "x", "z", "b", participant=judge)
    _vote(service, "x", "z", "a", board=False)
    _vote(service, "z", "z", "a")
    return service


def test_overall_counts_group_in_sql(filled: VoteService) -> None:
    assert _as_dict(load_counts(filled.engine, "generation")) == {("x", "y", "a"): 2, ("y", "x", "both_bad"): 1}


def test_aspect_counts(filled: VoteService) -> None:
    counts = load_counts(filled.engine, "generation", "aesthetic")
    assert _as_dict(counts) == {("x", "y", "b"): 1, ("y", "x", "tie"): 1}


def test_judges_and_off_board_votes_are_opt_in(filled: VoteService) -> None:
    counts = _as_dict(load_counts(filled.engine, "generation", include_judges=True, board_only=False))
    assert counts[("x", "z", "b")] == 1 and counts[("x", "z", "a")] == 1
    assert ("z", "z", "a") not in counts, "a system against itself carries no rating information"


def test_judges_have_a_board_of_their_own(filled: VoteService) -> None:
    assert _as_dict(load_counts(filled.engine, "generation", judges_only=True)) == {("x", "z", "b"): 1}


def test_unknown_aspect_or_task(filled: VoteService) -> None:
    with pytest.raises(ValueError, match="unknown aspect"):
        load_counts(filled.engine, "generation", "diversity")
    with pytest.raises(ValueError, match="unknown task"):
        load_counts(filled.engine, "music")
    assert load_counts(filled.engine, "critique").empty
