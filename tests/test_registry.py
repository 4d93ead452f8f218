"""The engine registry: lazy, built once, and unloading gives the memory back."""
from __future__ import annotations

import weakref
from pathlib import Path

import psutil
import pytest

from engines.registry import Registry, load_profile


def _rss() -> int:
    return psutil.Process().memory_info().rss


def test_engines_are_built_once_and_lazily(tmp_path: Path) -> None:
    registry = Registry(load_profile("tiny"), tmp_path)
    assert registry._engines == {}
    first = registry.engine("critique", "tiny-llava")
    assert registry.engine("critique", "tiny-llava") is first
    with pytest.raises(KeyError, match="no critique system named 'nobody'"):
        registry.engine("critique", "nobody")


def test_switching_critics_does_not_leak(tmp_path: Path) -> None:
    registry = Registry(load_profile("tiny"), tmp_path)
    for name in ("tiny-llava", "tiny-llava-sampled"):  # warm up: imports, caches, the converted checkpoint
        registry.engine("critique", name)
        registry.unload("critique", name)
    baseline = _rss()
    for _ in range(6):
        for name in ("tiny-llava", "tiny-llava-sampled"):
            model = weakref.ref(registry.engine("critique", name).model)
            registry.unload("critique", name)
            assert model() is None, f"{name}'s model is still referenced after unload"
    assert _rss() <= baseline * 1.10, f"RSS grew from {baseline} to {_rss()} over load/unload cycles"
