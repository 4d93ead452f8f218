"""Every vote rule, on SQLite and on PostgreSQL."""
from __future__ import annotations

import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from study.blobs import BlobStore, Output
from study.db import make_engine
from study.models import Blob, Comparison, Vote, VoteAspect
from study.participants import client_address, pseudonym
from study.votes import (ConflictingVote, ExpiredComparison, Matchup, NotYourComparison, UnknownComparison,
                         VoteConfig, VoteError, VoteService)


def _text(value: str) -> Output:
    return Output(value.encode(), "text/plain")


@pytest.fixture
def arena(service: VoteService) -> VoteService:
    for name in ("alpha", "beta", "gamma"):
        service.register_system("generation", name, engine="test")
    return service


def _open(service: VoteService, participant: int | None = None, a: str = "out A", b: str = "out B"):
    return service.open_comparison(Matchup("generation", "alpha", "beta"), "a red fox", _text(a), _text(b),
                                   participant_id=participant)


def test_open_comparison_stores_outputs_by_content(arena: VoteService) -> None:
    opened = _open(arena)
    assert arena.blobs.get(opened.output_a) == b"out A"
    assert arena.blobs.get(opened.output_b) == b"out B"
    again = _open(arena)
    assert again.output_a == opened.output_a, "the same bytes are stored once under one address"
    assert again.token != opened.token and len(opened.token) >= 40
    with arena.session() as s:
        assert s.scalar(select(func.count()).select_from(Blob)) == 2


def test_vote_is_recorded_with_aspects_and_reason(arena: VoteService) -> None:
    opened = _open(arena)
    receipt = arena.record_vote(opened.token, "a", {"aesthetic": "b", "fidelity": "tie"}, reason=" crisp ",
                                latency_ms=1500)
    assert (receipt.choice, receipt.system_a, receipt.system_b) == ("a", "alpha", "beta")
    assert receipt.aspects == {"aesthetic": "b", "fidelity": "tie"} and not receipt.repeated
    [listed] = arena.list_votes("generation")
    assert listed.vote_id == receipt.vote_id and listed.aspects == receipt.aspects
    with arena.session() as s:
        vote = s.scalars(select(Vote)).one()
        assert (vote.reason, vote.latency_ms) == ("crisp", 1500)


def test_identical_repeat_is_a_noop_returning_the_stored_vote(arena: VoteService) -> None:
    opened = _open(arena)
    first = arena.record_vote(opened.token, "tie", {"aesthetic": "a"}, latency_ms=900)
    second = arena.record_vote(opened.token, "tie", {"aesthetic": "a"}, latency_ms=950)
    assert second.repeated and second.vote_id == first.vote_id
    assert arena.count_votes("generation") == 1


@pytest.mark.parametrize("choice, aspects", [("b", {"aesthetic": "a"}), ("tie", {"aesthetic": "b"}), ("tie", {})])
def test_a_different_second_vote_is_refused(arena: VoteService, choice: str, aspects: dict[str, str]) -> None:
    opened = _open(arena)
    arena.record_vote(opened.token, "tie", {"aesthetic": "a"})
    with pytest.raises(ConflictingVote, match="already has a different vote"):
        arena.record_vote(opened.token, choice, aspects)
    [stored] = arena.list_votes()
    assert (stored.choice, stored.aspects) == ("tie", {"aesthetic": "a"})


@pytest.mark.parametrize("token", ["", "nope", "x" * 65, None, 12])
def test_unknown_tokens_are_refused(arena: VoteService, token) -> None:
    with pytest.raises(UnknownComparison, match="unknown comparison"):
        arena.record_vote(token, "a")
    assert arena.count_votes() == 0


def test_expired_comparison_is_refused(engine, tmp_path) -> None:
    service = VoteService(engine, BlobStore(tmp_path / "b"), VoteConfig(comparison_ttl=timedelta(seconds=-1)))
    for name in ("alpha", "beta"):
        service.register_system("generation", name)
    opened = _open(service)
    with pytest.raises(ExpiredComparison, match="expired"):
        service.record_vote(opened.token, "a")
    assert service.count_votes() == 0


@pytest.mark.parametrize("kwargs, message", [
    ({"choice": "A"}, "unknown choice"),
    ({"choice": "a", "aspects": {"diversity": "a"}}, "unknown aspect"),
    ({"choice": "a", "aspects": {"aesthetic": "maybe"}}, "unknown choice"),
    ({"choice": "a", "reason": "x" * 2001}, "limit is 2000"),
    ({"choice": "a", "latency_ms": -5}, "out of range"),
])
def test_malformed_votes_change_nothing(arena: VoteService, kwargs: dict, message: str) -> None:
    opened = _open(arena)
    with pytest.raises(VoteError, match=message):
        arena.record_vote(opened.token, **kwargs)
    assert arena.count_votes() == 0
    assert arena.record_vote(opened.token, "b").choice == "b", "a refused vote leaves the comparison open"


def test_only_the_session_that_was_shown_may_vote(arena: VoteService) -> None:
    shown, other = arena.participant("p" * 64), arena.participant("q" * 64)
    opened = _open(arena, participant=shown)
    with pytest.raises(NotYourComparison):
        arena.record_vote(opened.token, "a", participant_id=other)
    assert arena.record_vote(opened.token, "a", participant_id=shown).choice == "a"


def test_concurrent_double_clicks_make_one_vote(arena: VoteService) -> None:
    tokens = [_open(arena, a=f"a{i}").token for i in range(20)]

    def click(token: str):
        try:
            return arena.record_vote(token, "a", {"aesthetic": "a"})
        except VoteError as error:  # pragma: no cover - a failure shows up in the assertions below
            return error

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(click, [t for t in tokens for _ in range(4)]))
    assert all(not isinstance(r, Exception) for r in results), results
    assert Counter(r.repeated for r in results) == Counter({False: 20, True: 60})
    assert len({r.vote_id for r in results}) == 20
    with arena.session() as s:
        assert s.scalar(select(func.count()).select_from(Vote)) == 20
        assert s.scalar(select(func.count()).select_from(VoteAspect)) == 20


def test_matchups_follow_weights_and_randomize_sides(engine, tmp_path) -> None:
    service = VoteService(engine, BlobStore(tmp_path / "b"), rng=random.Random(7))
    service.register_system("generation", "heavy", weight=4.0)
    service.register_system("generation", "light", weight=1.0)
    service.register_system("generation", "off", weight=0.0)
    service.register_system("generation", "disabled", enabled=False)
    draws = [service.pick_matchup("generation") for _ in range(400)]
    assert all({m.system_a, m.system_b} == {"heavy", "light"} for m in draws)
    first = Counter(m.system_a for m in draws)
    assert 150 < first["heavy"] < 250, "either system lands on side A about half the time"
    override = [service.pick_matchup("generation", {"off": 1.0, "light": 0.0}) for _ in range(50)]
    assert all({m.system_a, m.system_b} == {"heavy", "off"} for m in override)


def test_matchup_needs_two_systems(service: VoteService) -> None:
    service.register_system("critique", "solo")
    with pytest.raises(VoteError, match="at least two"):
        service.pick_matchup("critique")


def test_register_system_updates_and_links_parent(service: VoteService) -> None:
    service.register_system("generation", "base", engine="diffusers", config={"steps": 1})
    child = service.register_system("generation", "base+dpo", source="trained", parent="base")
    again = service.register_system("generation", "base", engine="diffusers", config={"steps": 4})
    assert child.parent == "base" and again.id == service.systems("generation")[0].id
    assert service.systems("generation")[0].config == {"steps": 4}
    service.set_enabled("generation", "base+dpo", False)
    assert [s.name for s in service.systems("generation")] == ["base"]


def test_count_votes_by_task_and_system(arena: VoteService) -> None:
    for choice in ("a", "b", "tie"):
        arena.record_vote(_open(arena, a=choice).token, choice)
    assert arena.count_votes() == 3 and arena.count_votes("generation", "alpha") == 3
    assert arena.count_votes("generation", "gamma") == 0 and arena.count_votes("critique") == 0
    with pytest.raises(VoteError, match="no system named"):
        arena.count_votes("generation", "nobody")


def test_oversized_prompt_opens_nothing(arena: VoteService) -> None:
    with pytest.raises(VoteError, match="limit"):
        arena.open_comparison(Matchup("generation", "alpha", "beta"), "x" * 20001, _text("a"), _text("b"))
    with arena.session() as s:
        assert s.scalar(select(func.count()).select_from(Comparison)) == 0


def test_pseudonyms_hide_the_address() -> None:
    address = client_address({"X-Forwarded-For": "203.0.113.9, 10.0.0.1"}, "10.0.0.1")
    assert address == "203.0.113.9"
    assert client_address({}, "127.0.0.1") == "127.0.0.1"
    name = pseudonym(b"secret", address, "session-1")
    assert len(name) == 64 and "203" not in name
    assert name != pseudonym(b"secret", address, "session-2") != pseudonym(b"other", address, "session-1")


def test_same_new_output_opened_concurrently(arena: VoteService) -> None:
    with ThreadPoolExecutor(8) as pool:
        opened = list(pool.map(lambda i: _open(arena, a="shared ranking", b=f"other {i}"), range(16)))
    assert len({o.output_a for o in opened}) == 1 and len({o.token for o in opened}) == 16


def test_only_sqlite_and_postgresql() -> None:
    with pytest.raises(ValueError, match="runs on sqlite or postgresql"):
        make_engine("mysql://u@localhost/x")


def test_same_system_matchups_on_request(arena: VoteService) -> None:
    draws = [arena.pick_matchup("generation", same_system_rate=1.0) for _ in range(20)]
    assert all(m.system_a == m.system_b for m in draws)
    assert not any(m.system_a == m.system_b for m in (arena.pick_matchup("generation") for _ in range(50)))
    with pytest.raises(ValueError, match="same_system_rate"):
        arena.pick_matchup("generation", same_system_rate=1.5)


def test_matchups_only_among_servable_systems(arena: VoteService) -> None:
    draws = {frozenset((m.system_a, m.system_b)) for m in
             (arena.pick_matchup("generation", among={"alpha", "gamma"}) for _ in range(20))}
    assert draws == {frozenset({"alpha", "gamma"})}


def test_confidence_is_stored_once_and_checked(service: VoteService) -> None:
    """HPIR's confidence travels with the vote: kept, part of the exactly-once identity, and range-checked."""
    service.register_system("retrieval", "clip")
    service.register_system("retrieval", "clip+aesthetic")
    matchup = service.pick_matchup("retrieval")
    for bad in (0, 6, True):
        token = service.open_comparison(matchup, "a red car", Output(b"[1]", "application/json"),
                                        Output(b"[2]", "application/json")).token
        with pytest.raises(VoteError, match="confidence"):
            service.record_vote(token, "a", confidence=bad)
    receipt = service.record_vote(token, "a", {"aesthetic": "b"}, confidence=4)
    assert receipt.confidence == 4 and service.record_vote(token, "a", {"aesthetic": "b"}, confidence=4).repeated
    with pytest.raises(ConflictingVote):
        service.record_vote(token, "a", {"aesthetic": "b"}, confidence=2)
    assert service.list_votes("retrieval")[0].confidence == 4


def test_parent_rate_pits_a_trained_system_against_its_parent(service: VoteService) -> None:
    for name in ("base", "other"):
        service.register_system("generation", name)
    service.register_system("generation", "base+dpo", source="trained", parent="base")
    seen = Counter(frozenset((m.system_a, m.system_b)) for m in
                   (service.pick_matchup("generation", parent_rate=1.0) for _ in range(40)))
    assert set(seen) == {frozenset(("base", "base+dpo"))}
    sides = Counter(service.pick_matchup("generation", parent_rate=1.0).system_a for _ in range(40))
    assert set(sides) == {"base", "base+dpo"}, "sides stay random"
    service.set_enabled("generation", "base", False)  # no parent to meet: ordinary matchups
    assert {frozenset((m.system_a, m.system_b)) for m in
            (service.pick_matchup("generation", parent_rate=1.0) for _ in range(10))} == {
        frozenset(("other", "base+dpo"))}
    with pytest.raises(ValueError, match="parent_rate"):
        service.pick_matchup("generation", parent_rate=1.5)
