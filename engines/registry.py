"""Profiles name each task's systems; the registry builds their engines lazily, one lock per engine."""
from __future__ import annotations

import gc
import importlib
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PROFILES = Path(__file__).resolve().parent.parent / "assets" / "profiles"
SCORERS = "scorers"


@dataclass(frozen=True)
class SystemSpec:
    """One contestant: its public name, the engine class ("module:Class") and that engine's settings."""

    name: str
    engine: str
    settings: dict[str, Any] = field(default_factory=dict)
    weight: float = 1.0


@dataclass(frozen=True)
class Profile:
    """A named set of systems per task, and where and how their models run."""

    name: str
    description: str = ""
    banner: str = ""
    needs_hub: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    eager: bool = False
    device_concurrency: int = 1
    systems: dict[str, tuple[SystemSpec, ...]] = field(default_factory=dict)
    # Scorers judge outputs (VP-Score, aesthetic heads); they are shown beside battles, never voted on.
    scorers: tuple[SystemSpec, ...] = ()


def load_profile(name_or_path: str) -> Profile:
    """Read a profile by name (assets/profiles/NAME.yaml) or from a YAML path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILES / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILES.glob("*.yaml")))
        raise ValueError(f"no profile {name_or_path!r}; known profiles: {known}")
    raw = yaml.safe_load(path.read_text()) or {}
    systems = {task: tuple(SystemSpec(**spec) for spec in specs or ())
               for task, specs in (raw.pop("systems", None) or {}).items()}
    scorers = tuple(SystemSpec(**spec) for spec in raw.pop("scorers", None) or ())
    return Profile(systems=systems, scorers=scorers, **raw)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers (False at once when HF_HUB_OFFLINE is set)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # any transport failure means "not reachable"; the caller falls back to tiny
        return False
    return True


def cuda_available() -> bool:
    """Whether torch sees a GPU; imported lazily so that starting the app stays cheap."""
    import torch

    return torch.cuda.is_available()


def resolve_profile(requested: str | None) -> tuple[Profile, str]:
    """The profile to run and a note saying why; falls back to `tiny` when the Hub is unreachable."""
    requested = requested or os.environ.get("AESARENA_PROFILE")
    if requested:
        profile = load_profile(requested)
        if profile.needs_hub and not hub_reachable():
            return load_profile("tiny"), f"profile {profile.name!r} needs the Hugging Face Hub, which is unreachable"
        return profile, f"profile {profile.name!r} was requested"
    if not hub_reachable():
        return load_profile("tiny"), "no profile was given and the Hugging Face Hub is unreachable"
    name = "gpu" if cuda_available() else "cpu"
    return load_profile(name), f"no profile was given; the Hub is reachable and this machine suits {name!r}"


class Registry:
    """Builds each system's engine on first use; a lock per engine keeps two requests from building it twice."""

    def __init__(self, profile: Profile, home: Path) -> None:
        self.profile = profile
        self.home = Path(home)
        self._engines: dict[tuple[str, str], Any] = {}
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._guard = threading.Lock()
        self._added: dict[str, tuple[SystemSpec, ...]] = {}

    def specs(self, task: str) -> tuple[SystemSpec, ...]:
        """The profile's systems for a task, then any added since; the pseudo-task SCORERS lists the scorers."""
        if task == SCORERS:
            return self.profile.scorers
        return (*self.profile.systems.get(task, ()), *self._added.get(task, ()))

    def add(self, task: str, spec: SystemSpec) -> None:
        """Serve one more system (a trained one) from now on, without a restart; a known name is left as it is."""
        with self._guard:
            if all(known.name != spec.name for known in self.specs(task)):
                self._added[task] = (*self._added.get(task, ()), spec)

    def spec(self, task: str, name: str) -> SystemSpec:
        """One system's spec, or a clear error."""
        for spec in self.specs(task):
            if spec.name == name:
                return spec
        raise KeyError(f"profile {self.profile.name!r} has no {task} system named {name!r}")

    def lock(self, task: str, name: str) -> threading.Lock:
        """The lock that serializes use of one engine (models are not re-entrant)."""
        with self._guard:
            return self._locks.setdefault((task, name), threading.Lock())

    def engine(self, task: str, name: str) -> Any:
        """The system's engine, built once with `Class(settings, device=…, dtype=…, home=…)`."""
        key = (task, name)
        if key in self._engines:
            return self._engines[key]
        with self.lock(task, name):
            if key not in self._engines:
                spec = self.spec(task, name)
                module, _, attr = spec.engine.partition(":")
                factory = getattr(importlib.import_module(module), attr)
                self._engines[key] = factory(spec.settings, device=self.profile.device, dtype=self.profile.dtype,
                                             home=self.home)
            return self._engines[key]

    def unload(self, task: str, name: str) -> None:
        """Drop a built engine (switching critics); its memory goes back once nothing else holds it."""
        with self.lock(task, name):
            self._engines.pop((task, name), None)
        gc.collect()
        if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
            sys.modules["torch"].cuda.empty_cache()

    def load_eager(self) -> None:
        """Build every engine now (ZeroGPU wants models on the device at import time)."""
        for task in (*self.profile.systems, SCORERS):
            for spec in self.specs(task):
                self.engine(task, spec.name)
