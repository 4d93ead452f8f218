"""Gallery indexes: the images a ranker searches, embedded once with CLIP and stored with their aesthetic scores.

An index lives in `$AESARENA_HOME/indexes/NAME/`: `manifest.json` (the embedder that built it, what was skipped),
`items.parquet` (file, caption, thumbnail, LAION and low-level aesthetic scores), `embeddings.npy`, a faiss
index in `vectors/`, and a small JPEG thumbnail per image for the result rows. It is written into a scratch
folder and renamed into place, so a crash mid-way leaves the previous index, never half of one.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from engines.aesthetic import LowLevelAesthetic, load_laion_head
from engines.embedder import Embedder, EmbedderSettings, resolve_file
from engines.images import ImageRejected, load_image
from engines.tiny import write_tiny_laion_head
from engines.vector_index import IndexConfig, VectorIndex

MANIFEST = "manifest.json"
ITEMS = "items.parquet"
EMBEDDINGS = "embeddings.npy"
VECTORS = "vectors"
THUMBS = "thumbs"
THUMB_SIDE = 256
CAPTIONS = "gallery.csv"  # optional beside a folder's images: file,caption,…
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
BUNDLED = Path(__file__).resolve().parent.parent / "assets" / "gallery"


class GalleryError(ValueError):
    """A gallery that cannot be built or used; the message says what to do."""


@dataclass(frozen=True)
class Source:
    """One image to index: its name in the gallery, how to read it, and an optional caption."""

    name: str
    read: Callable[[], Any]  # bytes, a path or a PIL image, as `engines.images.load_image` takes
    caption: str = ""


@dataclass(frozen=True)
class Manifest:
    """What built the index and what it holds."""

    name: str
    embedder: dict[str, Any]
    dim: int
    count: int
    source: str
    laion_head: str | None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why)
    created_at: str = ""


def folder_sources(folder: Path) -> tuple[list[Source], list[tuple[str, str]]]:
    """Every file under `folder` as a source (sorted, so ids are stable), with `gallery.csv` captions; files that
    are plainly not images are listed as skipped straight away."""
    if not folder.is_dir():
        raise GalleryError(f"{folder} is not a folder of images")
    captions: dict[str, str] = {}
    if (folder / CAPTIONS).is_file():
        with open(folder / CAPTIONS, newline="", encoding="utf-8") as handle:
            captions = {row["file"]: row.get("caption") or "" for row in csv.DictReader(handle) if row.get("file")}
    sources, skipped = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CAPTIONS):
        name = path.relative_to(folder).as_posix()
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append((name, f"not an image file ({path.suffix or 'no extension'})"))
            continue
        sources.append(Source(name, lambda path=path: path, captions.get(name, "")))
    return sources, skipped


def dataset_sources(dataset: str, split: str, image_column: str, caption_column: str | None) -> list[Source]:
    """The rows of a Hugging Face dataset with an image column (decoded lazily, row by row)."""
    from datasets import load_dataset

    rows = load_dataset(dataset, split=split)
    if image_column not in rows.column_names:
        raise GalleryError(f"{dataset} has no column {image_column!r}; its columns: {', '.join(rows.column_names)}")
    captions = rows[caption_column] if caption_column else [""] * len(rows)
    return [Source(f"{dataset}/{split}/{i}", lambda i=i: rows[i][image_column], str(captions[i] or ""))
            for i in range(len(rows))]


@dataclass(frozen=True)
class _Prepared:
    """One readable image, ready for the embedder: pixels, low-level score and thumbnail."""

    source: Source
    pixels: torch.Tensor
    low_level: float
    thumb: Image.Image


def _prepared_batches(sources: Iterable[Source], size: int, embedder: Embedder, low_level: LowLevelAesthetic,
                      skipped: list[tuple[str, str]]) -> Iterator[list[_Prepared]]:
    """Batches of decoded, preprocessed images; unreadable ones are listed in `skipped` and left out."""
    batch: list[_Prepared] = []
    for source in sources:
        try:
            image = load_image(source.read())
        except (ImageRejected, OSError) as error:  # a bad file is listed and indexing goes on
            skipped.append((source.name, str(error)))
            continue
        thumb = image.copy()
        thumb.thumbnail((THUMB_SIDE, THUMB_SIDE))
        [low] = low_level.score([""], [image])["aesthetic"]
        batch.append(_Prepared(source, embedder.preprocess(image), float(low), thumb))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def build(sources: list[Source], *, name: str, home: Path, embedder: Embedder, laion_head: str | None,
          source: str, skipped: list[tuple[str, str]] | None = None, config: IndexConfig = IndexConfig()) -> Manifest:
    """Embed, score and thumbnail every readable source, index the embeddings, and put the index in place."""
    skipped = list(skipped or [])
    head = None
    if laion_head:
        path = (write_tiny_laion_head(home / "tiny", embedder.dim) if laion_head == "tiny"
                else resolve_file(laion_head, home))
        head = load_laion_head(path, embedder.dim)
    low_level = LowLevelAesthetic({}, device="cpu", dtype="float32", home=home)
    root = home / "indexes"
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        (scratch / THUMBS).mkdir()
        rows, parts = [], []
        batches = _prepared_batches(sources, embedder.settings.batch_size, embedder, low_level, skipped)
        # tqdm is what a terminal shows and what gr.Progress(track_tqdm=True) turns into the tab's bar.
        with tqdm(total=len(sources), desc=f"indexing {name}", unit="image") as bar, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="gallery-loader",
                                   initializer=torch.set_num_threads, initargs=(1,)) as loader:
            # Decoding and preprocessing the next batch overlaps the image tower's work on this one. The loader
            # keeps to one torch thread (the setting is per thread): a second OpenMP team would fight the tower's.
            pending = loader.submit(next, batches, None)
            while (batch := pending.result()) is not None:
                pending = loader.submit(next, batches, None)
                vectors = embedder.embed_pixels(torch.stack([item.pixels for item in batch]))
                laion = np.full(len(batch), np.nan, dtype=np.float32)
                if head is not None:
                    with torch.inference_mode():
                        laion = head(torch.from_numpy(vectors)).numpy().astype(np.float32)
                for item, laion_score in zip(batch, laion):
                    thumb = f"{THUMBS}/{len(rows):06d}.jpg"
                    item.thumb.save(scratch / thumb, "JPEG", quality=85)
                    rows.append({"file": item.source.name, "caption": item.source.caption, "thumb": thumb,
                                 "laion": float(laion_score), "low_level": item.low_level})
                parts.append(vectors)
                bar.update(len(batch))
            bar.update(len(sources) - bar.n)  # skipped files count as done
        if not rows:
            raise GalleryError(f"no readable images to index in {source} ({len(skipped)} skipped)")
        embeddings = np.concatenate(parts)
        pd.DataFrame(rows).to_parquet(scratch / ITEMS, index=False)
        np.save(scratch / EMBEDDINGS, embeddings)
        VectorIndex.build(embeddings, config).save(scratch / VECTORS)
        manifest = Manifest(name, asdict(embedder.settings), embedder.dim, len(rows), source, laion_head, skipped,
                            datetime.now(timezone.utc).isoformat(timespec="seconds"))
        (scratch / MANIFEST).write_text(json.dumps(asdict(manifest), indent=2))
        _swap_into_place(scratch, root / name)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return manifest


def _swap_into_place(scratch: Path, target: Path) -> None:
    """Replace `target` with `scratch`; a reader sees the old index or the new one, each whole."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(scratch, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(scratch, target)


@dataclass
class Gallery:
    """An index opened for search: item table, embeddings and faiss index, checked against the embedder."""

    folder: Path
    manifest: Manifest
    items: pd.DataFrame
    vectors: VectorIndex

    @classmethod
    def open(cls, home: Path, name: str, embedder: EmbedderSettings) -> Gallery:
        """The index NAME, refused if another embedder built it (its vectors would be in another space)."""
        folder = home / "indexes" / name
        if not (folder / MANIFEST).is_file():
            raise GalleryError(f"there is no gallery index {name!r} under {home / 'indexes'}; build it with "
                               f"`python -m engines.retrieval index --images DIR --name {name}`")
        raw = json.loads((folder / MANIFEST).read_text())
        manifest = Manifest(**{**raw, "skipped": [tuple(s) for s in raw.get("skipped", [])]})
        built = EmbedderSettings.from_settings(manifest.embedder)
        # The batch size changes nothing in the vectors; the architecture and weights do.
        if (built.model, built.pretrained) != (embedder.model, embedder.pretrained):
            raise GalleryError(f"the gallery {name!r} was built with {built.model} / {built.pretrained}, but this "
                               f"ranker embeds with {embedder.model} / {embedder.pretrained}; rebuild the index "
                               "with this embedder")
        return cls(folder, manifest, pd.read_parquet(folder / ITEMS), VectorIndex.load(folder / VECTORS))


_bundled_guard = threading.Lock()


def ensure_bundled(home: Path, name: str, embedder: Embedder, laion_head: str | None) -> None:
    """Index the bundled gallery the first time a ranker asks for it by name."""
    with _bundled_guard:  # two rankers starting together build it once
        if (home / "indexes" / name / MANIFEST).is_file():
            return
        sources, skipped = folder_sources(BUNDLED)
        build(sources, name=name, home=home, embedder=embedder, laion_head=laion_head, source=str(BUNDLED),
              skipped=skipped)

