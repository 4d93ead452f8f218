"""A trained system registered in the vote store joins the running app's battles without a restart."""
from __future__ import annotations

from pathlib import Path

import pytest
from gradio_client import Client

from study.blobs import BlobStore
from study.db import make_engine
from study.votes import VoteService

TRAINED = "tiny-sd+trained"


def test_a_trained_system_is_served_next_round_and_can_be_switched_off(served_app: tuple[str, Path]) -> None:
    url, home = served_app
    votes = VoteService(make_engine(f"sqlite:///{home / 'aesarena.db'}"), BlobStore(home / "blobs"))
    for system in votes.systems("generation"):
        if system.name != "tiny-sd":
            votes.set_enabled("generation", system.name, False)
    # What a finished run does: the parent's settings plus its LoRA, registered as trained, beside its parent.
    parent = {s.name: s for s in votes.systems("generation")}["tiny-sd"]
    votes.register_system("generation", TRAINED, engine=parent.engine,
                          config={**parent.config, "loras": [{"path": "tiny"}]}, source="trained", parent="tiny-sd")
    client = Client(url, verbose=False)
    client.predict("a lighthouse at dawn", api_name="/generate")
    reveal, _ = client.predict("a", None, None, None, None, "", api_name="/vote")
    assert TRAINED in reveal and "tiny-sd" in reveal.replace(TRAINED, "")
    table, _, _ = client.predict("generation", "overall", api_name="/leaderboard")
    assert {row[1]: row[6] for row in table["data"]}[TRAINED] == "tiny-sd", "the board shows what it was trained from"
    votes.set_enabled("generation", TRAINED, False)
    with pytest.raises(Exception, match="at least two enabled systems"):
        client.predict("a lighthouse at dawn", api_name="/generate")
