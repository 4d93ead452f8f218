"""The arena's tasks, the vote choices and the aspects a voter may judge per task."""
from __future__ import annotations

CHOICES: tuple[str, ...] = ("a", "b", "tie", "both_bad")

# The vote's own choice is the overall judgement; aspects are the optional finer ones:
# VisionPrefer's four for generation, HPIR's three for retrieval, accuracy and insight for critique.
TASK_ASPECTS: dict[str, tuple[str, ...]] = {
    "generation": ("prompt_following", "aesthetic", "fidelity", "harmlessness"),
    "retrieval": ("accuracy", "aesthetic", "diversity"),
    "critique": ("accuracy", "insight"),
}

TASKS: tuple[str, ...] = tuple(TASK_ASPECTS)


def check_task(task: str) -> str:
    """Return `task` if the arena knows it, else raise ValueError naming the known ones."""
    if task not in TASK_ASPECTS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    return task


def check_choice(choice: str) -> str:
    """Return `choice` if it is one of a, b, tie, both_bad, else raise ValueError."""
    if choice not in CHOICES:
        raise ValueError(f"unknown choice {choice!r}; use one of {', '.join(CHOICES)}")
    return choice


def check_aspects(task: str, aspects: dict[str, str] | None) -> dict[str, str]:
    """Validate per-aspect choices for `task` and return them as a plain dict."""
    aspects = dict(aspects or {})
    allowed = TASK_ASPECTS[check_task(task)]
    for aspect, choice in aspects.items():
        if aspect not in allowed:
            raise ValueError(f"unknown aspect {aspect!r} for {task}; use one of {', '.join(allowed)}")
        check_choice(choice)
    return aspects
