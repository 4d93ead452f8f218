"""The Generate tab: two anonymous images for one prompt, a vote, then the reveal with VP-Score."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import gradio as gr
import pandas as pd
from PIL import Image

from demos.context import DEVICE_CONCURRENCY_ID, AppContext
from demos.gpu import gpu
from engines.generator import GenerationError
from engines.images import ImageRejected, read_image
from engines.registry import SCORERS
from study.blobs import Output
from study.tasks import TASK_ASPECTS
from study.votes import VoteError

TASK = "generation"
ASPECTS = TASK_ASPECTS[TASK]
CHOICE_LABELS = {"A is better": "a", "B is better": "b", "Tie": "tie", "Both are bad": "both_bad"}
EXAMPLES = [
    "a lighthouse on a cliff at dawn, soft golden light, long exposure",
    "a bowl of ripe figs on a linen cloth, still life, chiaroscuro",
    "a misty bamboo forest, ink wash painting",
    "portrait of an old fisherman, weathered face, shallow depth of field",
]
log = logging.getLogger(__name__)


@dataclass
class Round:
    """One battle as the server keeps it for a session: never sent to the browser before the vote."""

    token: str = ""
    shown_at: float = 0.0
    scores: dict[str, dict[str, float]] = field(default_factory=dict)


def score_table(scores: dict[str, dict[str, float]], columns: list[str]) -> pd.DataFrame:
    """Scorer·aspect rows, one column per image."""
    rows = sorted({key for side in scores.values() for key in side})
    return pd.DataFrame([[row, *(round(scores[c][row], 3) for c in columns)] for row in rows],
                        columns=["scorer · aspect", *columns])


def build(ctx: AppContext) -> None:
    """Lay out the tab and wire generate, vote and score."""
    registry, votes = ctx.registry, ctx.votes

    def run_scorers(prompt: str, images: list[Image.Image]) -> list[dict[str, float]]:
        """Every profile scorer on every image, as {"scorer · aspect": standardized score} per image."""
        found: list[dict[str, float]] = [{} for _ in images]
        for spec in registry.specs(SCORERS):
            scorer = registry.engine(SCORERS, spec.name)
            with registry.lock(SCORERS, spec.name):
                result = scorer.score([prompt] * len(images), images)
            for aspect, values in result.items():
                # A head never trained for its aspect repeats the overall score; say so rather than imply more.
                label = f"{scorer.name} · {aspect}" + (" (copy of overall)" if aspect in scorer.untrained_aspects else "")
                for i, value in enumerate(values):
                    found[i][label] = float(value)
        return found

    @gpu
    def generate(prompt: str, request: gr.Request, progress: gr.Progress = gr.Progress()):
        """Open a battle: two anonymous images for the prompt; nothing is stored unless both succeed."""
        prompt = (prompt or "").strip()
        if not prompt:
            raise gr.Error("Please type a prompt first.")
        try:
            matchup = votes.pick_matchup(TASK, same_system_rate=ctx.settings.same_system_rate,
                                         among=ctx.servable(TASK), parent_rate=ctx.settings.parent_rate)
        except VoteError as error:
            raise gr.Error(str(error)) from None
        results = []
        for i, name in enumerate((matchup.system_a, matchup.system_b)):
            generator = registry.engine(TASK, name)

            def step(done: int, total: int, i: int = i) -> None:
                progress((i + done / total) / 2, desc=f"image {'AB'[i]}: step {done}/{total}")

            try:
                with registry.lock(TASK, name):
                    results.append(generator.generate(prompt, progress=step))
            except GenerationError as error:
                raise gr.Error(f"{error} (no comparison was opened)") from None
            except Exception:
                log.exception("generation failed for %s", name)
                raise gr.Error("One side failed to generate, so no comparison was opened. Please try again.")
        progress(1.0, desc="scoring")
        scores = run_scorers(prompt, [r.image for r in results])
        meta = {side: {"seed": r.seed, "settings": r.settings, "scores": s}
                for side, r, s in zip(("a", "b"), results, scores)}
        try:
            opened = votes.open_comparison(matchup, prompt, Output(results[0].png(), "image/png"),
                                           Output(results[1].png(), "image/png"),
                                           participant_id=ctx.participant(request), meta=meta)
        except VoteError as error:
            raise gr.Error(str(error)) from None
        state = Round(opened.token, time.monotonic(), {"A": scores[0], "B": scores[1]})
        buttons = [gr.Button(interactive=True) for _ in CHOICE_LABELS]
        return (results[0].image, results[1].image, state, "Which image is better? Vote to reveal the models.",
                gr.DataFrame(visible=False), *buttons)

    def vote(choice: str, prompt_following: str | None, aesthetic: str | None, fidelity: str | None,
             harmlessness: str | None, reason: str, state: Round, request: gr.Request):
        """Record the vote on the current battle, then reveal the systems and their scores."""
        if not state.token:
            raise gr.Error("Generate a pair of images first.")
        if choice not in CHOICE_LABELS.values():
            raise gr.Error(f"Unknown choice {choice!r}; use one of {', '.join(CHOICE_LABELS.values())}.")
        labels = dict(zip(ASPECTS, (prompt_following, aesthetic, fidelity, harmlessness)))
        unknown = [v for v in labels.values() if v and v not in CHOICE_LABELS]
        if unknown:
            raise gr.Error(f"Unknown aspect choice {unknown[0]!r}; use one of {', '.join(CHOICE_LABELS)}.")
        aspects = {a: CHOICE_LABELS[v] for a, v in labels.items() if v}
        latency = int((time.monotonic() - state.shown_at) * 1000)
        try:
            receipt = votes.record_vote(state.token, choice, aspects, reason=reason, latency_ms=latency,
                                        participant_id=ctx.participant(request))
        except VoteError as error:
            raise gr.Error(str(error)) from None
        reveal = (f"**A** was **{receipt.system_a}**, **B** was **{receipt.system_b}**. "
                  f"Your vote: {choice}{' (already recorded)' if receipt.repeated else ''}. "
                  "Generate again for a new round.")
        table = score_table(state.scores, ["A", "B"])
        buttons = [gr.Button(interactive=False) for _ in CHOICE_LABELS]
        return reveal, gr.DataFrame(value=table, visible=not table.empty), *buttons

    def score(image: Any, prompt: str) -> pd.DataFrame:
        """Score an uploaded image against a prompt with every scorer of the profile."""
        prompt = (prompt or "").strip()
        if image is None:
            raise gr.Error("Please upload an image to score.")
        if not prompt:
            raise gr.Error("Please type the prompt the image should match.")
        try:
            intake = read_image(image)
        except ImageRejected as error:
            raise gr.Error(str(error)) from None
        [scores] = run_scorers(prompt, [intake.image])
        return score_table({"score": scores}, ["score"])

    with gr.Tab("Generate"):
        state = gr.State(Round())
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", placeholder="Describe an image…", scale=4, max_lines=3)
            go = gr.Button("Generate", variant="primary", scale=1)
        gr.Examples(EXAMPLES, prompt)
        status = gr.Markdown("Two anonymous models draw your prompt. Vote for the better image.")
        with gr.Row():
            image_a = gr.Image(label="A", type="pil", interactive=False, format="png")
            image_b = gr.Image(label="B", type="pil", interactive=False, format="png")
        with gr.Row():
            buttons = [gr.Button(label, interactive=False) for label in CHOICE_LABELS]
        with gr.Accordion("Aspects (optional, VisionPrefer's four)", open=False):
            with gr.Row():
                aspect_inputs = [gr.Radio(list(CHOICE_LABELS), label=a.replace("_", " "), value=None)
                                 for a in ASPECTS]
            reason = gr.Textbox(label="Why? (optional)", max_lines=3)
        reveal = gr.DataFrame(label="Scores (revealed after the vote)", visible=False, interactive=False)
        with gr.Accordion("Score your own image", open=False):
            with gr.Row():
                # A file, not gr.Image: gr.Image decodes uploads itself, before our intake's limits can run.
                upload = gr.File(label="Image (PNG, JPEG, WebP, GIF, BMP, TIFF)", file_types=["image"],
                                 type="filepath")
                with gr.Column():
                    upload_prompt = gr.Textbox(label="Prompt it should match")
                    score_button = gr.Button("Score")
            score_out = gr.DataFrame(label="Scores", interactive=False)
        choice = gr.Textbox(visible=False)
        api_vote = gr.Button(visible=False)

    generate_outputs = [image_a, image_b, state, status, reveal, *buttons]
    vote_inputs = [choice, *aspect_inputs, reason, state]
    vote_outputs = [status, reveal, *buttons]
    go.click(generate, prompt, generate_outputs, api_name="generate", concurrency_id=DEVICE_CONCURRENCY_ID,
             api_description="Two anonymous images for a prompt; opens a battle for this session.")
    prompt.submit(generate, prompt, generate_outputs, api_visibility="private",
                  concurrency_id=DEVICE_CONCURRENCY_ID)
    api_vote.click(vote, vote_inputs, vote_outputs, api_name="vote",
                   api_description="Vote on this session's battle: choice a|b|tie|both_bad, optional aspect "
                                   "choices ('A is better', 'B is better', 'Tie', 'Both are bad') and reason.")
    # Registered after the public endpoint so that it keeps the plain name `vote`.
    for button, value in zip(buttons, CHOICE_LABELS.values()):
        button.click(lambda v=value: v, None, choice, api_visibility="private").then(
            vote, vote_inputs, vote_outputs, api_visibility="private")
    score_button.click(score, [upload, upload_prompt], score_out, api_name="score",
                       concurrency_id=DEVICE_CONCURRENCY_ID,
                       api_description="Score an image against a prompt with every scorer of the profile.")
