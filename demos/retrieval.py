"""The Search tab: two anonymous rankings of the same gallery for one query, compared row against row (HPIR)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import gradio as gr
from PIL import Image

from demos.context import DEVICE_CONCURRENCY_ID, AppContext
from demos.gpu import gpu
from engines.retrieval import MAX_K, Ranking, RetrievalError
from study.blobs import Output
from study.tasks import TASK_ASPECTS
from study.votes import VoteError

TASK = "retrieval"
ASPECTS = TASK_ASPECTS[TASK]
CHOICES = {"A is better": "a", "B is better": "b", "Tie": "tie", "Both are bad": "both_bad"}
EXAMPLES = ["a cat resting", "a cup of coffee", "a portrait", "a landscape at sunset", "flowers"]
DEFAULT_K = 8
log = logging.getLogger(__name__)


@dataclass
class Round:
    """One search battle as the server keeps it for a session: the rankings stay here until the vote."""

    token: str = ""
    shown_at: float = 0.0
    searched: tuple[str, str] = ("", "")
    notes: tuple[str, str] = ("", "")


def row(ranking: Ranking) -> list[tuple[Image.Image, str]]:
    """A ranking as gallery items, best first; thumbnails are read here so the browser never sees index paths."""
    items = []
    for rank, hit in enumerate(ranking.hits, 1):
        with Image.open(hit.thumb) as thumb:
            items.append((thumb.convert("RGB"), f"{rank}. {hit.caption or hit.file}"))
    return items


def build(ctx: AppContext) -> None:
    """Lay out the tab and wire search and vote."""
    registry, votes = ctx.registry, ctx.votes
    if len(registry.specs(TASK)) < 2:
        return

    def rank(name: str, query: str, k: int) -> Ranking:
        ranker = registry.engine(TASK, name)
        with registry.lock(TASK, name):
            return ranker.search(query, k)

    @gpu
    def search(query: str, k: float, request: gr.Request, progress: gr.Progress = gr.Progress(track_tqdm=True)):
        """Open a battle: the same gallery ranked by two anonymous rankers; nothing is stored unless both succeed."""
        query = (query or "").strip()
        if not query:
            raise gr.Error("Please type a search query first.")
        if k is None or not 1 <= int(k) <= MAX_K:
            raise gr.Error(f"Top-k must be from 1 to {MAX_K}.")
        try:
            matchup = votes.pick_matchup(TASK, among=ctx.servable(TASK), parent_rate=ctx.settings.parent_rate)
        except VoteError as error:
            raise gr.Error(str(error)) from None
        rankings = []
        for side, name in zip("AB", (matchup.system_a, matchup.system_b)):
            progress(len(rankings) / 2, desc=f"ranking {side}")  # the first call also indexes the gallery
            try:
                rankings.append(rank(name, query, int(k)))
            except RetrievalError as error:
                raise gr.Error(f"{error} (no comparison was opened)") from None
            except Exception:
                log.exception("ranking failed for %s", name)
                raise gr.Error("One ranker failed, so no comparison was opened. Please try again.")
        meta = {side: {"searched_with": r.searched_with, "note": r.note} for side, r in zip("ab", rankings)}
        try:
            opened = votes.open_comparison(matchup, query, Output(rankings[0].to_json(), "application/json"),
                                           Output(rankings[1].to_json(), "application/json"),
                                           participant_id=ctx.participant(request), meta={**meta, "k": int(k)})
        except VoteError as error:
            raise gr.Error(str(error)) from None
        state = Round(opened.token, time.monotonic(), (rankings[0].searched_with, rankings[1].searched_with),
                      (rankings[0].note, rankings[1].note))
        return (row(rankings[0]), row(rankings[1]), state,
                "Which row answers the query better? Judge accuracy, aesthetics and diversity, then vote.",
                *[gr.Button(interactive=True) for _ in CHOICES])

    def vote(choice: str, accuracy: str | None, aesthetic: str | None, diversity: str | None, confidence: float,
             reason: str, state: Round, request: gr.Request):
        """Record the vote on this session's search battle, then reveal the rankers and what each searched."""
        if not state.token:
            raise gr.Error("Search first.")
        if choice not in CHOICES.values():
            raise gr.Error(f"Unknown choice {choice!r}; use one of {', '.join(CHOICES.values())}.")
        labels = dict(zip(ASPECTS, (accuracy, aesthetic, diversity)))
        if unknown := [v for v in labels.values() if v and v not in CHOICES]:
            raise gr.Error(f"Unknown aspect choice {unknown[0]!r}; use one of {', '.join(CHOICES)}.")
        if confidence is None or float(confidence) != int(confidence) or not 1 <= int(confidence) <= 5:
            raise gr.Error("Confidence must be a whole number from 1 to 5.")
        try:
            receipt = votes.record_vote(state.token, choice, {a: CHOICES[v] for a, v in labels.items() if v},
                                        reason=reason, confidence=int(confidence),
                                        latency_ms=int((time.monotonic() - state.shown_at) * 1000),
                                        participant_id=ctx.participant(request))
        except VoteError as error:
            raise gr.Error(str(error)) from None
        lines = [f"**A** was **{receipt.system_a}**, **B** was **{receipt.system_b}**."
                 + (" (Your vote was already recorded.)" if receipt.repeated else "")]
        for side, searched, note in zip("AB", state.searched, state.notes):
            lines.append(f"- {side} searched for: *{searched}*" + (f" ({note})" if note else ""))
        return "\n".join(lines), *[gr.Button(interactive=False) for _ in CHOICES]

    with gr.Tab("Search"):
        state = gr.State(Round())
        with gr.Row():
            query = gr.Textbox(label="Search the gallery", placeholder="Describe the picture you want…", scale=4,
                               max_lines=2)
            k = gr.Slider(1, MAX_K, value=DEFAULT_K, step=1, label="Top-k", scale=1)
            go = gr.Button("Search", variant="primary", scale=1)
        gr.Examples([[e] for e in EXAMPLES], query)
        status = gr.Markdown("Two anonymous rankers search the same gallery. Vote for the better row.")
        row_a = gr.Gallery(label="Row A", columns=DEFAULT_K, rows=1, height=200, object_fit="cover", format="jpeg")
        row_b = gr.Gallery(label="Row B", columns=DEFAULT_K, rows=1, height=200, object_fit="cover", format="jpeg")
        with gr.Row():
            buttons = [gr.Button(label, interactive=False) for label in CHOICES]
        with gr.Row():
            aspect_inputs = [gr.Radio(list(CHOICES), label=aspect, value=None) for aspect in ASPECTS]
        with gr.Row():
            confidence = gr.Slider(1, 5, value=3, step=1, label="How sure are you? (1–5)")
            reason = gr.Textbox(label="Why? (optional)", max_lines=3)
        choice = gr.Textbox(visible=False)
        api_vote = gr.Button(visible=False)

    outputs = [row_a, row_b, state, status, *buttons]
    go.click(search, [query, k], outputs, api_name="search", concurrency_id=DEVICE_CONCURRENCY_ID,
             api_description="Two anonymous rankings of the gallery for a query (top-k); opens a battle.")
    query.submit(search, [query, k], outputs, api_visibility="private", concurrency_id=DEVICE_CONCURRENCY_ID)
    vote_inputs = [choice, *aspect_inputs, confidence, reason, state]
    vote_outputs: list[Any] = [status, *buttons]
    api_vote.click(vote, vote_inputs, vote_outputs, api_name="search_vote",
                   api_description="Vote on this session's search battle: a|b|tie|both_bad, optional accuracy, "
                                   "aesthetic and diversity choices ('A is better', …), confidence 1–5, reason.")
    for button, value in zip(buttons, CHOICES.values()):
        button.click(lambda v=value: v, None, choice, api_visibility="private").then(
            vote, vote_inputs, vote_outputs, api_visibility="private")
