"""The Leaderboard tab: Bradley–Terry ratings with bootstrap intervals, per task and aspect."""
from __future__ import annotations

import gradio as gr
import pandas as pd
from matplotlib.figure import Figure

from demos.context import AppContext
from study.counts import load_counts
from study.leaderboard import Standing, compute_leaderboard
from study.plots import ratings_figure
from study.tasks import TASK_ASPECTS, TASKS

OVERALL = "overall"
PEOPLE, JUDGES = "people", "model judges"  # model judges' votes never mix into the people's board
COLUMNS = ["Rank", "System", "Rating", "95% CI", "Votes", "Status", "Trained from"]


def aspect_choices(task: str) -> list[str]:
    """The overall vote plus the task's aspects."""
    return [OVERALL, *TASK_ASPECTS[task]]


def standings_table(standings: list[Standing], parents: dict[str, str | None]) -> pd.DataFrame:
    """The board as people read it: rounded ratings, the interval as +/− offsets, and a trained system's parent
    beside it, so a run's gain reads off the board."""
    return pd.DataFrame(
        [(s.rank, s.system, round(s.rating), f"+{s.ci_high - s.rating:.0f} / −{s.rating - s.ci_low:.0f}", s.votes,
          "preliminary" if s.preliminary else "", parents.get(s.system) or "") for s in standings],
        columns=COLUMNS)


def build(ctx: AppContext) -> None:
    """Lay out the tab and wire refresh, task and aspect changes."""
    config = ctx.settings.leaderboard

    def refresh(task: str, aspect: str, voters: str = PEOPLE) -> tuple[pd.DataFrame, Figure, str]:
        """Fit the board for one task and aspect from the stored votes of people, or of model judges."""
        if task not in TASKS:
            raise gr.Error(f"Unknown task {task!r}. Pick one of: {', '.join(TASKS)}.")
        if aspect not in aspect_choices(task):
            raise gr.Error(f"{task} has no aspect {aspect!r}. Pick one of: {', '.join(aspect_choices(task))}.")
        if voters not in (PEOPLE, JUDGES):
            raise gr.Error(f"Unknown voters {voters!r}. Pick {PEOPLE!r} or {JUDGES!r}.")
        counts = load_counts(ctx.votes.engine, task, None if aspect == OVERALL else aspect,
                             judges_only=voters == JUDGES)
        standings = compute_leaderboard(counts, config)
        total = int(counts["n"].sum())
        note = f"{total} votes by {voters} counted. Systems with fewer than {config.preliminary_below} votes are *preliminary*."
        if config.min_votes:
            note += f" Systems with fewer than {config.min_votes} votes are not shown yet."
        if not total:
            note = "No votes yet for this task and aspect."
        parents = {system.name: system.parent for system in ctx.votes.systems(task, enabled_only=False)}
        return standings_table(standings, parents), ratings_figure(standings, f"{task} · {aspect}"), note

    def aspects_for(task: str) -> gr.Dropdown:
        return gr.Dropdown(choices=aspect_choices(task), value=OVERALL)

    with gr.Tab("Leaderboard"):
        with gr.Row():
            task = gr.Dropdown(list(TASKS), value=TASKS[0], label="Task")
            # Custom values pass the dropdown so API callers can name any task's aspect; refresh validates.
            aspect = gr.Dropdown(aspect_choices(TASKS[0]), value=OVERALL, label="Aspect", allow_custom_value=True)
            voters = gr.Radio([PEOPLE, JUDGES], value=PEOPLE, label="Votes by")
            button = gr.Button("Refresh", variant="secondary")
        note = gr.Markdown()
        table = gr.Dataframe(headers=COLUMNS, interactive=False, label="Ratings", elem_id="ratings-table")
        plot = gr.Plot(label="Ratings with 95% intervals")

    outputs = [table, plot, note]
    inputs = [task, aspect, voters]
    button.click(refresh, inputs, outputs, api_name="leaderboard",
                 api_description="Bradley–Terry leaderboard of one task and aspect, from the votes of people "
                                 "(default) or of model judges: table, plot, note.")
    task.change(aspects_for, task, aspect, api_visibility="private").then(
        refresh, inputs, outputs, api_visibility="private")
    for control in (aspect, voters):
        control.input(refresh, inputs, outputs, api_visibility="private")
    # No triggers and no inputs: runs once per page load, so a visitor sees the board straight away.
    gr.on(None, lambda: refresh(TASKS[0], OVERALL), None, outputs, api_visibility="private")
