"""The Generate tab end to end through gradio_client on the tiny profile: generate, vote, reveal, score."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from PIL import Image
from sqlalchemy import func, select

from study.blobs import BlobStore
from study.db import make_engine, sessions
from study.models import Blob, Comparison, System, Vote, VoteAspect


def _db(home: Path):
    return sessions(make_engine(f"sqlite:///{home / 'aesarena.db'}"))


def _comparisons(home: Path) -> int:
    with _db(home)() as s:
        return s.scalar(select(func.count()).select_from(Comparison))


def test_generate_vote_reveal_stores_everything(served_app: tuple[str, Path]) -> None:
    url, home = served_app
    client = Client(url, verbose=False)
    image_a, image_b, status, _ = client.predict("a lighthouse at dawn", api_name="/generate")
    assert Path(image_a).is_file() and Path(image_b).is_file() and "Vote to reveal" in status
    reveal, scores = client.predict("b", "A is better", None, "Tie", None, "sharper", api_name="/vote")
    with _db(home)() as s:
        comparison = s.scalars(select(Comparison).order_by(Comparison.id.desc())).first()
        vote = s.scalars(select(Vote).where(Vote.comparison_id == comparison.id)).one()
        names = [s.get(System, i).name for i in (comparison.system_a_id, comparison.system_b_id)]
        aspects = dict(s.execute(select(VoteAspect.aspect, VoteAspect.choice)
                                 .where(VoteAspect.vote_id == vote.id)).all())
        blobs = [s.get(Blob, sha) for sha in (comparison.output_a, comparison.output_b)]
    assert f"**A** was **{names[0]}**, **B** was **{names[1]}**" in reveal
    assert all(name.startswith("tiny-sd") for name in names)
    assert (vote.choice, vote.reason, aspects) == ("b", "sharper", {"prompt_following": "a", "fidelity": "tie"})
    assert vote.latency_ms is not None and vote.latency_ms >= 0 and vote.participant_id is not None
    assert comparison.participant_id == vote.participant_id and comparison.prompt == "a lighthouse at dawn"
    assert [b.media_type for b in blobs] == ["image/png", "image/png"]
    store = BlobStore(home / "blobs")
    pictures = [Image.open(io.BytesIO(store.get(sha))) for sha in (comparison.output_a, comparison.output_b)]
    assert pictures[0].size == Image.open(image_a).size
    assert {"seed", "settings", "scores"} <= set(comparison.meta["a"])
    rows = {row[0]: row[1:] for row in scores["value"]["data"]}
    assert rows["VP-Score · overall"] == [round(comparison.meta[s]["scores"]["VP-Score · overall"], 3) for s in "ab"]


def test_second_different_vote_is_refused_and_first_kept(served_app: tuple[str, Path]) -> None:
    url, home = served_app
    client = Client(url, verbose=False)
    client.predict("a bowl of figs", api_name="/generate")
    client.predict("a", None, None, None, None, "", api_name="/vote")
    with pytest.raises(Exception, match="already has a different vote"):
        client.predict("tie", None, None, None, None, "", api_name="/vote")
    repeat, _ = client.predict("a", None, None, None, None, "", api_name="/vote")
    assert "already recorded" in repeat


def test_vote_before_generating_is_refused(served_app: tuple[str, Path]) -> None:
    url, _ = served_app
    with pytest.raises(Exception, match="Generate a pair of images first"):
        Client(url, verbose=False).predict("a", None, None, None, None, "", api_name="/vote")


@pytest.mark.parametrize("prompt, message", [("   ", "type a prompt"), ("fox " * 200, "tokens long")])
def test_bad_prompts_open_nothing(served_app: tuple[str, Path], prompt: str, message: str) -> None:
    url, home = served_app
    before = _comparisons(home)
    with pytest.raises(Exception, match=message):
        Client(url, verbose=False).predict(prompt, api_name="/generate")
    assert _comparisons(home) == before


def test_score_your_own_image(served_app: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = served_app
    path = tmp_path / "upload.png"
    Image.new("RGBA", (40, 30), (200, 10, 10, 128)).save(path)
    table = Client(url, verbose=False).predict(handle_file(str(path)), "a red square", api_name="/score")
    assert {row[0] for row in table["data"]} >= {"VP-Score · overall"}
    broken = tmp_path / "broken.png"
    broken.write_bytes(path.read_bytes()[:60])
    with pytest.raises(Exception, match="damaged"):
        Client(url, verbose=False).predict(handle_file(str(broken)), "a red square", api_name="/score")
