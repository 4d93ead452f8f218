"""Critics on the tiny original-format LLaVA and a tiny transformers VLM: streaming, cancel, errors, history,
limits, adapters and the Q-Align score."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import engines.critic as critic_module
from engines.critic import (LEVEL_WEIGHTS, LEVELS, Critic, CriticError, CriticSettings, GenerationSettings,
                            QAlignScore, Turn, _TokenStreamer, pad_to_square)
from engines.llava_convert import LLAVA_V1_SYSTEM

TINY = {"model": "tiny", "format": "llava-original", "generation": {"max_new_tokens": 12}}
TINY_VLM = {"model": "tiny", "format": "transformers", "generation": {"max_new_tokens": 12}}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def critic(home: Path) -> Critic:
    return Critic(TINY, device="cpu", dtype="float32", home=home)


@pytest.fixture(scope="module")
def vlm(home: Path) -> Critic:
    return Critic(TINY_VLM, device="cpu", dtype="float32", home=home)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 50, 3), dtype=np.uint8))


def _bare_greedy(critic: Critic, image: Image.Image, question: str, max_new_tokens: int = 12, **kwargs) -> str:
    inputs = critic.inputs(image, question)
    with torch.no_grad():
        out = critic.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
    return critic.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


@pytest.mark.parametrize("name", ["critic", "vlm"])
def test_streaming_grows_to_the_greedy_answer(name: str, image: Image.Image, request: pytest.FixtureRequest,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    critic = request.getfixturevalue(name)
    monkeypatch.setattr(critic.model.generation_config, "eos_token_id", None)  # a long answer, many refreshes
    monkeypatch.setattr(critic_module, "STREAM_INTERVAL_S", 0.0)
    question, length = "how would you rate this image ?", 100
    parts = list(critic.stream(image, question, generation=GenerationSettings(max_new_tokens=length)))
    assert len(parts) > 1 and all(later.startswith(earlier) for earlier, later in zip(parts, parts[1:]))
    assert parts[-1] == _bare_greedy(critic, image, question, max_new_tokens=length)


def test_stream_refreshes_at_most_every_interval(critic: Critic) -> None:
    streamer = _TokenStreamer(critic.tokenizer, interval=0.05)
    words = critic.tokenizer("good fair poor bad " * 10, add_special_tokens=False).input_ids

    def generate() -> None:  # a model making a token every 2 ms, as generate() feeds a streamer
        streamer.put(torch.tensor([[1, 2, 3]]))  # the prompt comes first and is not part of the answer
        for word in words:
            streamer.put(torch.tensor([word]))
            time.sleep(0.002)
        streamer.end()

    worker = threading.Thread(target=generate)
    worker.start()
    parts = list(streamer.texts())
    worker.join()
    # ~80 ms of tokens at 20 refreshes a second: the reader wakes a few times, not once per token.
    assert 1 < len(parts) <= 5 and len(words) == 40
    assert parts[-1] == critic.tokenizer.decode(words, skip_special_tokens=True).strip()


def test_beam_search_answers_in_one_piece(critic: Critic, image: Image.Image) -> None:
    beams = GenerationSettings(max_new_tokens=12, num_beams=3)
    parts = list(critic.stream(image, "describe the image", generation=beams))
    assert parts == [_bare_greedy(critic, image, "describe the image", num_beams=3)]


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


def test_an_error_while_generating_reaches_the_reader(critic: Critic, image: Image.Image,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(**kwargs) -> None:
        raise RuntimeError("device lost")

    monkeypatch.setattr(critic.model, "generate", broken)
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            list(critic.stream(image, "describe the image"))
        except RuntimeError as error:
            outcome.append(error)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=30)  # before the fix the reader waited on the streamer forever
    assert not reader.is_alive() and str(outcome[0]) == "device lost"


def test_history_is_part_of_the_prompt(critic: Critic, image: Image.Image) -> None:
    history = [Turn("rate the image", "good .")]
    assert critic.prompt(history, "why ?") == (
        f"{LLAVA_V1_SYSTEM} USER: <image>\nrate the image ASSISTANT: good .</s>USER: why ? ASSISTANT:")
    text = critic.tokenizer.decode(critic.inputs(image, "why ?", history)["input_ids"][0])
    # The tiny word-level vocabulary decodes with spaces around punctuation.
    assert text.count("USER :") == 2 and "good . </s>" in text and text.rstrip().endswith("ASSISTANT :")
    with torch.no_grad():
        later = critic.model(**critic.inputs(image, "why ?", history)).logits[0, -1]
        alone = critic.model(**critic.inputs(image, "why ?")).logits[0, -1]
    assert not torch.allclose(later, alone)  # the model reads the earlier turn
    assert critic.answer(image, "why ?", history)


@pytest.mark.parametrize("question, message", [("   ", "question is empty"), ("the " * 300, "reads at most 256"),
                                               ("x" * 10_000, "10000 characters long")])
def test_bad_questions_are_refused(critic: Critic, image: Image.Image, question: str, message: str) -> None:
    with pytest.raises(CriticError, match=message):
        critic.answer(image, question)


@pytest.mark.parametrize("changes", [{"max_new_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"num_beams": 9},
                                     {"max_new_tokens": 2.5}, {"temperature": float("nan")}])
def test_generation_settings_are_validated(changes: dict) -> None:
    with pytest.raises(CriticError):
        GenerationSettings(**changes)


@pytest.mark.parametrize("settings, message", [({**TINY, "colour": 1}, "unknown critic settings: colour"),
                                               ({**TINY, "generation": {"beams": 2}}, "unknown generation settings"),
                                               ({**TINY, "format": "gguf"}, "format must be one of")])
def test_critic_settings_are_validated(settings: dict, message: str) -> None:
    with pytest.raises(CriticError, match=message):
        CriticSettings.from_settings(settings)


def test_qalign_score_follows_the_level_logits(home: Path, critic: Critic, image: Image.Image) -> None:
    scorer = QAlignScore({**TINY, "name": "AesExpert (Q-Align)"}, device="cpu", dtype="float32", home=home)
    [score] = scorer.score(["ignored"], [image])["aesthetic"]
    # By hand: the llava_v1 prompt with Q-Align's question and answer prefix, the image padded to a square.
    text = (f"{LLAVA_V1_SYSTEM} USER: <image>\nHow would you rate the aesthetics of this image? "
            "ASSISTANT: The aesthetics of the image is")
    processor = critic.processor
    inputs = processor(images=pad_to_square(image, processor.image_processor.image_mean), text=text,
                       return_tensors="pt")
    ids = processor.tokenizer.convert_tokens_to_ids(list(LEVELS))  # whole words in the tiny vocabulary
    with torch.no_grad():
        logits = critic.model(**inputs).logits[0, -1, ids]
    expected = float((torch.softmax(logits, 0) * torch.tensor(LEVEL_WEIGHTS)).sum()) * 4 + 1
    assert 1.0 <= score <= 5.0 and score == pytest.approx(expected, abs=1e-5)
    assert (scorer.name, scorer.aspects, scorer.untrained_aspects) == ("AesExpert (Q-Align)", ("aesthetic",), ())


@pytest.mark.parametrize("level, low, high", [("excellent", 4.9, 5.0), ("bad", 1.0, 1.1)])
def test_qalign_moves_with_the_level_logits(vlm: Critic, image: Image.Image, level: str, low: float,
                                            high: float) -> None:
    """On the transformers-format VLM: a level word's logit pushed far up drags the score to its end."""
    inputs = vlm.inputs(image, "How would you rate the aesthetics of this image?",
                        answer_prefix=" The aesthetics of the image is")
    with torch.no_grad():
        last = vlm.model(**inputs, output_hidden_states=True).hidden_states[-1][0, -1]
    row = vlm.level_token_ids()[LEVELS.index(level)]
    head = vlm.model.lm_head.weight
    saved = head[row].detach().clone()
    try:
        with torch.no_grad():
            head[row] = 100 * last / last.norm() ** 2  # the level's logit becomes about 100
            [score] = vlm.aesthetic_scores([image])
    finally:
        with torch.no_grad():
            head[row] = saved
    assert low <= score <= high


def test_qalign_refuses_a_list_mismatch(home: Path) -> None:
    scorer = QAlignScore(TINY, device="cpu", dtype="float32", home=home)
    with pytest.raises(CriticError, match="one prompt per image"):
        scorer.score("a prompt", [Image.new("RGB", (8, 8))])


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
    inputs = critic.inputs(image, "rate the image")
    with torch.no_grad():
        assert not torch.allclose(adapted.model(**inputs).logits, critic.model(**inputs).logits)
        with adapted.adapters.disabled():
            torch.testing.assert_close(adapted.model(**inputs).logits, critic.model(**inputs).logits)
    # Streaming generates in a worker thread; the adapters act there too.
    assert list(adapted.stream(image, "rate the image"))[-1] == _bare_greedy(adapted, image, "rate the image")


def test_critics_on_the_same_weights_share_one_model(home: Path, critic: Critic) -> None:
    """A sampled variant and the Q-Align scorer of the chat critic must not load the weights again."""
    sampled = Critic({**TINY, "generation": {"max_new_tokens": 12, "temperature": 0.8}}, device="cpu",
                     dtype="float32", home=home)
    scorer = QAlignScore(TINY, device="cpu", dtype="float32", home=home)
    assert sampled.model is critic.model and scorer.critic.model is critic.model
    assert sampled.settings.generation.temperature == 0.8 and critic.settings.generation.temperature == 0.0
    # Other weights, or adapters switched on, are another model.
    assert Critic(TINY_VLM, device="cpu", dtype="float32", home=home).model is not critic.model
    assert Critic(TINY, device="cpu", dtype="float32", home=home / "elsewhere").model is not critic.model
