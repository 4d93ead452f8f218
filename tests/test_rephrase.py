"""Query rephrasing on the tiny causal LM: the prompt variants, answer clean-up, the cache and the fallback."""
from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import pytest

from engines.rephrase import VARIANTS, Rephraser, RephraseError, clean, messages
from engines.tiny import write_tiny_causal_lm


@pytest.fixture(scope="module")
def rephraser(tmp_path_factory: pytest.TempPathFactory) -> Rephraser:
    return Rephraser({"model": "tiny"}, device="cpu", dtype="float32", home=tmp_path_factory.mktemp("home"))


def test_every_variant_asks_its_own_question_about_the_query() -> None:
    prompts = [messages("a red car", variant)[-1]["content"] for variant in VARIANTS]
    assert len(set(prompts)) == len(VARIANTS) and all("Query: a red car" in p for p in prompts)
    assert "5 visual qualities" in prompts[VARIANTS.index("k-list")]


def test_the_tiny_model_knows_the_prompts_words(rephraser: Rephraser) -> None:
    # Else every prompt would reach the tiny model as the same run of <unk> and the variants would not differ.
    for variant in VARIANTS:
        ids = rephraser.tokenizer.apply_chat_template(messages("a red car", variant), add_generation_prompt=True)
        ids = ids["input_ids"] if isinstance(ids, Mapping) else ids
        assert ids.count(rephraser.tokenizer.unk_token_id) <= 2, variant  # "-" of well-organized, at most


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
    ("{'subject': 'cat',\n 'style': ['bird's-eye view']}\nHope this helps!", "keyword-dict", "cat, bird's-eye view"),
    ("subject cat, soft light", "keyword-dict", "subject cat, soft light"),
    ("“A  sleeping cat on a velvet sofa,\tin warm window light”\n\nNote: a guess", "reorganize",
     "A sleeping cat on a velvet sofa, in warm window light"),
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
    with pytest.raises(RephraseError, match="unknown rephrasing variant ''"):
        rephraser.rephrase("a cat", "")
    with pytest.raises(RephraseError, match="unknown rephraser settings: temperature"):
        Rephraser({"model": "tiny", "temperature": 0.7}, device="cpu", dtype="float32", home=tmp_path)
    with pytest.raises(RephraseError, match="unknown rephrasing variant 'poem'"):
        Rephraser({"model": "tiny", "variant": "poem"}, device="cpu", dtype="float32", home=tmp_path)
    with pytest.raises(RephraseError, match="max_new_tokens"):
        Rephraser({"model": "tiny", "max_new_tokens": 0}, device="cpu", dtype="float32", home=tmp_path)
    with pytest.raises(RephraseError, match="dtype must be one of"):
        Rephraser({"model": "tiny"}, device="cpu", dtype="int8", home=tmp_path)


def test_a_model_without_a_chat_template_is_refused(tmp_path: Path) -> None:
    # A base (not instruct) model: the tiny one's files without the template save_pretrained wrote.
    model = shutil.copytree(write_tiny_causal_lm(tmp_path / "tiny"), tmp_path / "base")
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(RephraseError, match="no chat template"):
        Rephraser({"model": str(model)}, device="cpu", dtype="float32", home=tmp_path)
