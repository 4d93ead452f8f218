"""The LMM judge of retrieval rows: answer parsing, order consistency, the composite, and the command end to end."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engines.judge import CELL, LABEL, compose, judge, picked_row, verdict
from study.counts import load_counts
from study.db import default_url, make_engine
from train.judge import main, read_queries, report

RED, BLUE = (230, 20, 20), (20, 20, 230)


@pytest.mark.parametrize("answer, row", [("1", "1"), ("Row 2.", "2"), ("The first row", "1"), ("bottom", "2"),
                                         ("row 1 and row 2 are alike", None), ("neither", None), ("", None)])
def test_an_answer_picks_a_row_only_when_it_names_one(answer: str, row: str | None) -> None:
    assert picked_row(answer) == row


@pytest.mark.parametrize("first, second, expected", [("1", "2", "a"), ("2", "1", "b"), ("1", "1", "similar"),
                                                     ("2", "2", "similar"), (None, "2", "similar")])
def test_order_consistency(first: str | None, second: str | None, expected: str) -> None:
    assert verdict(first, second) == expected


class _PrefersRed:
    """A critic stand-in that reads the composite: it names the row whose first cell is redder."""

    def answer(self, image: Image.Image, question: str, history: Sequence = (), generation=None) -> str:
        pixels = np.asarray(image)
        top, bottom = (pixels[r * CELL + CELL // 2, LABEL + CELL // 2] for r in (0, 1))
        return "Row 1" if int(top[0]) - int(top[2]) > int(bottom[0]) - int(bottom[2]) else "Row 2"


class _AlwaysTop:
    """A critic with pure position bias."""

    def answer(self, image: Image.Image, question: str, history: Sequence = (), generation=None) -> str:
        return "1"


def test_a_consistent_preference_wins_from_either_side() -> None:
    red, blue = [Image.new("RGB", (40, 30), RED)] * 3, [Image.new("RGB", (30, 40), BLUE)] * 3
    assert judge(_PrefersRed(), "something red", red, blue).verdict == "a"
    assert judge(_PrefersRed(), "something red", blue, red).verdict == "b"


def test_position_bias_is_scored_similar() -> None:
    rows = [Image.new("RGB", (8, 8), RED)], [Image.new("RGB", (8, 8), BLUE)]
    result = judge(_AlwaysTop(), "anything", *rows)
    assert (result.first_pick, result.second_pick, result.verdict) == ("1", "1", "similar")


def test_compose_stacks_the_rows_in_order() -> None:
    sheet = compose([Image.new("RGB", (50, 50), RED)] * 2, [Image.new("RGB", (50, 50), BLUE)] * 3)
    assert sheet.size == (LABEL + 3 * CELL, 2 * CELL)
    assert sheet.getpixel((LABEL + CELL // 2, CELL // 2)) == RED
    assert sheet.getpixel((LABEL + 2 * CELL + CELL // 2, CELL + CELL // 2)) == BLUE
    assert sheet.getpixel((LABEL + 2 * CELL + CELL // 2, CELL // 2)) == (255, 255, 255)  # the short row's gap


def test_report_rates() -> None:
    import pandas as pd

    tally = pd.DataFrame({"system_a": ["x"] * 4, "system_b": ["y"] * 4, "verdict": ["a", "a", "b", "similar"],
                          "invalid": [0, 0, 0, 2]})
    [row] = report(tally).to_dict("records")
    assert (row["a_win_rate"], row["a_win_or_similar"], row["b_win_rate"], row["b_win_or_similar"]) == (
        0.5, 0.75, 0.25, 0.5)
    assert row["invalid_answers"] == 2


def test_queries_file_must_hold_queries(tmp_path: Path) -> None:
    (tmp_path / "q.json").write_text(json.dumps({"not": "a list"}))
    with pytest.raises(ValueError, match="JSON list"):
        read_queries(tmp_path / "q.json")
    (tmp_path / "q.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="no queries"):
        read_queries(tmp_path / "q.txt")


def test_judge_command_stores_judge_votes_off_the_human_board(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "queries.txt").write_text("a cat\na cup of coffee\n")
    status = main(["--profile", "tiny", "--queries", str(tmp_path / "queries.txt"), "--critic", "tiny-llava",
                   "--systems", "clip", "clip+aesthetic", "--k", "3", "--home", str(tmp_path), "--json"])
    assert status == 0
    [row] = json.loads(capsys.readouterr().out)
    assert (row["system_a"], row["system_b"], row["queries"]) == ("clip", "clip+aesthetic", 2)
    assert row["a_wins"] + row["b_wins"] + row["similar"] == 2
    engine = make_engine(default_url(tmp_path))
    assert int(load_counts(engine, "retrieval", judges_only=True)["n"].sum()) == 2
    assert load_counts(engine, "retrieval").empty


def test_judge_command_explains_bad_rankers(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "queries.txt").write_text("a cat\n")
    assert main(["--profile", "tiny", "--queries", str(tmp_path / "queries.txt"), "--critic", "tiny-llava",
                 "--systems", "clip", "best", "--home", str(tmp_path)]) == 2
    assert "best: not rankers of the tiny profile" in capsys.readouterr().err
