"""The Admin tab: list every system with its origin (profile or training run, with what the run measured), show
a trained system's run card, and switch systems in or out of new battles. Only an administrator may (see
demos/access.py: the admin token, or an organization on a Space)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gradio as gr
import pandas as pd

from demos.access import oauth_enabled, require_admin
from demos import study_admin
from demos.context import AppContext
from study.tasks import TASKS
from study.votes import VoteError

COLUMNS = ["System", "Source", "Parent", "Version", "Enabled", "Votes", "Trained on", "Held out: before → after"]


def metric_changes(metrics: Mapping[str, Any], prefix: str = "") -> list[str]:
    """"name: before → after" for each metric a run card measured both before and after training."""
    changes = []
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            changes += metric_changes(value, f"{prefix}{key} ")
        elif key.endswith("_before") and isinstance(value, (int, float)):
            after = metrics.get(key.removesuffix("_before") + "_after")
            if isinstance(after, (int, float)):
                changes.append(f"{prefix}{key.removesuffix('_before')}: {value:.3g} → {after:.3g}")
    return changes


def _run_columns(card: Mapping[str, Any] | None) -> tuple[str, str]:
    if not card:
        return "", ""
    data = card.get("data", {})
    return (f"{data.get('votes', '?')} votes, {card.get('steps', '?')} steps",
            "; ".join(metric_changes(card.get("metrics", {}))))


def build(ctx: AppContext) -> None:
    """Lay out the tab and wire list and switch, both behind the admin token."""
    votes = ctx.votes

    def systems(token: str, task: str, profile: gr.OAuthProfile | None = None) -> pd.DataFrame:
        """Every system of a task: profile or trained, its parent and version, enabled, votes so far."""
        require_admin(ctx.settings, token, profile)
        if task not in TASKS:
            raise gr.Error(f"Unknown task {task!r}; pick one of {', '.join(TASKS)}.")
        rows = [(s.name, s.source, s.parent or "", s.version, s.enabled, votes.count_votes(task, s.name),
                 *_run_columns(s.run_card)) for s in votes.systems(task, enabled_only=False)]
        return pd.DataFrame(rows, columns=COLUMNS)

    def run_card(token: str, task: str, name: str, profile: gr.OAuthProfile | None = None) -> dict[str, Any]:
        """The run card of the training run that made a system: data, settings, metrics before and after."""
        require_admin(ctx.settings, token, profile)
        found = {s.name: s for s in votes.systems(task, enabled_only=False)} if task in TASKS else {}
        if name not in found:
            raise gr.Error(f"There is no system named {name!r} in the {task} arena.")
        if found[name].run_card is None:
            raise gr.Error(f"{name!r} was not trained by a run of this arena, so it has no run card.")
        return found[name].run_card

    def switch(token: str, task: str, name: str, enabled: bool, profile: gr.OAuthProfile | None = None
               ) -> tuple[pd.DataFrame, str]:
        """Switch one system in or out of new battles; its votes stay on the board."""
        require_admin(ctx.settings, token, profile)
        try:
            votes.set_enabled(task, name, bool(enabled))
        except VoteError as error:
            raise gr.Error(f"Cannot switch {name!r}: {error}") from None
        return systems(token, task, profile), f"**{name}** is now {'in' if enabled else 'out of'} new {task} battles."

    with gr.Tab("Admin"):
        if oauth_enabled(ctx.settings):
            gr.LoginButton()
        with gr.Row():
            token = gr.Textbox(label="Admin token", type="password", scale=2)
            task = gr.Dropdown(list(TASKS), value=TASKS[0], label="Task", scale=1)
            show = gr.Button("List systems", scale=1)
        table = gr.Dataframe(headers=COLUMNS, interactive=False, label="Systems")
        with gr.Row():
            name = gr.Textbox(label="System")
            enabled = gr.Checkbox(label="In new battles", value=True)
            apply = gr.Button("Switch")
            card = gr.Button("Show run card")
        note = gr.Markdown()
        card_view = gr.JSON(label="Run card")
        study_admin.build(ctx, token)

    show.click(systems, [token, task], table, api_name="admin_systems",
               api_description="Every system of a task with its source, parent, version, state and votes "
                               "(needs the admin token).")
    apply.click(switch, [token, task, name, enabled], [table, note], api_name="admin_switch",
                api_description="Switch a system in or out of new battles (needs the admin token).")
    card.click(run_card, [token, task, name], card_view, api_name="admin_run_card",
               api_description="The run card of a trained system: data, settings, metrics before and after "
                               "(needs the admin token).")
