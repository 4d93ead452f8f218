"""The About tab: what the arena is, the research behind it, how votes are kept, and the API."""
from __future__ import annotations

import gradio as gr

from demos.context import AppContext

ABOUT = """
## AesArena

An open arena for image-aesthetics research. Visitors chat with an aesthetics expert model about an
image, compare two anonymous rankings of an aesthetic image search, and compare two anonymous generated
images that a reward model scores. Every choice is a pairwise vote. The votes drive a Bradley–Terry
leaderboard and feed preference-training scripts, whose results come back here as new contestants.

**Research it serves.** AesExpert (aesthetic critique MLLM), ArtGPT-4 (image adapters for art),
aesthetic retrieval alignment (arXiv 2406.09397, HPIR), VisionPrefer / VP-Score (reward model and
aligned diffusion).

**Leaderboard.** Bradley–Terry maximum likelihood on aggregated vote counts; a tie or "both bad" is
half a win for each side. Rating = 400·θ/ln 10 + 1000, mean-anchored. A tiny explicit ridge
(λ = {l2:g}) keeps ratings finite when a system has never lost; it is negligible otherwise.
Intervals: {rounds} seeded bootstrap rounds over the counts. Rank = 1 + the number of systems whose
lower bound is above this one's upper bound. Systems with fewer than {preliminary} votes are marked
*preliminary*.

**Your data.** A voter is a pseudonym: a keyed hash of the connection address and the page session.
No address is stored. Outputs shown in a battle are kept, content-addressed, with the vote.

**Scripting.** Every action has a stable API name; see "Use via API" at the foot of the page and
`gradio_client`. Running profile: **{profile}** ({note}).
"""


def build(ctx: AppContext) -> None:
    """Lay out the About tab."""
    config = ctx.settings.leaderboard
    with gr.Tab("About"):
        gr.Markdown(ABOUT.format(l2=config.l2, rounds=config.bootstrap_rounds, preliminary=config.preliminary_below,
                                 profile=ctx.profile.name, note=ctx.profile_note))
