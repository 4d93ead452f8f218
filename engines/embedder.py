"""open_clip image and text embeddings: batched, L2-normalized, through `create_model_and_transforms`."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from PIL import Image

from engines.settings import refuse_unknown
from engines.tiny import TINY_OPEN_CLIP, write_tiny_open_clip


class EmbedderError(ValueError):
    """Embedder settings or inputs that cannot be used; the message says why."""


@dataclass(frozen=True)
class EmbedderSettings:
    """Which open_clip model: an architecture name and `pretrained` tag, a local checkpoint, or "tiny"."""

    model: str = "ViT-L-14"
    pretrained: str = "openai"
    batch_size: int = 16

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise EmbedderError(f"batch_size must be a positive integer, got {self.batch_size!r}")

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> EmbedderSettings:
        """Validated settings; unknown keys are refused by name."""
        refuse_unknown(settings, cls, "embedder", EmbedderError)
        return cls(**settings)


class Embedder:
    """`Embedder(settings, device=…, dtype=…, home=…)`; "tiny" is a random architecture registered with open_clip."""

    def __init__(self, settings: Mapping[str, Any], *, device: str, dtype: str, home: Path) -> None:
        self.settings = EmbedderSettings.from_settings(settings)
        name, pretrained = self.settings.model, self.settings.pretrained
        if pretrained == "tiny":
            name = TINY_OPEN_CLIP
            pretrained = str(write_tiny_open_clip(Path(home) / "tiny") / "open_clip_model.safetensors")
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained,
                                                                              device=device)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(name)
        self.device = torch.device(device)
        # Half precision only where it is fast and safe: on CUDA, under autocast; CPU stays float32.
        self.autocast = self.device.type == "cuda" and dtype in ("float16", "bfloat16")
        self.dtype = getattr(torch, dtype)

    @property
    def dim(self) -> int:
        """The width of the joint embedding space."""
        return int(self.model.visual.output_dim)

    def _batched(self, items: Sequence[Any], encode) -> np.ndarray:
        parts = []
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.dtype, enabled=self.autocast):
            for start in range(0, len(items), self.settings.batch_size):
                features = encode(items[start:start + self.settings.batch_size]).float()
                parts.append(torch.nn.functional.normalize(features, dim=-1).cpu().numpy())
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), dtype=np.float32)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Unit-length image embeddings, one row per image."""
        return self._batched(images, lambda batch: self.model.encode_image(
            torch.stack([self.preprocess(image) for image in batch]).to(self.device)))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length text embeddings, one row per text (open_clip's tokenizer truncates at its context)."""
        return self._batched(list(texts), lambda batch: self.model.encode_text(self.tokenizer(batch).to(self.device)))
