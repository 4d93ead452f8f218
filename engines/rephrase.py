"""Query rephrasing for aesthetic retrieval (arXiv 2406.09397): an LLM spells out what a beautiful picture of the
query would look like before CLIP searches for it.

The paper's four prompt variants are here: detail, k-list, keyword-dict and reorganize. Any causal LM with a
chat template does the rewriting, greedily. A rewrite that fails or comes back empty falls back to the
visitor's own words, and says so. Results are cached per (query, variant).
"""
from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engines.settings import refuse_unknown
from engines.tiny import write_tiny_causal_lm

SYSTEM = ("You rewrite image search queries so that they describe what an excellent, beautiful picture of the "
          "subject looks like. Keep the subject of the query.")
PROMPTS = {
    "detail": ("Rewrite this image search query as one detailed sentence that keeps its subject and adds the "
               "aesthetic qualities an excellent photo of it would have: composition, lighting, colour and mood. "
               "Reply with the sentence only.\nQuery: {query}"),
    "k-list": ("List {k} visual qualities that would make a picture for this image search query beautiful, "
               "on one line, separated by commas. Reply with the list only.\nQuery: {query}"),
    "keyword-dict": ("Describe the ideal picture for this image search query as a JSON object with the keys "
                     "subject, composition, lighting, color and style, each holding a few keywords. Reply with "
                     "the JSON only.\nQuery: {query}"),
    "reorganize": ("Rewrite this image search query as a fluent, well-organized description of the picture "
                   "wanted: its subject first, then its setting, then its visual style. Reply with the "
                   "description only.\nQuery: {query}"),
}
VARIANTS = tuple(PROMPTS)
K_LIST = 5
CACHE_SIZE = 1024
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_LEAD = re.compile(r"^\s*(?:[-*•]|\d+[.)]|(?:query|answer|description|sentence|list)\s*:)\s*", re.IGNORECASE)
# In a dict that is not JSON: a key with its colon, and a quote that opens or closes a value (not an apostrophe).
_DICT_KEY = re.compile(r"""(["']?)\b\w[\w ]*\1\s*:""")
_DICT_QUOTE = re.compile(r"""(?<!\w)'|'(?!\w)|["{}\[\]]""")


class RephraseError(ValueError):
    """A query or setting the rephraser refuses; the message is meant for the person who sent it."""


@dataclass(frozen=True)
class RephraserSettings:
    """Which causal LM rewrites queries ("tiny" for the tiny one), with which prompt variant, and how long."""

    model: str
    variant: str = "detail"
    max_new_tokens: int = 60

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise RephraseError(f"model must be a Hub id, a path or tiny, got {self.model!r}")
        _check_variant(self.variant)
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or not (
                8 <= self.max_new_tokens <= 256):
            raise RephraseError(f"max_new_tokens must be a whole number from 8 to 256, got {self.max_new_tokens!r}")

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> RephraserSettings:
        """Validated settings; unknown keys are refused by name."""
        refuse_unknown(settings, cls, "rephraser", RephraseError)
        if "model" not in settings:
            raise RephraseError("rephraser settings need a model")
        return cls(**settings)


@dataclass(frozen=True)
class Rephrasing:
    """What the visitor typed, what to search with, and whether the rewrite had to fall back (and why)."""

    query: str
    text: str
    variant: str
    fell_back: bool = False
    note: str = ""


def _check_variant(variant: str) -> str:
    if variant not in PROMPTS:
        raise RephraseError(f"unknown rephrasing variant {variant!r}; use one of {', '.join(VARIANTS)}")
    return variant


def messages(query: str, variant: str) -> list[dict[str, str]]:
    """The chat for one rewrite: the instruction and the variant's prompt with the query in it."""
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": PROMPTS[_check_variant(variant)].format(query=query, k=K_LIST)}]


def _flatten(value: Any) -> list[str]:
    if isinstance(value, Mapping):
        return [word for item in value.values() for word in _flatten(item)]
    if isinstance(value, (list, tuple)):
        return [word for item in value for word in _flatten(item)]
    return [str(value).strip()] if str(value).strip() else []


def clean(raw: str, variant: str) -> str:
    """The searchable text in a model's raw answer: one line, no quotes or list marks, a keyword dict flattened."""
    if variant == "keyword-dict" and (found := re.search(r"\{.*\}", raw, re.DOTALL)):
        try:
            raw = ", ".join(_flatten(json.loads(found.group(0))))
        except json.JSONDecodeError:  # not JSON (single quotes, bare words): keep the values, drop the syntax
            raw = " ".join(_DICT_QUOTE.sub(" ", _DICT_KEY.sub(" ", found.group(0))).split())
    lines = [line for line in raw.splitlines() if line.strip()]
    if variant == "k-list" and len(lines) > 1:  # a list despite the instruction: one item per line
        text = ", ".join(_LEAD.sub("", line).strip() for line in lines)
    else:
        text = _LEAD.sub("", lines[0]) if lines else ""
    return re.sub(r"\s+,", ",", " ".join(text.strip().strip("\"'“”‘’`").split()))


class Rephraser:
    """`Rephraser(settings, device=…, dtype=…, home=…)`: `rephrase(query)` gives a `Rephrasing`."""

    def __init__(self, settings: Mapping[str, Any], *, device: str, dtype: str, home: Path) -> None:
        self.settings = s = RephraserSettings.from_settings(settings)
        if dtype not in DTYPES:
            raise RephraseError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        source = write_tiny_causal_lm(Path(home) / "tiny") if s.model == "tiny" else s.model
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise RephraseError(f"{s.model} has no chat template, so its prompts cannot be built")
        self.model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype]).to(device).eval()
        self.pad_token_id = (self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                             else self.tokenizer.eos_token_id)
        self._cache: OrderedDict[tuple[str, str], Rephrasing] = OrderedDict()
        # Rankers share one rephraser; one generate at a time keeps the model and the cache consistent.
        self._lock = threading.Lock()

    def _generate(self, query: str, variant: str) -> str:
        inputs = self.tokenizer.apply_chat_template(messages(query, variant), add_generation_prompt=True,
                                                    return_tensors="pt", return_dict=True).to(self.model.device)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.settings.max_new_tokens, do_sample=False,
                                      pad_token_id=self.pad_token_id)
        return self.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    def rephrase(self, query: str, variant: str | None = None) -> Rephrasing:
        """The query rewritten by `variant` (default: the settings'), or the query itself with a note why not."""
        if not isinstance(query, str) or not query.strip():
            raise RephraseError("the query is empty; please type some words")
        query = " ".join(query.split())
        variant = _check_variant(self.settings.variant if variant is None else variant)
        with self._lock:
            if (found := self._cache.get((query, variant))) is not None:
                self._cache.move_to_end((query, variant))
                return found
            try:
                text = clean(self._generate(query, variant), variant)
                result = (Rephrasing(query, text, variant) if re.search(r"[^\W\d_]", text) else
                          Rephrasing(query, query, variant, True,
                                     "the rephraser gave no usable answer, so your own words were searched"))
            except (RuntimeError, ValueError) as error:  # a model or tokenizer failure must not fail the search
                # Not cached: the next search for this query tries again.
                return Rephrasing(query, query, variant, True,
                                  f"rephrasing failed ({type(error).__name__}), so your own words were searched")
            self._cache[(query, variant)] = result
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
            return result
