"""The gallery's vector index: exact below the limit, IVF with measured recall above it, saved and refused cleanly."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engines.vector_index import INDEX, IndexConfig, VectorIndex, VectorIndexError


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _clustered(n: int, dim: int = 32, clusters: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(clusters, dim)))
    return _unit(centres[rng.integers(0, clusters, n)] + rng.normal(scale=0.5 / np.sqrt(dim), size=(n, dim)))


def test_exact_search_is_a_sort_of_inner_products() -> None:
    data, queries = _clustered(300), _clustered(5, seed=1)
    index = VectorIndex.build(data)
    scores, ids = index.search(queries, 10)
    expected = np.argsort(-(queries @ data.T), axis=1, kind="stable")[:, :10]
    assert index.info.kind == "exact" and (ids == expected).all()
    assert np.allclose(scores, np.take_along_axis(queries @ data.T, expected, axis=1), atol=1e-5)


def test_above_the_limit_the_index_is_ivf_with_its_recall_measured() -> None:
    everything = _clustered(4100)
    data, queries = everything[:4000], everything[4000:]  # held-out points of the same topics
    config = IndexConfig(exact_limit=1000, probe_queries=100)
    index = VectorIndex.build(data, config)
    assert index.info.kind == "ivf" and index.info.recall_at_k >= config.target_recall
    assert 1 <= index.info.nprobe <= index.info.nlist
    # On queries it never saw, recall stays near what the build measured.
    truth = np.argsort(-(queries @ data.T), axis=1)[:, :10]
    found = index.search(queries, 10)[1]
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])
    assert recall >= config.target_recall - 0.05


def test_save_and_load_keep_results_and_probes(tmp_path: Path) -> None:
    data, queries = _clustered(3000), _clustered(20, seed=3)
    index = VectorIndex.build(data, IndexConfig(exact_limit=500, probe_queries=50))
    index.save(tmp_path / "vectors")
    loaded = VectorIndex.load(tmp_path / "vectors")
    assert loaded.info == index.info
    assert (loaded.search(queries, 10)[1] == index.search(queries, 10)[1]).all()


def test_k_beyond_the_gallery_returns_the_whole_gallery() -> None:
    scores, ids = VectorIndex.build(_clustered(7)).search(_clustered(1, seed=2), 50)
    assert ids.shape == (1, 7) and sorted(ids[0]) == list(range(7))


@pytest.mark.parametrize("embeddings, message", [(np.full((4, 8), np.nan, dtype=np.float32), "NaN"),
                                                 (np.zeros((0, 8), dtype=np.float32), "non-empty"),
                                                 (np.zeros(8, dtype=np.float32), "2-D")])
def test_bad_embeddings_are_refused(embeddings: np.ndarray, message: str) -> None:
    with pytest.raises(VectorIndexError, match=message):
        VectorIndex.build(embeddings)


def test_queries_of_another_width_are_refused() -> None:
    with pytest.raises(VectorIndexError, match="16-d but the index is 32-d"):
        VectorIndex.build(_clustered(10)).search(np.ones((1, 16), dtype=np.float32), 3)


def test_a_missing_or_corrupt_index_file_is_explained(tmp_path: Path) -> None:
    VectorIndex.build(_clustered(10)).save(tmp_path)
    (tmp_path / INDEX).write_bytes(b"not a faiss index")
    with pytest.raises(VectorIndexError, match="cannot read the vector index"):
        VectorIndex.load(tmp_path)
    with pytest.raises(VectorIndexError, match="cannot read the vector index"):
        VectorIndex.load(tmp_path / "absent")
