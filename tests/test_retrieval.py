"""Gallery indexing and the rankers, on a small folder of synthetic images with the tiny CLIP and LAION head."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from engines.embedder import EmbedderSettings
from engines.gallery import EMBEDDINGS, ITEMS, MANIFEST, Gallery, GalleryError
from engines.retrieval import Ranker, RetrievalError, main, rerank
from tests.test_images import png_claiming

CLIP = {"model": "aesarena-tiny-clip", "pretrained": "tiny"}
COLOURS = {"red.png": (220, 30, 30), "green.png": (30, 200, 60), "blue.jpg": (40, 60, 220),
           "grey.png": (128, 128, 128), "white.png": (250, 250, 250), "sunset.jpg": (250, 140, 40)}


def _noisy(colour: tuple[int, int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.normal(0, 25, (48, 64, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gallery")
    for i, (name, colour) in enumerate(COLOURS.items()):
        _noisy(colour, i).save(root / name)
    (root / "gallery.csv").write_text("file,caption\nred.png,a red square\nsunset.jpg,an orange sunset\n")
    (root / "notes.txt").write_text("not an image")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is no jpeg")
    (root / "bomb.png").write_bytes(png_claiming(30_000, 30_000))
    return root


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, folder: Path) -> Path:
    home = tmp_path_factory.mktemp("home")
    assert main(["index", "--images", str(folder), "--name", "test", "--home", str(home), "--profile", "tiny"]) == 0
    return home


def _ranker(home: Path, method: str, **extra) -> Ranker:
    settings = {"method": method, "embedder": CLIP, "index": "test", **extra}
    return Ranker(settings, device="cpu", dtype="float32", home=home)


def test_index_skips_bad_files_and_lists_why(home: Path, capsys: pytest.CaptureFixture) -> None:
    manifest = json.loads((home / "indexes" / "test" / MANIFEST).read_text())
    skipped = dict(manifest["skipped"])
    assert set(skipped) == {"notes.txt", "broken.jpg", "bomb.png"}
    assert "not an image" in skipped["notes.txt"] and "pixels" in skipped["bomb.png"]
    items = pd.read_parquet(home / "indexes" / "test" / ITEMS)
    assert sorted(items["file"]) == sorted(COLOURS) and manifest["count"] == len(COLOURS)
    assert items.set_index("file").at["red.png", "caption"] == "a red square"
    assert items["laion"].notna().all() and items["low_level"].between(0, 1).all()
    assert all((home / "indexes" / "test" / thumb).is_file() for thumb in items["thumb"])


def _by_hand(home: Path, ranker: Ranker, text: str) -> np.ndarray:
    embeddings = np.load(home / "indexes" / "test" / EMBEDDINGS)
    return embeddings @ ranker.embedder.embed_texts([text])[0]


def test_clip_ranks_by_cosine(home: Path) -> None:
    ranker = _ranker(home, "clip")
    ranking = ranker.search("a red square", k=4)
    cosine = _by_hand(home, ranker, "a red square")
    assert [h.row for h in ranking.hits] == list(np.argsort(-cosine, kind="stable")[:4])
    assert [h.semantic for h in ranking.hits] == pytest.approx(sorted(cosine, reverse=True)[:4], abs=1e-5)
    assert ranking.searched_with == "a red square" and ranking.note == ""


@pytest.mark.parametrize("method, column", [("clip+aesthetic", "laion"), ("low-level", "low_level")])
def test_aesthetic_rerank_matches_the_hand_computed_order(home: Path, method: str, column: str) -> None:
    ranker = _ranker(home, method, aesthetic_weight=0.7)
    ranking = ranker.search("an orange sunset", k=5)
    cosine = _by_hand(home, ranker, "an orange sunset")
    aesthetic = pd.read_parquet(home / "indexes" / "test" / ITEMS)[column].to_numpy()
    # The whole gallery is within the re-ranked top 50: min-max both over all six images, then mix 0.3 / 0.7.
    mixed = 0.3 * (cosine - cosine.min()) / np.ptp(cosine) + 0.7 * (aesthetic - aesthetic.min()) / np.ptp(aesthetic)
    assert [h.row for h in ranking.hits] == list(np.argsort(-mixed, kind="stable")[:5])
    assert [h.aesthetic for h in ranking.hits] == pytest.approx(list(aesthetic[[h.row for h in ranking.hits]]))


def test_rerank_mixes_normalized_scores_and_breaks_ties_by_semantics() -> None:
    order, mixed = rerank(np.array([0.9, 0.8, 0.7]), np.array([1.0, 5.0, 3.0]), 0.5)
    assert list(order) == [1, 0, 2] and list(mixed) == pytest.approx([0.5, 0.75, 0.25])
    assert list(rerank(np.array([0.5, 0.9]), np.array([1.0, 0.0]), 0.5)[0]) == [1, 0]  # 0.5 each: semantic wins
    assert list(rerank(np.array([0.2, 0.9, 0.5]), np.array([3.0, 3.0, 3.0]), 1.0)[0]) == [1, 2, 0]  # flat: semantic


def test_rephrase_ranker_searches_with_the_rephrased_query(home: Path) -> None:
    ranker = _ranker(home, "rephrase", rephraser={"model": "tiny", "variant": "detail"})
    ranking = ranker.search("a red square", k=3)
    rephrased = ranker.rephraser.rephrase("a red square")
    assert ranking.searched_with == rephrased.text and ranking.note == rephrased.note
    cosine = _by_hand(home, ranker, rephrased.text)
    assert [h.row for h in ranking.hits] == list(np.argsort(-cosine, kind="stable")[:3])


@pytest.mark.parametrize("query, message", [("", "empty"), ("   ", "empty"), ("red " * 200, "77 tokens")])
def test_bad_queries_are_refused(home: Path, query: str, message: str) -> None:
    with pytest.raises(RetrievalError, match=message):
        _ranker(home, "clip").search(query)


def test_bad_top_k_is_refused(home: Path) -> None:
    with pytest.raises(RetrievalError, match="top-k"):
        _ranker(home, "clip").search("red", k=0)


def test_a_missing_index_is_explained(tmp_path: Path) -> None:
    with pytest.raises(RetrievalError, match="python -m engines.retrieval index"):
        Ranker({"method": "clip", "embedder": CLIP, "index": "nowhere"}, device="cpu", dtype="float32",
               home=tmp_path)


def test_an_index_of_another_embedder_is_refused(home: Path) -> None:
    other = EmbedderSettings(model="ViT-B-32-quickgelu", pretrained="openai")
    with pytest.raises(GalleryError, match="rebuild the index"):
        Gallery.open(home, "test", other)


@pytest.mark.parametrize("settings, message", [
    ({"method": "best"}, "method must be one of"),
    ({"method": "clip+aesthetic", "aesthetic_weight": 2}, "aesthetic_weight"),
    ({"method": "rephrase"}, "needs rephraser settings"),
    ({"method": "clip", "colour": "red"}, "unknown ranker settings: colour"),
])
def test_ranker_settings_are_validated(home: Path, settings: dict, message: str) -> None:
    with pytest.raises(RetrievalError, match=message):
        Ranker({"embedder": CLIP, "index": "test", **settings}, device="cpu", dtype="float32", home=home)


def test_index_command_explains_a_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["index", "--images", str(tmp_path / "absent"), "--name", "x", "--home", str(tmp_path)]) == 2
    assert "is not a folder of images" in capsys.readouterr().err
