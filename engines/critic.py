"""Critics: image-text-to-text models (AesExpert and any transformers VLM) that chat about an image.

Every model call runs on the critic's own model thread. Streaming hands the reader the new tokens as they
come, decoded at most `STREAM_INTERVAL_S` apart; a cancelled or abandoned stream stops generating at the next
token, and an error while generating reaches the reader. The Q-Align score turns any critic into a 1–5
aesthetic scorer. Critics that differ only in decoding settings share one loaded model.
"""
from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from huggingface_hub import hf_hub_download
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from engines.adapters import ImageAdapters
from engines.llava_convert import load_or_convert
from engines.settings import refuse_unknown
from engines.tiny import write_tiny_llava_original, write_tiny_vlm

FORMATS = ("transformers", "llava-original")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Q-Align: the five level words and their weights; softmax over their next-token logits, ×4 + 1 for 1–5.
LEVELS = ("excellent", "good", "fair", "poor", "bad")
LEVEL_WEIGHTS = (1.0, 0.75, 0.5, 0.25, 0.0)
QALIGN_QUESTION = "How would you rate the aesthetics of this image?"
QALIGN_ANSWER_PREFIX = " The aesthetics of the image is"
HUB_PREFIX = "hf://"
T = TypeVar("T")
# A person reads a stream refreshed 30 times a second as smooth; waking the reader for every token instead cost a
# small model half its speed (bench/critique.py), the thread hand-off and re-decoding outweighing the token.
STREAM_INTERVAL_S = 1 / 30


class CriticError(ValueError):
    """A request or setting the critic refuses; the message is meant for the person who sent it."""


def _check_range(name: str, value: Any, low: float, high: float, integer: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or not (
            math.isfinite(value) and low <= value <= high):
        raise CriticError(f"{name} must be {'a whole number ' if integer else ''}between {low} and {high}, "
                          f"got {value!r}")


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings; temperature 0 means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    num_beams: int = 1

    def __post_init__(self) -> None:
        _check_range("max_new_tokens", self.max_new_tokens, 1, 4096, integer=True)
        _check_range("temperature", self.temperature, 0.0, 2.0)
        _check_range("top_p", self.top_p, 0.01, 1.0)
        _check_range("num_beams", self.num_beams, 1, 8, integer=True)

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `model.generate`."""
        sampling = self.temperature > 0
        return {"max_new_tokens": self.max_new_tokens, "do_sample": sampling, "num_beams": self.num_beams,
                **({"temperature": self.temperature, "top_p": self.top_p} if sampling else {})}


@dataclass(frozen=True)
class CriticSettings:
    """Which model, in which format, and its default decoding; "tiny" is the tiny model of that format."""

    model: str
    format: str = "transformers"
    vision_tower: str | None = None  # llava-original only: overrides the checkpoint's mm_vision_tower
    # ArtGPT-4-style image adapters to switch on: safetensors under the data home, or hf://owner/repo/file
    adapters: str | None = None
    # The model's own tensors that a training run changed (train.critic: layer norms and the image projection),
    # safetensors by state-dict name; each must exist in the model with the same shape.
    weights: str | None = None
    # A peft LoRA folder (adapter_config.json and its weights) that train.critic wrote, merged in at load.
    lora: str | None = None
    generation: GenerationSettings = field(default_factory=GenerationSettings)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise CriticError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> CriticSettings:
        """Validated settings; unknown keys are refused by name."""
        refuse_unknown(settings, cls, "critic", CriticError)
        raw = dict(settings)
        generation = dict(raw.get("generation") or {})
        refuse_unknown(generation, GenerationSettings, "generation", CriticError)
        raw["generation"] = GenerationSettings(**generation)
        return cls(**raw)


@dataclass(frozen=True)
class Turn:
    """One exchange of a conversation about the image."""

    question: str
    answer: str


class _Cancelled(StoppingCriteria):
    """Stops generation once the event is set (a cancelled request, or a reader that went away)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> bool:
        return self.event.is_set()


class _TokenStreamer(BaseStreamer):
    """Collects generated token ids in the worker; the reader decodes whatever has arrived, one batch at a time.

    Unlike `TextIteratorStreamer`, the worker does no decoding and wakes the reader only through an event, so
    a fast model is not slowed to the reader's pace, and text is decoded once per refresh rather than per token.
    """

    def __init__(self, tokenizer: Any, interval: float) -> None:
        self.tokenizer = tokenizer
        self.interval = interval
        self.ids: list[int] = []
        self.prompt_seen = False
        self.arrived = threading.Event()
        self.finished = threading.Event()

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() hands over the prompt first
            self.prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())  # list.extend is atomic under the GIL; no lock needed
        self.arrived.set()

    def end(self) -> None:
        self.finished.set()
        self.arrived.set()

    def texts(self) -> Iterator[str]:
        """The answer so far, each time it has changed, until generation ends."""
        shown = ""
        while True:
            self.arrived.wait()
            self.arrived.clear()
            done = self.finished.is_set()
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True).strip()
            if not done:
                text = text.rstrip("\ufffd")  # a character whose bytes have not all arrived yet
            if text != shown:
                shown = text
                yield text
            if done:
                return
            self.finished.wait(self.interval)  # lets tokens gather; returns at once when generation ends


def _resolve(path: str, home: Path) -> Path:
    if path.startswith(HUB_PREFIX):  # hf://owner/repo/file, cached by huggingface_hub
        owner, repo, filename = path.removeprefix(HUB_PREFIX).split("/", 2)
        return Path(hf_hub_download(f"{owner}/{repo}", filename))
    return home / Path(path).expanduser()


def pad_to_square(image: Image.Image, mean: Sequence[float]) -> Image.Image:
    """LLaVA-1.5's `image_aspect_ratio: pad`: centre the image on a square of the processor's mean colour."""
    side = max(image.size)
    square = Image.new("RGB", (side, side), tuple(int(round(255 * m)) for m in mean))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return square


@dataclass(eq=False)
class _LoadedModel:
    """A critic model with its processor and adapters, and the one thread that makes all of its calls."""

    model: Any
    processor: Any
    adapters: ImageAdapters | None
    image_aspect_ratio: str
    # OpenMP keeps a thread team per calling thread, and two teams on a small CPU fight each other: preparing
    # inputs on the caller's thread and generating on another cost a third of the tokens/s on 2 cores
    # (bench/critique.py). One thread per model also serializes its requests.
    thread: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="critic"))


def load_trained_weights(model: torch.nn.Module, path: Path) -> None:
    """Replace some of the model's tensors with a training run's, refusing unknown names and wrong shapes."""
    try:
        weights = load_file(path)
    except Exception as error:  # a missing or damaged file: safetensors raises its own error types
        raise CriticError(f"cannot read the trained weights {path}: {error}") from None
    expected = model.state_dict()
    unknown = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(weights) & set(expected) if weights[k].shape != expected[k].shape)
    if unknown or wrong:
        raise CriticError(f"{path} does not fit this critic: unknown tensors {unknown[:5]}, wrong shapes {wrong[:5]}")
    model.load_state_dict(weights, strict=False)  # only the trained tensors are in the file


def merge_lora(model: torch.nn.Module, path: Path) -> torch.nn.Module:
    """The model with a training run's LoRA merged into its weights: served as a plain model, at full speed."""
    try:
        return PeftModel.from_pretrained(model, path).merge_and_unload()
    except Exception as error:  # a missing folder, a damaged file, or targets this model lacks: peft's own errors
        raise CriticError(f"cannot load the LoRA {path}: {error}") from None


def _load(s: CriticSettings, device: str, dtype: str, home: Path) -> _LoadedModel:
    aspect_ratio = "square"
    if s.format == "llava-original":
        source, tower = s.model, s.vision_tower
        if s.model == "tiny":
            written = write_tiny_llava_original(home / "tiny")
            source, tower = written / "llava", written / "clip-vision"
        cache = home / "converted" / str(source).strip("/").replace("/", "--")
        model, processor, report = load_or_convert(source, cache, tower, DTYPES[dtype])
        aspect_ratio = report.image_aspect_ratio
    else:
        source = write_tiny_vlm(home / "tiny") if s.model == "tiny" else s.model
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=DTYPES[dtype])
        processor = AutoProcessor.from_pretrained(source)
    if getattr(processor, "chat_template", None) is None:
        raise CriticError(f"{s.model} has no chat template in its processor, so its prompts cannot be built")
    if s.weights:
        load_trained_weights(model, _resolve(s.weights, home))
    if s.lora:
        model = merge_lora(model, home / Path(s.lora).expanduser())
    model.to(device=device, dtype=DTYPES[dtype]).eval()
    adapters = None
    if s.adapters:
        adapters = ImageAdapters.for_model(model).load(_resolve(s.adapters, home)).attach(model)
    return _LoadedModel(model, processor, adapters, aspect_ratio)


_shared: weakref.WeakValueDictionary[tuple[Any, ...], _LoadedModel] = weakref.WeakValueDictionary()
_shared_guard = threading.Lock()


def _shared_model(s: CriticSettings, device: str, dtype: str, home: Path) -> _LoadedModel:
    """One loaded model for every critic that differs only in its decoding defaults (a chat system, a sampled
    variant, the Q-Align scorer), freed once none holds it: a 7B model loaded twice would not fit one GPU."""
    key = (replace(s, generation=GenerationSettings()), device, dtype, home.resolve())
    # One guard for all keys: a second critic waits for the first one's load instead of loading a copy.
    with _shared_guard:
        loaded = _shared.get(key)
        if loaded is None:
            loaded = _shared[key] = _load(s, device, dtype, home)
        return loaded


class Critic:
    """`Critic(settings, device=…, dtype=…, home=…)`: chat about one image, streamed; Q-Align scores."""

    def __init__(self, settings: Mapping[str, Any], *, device: str, dtype: str, home: Path) -> None:
        self.settings = CriticSettings.from_settings(settings)
        if dtype not in DTYPES:
            raise CriticError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        # Held, not copied: the loaded model lives as long as some critic built on it.
        self._loaded = loaded = _shared_model(self.settings, device, dtype, Path(home))
        self.model, self.processor, self.adapters = loaded.model, loaded.processor, loaded.adapters
        self.image_aspect_ratio, self._thread = loaded.image_aspect_ratio, loaded.thread
        self.tokenizer = self.processor.tokenizer
        self.pad_token_id = (self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                             else self.tokenizer.eos_token_id)
        self.context = self.model.config.get_text_config().max_position_embeddings
        self._level_ids: list[int] | None = None

    def _image(self, image: Image.Image) -> Image.Image:
        if self.image_aspect_ratio == "pad":
            return pad_to_square(image, self.processor.image_processor.image_mean)
        return image

    def on_model_thread(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` run on the thread that makes every model call of this critic."""
        return self._thread.submit(fn, *args, **kwargs).result()

    def prompt(self, history: Sequence[Turn], question: str, answer_prefix: str = "") -> str:
        """The chat-templated text of the conversation so far plus the new question; the image opens turn one."""
        if not isinstance(question, str) or not question.strip():
            raise CriticError("the question is empty; please ask something about the image")
        # Checked before tokenizing, so that a huge paste costs nothing; no tokenizer packs 16 characters a token.
        if len(question) > 16 * self.context:
            raise CriticError(f"the question is {len(question)} characters long; this critic reads at most "
                              f"{self.context} tokens, so please ask a shorter question")
        messages: list[dict[str, Any]] = []
        for i, turn in enumerate([*history, Turn(question.strip(), "")]):
            content = [{"type": "text", "text": turn.question}]
            messages.append({"role": "user", "content": ([{"type": "image"}] if i == 0 else []) + content})
            if turn.answer:
                messages.append({"role": "assistant", "content": [{"type": "text", "text": turn.answer}]})
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        # A template whose generation prompt ends in a space or newline already separates the prefix.
        return text + (answer_prefix.lstrip() if text[-1:].isspace() else answer_prefix)

    def inputs(self, image: Image.Image, question: str, history: Sequence[Turn] = (), answer_prefix: str = "",
               reserve: int = 0) -> dict[str, torch.Tensor]:
        """Model inputs for the conversation plus the question, refused if they and `reserve` more overflow."""
        return self._encode(image, self.prompt(history, question, answer_prefix), reserve)

    def _encode(self, image: Image.Image, text: str, reserve: int) -> dict[str, torch.Tensor]:
        inputs = self.processor(images=self._image(image), text=text, return_tensors="pt").to(self.model.device)
        length = inputs["input_ids"].shape[1]
        if length + reserve > self.context:
            raise CriticError(f"the conversation is {length} tokens long and the answer needs {reserve} more, but "
                              f"this critic reads at most {self.context}; please ask a shorter question or clear "
                              "the chat")
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def stream(self, image: Image.Image, question: str, history: Sequence[Turn] = (),
               generation: GenerationSettings | None = None, cancel: threading.Event | None = None) -> Iterator[str]:
        """The answer as it grows; setting `cancel`, or closing the iterator, stops the model at the next token."""
        generation = generation or self.settings.generation
        text = self.prompt(history, question)  # refuses an empty or huge question before the model is involved
        cancel = cancel or threading.Event()
        kwargs = {**generation.generate_kwargs(), "pad_token_id": self.pad_token_id,
                  "stopping_criteria": StoppingCriteriaList([_Cancelled(cancel)])}
        if generation.num_beams > 1:
            # transformers cannot stream beam search (the best beam is known only at the end): one piece.
            yield self.on_model_thread(self._whole_answer, image, text, generation, kwargs)
            return
        streamer = _TokenStreamer(self.tokenizer, STREAM_INTERVAL_S)
        failures: list[BaseException] = []

        def work() -> None:
            try:
                inputs = self._encode(image, text, generation.max_new_tokens)
                with torch.inference_mode():  # thread-local, so set here: it spares autograd's version counters
                    self.model.generate(**inputs, **kwargs, streamer=streamer)
            except BaseException as error:  # handed to the reader, who would otherwise wait forever
                failures.append(error)
            finally:
                streamer.end()

        job = self._thread.submit(work)
        try:
            yield from streamer.texts()
            if failures:
                raise failures[0]
        finally:
            cancel.set()
            if not job.cancel():  # a job still queued never starts; a running one stops at its next token
                job.result()

    def _whole_answer(self, image: Image.Image, text: str, generation: GenerationSettings,
                      kwargs: dict[str, Any]) -> str:
        inputs = self._encode(image, text, generation.max_new_tokens)
        with torch.inference_mode():
            out = self.model.generate(**inputs, **kwargs)
        return self.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    def answer(self, image: Image.Image, question: str, history: Sequence[Turn] = (),
               generation: GenerationSettings | None = None) -> str:
        """The whole answer at once (the last value of `stream`)."""
        answer = ""
        for answer in self.stream(image, question, history, generation):
            pass
        return answer

    def level_token_ids(self) -> list[int]:
        """Each Q-Align level word's first token where it follows the answer prefix in the prompt."""
        if self._level_ids is None:
            base = self.tokenizer(QALIGN_ANSWER_PREFIX, add_special_tokens=False).input_ids
            ids = []
            for word in LEVELS:
                # Tokenized in context: "is good" may not contain the tokens of "good" alone (leading spaces).
                full = self.tokenizer(f"{QALIGN_ANSWER_PREFIX} {word}", add_special_tokens=False).input_ids
                if full[:len(base)] != base or len(full) == len(base):
                    raise CriticError(f"this critic's tokenizer does not continue the Q-Align prompt with {word!r}")
                ids.append(full[len(base)])
            if len(set(ids)) < len(ids) or self.tokenizer.unk_token_id in ids:
                raise CriticError("this critic's tokenizer cannot tell the Q-Align level words apart by their "
                                  f"first tokens: {dict(zip(LEVELS, ids))}")
            self._level_ids = ids
        return self._level_ids

    def aesthetic_scores(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Q-Align: softmax over the level words' next-token logits, weighted 1…0, mapped to 1–5."""
        return self.on_model_thread(self._aesthetic_scores, images)

    def _aesthetic_scores(self, images: Sequence[Image.Image]) -> np.ndarray:
        ids = self.level_token_ids()
        weights = torch.tensor(LEVEL_WEIGHTS)
        scores = []
        with torch.inference_mode():
            for image in images:
                inputs = self.inputs(image, QALIGN_QUESTION, answer_prefix=QALIGN_ANSWER_PREFIX)
                logits = self.model(**inputs).logits[0, -1, ids].float().cpu()
                scores.append(float(torch.softmax(logits, dim=0) @ weights) * 4 + 1)
        return np.asarray(scores, dtype=np.float32)


class QAlignScore:
    """Any critic as an aesthetic scorer (1–5) behind the scorer interface; the prompt plays no part."""

    aspects = ("aesthetic",)
    untrained_aspects: tuple[str, ...] = ()

    def __init__(self, settings: Mapping[str, Any], *, device: str, dtype: str, home: Path) -> None:
        raw = dict(settings)
        self.name = raw.pop("name", "Q-Align")
        self.critic = Critic(raw, device=device, dtype=dtype, home=home)

    def score(self, prompts: Sequence[str], images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        """One 1–5 score per image."""
        if isinstance(prompts, str) or len(prompts) != len(images):
            raise CriticError("give one prompt per image, as a list")
        return {"aesthetic": self.critic.aesthetic_scores(images)}
