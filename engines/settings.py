"""Settings from profiles: every engine refuses unknown keys by name, the same way."""
from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import fields, is_dataclass
from typing import Any


def refuse_unknown(settings: Mapping[str, Any], known: type | Collection[str], what: str,
                   error: type[Exception]) -> None:
    """Raise `error` naming the keys of `settings` that `known` (a dataclass or a set of names) lacks."""
    names = {f.name for f in fields(known)} if is_dataclass(known) else set(known)
    if unknown := sorted(set(settings) - names):
        raise error(f"unknown {what} settings: {', '.join(unknown)}; known: {', '.join(sorted(names))}")
