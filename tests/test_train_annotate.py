"""VisionPrefer-style AI feedback: strict parsing of a critic's 1–5 ratings, decoding held to the score format,
pairs from score differences, and judge votes that never touch the people's board, through real tiny models."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from sqlalchemy import select

import engines.tiny as tiny
from engines.critic import Critic
from engines.registry import PROFILES
from study.blobs import BlobStore, Output
from study.counts import load_counts
from study.db import default_url, make_engine, upgrade
from study.models import Comparison, Participant, Vote, VoteAspect
from study.votes import Matchup, VoteService
from train.annotate import (ASPECTS, FORMAT, OPENING, QUESTIONS, Rating, annotated, ask, main, pair_from_scores,
                            parse_rating, score_openings, store_pair, stored_pairs, vocabulary, EndOfLine)
from train.data import PairFilter, load_pairs


@pytest.mark.parametrize(("answer", "expected"), [
    ("Score: 4. Reason: the light is soft.", Rating(4, "the light is soft.")),
    ("  Score:5 .Reason:  crisp detail  ", Rating(5, "crisp detail")),
    ("Score : 1 . Reason : blurry , dark", Rating(1, "blurry , dark")),  # a word-level tokenizer's spacing
])
def test_well_formed_answers_parse(answer: str, expected: Rating) -> None:
    assert parse_rating(answer) == expected


@pytest.mark.parametrize("answer", [
    "", "good", "Score: 0. Reason: none", "Score: 6. Reason: too good", "Score: 3.5. Reason: between",
    "Score: 35. Reason: big", "Score: four. Reason: words", "Score: 3", "Score: 3. Because: nice",
    "Score: 3. Reason:", "Score: 3. Reason:   ", "Score: 3. Reason: ...", "I rate it Score: 3. Reason: fine",
    "Score: 3. Reason: fine. Score: 5. Reason: changed my mind", "Score: 3. Reason: fine\nand a second line",
])
def test_anything_else_is_invalid(answer: str) -> None:
    assert parse_rating(answer) is None


def _ratings(*scores: int | None) -> dict[str, Rating | None]:
    return {a: None if s is None else Rating(s, "because") for a, s in zip(ASPECTS, scores)}


def test_pairs_come_from_score_differences() -> None:
    overall, aspects = pair_from_scores(_ratings(5, 3, 4, 5), _ratings(2, 3, 5, 5))
    assert aspects == {"prompt_following": "a", "aesthetic": "tie", "fidelity": "b", "harmlessness": "tie"}
    assert overall == "a"  # means 4.25 against 3.75
    assert pair_from_scores(_ratings(1, 2, 3, 4), _ratings(4, 3, 2, 1)) == (
        "tie", {"prompt_following": "b", "aesthetic": "b", "fidelity": "a", "harmlessness": "a"})
    # An aspect invalid on either side is unjudged, and the means cover only the judged ones.
    overall, aspects = pair_from_scores(_ratings(5, None, 1, 2), _ratings(1, 4, None, 3))
    assert aspects == {"prompt_following": "a", "harmlessness": "b"} and overall == "a"
    assert pair_from_scores(_ratings(None, 2, None, None), _ratings(3, None, None, None)) == (None, {})


@pytest.fixture(scope="module")
def speller(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random transformers-format VLM whose word-level vocabulary can spell the score format (the tiny critics'
    cannot: no digits), written by the real tiny writer with those words added."""
    written = tiny.write_tiny_llama_tokenizer
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tiny, "write_tiny_llama_tokenizer",
                      lambda folder: written(folder, (*tiny._TINY_WORDS, "Score", "Reason", *"0123456789")))
        return tiny.write_random_vlm(tmp_path_factory.mktemp("speller") / "vlm", vision=tiny._TINY_VLM_VISION,
                                     text=tiny._TINY_VLM_TEXT)


@pytest.fixture(scope="module")
def profile(speller: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny profile plus the speller as a critic."""
    raw = yaml.safe_load((PROFILES / "tiny.yaml").read_text())
    raw["systems"]["critique"].append({"name": "speller", "engine": "engines.critic:Critic",
                                       "settings": {"model": str(speller)}})
    path = tmp_path_factory.mktemp("profile") / "tiny-speller.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_decoding_is_held_to_the_format_and_picks_the_likeliest_score(speller: Path, tmp_path: Path) -> None:
    critic = Critic({"model": str(speller)}, device="cpu", dtype="float32", home=tmp_path)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    question = QUESTIONS["aesthetic"] + FORMAT
    openings = score_openings(critic, question)
    assert openings is not None and len(set(openings)) == 5
    vocab = vocabulary(critic.tokenizer)
    ids = critic.tokenizer.convert_tokens_to_ids(["\n", ".", "Score", "what"])
    assert ids[0] in vocab.line_breaks.tolist() and EndOfLine(vocab)(torch.tensor([[5, ids[0]], [ids[0], 5]]), None).tolist() == [True, False]
    not_words = set(vocab.not_words.tolist())
    assert {ids[1], critic.tokenizer.eos_token_id} <= not_words and not {ids[2], ids[3]} & not_words
    rating = parse_rating(ask(critic, vocab, image, question, 24))
    assert rating is not None
    # Greedy under the constraint is the argmax over the five score tokens where the score goes.
    inputs = critic.inputs(image, question, answer_prefix=OPENING.split("{score}")[0])
    digits = critic.tokenizer.convert_tokens_to_ids([str(s) for s in range(1, 6)])
    with torch.inference_mode():
        logits = critic.model(**inputs).logits[0, -1, digits]
    assert rating.score == int(logits.argmax()) + 1


def _png(level: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), level, dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """Three people's battles, and a fourth showing battle 0's two images again, sides swapped (as a study's
    pinned pair is shown to many participants)."""
    votes = VoteService(make_engine(default_url(tmp_path)), BlobStore(tmp_path / "blobs"))
    upgrade(votes.engine)
    for name in ("tiny-sd", "tiny-sd-ddim"):
        votes.register_system("generation", name)
    battles = [("tiny-sd", "tiny-sd-ddim", f"a photo {i}", 40 * i, 40 * i + 20) for i in range(3)]
    for a, b, prompt, level_a, level_b in [*battles, ("tiny-sd-ddim", "tiny-sd", "a photo 0", 20, 0)]:
        opened = votes.open_comparison(Matchup("generation", a, b), prompt, Output(_png(level_a), "image/png"),
                                       Output(_png(level_b), "image/png"))
        votes.record_vote(opened.token, "a", screened=False)
    return tmp_path


def _annotate(capsys: pytest.CaptureFixture, *args: str) -> dict:
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _accounted(tally: dict, images: int) -> None:
    """Every question asked got exactly one verdict, and every rated pair either a vote or none for a reason."""
    assert tally["images_scored"] == images and tally["asked"] == images * len(ASPECTS)
    for aspect in ASPECTS:
        assert tally["valid"][aspect] + tally["invalid"][aspect] == images
    assert tally["votes"] + tally["unjudged"] == tally["pairs"]


def _judge_votes(home: Path) -> list:
    with make_engine(default_url(home)).connect() as conn:
        return conn.execute(select(Vote.id, Vote.choice, Vote.counts_for_board, Participant.kind, Comparison.meta)
                            .join(Participant, Vote.participant_id == Participant.id)
                            .join(Comparison, Vote.comparison_id == Comparison.id)
                            .where(Participant.kind == "judge")).all()


def test_a_pair_is_stored_on_the_battles_sides(home: Path) -> None:
    votes = VoteService(make_engine(default_url(home)), BlobStore(home / "blobs"))
    judge = votes.participant("j" * 64, kind="judge")
    pair = stored_pairs(votes)[0]
    assert store_pair(votes, judge, "critic", pair, _ratings(5, 4, 4, 5), _ratings(2, 4, 3, None)) == (
        "a", {"prompt_following": "a", "aesthetic": "tie", "fidelity": "a"})
    assert store_pair(votes, judge, "critic", pair, _ratings(None, 1, None, 1), _ratings(2, None, 3, None)) == (
        None, {})
    [row] = load_pairs(votes.engine, "generation", PairFilter(judges="only", test_share=0.0)).itertuples()
    assert (row.system_a, row.system_b, row.output_a, row.output_b) == (
        pair.system_a, pair.system_b, pair.output_a, pair.output_b)
    assert (row.choice, row.aspect_aesthetic) == ("a", "tie") and pd.isna(row.aspect_harmlessness)
    assert annotated(votes, "critic") == {pair.key} and annotated(votes, "another critic") == set()


def test_the_tiny_critic_accounts_for_every_answer(home: Path, capsys: pytest.CaptureFixture) -> None:
    board = load_counts(make_engine(default_url(home)), "generation")
    tally = _annotate(capsys, "--profile", "tiny", "--critic", "tiny-llava", "--home", str(home),
                      "--max-new-tokens", "8")
    assert tally["constrained"] is False, "the tiny vocabulary has no digits, so the format cannot be forced"
    assert tally["pairs"] == 3 and tally["already_annotated"] == 1, "the repeated pair of images is rated once"
    _accounted(tally, images=6)
    assert len(_judge_votes(home)) == tally["votes"]
    assert load_counts(make_engine(default_url(home)), "generation").equals(board)


def test_ai_feedback_becomes_judge_votes_once(home: Path, profile: str, capsys: pytest.CaptureFixture) -> None:
    engine = make_engine(default_url(home))
    board = load_counts(engine, "generation")
    tally = _annotate(capsys, "--profile", profile, "--critic", "speller", "--home", str(home), "--max-new-tokens", "16")
    assert tally["constrained"] is True and tally["pairs"] == 3
    _accounted(tally, images=6)
    stored = _judge_votes(home)
    assert len(stored) == tally["votes"] >= 1
    with engine.connect() as conn:
        aspects = conn.execute(select(VoteAspect.vote_id, VoteAspect.aspect, VoteAspect.choice)).all()
    for vote in stored:
        assert vote.kind == "judge" and vote.meta["critic"] == "speller"
        # The stored choices are the ones the stored ratings give.
        ratings = [{a: Rating(**r) if r else None for a, r in vote.meta["ratings"][side].items()} for side in "ab"]
        overall, expected = pair_from_scores(*ratings)
        assert vote.choice == overall
        assert {a: c for v, a, c in aspects if v == vote.id} == expected
    assert load_counts(engine, "generation").equals(board), "the people's board is unchanged"
    assert load_counts(engine, "generation", judges_only=True)["n"].sum() == tally["votes"]
    pairs = load_pairs(engine, "generation", PairFilter(judges="only"))
    assert set(pairs.voter_kind) == {"judge"} and set(pairs.vote_id) <= {v.id for v in stored} and len(pairs)
    assert len(load_pairs(engine, "generation", PairFilter(judges="only", test_share=0.0))) == tally["votes"]

    assert main(["--profile", profile, "--critic", "speller", "--home", str(home), "--max-new-tokens", "16"]) == 0
    assert "0 judge votes stored" in capsys.readouterr().out
    assert len(_judge_votes(home)) == len(stored), "a re-run does not double the votes"


def test_fresh_images_of_prompts_are_paired_by_generator(tmp_path: Path, profile: str,
                                                         capsys: pytest.CaptureFixture) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\n\na photo of light\n")
    args = ["--profile", profile, "--critic", "speller", "--home", str(tmp_path), "--prompts", str(prompts),
            "--generators", "tiny-sd-lora", "tiny-sd", "tiny-sd-ddim", "--seed", "3", "--max-new-tokens", "16"]
    tally = _annotate(capsys, *args)
    assert tally["pairs"] == 2 * 3
    _accounted(tally, images=2 * 3)  # each image rated once, though it is in two pairs
    stored = _judge_votes(tmp_path)
    assert len(stored) == tally["votes"] and all(v.meta["seed"] == 3 for v in stored)
    with make_engine(default_url(tmp_path)).connect() as conn:
        sides = conn.execute(select(Comparison.prompt, Comparison.system_a_id, Comparison.system_b_id)).all()
    assert len({(prompt, frozenset((a, b))) for prompt, a, b in sides}) == 2 * 3 == len(sides)
    again = _annotate(capsys, *args)
    assert again["votes"] == 0 and again["already_annotated"] == tally["votes"], "the same seeded images"
    assert len(_judge_votes(tmp_path)) == len(stored)


@pytest.mark.parametrize(("args", "message"), [
    (["--critic", "nobody"], "not a critic of the tiny profile"),
    (["--critic", "tiny-llava", "--limit", "0"], "--limit must be at least 1"),
    (["--critic", "tiny-llava", "--generators", "tiny-sd"], "give the prompts too"),
    (["--critic", "tiny-llava", "--prompts", "missing.txt"], "missing.txt"),
    (["--critic", "tiny-llava", "--max-new-tokens", "0"], "max_new_tokens must be"),
])
def test_bad_input_is_refused_and_changes_nothing(home: Path, args: list[str], message: str,
                                                  capsys: pytest.CaptureFixture) -> None:
    assert main(["--profile", "tiny", "--home", str(home), *args]) == 2
    assert message in capsys.readouterr().err
    assert _judge_votes(home) == []


def test_generators_must_be_the_profiles(home: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\n")
    args = ["--profile", "tiny", "--critic", "tiny-llava", "--home", str(home), "--prompts", str(prompts)]
    assert main([*args, "--generators", "tiny-sd", "dall-e"]) == 2
    assert "dall-e: not generators of the tiny profile" in capsys.readouterr().err
    assert main([*args, "--generators", "tiny-sd"]) == 2
    assert "at least two generators" in capsys.readouterr().err
