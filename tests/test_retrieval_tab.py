"""The Search tab through gradio_client on the tiny profile: search, vote with aspects and confidence, refusals."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from gradio_client import Client
from sqlalchemy import select

from study.blobs import BlobStore
from study.db import make_engine, sessions
from study.models import Comparison, System, Vote, VoteAspect


def test_search_then_vote_is_stored_with_aspects_and_confidence(served_app: tuple[str, Path]) -> None:
    url, home = served_app
    client = Client(url, verbose=False)
    row_a, row_b, status = client.predict("a cup of coffee", 4, api_name="/search")
    assert len(row_a) == 4 and len(row_b) == 4 and "Which row" in status
    assert all(item["image"] and item["caption"].startswith(f"{i}. ") for i, item in enumerate(row_a, 1))
    reveal = client.predict("a", "A is better", "Tie", None, 4, "sharper pictures", api_name="/search_vote")
    with sessions(make_engine(f"sqlite:///{home / 'aesarena.db'}"))() as s:
        comparison = s.scalars(select(Comparison).where(Comparison.task == "retrieval")).one()
        vote = s.scalars(select(Vote).where(Vote.comparison_id == comparison.id)).one()
        aspects = {a.aspect: a.choice for a in s.scalars(select(VoteAspect).where(VoteAspect.vote_id == vote.id))}
        names = [s.get(System, i).name for i in (comparison.system_a_id, comparison.system_b_id)]
    assert (vote.choice, vote.confidence, vote.reason) == ("a", 4, "sharper pictures")
    assert aspects == {"accuracy": "a", "aesthetic": "tie"}
    assert f"**A** was **{names[0]}**, **B** was **{names[1]}**" in reveal and "searched for" in reveal
    stored = json.loads(BlobStore(home / "blobs").path(comparison.output_a).read_bytes())
    assert stored["query"] == "a cup of coffee" and len(stored["items"]) == 4
    with pytest.raises(Exception, match="already has a different vote"):
        client.predict("b", None, None, None, 4, "", api_name="/search_vote")


@pytest.mark.parametrize("query, message", [("  ", "type a search query"), ("red " * 200, "77 tokens")])
def test_bad_queries_open_nothing(served_app: tuple[str, Path], query: str, message: str) -> None:
    url, home = served_app
    with sessions(make_engine(f"sqlite:///{home / 'aesarena.db'}"))() as s:
        before = len(s.scalars(select(Comparison).where(Comparison.task == "retrieval")).all())
    with pytest.raises(Exception, match=message):
        Client(url, verbose=False).predict(query, 5, api_name="/search")
    with sessions(make_engine(f"sqlite:///{home / 'aesarena.db'}"))() as s:
        assert len(s.scalars(select(Comparison).where(Comparison.task == "retrieval")).all()) == before


def test_a_vote_before_any_search_is_refused(served_app: tuple[str, Path]) -> None:
    with pytest.raises(Exception, match="Search first"):
        Client(served_app[0], verbose=False).predict("a", None, None, None, 3, "", api_name="/search_vote")
