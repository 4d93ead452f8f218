"""The `python -m study` CLI: init, import-votes, leaderboard, export and stats, on SQLite and PostgreSQL."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from PIL import Image
from sqlalchemy import Engine, func, select

import study.importer
from study.__main__ import main
from study.blobs import BlobStore, Output
from study.db import current_revision, head_revision, make_engine
from study.importer import import_votes
from study.models import Comparison, Participant, System, Vote, VoteAspect
from study.participants import judge_pseudonym, load_secret
from study.votes import Matchup, VoteService

REPO = Path(__file__).resolve().parents[1]
PICK_A_PIC = ["caption", "created_at", "ranking_id", "user_id", "image_0_uid", "image_1_uid", "jpg_0", "jpg_1",
              "model_0", "model_1", "label_0", "label_1", "best_image_uid", "are_different", "has_label",
              "num_example_per_prompt"]
BOARD_KEYS = {"system", "rating", "ci_low", "ci_high", "votes", "rank", "preliminary"}
sqlite_only = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str


Cli = Callable[..., Run]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def cli(db_url: str, home: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    """Run the CLI in-process against the test database; returns exit status, stdout and stderr."""
    def run(*argv: Any) -> Run:
        code = main(["--db", db_url, "--home", str(home), *map(str, argv)])
        captured = capsys.readouterr()
        return Run(code, captured.out, captured.err)
    return run


def write_jsonl(path: Path, rows: list[dict[str, Any] | str]) -> Path:
    """One line per row; strings are written as they are, to make malformed lines."""
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def count(engine: Engine, model: type) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(model)).scalar_one()


def vote(winner: str, a: str = "alpha", b: str = "beta", **extra: Any) -> dict[str, Any]:
    return {"task": "generation", "system_a": a, "system_b": b, "winner": winner, **extra}


def png(color: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, "PNG")
    return buffer.getvalue()


def service_for(engine: Engine, home: Path) -> VoteService:
    """The vote service over the same blob store the CLI reads (home/blobs)."""
    return VoteService(engine, BlobStore(home / "blobs"))


# init


def test_init_creates_and_is_idempotent(db_url: str, cli: Cli) -> None:
    first = cli("init")
    assert first.code == 0 and f"revision {head_revision()}" in first.out and "upgraded" in first.out
    second = cli("init")
    assert second.code == 0 and f"already at revision {head_revision()}" in second.out
    assert main(["init", "--db", db_url]) == 0, "--db is accepted after the subcommand too"
    engine = make_engine(db_url)
    assert current_revision(engine) == head_revision()
    engine.dispose()


def test_commands_refuse_an_uninitialized_database(db_url: str, cli: Cli, tmp_path: Path) -> None:
    for argv in (["stats"], ["leaderboard", "--task", "generation"], ["import-votes", tmp_path / "x.jsonl"]):
        result = cli(*argv)
        assert result.code == 2 and "python -m study init" in result.err and result.out == ""
    if db_url.startswith("sqlite"):
        assert not (tmp_path / "votes.db").exists(), "a refused command must not create the database file"


# import-votes


def test_import_jsonl_stores_votes_aspects_times_and_systems(engine: Engine, cli: Cli, home: Path,
                                                             tmp_path: Path) -> None:
    service = service_for(engine, home)
    service.register_system("generation", "alpha", engine="sdxl")
    path = write_jsonl(tmp_path / "votes.jsonl", [
        vote("a", prompt="a red fox", aspects={"aesthetic": "b", "fidelity": "tie"},
             timestamp="2025-03-01T12:00:00+02:00", reason=" sharp ", latency_ms=1500),
        "",
        vote("both_bad", "beta", "gamma", timestamp=1700000000),
        {"task": "critique", "system_a": "c1", "system_b": "c2", "winner": "tie"},
    ])
    result = cli("import-votes", path)
    assert result.code == 0, result.err
    assert "imported 3 votes" in result.out and "4 new systems" in result.out

    votes = {v.choice: v for v in service.list_votes()}
    assert votes["a"].aspects == {"aesthetic": "b", "fidelity": "tie"}
    assert votes["a"].created_at == datetime(2025, 3, 1, 10, 0)  # stored as naive UTC
    assert votes["both_bad"].created_at == datetime(2023, 11, 14, 22, 13, 20)
    assert (votes["both_bad"].system_a, votes["both_bad"].system_b) == ("beta", "gamma")
    assert votes["tie"].task == "critique" and all(v.counts_for_board for v in votes.values())
    with engine.connect() as conn:
        fox = conn.execute(select(Comparison, Vote.reason, Vote.latency_ms)
                           .join(Vote, Vote.comparison_id == Comparison.id)
                           .where(Comparison.prompt == "a red fox")).one()
        tokens = conn.execute(select(Comparison.token)).scalars().all()
    assert (fox.reason, fox.latency_ms) == ("sharp", 1500)
    assert fox.output_a is None and fox.expires_at is None and fox.created_at == datetime(2025, 3, 1, 10, 0)
    assert len(set(tokens)) == 3 and min(map(len, tokens)) >= 40

    systems = {s.name: s for s in service.systems("generation", enabled_only=False)}
    assert (systems["alpha"].source, systems["alpha"].enabled, systems["alpha"].engine) == ("config", True, "sdxl")
    assert (systems["gamma"].source, systems["gamma"].enabled) == ("imported", False), \
        "imported systems have no engine and must stay out of new matchups"


@sqlite_only
def test_chatbot_arena_rows_need_a_task_and_map_their_winners(engine: Engine, cli: Cli, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "arena.jsonl", [
        {"model_a": "m1", "model_b": "m2", "winner": "model_a", "judge": "arena_user_7", "tstamp": 1700000000.5},
        {"model_a": "m1", "model_b": "m2", "winner": "model_b", "anony": True},
        {"model_a": "m2", "model_b": "m3", "winner": "tie", "anony": False},
        {"model_a": "m3", "model_b": "m1", "winner": "tie (bothbad)"},
    ])
    refused = cli("import-votes", path)
    assert refused.code == 2 and "line 1: missing task" in refused.err and "line 4: missing task" in refused.err
    assert count(engine, System) == 0

    result = cli("import-votes", path, "--task", "critique")
    assert result.code == 0, result.err
    with engine.connect() as conn:
        rows = conn.execute(select(Vote.choice, Vote.counts_for_board, Vote.participant_id, Comparison.task)
                            .join(Comparison, Vote.comparison_id == Comparison.id).order_by(Vote.id)).all()
    assert [r.choice for r in rows] == ["a", "b", "tie", "both_bad"]
    assert [r.counts_for_board for r in rows] == [True, True, False, True], "non-anonymous battles stay off the board"
    assert {r.task for r in rows} == {"critique"}
    assert all(r.participant_id is None for r in rows) and count(engine, Participant) == 0, \
        "Arena's judge field names a human voter, not a model judge"


@sqlite_only
def test_parquet_input_is_imported_and_bad_rows_are_numbered(engine: Engine, cli: Cli, tmp_path: Path) -> None:
    frame = pd.DataFrame({
        "task": ["generation", "generation", "retrieval"],
        "system_a": ["alpha", "beta", "r1"],
        "system_b": ["beta", "gamma", "r2"],
        "winner": ["a", "tie", "b"],
        "aspects": [{"aesthetic": "a"}, None, {"diversity": "b"}],
        "timestamp": pd.to_datetime(["2025-01-02T03:04:05Z", "2025-01-03T00:00:00Z", "2025-01-04T00:00:00Z"]),
        "latency_ms": [1200, None, 800],
    })
    good = tmp_path / "votes.parquet"
    frame.to_parquet(good)
    result = cli("import-votes", good)
    assert result.code == 0, result.err
    assert "imported 3 votes" in result.out
    receipts = {v.system_a: v for v in service_for(engine, tmp_path).list_votes()}
    assert receipts["alpha"].aspects == {"aesthetic": "a"} and receipts["r1"].aspects == {"diversity": "b"}
    assert receipts["alpha"].created_at == datetime(2025, 1, 2, 3, 4, 5)

    frame.loc[1, "winner"] = "maybe"
    bad = tmp_path / "bad.parquet"
    frame.to_parquet(bad)
    refused = cli("import-votes", bad)
    assert refused.code == 2 and "row 2: unknown winner 'maybe'" in refused.err
    assert count(engine, Vote) == 3

    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"this is not parquet")
    unreadable = cli("import-votes", garbage)
    assert unreadable.code == 2 and "cannot read" in unreadable.err and "Traceback" not in unreadable.err


BAD_LINES = [
    vote("a"),                                                 # 1 good
    vote("a", task="painting"),                                # 2 unknown task
    vote("maybe"),                                             # 3 unknown choice
    vote("a", b="alpha"),                                      # 4 the same system twice
    vote("a", a=" "),                                          # 5 empty name
    vote("a", a=7),                                            # 6 not a string
    vote("a", aspects={"colour": "a"}),                        # 7 aspect unknown for generation
    vote("a", aspects={"aesthetic": "meh"}),                   # 8 bad aspect choice
    vote("a", timestamp="last tuesday"),                       # 9 unparseable time
    vote("a", prompt="x" * 20001),                             # 10 prompt too long
    '{"task": "generation", "system_a": "alpha",',             # 11 malformed JSON
    vote("b", judge="gpt-4o", aspects={"fidelity": "b"}),      # 12 good (a judge)
]
BAD_NUMBERS = list(range(2, 12))


def test_a_file_with_bad_rows_imports_nothing(engine: Engine, cli: Cli, tmp_path: Path) -> None:
    result = cli("import-votes", write_jsonl(tmp_path / "mixed.jsonl", BAD_LINES))
    assert result.code == 2 and result.out == "" and "Traceback" not in result.err
    assert "10 of 12 lines" in result.err and "nothing was imported" in result.err
    listed = [int(line.split()[1].rstrip(":")) for line in result.err.splitlines() if line.startswith("  line ")]
    assert listed == BAD_NUMBERS
    for number, words in ((2, "unknown task"), (3, "unknown winner"), (4, "same system"), (5, "empty"),
                          (6, "must be a string"), (7, "unknown aspect 'colour'"), (8, "unknown choice 'meh'"),
                          (9, "not a valid date"), (10, "longer than 20000"), (11, "not valid JSON")):
        assert f"line {number}: " in result.err and words in result.err.split(f"line {number}: ")[1].splitlines()[0]
    for model in (System, Participant, Comparison, Vote, VoteAspect):
        assert count(engine, model) == 0, f"a refused file left {model.__tablename__} behind"


def test_skip_bad_imports_the_good_rows_and_lists_the_rest(engine: Engine, cli: Cli, tmp_path: Path) -> None:
    result = cli("import-votes", write_jsonl(tmp_path / "mixed.jsonl", BAD_LINES), "--skip-bad")
    assert result.code == 0, result.err
    assert "imported 2 votes" in result.out and "skipped 10 bad lines" in result.out
    assert [int(line.split()[1].rstrip(":")) for line in result.out.splitlines()
            if line.startswith("  line ")] == BAD_NUMBERS
    assert count(engine, Vote) == 2 and count(engine, VoteAspect) == 1 and count(engine, Participant) == 1


@sqlite_only
def test_bad_row_listing_is_capped_and_all_bad_is_refused_even_with_skip_bad(cli: Cli, engine: Engine,
                                                                             tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", ["{oops"] * 25)
    for argv in ([], ["--skip-bad"]):
        result = cli("import-votes", path, *argv)
        assert result.code == 2 and "25 of 25 lines" in result.err and "… and 5 more bad lines" in result.err
        assert result.err.count("\n  line ") == 20
    empty = cli("import-votes", write_jsonl(tmp_path / "empty.jsonl", []))
    assert empty.code == 2 and "no rows" in empty.err
    missing = cli("import-votes", tmp_path / "nope.jsonl")
    assert missing.code == 2 and "no such file" in missing.err
    assert count(engine, Vote) == 0


def test_a_failure_while_inserting_rolls_everything_back(engine: Engine, home: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    insert_rows = study.importer._insert_rows
    calls = []

    def fail_on_votes(conn, statement, columns):
        calls.append(statement.table.name)
        if statement.table.name == "votes":
            raise RuntimeError("disk full")
        return insert_rows(conn, statement, columns)

    monkeypatch.setattr(study.importer, "_insert_rows", fail_on_votes)
    path = write_jsonl(tmp_path / "votes.jsonl", [vote("a"), vote("b", judge="gpt-4o")])
    with pytest.raises(RuntimeError, match="disk full"):
        import_votes(engine, path, home=home)
    assert calls == ["comparisons", "votes"], "the failure must come after systems, judges and comparisons"
    for model in (System, Participant, Comparison, Vote):
        assert count(engine, model) == 0, f"{model.__tablename__} survived a failed import"


def test_judge_votes_go_to_judge_participants_and_stay_off_the_default_board(engine: Engine, cli: Cli, home: Path,
                                                                            tmp_path: Path) -> None:
    rows = [vote("a")] * 6 + [vote("b")] * 2 + [vote("a", "gamma", "alpha", judge="gpt-4o")] * 5
    assert cli("import-votes", write_jsonl(tmp_path / "votes.jsonl", rows)).code == 0
    assert cli("import-votes", write_jsonl(tmp_path / "more.jsonl", [vote("b", judge="gpt-4o")])).code == 0
    with engine.connect() as conn:
        judges = conn.execute(select(Participant.pseudonym, Participant.kind)).all()
        judged = conn.execute(select(func.count()).select_from(Vote).where(Vote.participant_id.is_not(None))).scalar()
    assert judges == [(judge_pseudonym(load_secret(home), "gpt-4o"), "judge")], "one judge, reused across imports"
    assert judged == 6

    human = json.loads(cli("leaderboard", "--task", "generation", "--json", "--bootstrap", 20).out)
    assert {row["system"] for row in human} == {"alpha", "beta"}
    assert sum(row["votes"] for row in human) == 2 * 8
    everyone = json.loads(cli("leaderboard", "--task", "generation", "--json", "--bootstrap", 20,
                              "--include-judges").out)
    assert {row["system"] for row in everyone} == {"alpha", "beta", "gamma"}


# leaderboard


@sqlite_only
def test_leaderboard_json_schema_and_order(engine: Engine, cli: Cli, tmp_path: Path) -> None:
    rows = ([vote("a")] * 30 + [vote("b")] * 10 + [vote("a", "beta", "gamma")] * 30 + [vote("b", "beta", "gamma")] * 10
            + [vote("tie", "alpha", "gamma")] * 2)
    assert cli("import-votes", write_jsonl(tmp_path / "votes.jsonl", rows)).code == 0
    result = cli("leaderboard", "--task", "generation", "--json", "--bootstrap", 50)
    assert result.code == 0
    board = json.loads(result.out)
    assert all(set(row) == BOARD_KEYS for row in board)
    assert [row["system"] for row in board] == ["alpha", "beta", "gamma"], "the system that wins more ranks higher"
    assert board[0]["rating"] > board[1]["rating"] > board[2]["rating"]
    assert board[0]["ci_low"] <= board[0]["rating"] <= board[0]["ci_high"]
    assert [row["votes"] for row in board] == [42, 80, 42] and all(row["preliminary"] for row in board)
    assert board[0]["rank"] == 1 and board[2]["rank"] > 1

    hidden = json.loads(cli("leaderboard", "--task", "generation", "--json", "--bootstrap", 20,
                            "--min-votes", 50).out)
    assert [row["system"] for row in hidden] == ["beta"]
    table = cli("leaderboard", "--task", "generation", "--bootstrap", 20)
    lines = table.out.splitlines()
    assert table.code == 0 and "rank" in lines[1] and lines[2].split()[:2] == ["1", "alpha"]
    aspect = cli("leaderboard", "--task", "generation", "--aspect", "aesthetic", "--json", "--bootstrap", 20)
    assert aspect.code == 0 and json.loads(aspect.out) == []

    for argv, message in ((["--aspect", "colour"], "unknown aspect"), (["--bootstrap", 0], "bootstrap_rounds")):
        refused = cli("leaderboard", "--task", "generation", *argv)
        assert refused.code == 2 and message in refused.err
    with pytest.raises(SystemExit) as exited:
        cli("leaderboard", "--task", "painting")
    assert exited.value.code == 2


# export


def _generation_votes(engine: Engine, home: Path, tmp_path: Path, cli: Cli) -> dict[str, str]:
    """Four app votes with real PNGs (one by a judge) and one imported vote without outputs."""
    service = service_for(engine, home)
    for name in ("alpha", "beta"):
        service.register_system("generation", name)
    judge = service.participant("j" * 64, kind="judge")
    shas = {}
    for choice, first, second, participant in (("a", "red", "blue", None), ("b", "red", "green", None),
                                               ("tie", "red", "red", None), ("both_bad", "blue", "green", judge)):
        opened = service.open_comparison(Matchup("generation", "alpha", "beta"), "a red fox",
                                         Output(png(first), "image/png"), Output(png(second), "image/png"),
                                         participant_id=participant)
        service.record_vote(opened.token, choice, {"aesthetic": choice} if choice != "both_bad" else None,
                            participant_id=participant)
        shas[choice] = (opened.output_a, opened.output_b)
    assert cli("import-votes", write_jsonl(tmp_path / "one.jsonl", [vote("b", prompt="a cat")])).code == 0
    return shas


def test_export_generation_uses_pick_a_pic_columns_and_labels(engine: Engine, cli: Cli, home: Path,
                                                              tmp_path: Path) -> None:
    shas = _generation_votes(engine, home, tmp_path, cli)
    result = cli("export", "--out", tmp_path / "out", "--format", "parquet")
    assert result.code == 0 and "wrote 5 votes of generation" in result.out
    assert sorted(os.listdir(tmp_path / "out")) == ["generation.parquet"]
    frame = pd.read_parquet(tmp_path / "out" / "generation.parquet")
    assert list(frame.columns[:len(PICK_A_PIC)]) == PICK_A_PIC
    assert frame["choice"].tolist() == ["a", "b", "tie", "both_bad", "b"]
    assert frame["label_0"].tolist() == [1.0, 0.0, 0.5, 0.5, 0.0]
    assert frame["label_1"].tolist() == [0.0, 1.0, 0.5, 0.5, 1.0]
    assert frame["model_0"].tolist()[:4] == ["alpha"] * 4 and frame["caption"].tolist()[0] == "a red fox"
    assert frame["num_example_per_prompt"].tolist() == [4, 4, 4, 4, 1]
    assert frame["has_label"].all()
    assert frame["are_different"].tolist() == [True, True, False, True, True], "the tie showed the same image twice"
    assert frame["image_0_uid"].tolist()[:2] == [shas["a"][0], shas["b"][0]]
    assert frame["best_image_uid"].tolist()[:2] == [shas["a"][0], shas["b"][1]]
    assert frame["best_image_uid"].isna().tolist()[2:4] == [True, True]
    assert frame["is_judge"].tolist() == [False, False, False, True, False]
    assert frame["user_id"].notna().tolist() == [False, False, False, True, False]
    assert frame["aspects"][0]["aesthetic"] == "a" and frame["aspects"][3]["aesthetic"] is None

    for column, color in (("jpg_0", (255, 0, 0)), ("jpg_1", (0, 0, 255))):
        image = Image.open(io.BytesIO(frame[column][0]))
        assert image.size == (8, 8) and image.convert("RGB").getpixel((0, 0)) == color
    assert frame["jpg_0"][4] is None and frame["image_0_uid"].isna()[4], "an imported vote has no stored image"


@sqlite_only
def test_export_hf_is_loadable_with_datasets(engine: Engine, cli: Cli, home: Path, tmp_path: Path) -> None:
    import datasets

    _generation_votes(engine, home, tmp_path, cli)
    for _ in range(2):  # a second export replaces the first
        result = cli("export", "--out", tmp_path / "out", "--format", "hf", "--task", "generation")
        assert result.code == 0, result.err
    loaded = datasets.load_from_disk(str(tmp_path / "out" / "generation"))
    assert loaded.num_rows == 5 and set(PICK_A_PIC) <= set(loaded.column_names)
    assert loaded["label_0"] == [1.0, 0.0, 0.5, 0.5, 0.0]
    assert Image.open(io.BytesIO(loaded[0]["jpg_0"])).size == (8, 8)
    assert sorted(os.listdir(tmp_path / "out")) == ["generation"], "no temporary folders are left behind"
    assert cli("export", "--out", tmp_path / "out", "--task", "retrieval").out.startswith("no votes to export")


@sqlite_only
def test_export_of_critique_decodes_text_outputs(engine: Engine, cli: Cli, home: Path, tmp_path: Path) -> None:
    service = service_for(engine, home)
    for name in ("expert", "baseline"):
        service.register_system("critique", name)
    human = service.participant("h" * 64)
    opened = service.open_comparison(Matchup("critique", "expert", "baseline"), "critique this photo",
                                     Output("Balanced light.".encode(), "text/plain"),
                                     Output(json.dumps({"score": 3}).encode(), "application/json"),
                                     participant_id=human)
    service.record_vote(opened.token, "a", {"insight": "a"}, reason="more specific", latency_ms=900,
                        participant_id=human)
    assert cli("export", "--out", tmp_path / "out").code == 0
    [row] = pd.read_parquet(tmp_path / "out" / "critique.parquet").to_dict("records")
    assert (row["system_a"], row["system_b"], row["choice"], row["reason"]) == ("expert", "baseline", "a",
                                                                                "more specific")
    assert (row["output_a"], json.loads(row["output_b"])) == ("Balanced light.", {"score": 3})
    assert row["participant"] == human and not row["is_judge"] and row["latency_ms"] == 900
    assert row["aspects"] == {"accuracy": None, "insight": "a"} and row["output_a_sha256"] == opened.output_a


# stats


def test_stats_counts_votes_per_task_system_and_day(engine: Engine, cli: Cli, tmp_path: Path) -> None:
    rows = ([vote("a", timestamp="2025-03-01T10:00:00Z")] * 3 + [vote("b", "beta", "gamma", judge="gpt-4o",
                                                                     timestamp="2025-03-02T23:59:00Z")]
            + [{"task": "critique", "system_a": "c1", "system_b": "c2", "winner": "tie",
                "timestamp": "2025-03-02T01:00:00Z"}])
    assert cli("import-votes", write_jsonl(tmp_path / "votes.jsonl", rows)).code == 0
    data = json.loads(cli("stats", "--json").out)
    tasks = {row["task"]: row for row in data["tasks"]}
    assert (tasks["generation"]["votes"], tasks["generation"]["judge_votes"], tasks["generation"]["human_votes"]) \
        == (4, 1, 3)
    assert tasks["retrieval"]["votes"] == 0 and tasks["critique"]["systems"] == 2
    assert {(r["task"], r["system"]): r["votes"] for r in data["systems"]} == {
        ("generation", "alpha"): 3, ("generation", "beta"): 4, ("generation", "gamma"): 1,
        ("critique", "c1"): 1, ("critique", "c2"): 1}
    assert [(r["day"], r["task"], r["votes"]) for r in data["days"]] == [
        ("2025-03-01", "generation", 3), ("2025-03-02", "critique", 1), ("2025-03-02", "generation", 1)]
    table = cli("stats")
    assert table.code == 0 and "== tasks" in table.out and "gamma" in table.out and "2025-03-02" in table.out


# a real process


def test_python_dash_m_study_runs_and_fails_cleanly(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {**os.environ, "AESARENA_HOME": str(home)}
    env.pop("AESARENA_DB", None)  # with no --db, the database is the SQLite file under $AESARENA_HOME

    def study(*argv: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "study", *map(str, argv)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)

    missing = study("stats")
    assert missing.returncode == 2 and "run `python -m study init`" in missing.stderr
    assert study("init").returncode == 0 and (home / "aesarena.db").exists()
    broken = study("import-votes", write_jsonl(tmp_path / "v.jsonl", [vote("a"), "{not json"]))
    assert broken.returncode == 2 and "line 2: not valid JSON" in broken.stderr
    assert "Traceback" not in broken.stderr and broken.stderr.startswith("error: ")
