"""The app shell through gradio_client: it starts offline on tiny, and the leaderboard API answers."""
from __future__ import annotations

from pathlib import Path

import pytest
from gradio_client import Client

from app import build_app, parse_settings
from demos.context import Settings


def test_offline_start_falls_back_to_tiny_and_says_why(served_app: tuple[str, Path]) -> None:
    url, _ = served_app
    config = Client(url, verbose=False).config
    texts = " ".join(str(c.get("props", {}).get("value", "")) for c in config["components"])
    assert "Tiny profile" in texts and "Hugging Face Hub is unreachable" in texts


def test_leaderboard_api_ranks_the_stronger_system_first(served_app: tuple[str, Path]) -> None:
    url, _ = served_app
    table, _plot, note = Client(url, verbose=False).predict("generation", "overall", api_name="/leaderboard")
    rows = table["data"]
    assert [row[1] for row in rows] == ["strong", "weak"]
    assert rows[0][2] > 1000 > rows[1][2] and rows[0][4] == 12
    assert rows[0][5] == "preliminary" and "12 votes by people counted" in note


def test_model_judges_have_their_own_board(served_app: tuple[str, Path]) -> None:
    url, _ = served_app
    table, _plot, note = Client(url, verbose=False).predict("generation", "overall", "model judges",
                                                            api_name="/leaderboard")
    assert table["data"] == [] and "No votes yet" in note, "people's votes stay off the judges' board"


def test_leaderboard_api_per_aspect(served_app: tuple[str, Path]) -> None:
    url, _ = served_app
    table, _plot, _note = Client(url, verbose=False).predict("generation", "aesthetic", api_name="/leaderboard")
    assert [row[1] for row in table["data"]] == ["weak", "strong"], "every aesthetic choice went to B"
    table, _plot, note = Client(url, verbose=False).predict("retrieval", "diversity", api_name="/leaderboard")
    assert table["data"] == []
    assert "No votes yet" in note


@pytest.mark.parametrize("task, aspect, message", [("music", "overall", "music"),
                                                    ("generation", "diversity", "has no aspect")])
def test_leaderboard_api_refuses_bad_input_clearly(served_app: tuple[str, Path], task: str, aspect: str,
                                                   message: str) -> None:
    url, _ = served_app
    client = Client(url, verbose=False)
    with pytest.raises(Exception, match=message):
        client.predict(task, aspect, api_name="/leaderboard")
    table, _, _ = client.predict("generation", "overall", api_name="/leaderboard")
    assert table["data"], "the app keeps serving after a refused request"


def test_command_line_settings(tmp_path: Path) -> None:
    settings = parse_settings(["--profile", "tiny", "--db", "sqlite:///x.db", "--home", str(tmp_path),
                               "--port", "7999", "--host", "0.0.0.0"])
    assert (settings.profile, settings.db, settings.home, settings.port, settings.host) == (
        "tiny", "sqlite:///x.db", tmp_path, 7999, "0.0.0.0")


def test_unknown_profile_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="known profiles: cpu, gpu, tiny"):
        build_app(Settings(profile="nope", home=tmp_path))


@pytest.mark.parametrize("name", ["tiny", "cpu", "gpu"])
def test_every_profile_has_valid_settings(name: str) -> None:
    """Typos in a profile's settings surface here, without downloading any model."""
    from engines.critic import CriticSettings
    from engines.embedder import EmbedderSettings
    from engines.generator import GeneratorConfig
    from engines.registry import load_profile
    from engines.reward import VPScoreSettings

    profile = load_profile(name)
    generators = profile.systems.get("generation", ())
    assert len(generators) >= 2, "a generation arena needs two systems"
    for spec in generators:
        assert spec.engine == "engines.generator:Generator"
        GeneratorConfig.from_settings(spec.settings)
    scorers = {spec.engine: spec.settings for spec in profile.scorers}
    assert {"engines.reward:VPScore", "engines.aesthetic:LaionAesthetic", "engines.aesthetic:ClipScore"} <= set(
        scorers) <= {"engines.reward:VPScore", "engines.aesthetic:LaionAesthetic", "engines.aesthetic:ClipScore",
                     "engines.critic:QAlignScore"}
    VPScoreSettings.from_settings(scorers["engines.reward:VPScore"])
    for engine in ("engines.aesthetic:LaionAesthetic", "engines.aesthetic:ClipScore"):
        EmbedderSettings.from_settings(scorers[engine]["embedder"])
    critics = profile.systems.get("critique", ())
    assert len(critics) >= 2, "a critique battle needs two critics"
    for spec in critics:
        assert spec.engine == "engines.critic:Critic"
        CriticSettings.from_settings(spec.settings)
    if "engines.critic:QAlignScore" in scorers:
        CriticSettings.from_settings({k: v for k, v in scorers["engines.critic:QAlignScore"].items() if k != "name"})
