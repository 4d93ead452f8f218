"""Aesthetic scorers on CLIP embeddings: the LAION aesthetic head, and CLIP score for prompt following."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from huggingface_hub import hf_hub_download
from PIL import Image
from torch import nn

from engines.embedder import Embedder
from engines.settings import refuse_unknown
from engines.tiny import write_tiny_laion_head

HUB_PREFIX = "hf://"
# Hessel et al.'s CLIPScore rescales the clipped cosine by 2.5 so that scores spread over ~0–1 in practice.
CLIP_SCORE_WEIGHT = 2.5


class AestheticError(ValueError):
    """A head or setting that cannot be used; the message names what is wrong."""


class LaionAestheticHead(nn.Module):
    """The improved-aesthetic-predictor MLP (`layers.{0,2,4,6,7}`): Linear/Dropout stacks with no activations."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Scores (about 1–10 for the released head) of L2-normalized image embeddings."""
        return self.layers(embeddings).squeeze(-1)


def load_laion_head(path: Path, dim: int) -> LaionAestheticHead:
    """Load a `sac+logos+ava1-l14-linearMSE.pth`-layout state dict strictly: stray or missing keys are errors."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    head = LaionAestheticHead(dim)
    expected = head.state_dict()
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if unexpected or missing or wrong:
        raise AestheticError(f"{path} is not a LAION aesthetic head for {dim}-wide embeddings: unexpected "
                             f"{unexpected}, missing {missing}, wrong shapes {wrong}")
    head.load_state_dict(state)
    return head.eval()


def _resolve(path: str, home: Path) -> Path:
    if path.startswith(HUB_PREFIX):  # hf://owner/repo/file, cached by huggingface_hub
        owner, repo, filename = path.removeprefix(HUB_PREFIX).split("/", 2)
        return Path(hf_hub_download(f"{owner}/{repo}", filename))
    return home / Path(path).expanduser()


def _check(prompts: Sequence[str], images: Sequence[Image.Image]) -> None:
    if isinstance(prompts, str) or len(prompts) != len(images):
        raise AestheticError("give one prompt per image, as a list")


class LaionAesthetic:
    """The LAION aesthetic predictor as a scorer: the head on the normalized CLIP image embedding."""

    name = "LAION aesthetic"
    aspects = ("aesthetic",)
    untrained_aspects: tuple[str, ...] = ()

    def __init__(self, settings: Mapping[str, Any], *, device: str, dtype: str, home: Path) -> None:
        refuse_unknown(settings, {"embedder", "head"}, "LAION aesthetic", AestheticError)
        if "head" not in settings:
            raise AestheticError("LAION aesthetic settings need a `head`: tiny, a path or hf://owner/repo/file")
        self.embedder = Embedder(settings.get("embedder", {}), device=device, dtype=dtype, home=home)
        head = settings["head"]
        path = write_tiny_laion_head(Path(home) / "tiny", self.embedder.dim) if head == "tiny" else _resolve(head, home)
        self.head = load_laion_head(path, self.embedder.dim)

    def score(self, prompts: Sequence[str], images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        """Aesthetic score per image; the prompt plays no part (the head sees only the image)."""
        _check(prompts, images)
        embeddings = torch.from_numpy(self.embedder.embed_images(images))
        with torch.inference_mode():
            return {"aesthetic": self.head(embeddings).numpy().astype(np.float32)}


class ClipScore:
    """CLIPScore (Hessel et al. 2021): 2.5 · max(cos(text, image), 0), a prompt-following score."""

    name = "CLIP score"
    aspects = ("prompt_following",)
    untrained_aspects: tuple[str, ...] = ()

    def __init__(self, settings: Mapping[str, Any], *, device: str, dtype: str, home: Path) -> None:
        refuse_unknown(settings, {"embedder"}, "CLIP score", AestheticError)
        self.embedder = Embedder(settings.get("embedder", {}), device=device, dtype=dtype, home=home)

    def score(self, prompts: Sequence[str], images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        """One score per (prompt, image) pair."""
        _check(prompts, images)
        cosine = np.sum(self.embedder.embed_texts(prompts) * self.embedder.embed_images(images), axis=1)
        return {"prompt_following": (CLIP_SCORE_WEIGHT * np.maximum(cosine, 0.0)).astype(np.float32)}
