"""Critics on the tiny original-format LLaVA: streaming, cancel, history, limits and the Q-Align score."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engines.critic import (LEVEL_WEIGHTS, LEVELS, Critic, CriticError, GenerationSettings, QAlignScore, Turn,
                            pad_to_square)

TINY = {"model": "tiny", "format": "llava-original", "generation": {"max_new_tokens": 12}}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def critic(home: Path) -> Critic:
    return Critic(TINY, device="cpu", dtype="float32", home=home)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 50, 3), dtype=np.uint8))


def test_streaming_grows_to_the_greedy_answer(critic: Critic, image: Image.Image) -> None:
    parts = list(critic.stream(image, "how would you rate this image ?"))
    assert parts and all(later.startswith(earlier) for earlier, later in zip(parts, parts[1:]))
    inputs = critic._inputs(image, (), "how would you rate this image ?")
    with torch.no_grad():
        out = critic.model.generate(**inputs, max_new_tokens=12, do_sample=False)
    bare = critic.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert parts[-1] == bare


def test_cancel_stops_generation(critic: Critic, image: Image.Image, monkeypatch: pytest.MonkeyPatch) -> None:
    # Without an end-of-sequence token the tiny model talks for all 200 tokens unless cancelled.
    monkeypatch.setattr(critic.model.generation_config, "eos_token_id", None)
    long = GenerationSettings(max_new_tokens=200)
    full = critic.answer(image, "describe the image", generation=long)
    cancel = threading.Event()
    stream = critic.stream(image, "describe the image", generation=long, cancel=cancel)
    first = next(stream)
    cancel.set()
    last = ([first, *stream])[-1]
    assert len(full.split()) > 100 and len(last.split()) < 20


def test_history_is_part_of_the_prompt(critic: Critic, image: Image.Image) -> None:
    inputs = critic._inputs(image, [Turn("rate the image", "good .")], "why ?")
    text = critic.tokenizer.decode(inputs["input_ids"][0])
    # The tiny word-level vocabulary decodes with spaces around punctuation.
    assert text.count("USER :") == 2 and "good . </s>" in text and text.rstrip().endswith("ASSISTANT :")
    assert critic.answer(image, "why ?", [Turn("rate the image", "good .")]) is not None


@pytest.mark.parametrize("question, message", [("   ", "question is empty"), ("the " * 300, "reads at most")])
def test_bad_questions_are_refused(critic: Critic, image: Image.Image, question: str, message: str) -> None:
    with pytest.raises(CriticError, match=message):
        critic.answer(image, question)


@pytest.mark.parametrize("changes", [{"max_new_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"num_beams": 9}])
def test_generation_settings_are_validated(changes: dict) -> None:
    with pytest.raises(CriticError):
        GenerationSettings(**changes)


def test_qalign_score_follows_the_level_logits(home: Path, critic: Critic, image: Image.Image) -> None:
    scorer = QAlignScore({**TINY, "name": "AesExpert (Q-Align)"}, device="cpu", dtype="float32", home=home)
    [score] = scorer.score(["ignored"], [image])["aesthetic"]
    inputs = critic._inputs(image, (), "How would you rate the aesthetics of this image?",
                            " The aesthetics of the image is")
    ids = [critic.tokenizer(w, add_special_tokens=False).input_ids[0] for w in LEVELS]
    with torch.no_grad():
        logits = critic.model(**inputs).logits[0, -1, ids]
    expected = float((torch.softmax(logits, 0) * torch.tensor(LEVEL_WEIGHTS)).sum()) * 4 + 1
    assert 1.0 <= score <= 5.0 and score == pytest.approx(expected, abs=1e-5)
    assert (scorer.name, scorer.aspects) == ("AesExpert (Q-Align)", ("aesthetic",))


def test_llava_pads_to_square_with_the_mean_colour() -> None:
    square = pad_to_square(Image.new("RGB", (40, 20), (255, 0, 0)), (0.5, 0.25, 0.0))
    assert square.size == (40, 40)
    assert square.getpixel((0, 0)) == (128, 64, 0) and square.getpixel((20, 20)) == (255, 0, 0)


def test_adapters_switch_on_per_system(home: Path, critic: Critic, image: Image.Image) -> None:
    from engines.adapters import ImageAdapters

    adapters = ImageAdapters.for_model(critic.model)
    torch.manual_seed(0)
    for adapter in adapters.adapters:
        torch.nn.init.normal_(adapter.up.weight, std=2.0)
    adapters.save(home / "adapters" / "art.safetensors")
    adapted = Critic({**TINY, "adapters": "adapters/art.safetensors"}, device="cpu", dtype="float32", home=home)
    inputs = critic._inputs(image, (), "rate the image")
    with torch.no_grad():
        assert not torch.allclose(adapted.model(**inputs).logits, critic.model(**inputs).logits)
