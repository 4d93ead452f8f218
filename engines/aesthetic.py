"""Scorers on CLIP embeddings: the LAION aesthetic predictor (v2) and CLIPScore for prompt following.

Both read one open_clip embedder through `shared_embedder`, so a profile that names the same embedder settings for
both loads that CLIP once (ViT-L/14 is about 1.7 GB in float32), although the registry builds each scorer apart.
The released LAION head, `sac+logos+ava1-l14-linearMSE.pth` from christophschuhmann/improved-aesthetic-predictor,
is mirrored on the Hub at `camenduru/improved-aesthetic-predictor` (the real profiles fetch it from there).

Beside them, a no-weights baseline on low-level features (colourfulness, sharpness, exposure, contrast,
saturation): the re-ranker the aesthetic retrieval paper argues against, and a scorer that works offline.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from engines.embedder import EmbedderSettings, resolve_file, shared_embedder
from engines.settings import refuse_unknown
from engines.tiny import write_tiny_laion_head

# The predictor's hidden widths after the embedding: 768 -> 1024 -> 128 -> 64 -> 16 -> 1 for CLIP ViT-L/14.
LAION_HEAD_WIDTHS = (1024, 128, 64, 16)
# Hessel et al. (2021), CLIPScore: w * max(cos, 0) with w = 2.5, which stretches the cosines CLIP gives to
# matching captions (rarely above 0.4) over roughly 0 to 1.
CLIP_SCORE_WEIGHT = 2.5
# Their reference code prepends this to every caption before encoding it.
CLIP_SCORE_PREFIX = "A photo depicts "


class AestheticError(ValueError):
    """A head, setting or input that cannot be used; the message names what is wrong."""


class LaionAestheticHead(nn.Module):
    """The improved-aesthetic-predictor MLP as released: Linear layers, dropout after the first three, and no
    activations, so in eval mode it is one affine map of the embedding."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        w1, w2, w3, w4 = LAION_HEAD_WIDTHS
        # Indices 0, 2, 4, 6 and 7 hold the Linear layers: the checkpoint's keys are `layers.{0,2,4,6,7}.*`.
        self.layers = nn.Sequential(nn.Linear(dim, w1), nn.Dropout(0.2), nn.Linear(w1, w2), nn.Dropout(0.2),
                                    nn.Linear(w2, w3), nn.Dropout(0.1), nn.Linear(w3, w4), nn.Linear(w4, 1))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """One score per L2-normalized image embedding (about 1–10 for the released head)."""
        return self.layers(embeddings).squeeze(-1)


def load_laion_head(path: Path, dim: int) -> LaionAestheticHead:
    """A `sac+logos+ava1-l14-linearMSE.pth`-layout state dict as a head for `dim`-wide embeddings; every stray,
    missing or misshapen key is an AestheticError that names it, all of them at once."""
    try:
        # weights_only: a plain state dict needs no pickled code, and a hostile file cannot run any.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several unrelated types for files that are not tensor pickles
        raise AestheticError(f"{path} is not a readable PyTorch state dict: {error}") from None
    if not isinstance(state, Mapping) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise AestheticError(f"{path} is not a plain state dict of tensors, as sac+logos+ava1-l14-linearMSE.pth is")
    head = LaionAestheticHead(dim)
    expected = head.state_dict()
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    wrong = sorted(f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})"
                   for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if unexpected or missing or wrong:
        problems = [f"{title}: {', '.join(names)}" for title, names in
                    (("unexpected keys", unexpected), ("missing keys", missing), ("wrong shapes", wrong)) if names]
        raise AestheticError(f"{path} is not a LAION aesthetic head for {dim}-wide embeddings; "
                             + "; ".join(problems))
    head.load_state_dict(state)
    return head.eval()


def _check_pairs(prompts: Sequence[str], images: Sequence[Image.Image]) -> None:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise AestheticError("prompts must be a list of strings, one per image")
    if len(prompts) != len(images):
        raise AestheticError(f"{len(prompts)} prompts for {len(images)} images; give one prompt per image")
    if bad := [i for i, prompt in enumerate(prompts) if not isinstance(prompt, str)]:
        raise AestheticError(f"prompts at positions {bad} are not strings")


def _embedder_settings(settings: Mapping[str, Any], what: str) -> EmbedderSettings:
    if "embedder" not in settings:
        raise AestheticError(f"{what} settings need an `embedder` (model and pretrained)")
    return EmbedderSettings.from_settings(settings["embedder"])


@dataclass(frozen=True)
class LaionAestheticSettings:
    """The CLIP that embeds images and the head that scores the embeddings."""

    embedder: EmbedderSettings
    head: str  # "tiny", a .pth state dict (relative paths are under the data home) or hf://owner/repo/file
    name: str = "LAION aesthetic"

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> LaionAestheticSettings:
        """Validated settings; unknown keys are refused by name."""
        refuse_unknown(settings, cls, "LAION aesthetic", AestheticError)
        head, name = settings.get("head"), settings.get("name", cls.name)
        if not isinstance(head, str) or not head.strip():
            raise AestheticError(f"LAION aesthetic settings need a `head`: tiny, a path or hf://owner/repo/file; "
                                 f"got {head!r}")
        if not isinstance(name, str) or not name.strip():
            raise AestheticError(f"name must be a non-empty string, got {name!r}")
        return cls(_embedder_settings(settings, "LAION aesthetic"), head, name)


@dataclass(frozen=True)
class ClipScoreSettings:
    """The CLIP that embeds prompts and images, and the text put before each prompt."""

    embedder: EmbedderSettings
    prefix: str = CLIP_SCORE_PREFIX  # prepended verbatim; "" scores the bare prompt
    name: str = "CLIP score"

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> ClipScoreSettings:
        """Validated settings; unknown keys are refused by name."""
        refuse_unknown(settings, cls, "CLIP score", AestheticError)
        prefix, name = settings.get("prefix", cls.prefix), settings.get("name", cls.name)
        if not isinstance(prefix, str):
            raise AestheticError(f"prefix must be a string, got {prefix!r}")
        if not isinstance(name, str) or not name.strip():
            raise AestheticError(f"name must be a non-empty string, got {name!r}")
        return cls(_embedder_settings(settings, "CLIP score"), prefix, name)


class LaionAesthetic:
    """LAION aesthetic v2 as a scorer: the head on the L2-normalized CLIP image embedding, on its own ~1–10 scale."""

    aspects = ("aesthetic",)
    untrained_aspects: tuple[str, ...] = ()

    def __init__(self, settings: Mapping[str, Any], *, device: str, dtype: str, home: Path) -> None:
        self.settings = s = LaionAestheticSettings.from_settings(settings)
        self.name = s.name
        self.embedder = shared_embedder(asdict(s.embedder), device=device, dtype=dtype, home=home)
        path = (write_tiny_laion_head(Path(home) / "tiny", self.embedder.dim) if s.head == "tiny"
                else resolve_file(s.head, Path(home)))
        if not path.is_file():
            raise AestheticError(f"no LAION aesthetic head at {path}")
        # The head stays on the CPU in float32: a 1M-parameter MLP on a few rows costs microseconds there, and the
        # embeddings arrive on the CPU anyway.
        self.head = load_laion_head(path, self.embedder.dim)

    def score(self, prompts: Sequence[str], images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        """One aesthetic score per image."""
        _check_pairs(prompts, images)
        # The predictor reads the image alone: prompts are taken only so that every scorer has the same call.
        embeddings = torch.from_numpy(self.embedder.embed_images(images))
        with torch.inference_mode():
            return {"aesthetic": self.head(embeddings).numpy().astype(np.float32)}


class ClipScore:
    """CLIPScore (Hessel et al. 2021) as a prompt-following scorer: 2.5 · max(cos(prefix + prompt, image), 0).

    The paper used CLIP ViT-B/32; the profiles share ViT-L/14 with the LAION head, so values are not the paper's."""

    aspects = ("prompt_following",)
    untrained_aspects: tuple[str, ...] = ()

    def __init__(self, settings: Mapping[str, Any], *, device: str, dtype: str, home: Path) -> None:
        self.settings = s = ClipScoreSettings.from_settings(settings)
        self.name = s.name
        self.embedder = shared_embedder(asdict(s.embedder), device=device, dtype=dtype, home=home)

    def score(self, prompts: Sequence[str], images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        """One score in [0, 2.5] per (prompt, image) pair."""
        _check_pairs(prompts, images)
        texts = self.embedder.embed_texts([self.settings.prefix + prompt for prompt in prompts])
        cosine = np.sum(texts * self.embedder.embed_images(images), axis=1)
        return {"prompt_following": (CLIP_SCORE_WEIGHT * np.maximum(cosine, 0.0)).astype(np.float32)}


# Low-level features, each squashed to [0, 1] on fixed scales so that scores compare across images and galleries.
LOW_LEVEL_SIDE = 256  # features are measured at this longer side: cheap, and blind to the file's resolution
COLORFULNESS_SCALE = 100.0  # Hasler & Süsstrunk: ~59 is "highly", ~109 "extremely" colourful
SHARPNESS_SCALE = 300.0  # Laplacian variance of a grey image in 0–255: blurry below ~100, crisp above ~500
FEATURES = ("colorfulness", "sharpness", "exposure", "contrast", "saturation")


def low_level_features(image: Image.Image) -> dict[str, float]:
    """Colourfulness, sharpness, exposure, contrast and saturation of an image, each in [0, 1] on a fixed scale.

    Measured on an RGB copy shrunk to at most LOW_LEVEL_SIDE pixels on its longer side (never enlarged), with
    grey = 0.299 R + 0.587 G + 0.114 B in 0–255 and luminance = grey / 255:

    - colorfulness: Hasler & Süsstrunk (2003), sqrt(σ_rg² + σ_yb²) + 0.3 · sqrt(μ_rg² + μ_yb²) with rg = R − G and
      yb = (R + G) / 2 − B, divided by COLORFULNESS_SCALE and clipped at 1;
    - sharpness: 1 − exp(−v / SHARPNESS_SCALE), v the variance of the 4-neighbour Laplacian of grey;
    - exposure: 1 − 2 · |mean(luminance) − 0.5|, 1 at mid-grey and 0 all black or all white;
    - contrast: RMS contrast std(luminance), doubled (0.5 is its largest value) and clipped at 1;
    - saturation: mean HSV saturation (PIL's), over 255.
    """
    small = image.convert("RGB")
    small.thumbnail((LOW_LEVEL_SIDE, LOW_LEVEL_SIDE))
    rgb = np.asarray(small, dtype=np.float64)
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    rg, yb = red - green, 0.5 * (red + green) - blue
    colorfulness = np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())
    grey = 0.299 * red + 0.587 * green + 0.114 * blue
    # The 4-neighbour Laplacian over the interior: its variance is the usual focus measure.
    laplacian = (grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:] - 4 * grey[1:-1, 1:-1])
    sharpness = laplacian.var() if laplacian.size else 0.0
    luminance = grey / 255.0
    saturation = np.asarray(small.convert("HSV"), dtype=np.float64)[..., 1].mean() / 255.0
    return {"colorfulness": float(min(colorfulness / COLORFULNESS_SCALE, 1.0)),
            "sharpness": float(1.0 - np.exp(-sharpness / SHARPNESS_SCALE)),
            "exposure": float(1.0 - 2.0 * abs(luminance.mean() - 0.5)),
            "contrast": float(min(2.0 * luminance.std(), 1.0)),  # RMS contrast; 0.5 is the largest possible
            "saturation": float(saturation)}


@dataclass(frozen=True)
class LowLevelSettings:
    """How much each low-level feature weighs in the score."""

    weights: Mapping[str, float] = field(default_factory=lambda: dict.fromkeys(FEATURES, 1.0))  # unnamed: 0
    name: str = "Low-level features"

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> LowLevelSettings:
        """Validated settings; unknown keys (and unknown features) are refused by name."""
        refuse_unknown(settings, cls, "low-level", AestheticError)
        weights, name = settings.get("weights"), settings.get("name", cls.name)
        if weights is None:
            weights = cls().weights
        if not isinstance(weights, Mapping) or not weights:
            raise AestheticError(f"weights must be a mapping of feature to weight ({', '.join(FEATURES)}); "
                                 f"got {weights!r}")
        weights = dict(weights)
        refuse_unknown(weights, FEATURES, "low-level feature", AestheticError)
        if any(isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < float("inf")
               for w in weights.values()) or not sum(weights.values()) > 0:
            raise AestheticError(f"feature weights must be finite non-negative numbers, not all zero; got {weights}")
        if not isinstance(name, str) or not name.strip():
            raise AestheticError(f"name must be a non-empty string, got {name!r}")
        return cls(weights, name)


class LowLevelAesthetic:
    """The "low-level features" baseline that the aesthetic retrieval paper argues against: a weighted mean of
    colourfulness, sharpness, exposure, contrast and saturation in [0, 1]. It needs no weights, so it works offline."""

    aspects = ("aesthetic",)
    untrained_aspects: tuple[str, ...] = ()

    def __init__(self, settings: Mapping[str, Any], *, device: str, dtype: str, home: Path) -> None:
        self.settings = LowLevelSettings.from_settings(settings)
        self.name = self.settings.name

    def score(self, prompts: Sequence[str], images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        """One score in [0, 1] per image; the prompts play no part."""
        _check_pairs(prompts, images)
        weights = self.settings.weights
        total = sum(weights.values())
        scores = [sum(weights.get(k, 0.0) * v for k, v in low_level_features(image).items()) / total
                  for image in images]
        return {"aesthetic": np.asarray(scores, dtype=np.float32)}
