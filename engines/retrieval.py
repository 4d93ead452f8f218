"""Rankers for aesthetic retrieval (arXiv 2406.09397): CLIP search, optionally after an LLM rephrases the query,
optionally re-ranked by aesthetics. Also the command that builds gallery indexes.

A ranker fetches the top `rerank_k` images by cosine similarity, then (for the +aesthetic and low-level methods)
orders them by (1 − w)·semantic + w·aesthetic, each min–max normalized over those candidates, as the paper
re-ranks its top-K. `w` is the system's `aesthetic_weight`.

    python -m engines.retrieval index --images assets/gallery --name gallery --profile tiny
    python -m engines.retrieval index --dataset owner/name --split train --name mine --profile cpu
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines.embedder import EmbedderError, EmbedderSettings, shared_embedder
from engines.gallery import (GalleryError, Gallery, build, dataset_sources, ensure_bundled, folder_sources)
from engines.rephrase import Rephraser, RephraseError
from engines.settings import refuse_unknown

METHODS = ("clip", "clip+aesthetic", "rephrase", "rephrase+aesthetic", "low-level")
BUNDLED_INDEX = "gallery"
MAX_K = 50


class RetrievalError(ValueError):
    """A search or setting the ranker refuses; the message is meant for the person who sent it."""


@dataclass(frozen=True)
class RankerSettings:
    """One ranker: its method, the CLIP it searches with, the gallery, and how much aesthetics weigh."""

    method: str
    embedder: EmbedderSettings
    index: str = BUNDLED_INDEX
    laion_head: str | None = None  # scores the bundled gallery when it is indexed on first use
    aesthetic_weight: float = 0.5
    rerank_k: int = 50
    rephraser: Mapping[str, Any] | None = None  # Rephraser settings, for the rephrase methods

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise RetrievalError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if isinstance(self.aesthetic_weight, bool) or not isinstance(self.aesthetic_weight, (int, float)) or not (
                0 <= self.aesthetic_weight <= 1):
            raise RetrievalError(f"aesthetic_weight must be between 0 and 1, got {self.aesthetic_weight!r}")
        if isinstance(self.rerank_k, bool) or not isinstance(self.rerank_k, int) or not MAX_K <= self.rerank_k <= 1000:
            raise RetrievalError(f"rerank_k must be a whole number from {MAX_K} to 1000, got {self.rerank_k!r}")
        if self.method.startswith("rephrase") and not self.rephraser:
            raise RetrievalError(f"the {self.method} method needs rephraser settings")

    @property
    def reranks(self) -> bool:
        """Whether candidates are re-ordered after the CLIP search."""
        return self.method.endswith("+aesthetic") or self.method == "low-level"

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> RankerSettings:
        """Validated settings; unknown keys are refused by name."""
        refuse_unknown(settings, cls, "ranker", RetrievalError)
        raw = dict(settings)
        if "method" not in raw or "embedder" not in raw:
            raise RetrievalError("ranker settings need a method and an embedder")
        try:
            raw["embedder"] = EmbedderSettings.from_settings(raw["embedder"])
        except EmbedderError as error:
            raise RetrievalError(str(error)) from None
        return cls(**raw)


@dataclass(frozen=True)
class Hit:
    """One result: the gallery row, its thumbnail, and the scores that placed it."""

    row: int
    file: str
    caption: str
    thumb: Path
    semantic: float
    aesthetic: float | None
    score: float


@dataclass(frozen=True)
class Ranking:
    """A ranked row of results, with the text that was actually searched and any note about it."""

    query: str
    searched_with: str
    method: str
    hits: tuple[Hit, ...]
    note: str = ""

    def to_json(self) -> bytes:
        """The ranking as stored with a comparison: the query, the searched text, and the ranked files."""
        return json.dumps({"query": self.query, "searched_with": self.searched_with, "method": self.method,
                           "items": [{"file": h.file, "semantic": round(h.semantic, 6), "score": round(h.score, 6),
                                      "aesthetic": None if h.aesthetic is None else round(h.aesthetic, 6)}
                                     for h in self.hits]}, sort_keys=True).encode()


def _minmax(values: np.ndarray) -> np.ndarray:
    spread = float(values.max() - values.min())
    return (values - values.min()) / spread if spread > 0 else np.zeros_like(values)


def rerank(semantic: np.ndarray, aesthetic: np.ndarray, weight: float) -> tuple[np.ndarray, np.ndarray]:
    """Order of the candidates by (1 − w)·minmax(semantic) + w·minmax(aesthetic), best first, and those scores;
    equal scores keep the semantic order."""
    combined = (1 - weight) * _minmax(semantic) + weight * _minmax(aesthetic)
    order = np.lexsort((-semantic, -combined))  # the last key sorts first
    return order, combined


_rephrasers: weakref.WeakValueDictionary[tuple[Any, ...], Rephraser] = weakref.WeakValueDictionary()
_rephrasers_guard = threading.Lock()


def _shared_rephraser(settings: Mapping[str, Any], device: str, dtype: str, home: Path) -> Rephraser:
    """One rephrasing model for every ranker that names the same settings (rephrase and rephrase+aesthetic)."""
    key = (json.dumps(dict(settings), sort_keys=True), device, dtype, home.resolve())
    with _rephrasers_guard:
        rephraser = _rephrasers.get(key)
        if rephraser is None:
            rephraser = _rephrasers[key] = Rephraser(settings, device=device, dtype=dtype, home=home)
        return rephraser


class Ranker:
    """`Ranker(settings, device=…, dtype=…, home=…)`: `search(query, k)` gives a `Ranking` of the gallery."""

    def __init__(self, settings: Mapping[str, Any], *, device: str, dtype: str, home: Path) -> None:
        self.settings = s = RankerSettings.from_settings(settings)
        home = Path(home)
        self.embedder = shared_embedder(asdict(s.embedder), device=device, dtype=dtype, home=home)
        if s.index == BUNDLED_INDEX:
            ensure_bundled(home, s.index, self.embedder, s.laion_head)
        try:
            self.gallery = Gallery.open(home, s.index, s.embedder)
        except GalleryError as error:
            raise RetrievalError(str(error)) from None
        self.aesthetic: np.ndarray | None = None
        if s.reranks:
            column = "low_level" if s.method == "low-level" else "laion"
            self.aesthetic = self.gallery.items[column].to_numpy(dtype=np.float32)
            if np.isnan(self.aesthetic).any():
                raise RetrievalError(f"the gallery {s.index!r} was indexed without a LAION aesthetic head, so "
                                     f"{s.method} cannot re-rank it; rebuild it with --head")
        self.rephraser = (_shared_rephraser(s.rephraser, device, dtype, home) if s.method.startswith("rephrase")
                          else None)

    def search(self, query: str, k: int = 10) -> Ranking:
        """The k best images for the query, by this ranker's method."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise RetrievalError(f"top-k must be a whole number from 1 to {MAX_K}, got {k!r}")
        try:
            self.embedder.check_text(query)
        except EmbedderError as error:
            raise RetrievalError(str(error)) from None
        text, note = query.strip(), ""
        if self.rephraser is not None:
            try:
                rephrased = self.rephraser.rephrase(text)
            except RephraseError as error:
                raise RetrievalError(str(error)) from None
            text, note = rephrased.text, rephrased.note
            try:
                self.embedder.check_text(text)
            except EmbedderError:  # the visitor's query fits, so cutting the model's long rewrite is fair
                note = "; ".join(filter(None, (note, "the rephrasing was longer than CLIP reads, so its end was cut")))
        vector = self.embedder.embed_texts([text])
        fetch = self.settings.rerank_k if self.settings.reranks else k
        semantic, rows = (a[0] for a in self.gallery.vectors.search(vector, fetch))
        keep = rows >= 0
        semantic, rows = semantic[keep], rows[keep]
        aesthetic = None
        if self.aesthetic is not None:
            aesthetic = self.aesthetic[rows]
            order, score = rerank(semantic, aesthetic, self.settings.aesthetic_weight)
        else:
            order, score = np.arange(len(rows)), semantic
        items = self.gallery.items
        hits = tuple(Hit(int(rows[i]), str(items.at[rows[i], "file"]), str(items.at[rows[i], "caption"]),
                         self.gallery.folder / str(items.at[rows[i], "thumb"]), float(semantic[i]),
                         None if aesthetic is None else float(aesthetic[i]), float(score[i]))
                     for i in order[:k])
        return Ranking(query.strip(), text, self.settings.method, hits, note)


def _embedder_settings(args: argparse.Namespace) -> tuple[dict[str, Any], str | None]:
    """The embedder (and LAION head) named on the command line, or else by the profile's first ranker."""
    if args.model:
        return {"model": args.model, "pretrained": args.pretrained}, args.head
    from engines.registry import load_profile

    profile = load_profile(args.profile)
    for spec in profile.systems.get("retrieval", ()):
        return spec.settings["embedder"], args.head or spec.settings.get("laion_head")
    raise RetrievalError(f"the {profile.name} profile has no retrieval systems; name --model and --pretrained")


def main(argv: Sequence[str] | None = None) -> int:
    """`index`: embed a folder or a Hub dataset into a named gallery index."""
    parser = argparse.ArgumentParser(prog="python -m engines.retrieval", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    index = commands.add_parser("index", help="build a gallery index (replacing one of the same name)")
    where = index.add_mutually_exclusive_group(required=True)
    where.add_argument("--images", type=Path, help="a folder of images (gallery.csv beside them adds captions)")
    where.add_argument("--dataset", help="a Hugging Face dataset id with an image column")
    index.add_argument("--split", default="train")
    index.add_argument("--image-column", default="image")
    index.add_argument("--caption-column")
    index.add_argument("--name", required=True)
    index.add_argument("--home", type=Path, default=Path("data"))
    index.add_argument("--profile", default="tiny", help="take the embedder and head from this profile's rankers")
    index.add_argument("--model", help="an open_clip architecture (overrides the profile)")
    index.add_argument("--pretrained", help="its weights: a tag, a checkpoint, hf://… or tiny")
    index.add_argument("--head", help="a LAION aesthetic head for the aesthetic scores (or tiny)")
    index.add_argument("--device", default="cpu")
    index.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    try:
        embedder_settings, head = _embedder_settings(args)
        embedder = shared_embedder(embedder_settings, device=args.device, dtype=args.dtype, home=args.home)
        if args.images:
            sources, skipped = folder_sources(args.images)
            origin = str(args.images)
        else:
            sources, skipped = dataset_sources(args.dataset, args.split, args.image_column, args.caption_column), []
            origin = f"{args.dataset}:{args.split}"
        manifest = build(sources, name=args.name, home=args.home, embedder=embedder, laion_head=head,
                         source=origin, skipped=skipped)
    except (RetrievalError, GalleryError, EmbedderError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"indexed {manifest.count} images into {args.home / 'indexes' / args.name}")
    for name, why in manifest.skipped:
        print(f"skipped {name}: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
