"""Query rephrasing on the tiny causal LM: the prompt variants, answer clean-up, the cache and the fallback."""
from __future__ import annotations

from pathlib import Path

import pytest

from engines.rephrase import VARIANTS, Rephraser, RephraseError, clean, messages


@pytest.fixture(scope="module")
def rephraser(tmp_path_factory: pytest.TempPathFactory) -> Rephraser:
    return Rephraser({"model": "tiny"}, device="cpu", dtype="float32", home=tmp_path_factory.mktemp("home"))


def test_every_variant_asks_its_own_question_about_the_query() -> None:
    prompts = [messages("a red car", variant)[-1]["content"] for variant in VARIANTS]
    assert len(set(prompts)) == len(VARIANTS) and all("Query: a red car" in p for p in prompts)
    assert "5 visual qualities" in prompts[VARIANTS.index("k-list")]


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_rewrites_through_the_model(rephraser: Rephraser, variant: str) -> None:
    result = rephraser.rephrase("a cat on a sofa", variant)
    # The tiny model's words are random but real generations: one clean line, not the query itself.
    assert result.text and "\n" not in result.text and not result.fell_back and result.variant == variant


@pytest.mark.parametrize("raw, variant, text", [
    ('"A golden-hour portrait of a cat."\nExtra line', "detail", "A golden-hour portrait of a cat."),
    ("Answer: soft light, rule of thirds", "detail", "soft light, rule of thirds"),
    ("1. warm light\n2. shallow depth of field\n- muted colours", "k-list",
     "warm light, shallow depth of field, muted colours"),
    ('Here: {"subject": "cat", "lighting": ["soft", "warm"], "style": "film"}', "keyword-dict",
     "cat, soft, warm, film"),
    ('{"subject": "cat", "lighting": soft}', "keyword-dict", "cat, soft"),
    ("   \n  ", "reorganize", ""),
])
def test_clean_keeps_only_the_searchable_text(raw: str, variant: str, text: str) -> None:
    assert clean(raw, variant) == text


def test_a_repeated_query_is_answered_from_the_cache(rephraser: Rephraser, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = rephraser.model.generate

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(rephraser.model, "generate", counted)
    first = rephraser.rephrase("a quiet harbour at dawn")
    assert rephraser.rephrase("  a quiet   harbour at dawn ") == first and len(calls) == 1
    rephraser.rephrase("a quiet harbour at dawn", "reorganize")
    assert len(calls) == 2, "another variant is another rewrite"


def test_a_failing_model_falls_back_to_the_query_and_says_so(rephraser: Rephraser,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(rephraser.model, "generate", broken)
    result = rephraser.rephrase("a lighthouse in a storm")
    assert (result.text, result.fell_back) == ("a lighthouse in a storm", True) and "RuntimeError" in result.note
    monkeypatch.undo()
    assert not rephraser.rephrase("a lighthouse in a storm").fell_back, "a failure is not cached"


def test_an_empty_answer_falls_back(rephraser: Rephraser, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rephraser.tokenizer, "decode", lambda *args, **kwargs: " \n ?! ")
    result = rephraser.rephrase("a bowl of figs")
    assert (result.text, result.fell_back) == ("a bowl of figs", True) and "no usable answer" in result.note


def test_bad_requests_and_settings_are_refused(rephraser: Rephraser, tmp_path: Path) -> None:
    with pytest.raises(RephraseError, match="empty"):
        rephraser.rephrase("   ")
    with pytest.raises(RephraseError, match="use one of detail, k-list, keyword-dict, reorganize"):
        rephraser.rephrase("a cat", "poem")
    with pytest.raises(RephraseError, match="unknown rephraser settings: temperature"):
        Rephraser({"model": "tiny", "temperature": 0.7}, device="cpu", dtype="float32", home=tmp_path)
