"""Inner-product search over unit-length embeddings with faiss: exact up to `exact_limit` rows, IVF above.

The approximate index is tuned when it is built: `nprobe` is the smallest power of two whose recall@k against
exact search, on probe queries drawn from the data, reaches `target_recall`; the measured recall is kept with
the index so a gallery can say how approximate it is.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

META = "index.json"
INDEX = "index.faiss"


class VectorIndexError(ValueError):
    """Embeddings or an index file that cannot be used; the message says why."""


@dataclass(frozen=True)
class IndexConfig:
    """When to go approximate, and how good the approximation must be."""

    exact_limit: int = 100_000  # exact search stays under ~20 ms a query up to here on 2 cores
    target_recall: float = 0.95
    recall_k: int = 10
    probe_queries: int = 256
    # Probe queries are data points with this much Gaussian noise (per unit vector), then renormalized: at 2 their
    # cosine to the point they came from is ~0.45, as a text query's is to its best image under CLIP, so the
    # probes are as hard as the queries the index will serve.
    probe_noise: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.exact_limit < 1 or not 0 < self.target_recall <= 1 or self.recall_k < 1 or self.probe_queries < 1:
            raise VectorIndexError(f"invalid index settings: {self}")


@dataclass(frozen=True)
class IndexInfo:
    """What was built: exact or IVF, its list count and probes, and the recall measured at build time."""

    kind: str  # "exact" or "ivf"
    count: int
    dim: int
    nlist: int = 0
    nprobe: int = 0
    recall_at_k: float = 1.0
    recall_k: int = 10


def _check(embeddings: np.ndarray) -> np.ndarray:
    if embeddings.ndim != 2 or embeddings.shape[0] == 0 or embeddings.shape[1] == 0:
        raise VectorIndexError(f"embeddings must be a non-empty 2-D array, got shape {embeddings.shape}")
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    if not np.isfinite(embeddings).all():
        raise VectorIndexError("embeddings contain NaN or infinite values")
    return embeddings


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(f[f >= 0]) & set(t)) for f, t in zip(found, truth))
    return hits / truth.size


class VectorIndex:
    """`VectorIndex.build(embeddings)`, then `search(queries, k)` → (scores, row ids), best first."""

    def __init__(self, index: faiss.Index, info: IndexInfo) -> None:
        self.index, self.info = index, info

    @classmethod
    def build(cls, embeddings: np.ndarray, config: IndexConfig = IndexConfig()) -> VectorIndex:
        """An exact index for a small gallery; an IVF index with measured recall for a large one."""
        data = _check(embeddings)
        count, dim = data.shape
        exact = faiss.IndexFlatIP(dim)
        exact.add(data)
        if count <= config.exact_limit:
            return cls(exact, IndexInfo("exact", count, dim, recall_k=config.recall_k))
        # faiss's rule of thumb: about 4·sqrt(n) lists, trained on at least 39 points per list.
        nlist = 1 << round(math.log2(4 * math.sqrt(count)))
        rng = np.random.default_rng(config.seed)
        train = data[rng.choice(count, size=min(count, 64 * nlist), replace=False)]
        quantizer = faiss.IndexFlatIP(dim)
        ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.seed = config.seed
        ivf.train(train)
        ivf.add(data)
        probes = data[rng.choice(count, size=config.probe_queries, replace=False)]
        probes = probes + rng.normal(scale=config.probe_noise / math.sqrt(dim), size=probes.shape)
        probes = (probes / np.linalg.norm(probes, axis=1, keepdims=True)).astype(np.float32)
        _, truth = exact.search(probes, config.recall_k)
        del exact
        nprobe, recall = 1, 0.0
        while True:
            ivf.nprobe = nprobe
            recall = _recall(ivf.search(probes, config.recall_k)[1], truth)
            if recall >= config.target_recall or nprobe >= nlist:
                break
            nprobe *= 2
        return cls(ivf, IndexInfo("ivf", count, dim, nlist, nprobe, round(recall, 4), config.recall_k))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Inner products and row ids of the k best rows per query (fewer, id -1, past the gallery's end)."""
        queries = _check(np.atleast_2d(queries))
        if queries.shape[1] != self.info.dim:
            raise VectorIndexError(f"queries are {queries.shape[1]}-d but the index is {self.info.dim}-d")
        return self.index.search(queries, min(k, self.info.count))

    def save(self, folder: Path) -> None:
        """Write the faiss index and what was measured about it into `folder`."""
        folder.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(folder / INDEX))
        (folder / META).write_text(json.dumps(asdict(self.info), indent=2))

    @classmethod
    def load(cls, folder: Path) -> VectorIndex:
        """Read what `save` wrote; the probe count found at build time is restored."""
        try:
            info = IndexInfo(**json.loads((folder / META).read_text()))
            index = faiss.read_index(str(folder / INDEX))
        except (OSError, ValueError, TypeError, RuntimeError) as error:
            raise VectorIndexError(f"cannot read the vector index in {folder}: {error}") from None
        if index.ntotal != info.count or index.d != info.dim:
            raise VectorIndexError(f"the vector index in {folder} holds {index.ntotal}×{index.d}, "
                              f"its description says {info.count}×{info.dim}")
        if info.kind == "ivf":
            faiss.extract_index_ivf(index).nprobe = info.nprobe
        return cls(index, info)
