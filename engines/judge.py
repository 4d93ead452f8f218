"""LMM-as-judge for retrieval rows (arXiv 2406.09397): a critic compares two result rows, asked twice with the
rows swapped; when the two answers disagree, the pair is "similar".

The rows are drawn one above the other into a single image, since critics take one image per conversation.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from PIL import Image, ImageDraw

from engines.critic import GenerationSettings

CELL = 160  # thumbnail cell, px; a LLaVA-1.5 critic sees the composite at 336 px, so rows of 4–6 stay legible
LABEL = 28  # the strip left of each row that carries its number
QUESTION = ('Both rows of images are search results for the query "{query}". Row 1 is the top row and row 2 the '
            "bottom row. Which row is better overall, judging relevance to the query, aesthetic quality and "
            'diversity? Answer with "1" or "2" only.')
_ROW_WORDS = {"1": "1", "2": "2", "first": "1", "second": "2", "top": "1", "bottom": "2", "one": "1", "two": "2"}
_MENTION = re.compile(r"\b(1|2|first|second|top|bottom|one|two)\b", re.IGNORECASE)


class Answers(Protocol):
    """What the judge needs from a critic."""

    def answer(self, image: Image.Image, question: str, history: Sequence = (),
               generation: GenerationSettings | None = None) -> str:
        """The critic's whole answer to one question about one image."""


@dataclass(frozen=True)
class Judgement:
    """Both answers, the rows they picked (None when an answer picks no single row) and the verdict."""

    first: str  # asked with A's row on top
    second: str  # asked with B's row on top
    first_pick: str | None
    second_pick: str | None
    verdict: str  # "a", "b" or "similar"


def compose(top: Sequence[Image.Image], bottom: Sequence[Image.Image]) -> Image.Image:
    """Two rows of thumbnails, numbered 1 (top) and 2 (bottom), on a white sheet."""
    columns = max(len(top), len(bottom), 1)
    sheet = Image.new("RGB", (LABEL + columns * CELL, 2 * CELL), "white")
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate((top, bottom)):
        draw.text((LABEL // 3, r * CELL + CELL // 2 - 6), str(r + 1), fill="black")
        for c, image in enumerate(row):
            thumb = image.convert("RGB")
            thumb.thumbnail((CELL - 8, CELL - 8))
            sheet.paste(thumb, (LABEL + c * CELL + (CELL - thumb.width) // 2, r * CELL + (CELL - thumb.height) // 2))
    return sheet


def picked_row(answer: str) -> str | None:
    """"1" or "2" when the answer names exactly one row, else None."""
    rows = {_ROW_WORDS[m.lower()] for m in _MENTION.findall(answer)}
    return rows.pop() if len(rows) == 1 else None


def verdict(first_pick: str | None, second_pick: str | None) -> str:
    """Order consistency: A wins only if picked on top and then at the bottom; likewise B; else "similar"."""
    if (first_pick, second_pick) == ("1", "2"):
        return "a"
    if (first_pick, second_pick) == ("2", "1"):
        return "b"
    return "similar"


def judge(critic: Answers, query: str, row_a: Sequence[Image.Image], row_b: Sequence[Image.Image],
          max_new_tokens: int = 16) -> Judgement:
    """Ask the critic about A over B, then B over A, greedily, and combine the two answers."""
    question = QUESTION.format(query=query)
    greedy = GenerationSettings(max_new_tokens=max_new_tokens)
    first = critic.answer(compose(row_a, row_b), question, generation=greedy)
    second = critic.answer(compose(row_b, row_a), question, generation=greedy)
    first_pick, second_pick = picked_row(first), picked_row(second)
    return Judgement(first, second, first_pick, second_pick, verdict(first_pick, second_pick))
