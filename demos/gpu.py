"""`@spaces.GPU` on ZeroGPU Spaces, a no-op everywhere else."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

try:
    import spaces
except ImportError:  # not on a Space: the functions run on whatever device the profile names
    spaces = None


def gpu(fn: F) -> F:
    """Ask ZeroGPU for a device while `fn` runs; returns `fn` unchanged when `spaces` is absent."""
    return spaces.GPU(fn) if spaces is not None else fn
