"""Benchmark: query latency of the gallery's vector index against brute-force exact search, at 10k, 100k and 1M
synthetic 768-d CLIP-like embeddings, and the recall@10 of the approximate index on queries it never saw.

The data imitates CLIP: unit vectors around 20k topics (more than the index has lists), so nearest-neighbour
cosines sit near 0.8 and random pairs near 0; queries imitate text embeddings, whose best match scores only
~0.3–0.5.
One query per call, k = 50 (the rankers fetch the top 50 to re-rank them), as the Search tab asks.

    python bench/retrieval.py [--sizes 10000 100000 1000000] [--queries 200]

Indexing throughput against a bare forward pass of the embedder is `bench/indexing.py`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

# Run as `python bench/retrieval.py`, the repository root is not on sys.path; add it so `engines` imports.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import machine  # noqa: E402
from engines.vector_index import IndexConfig, VectorIndex  # noqa: E402

DIM = 768
FETCH_K = 50
RECALL_K = 10
TARGETS = {"exact_p50_ms_at_100k": 20.0, "approximate_p50_ms_at_1m": 10.0, "approximate_recall_at_10": 0.95}


@dataclass(frozen=True)
class BenchConfig:
    """Gallery sizes, query count and the synthetic data's shape."""

    sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000)
    queries: int = 200
    clusters: int = 20_000  # more topics than IVF lists, so lists and topics do not line up
    # Spread of points around their cluster centre, and of a text query around its topic, per unit vector.
    point_spread: float = 0.5
    query_spread: float = 2.0
    seed: int = 0
    chunk: int = 100_000  # rows generated at a time, so 1M rows never need two 3 GB temporaries


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def synthetic(bench: BenchConfig, size: int) -> tuple[np.ndarray, np.ndarray]:
    """CLIP-like gallery embeddings and text-like queries about the same topics."""
    rng = np.random.default_rng(bench.seed)
    centres = _unit(rng.normal(size=(bench.clusters, DIM)))
    gallery = np.empty((size, DIM), dtype=np.float32)
    for start in range(0, size, bench.chunk):
        n = min(bench.chunk, size - start)
        noise = rng.normal(scale=bench.point_spread / np.sqrt(DIM), size=(n, DIM))
        gallery[start:start + n] = _unit(centres[rng.integers(0, bench.clusters, n)] + noise)
    topics = centres[rng.integers(0, bench.clusters, bench.queries)]
    queries = _unit(topics + rng.normal(scale=bench.query_spread / np.sqrt(DIM), size=(bench.queries, DIM)))
    return gallery, queries


def _latencies(search: Any, queries: np.ndarray) -> list[float]:
    times = []
    for query in queries:
        start = time.perf_counter()
        search(query[None, :])
        times.append(time.perf_counter() - start)
    return times


def _summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {"p50_ms": round(1000 * statistics.median(ordered), 3),
            "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 3)}


def run_size(bench: BenchConfig, size: int) -> dict[str, Any]:
    """Exact brute force and our index on one gallery size, with the data's statistics beside them."""
    gallery, queries = synthetic(bench, size)
    exact = faiss.IndexFlatIP(DIM)
    exact.add(gallery)
    start = time.perf_counter()
    ours = VectorIndex.build(gallery, IndexConfig())
    build_s = time.perf_counter() - start
    truth_scores, truth = exact.search(queries, RECALL_K)
    found = ours.search(queries, RECALL_K)[1]
    recall = float(np.mean([len(set(f) & set(t)) / RECALL_K for f, t in zip(found, truth)]))
    sample = gallery[np.random.default_rng(bench.seed + 1).choice(size, 2000, replace=False)]
    neighbour = exact.search(sample[:200], 2)[0][:, 1]  # [:, 0] is the point itself
    result = {
        "size": size,
        "our_index": asdict(ours.info),
        "build_s": round(build_s, 2),
        "exact": _summary(_latencies(lambda q: exact.search(q, FETCH_K), queries)),
        "ours": _summary(_latencies(lambda q: ours.search(q, FETCH_K), queries)),
        "recall_at_10_vs_exact": round(recall, 4),
        "data": {"nearest_neighbour_cosine_median": round(float(np.median(neighbour)), 3),
                 "random_pair_cosine_median": round(float(np.median(np.sum(sample[:1000] * sample[1000:], 1))), 3),
                 "query_best_match_cosine_median": round(float(np.median(truth_scores[:, 0])), 3)},
    }
    return result


def run(bench: BenchConfig) -> dict[str, Any]:
    """Every size in turn, and whether the issue's targets hold."""
    results = [run_size(bench, size) for size in bench.sizes]
    by_size = {r["size"]: r for r in results}
    met = {}
    if 100_000 in by_size:
        met["exact_p50_le_20ms_at_100k"] = by_size[100_000]["ours"]["p50_ms"] <= TARGETS["exact_p50_ms_at_100k"]
    if 1_000_000 in by_size:
        big = by_size[1_000_000]
        met["approximate_p50_le_10ms_at_1m"] = big["ours"]["p50_ms"] <= TARGETS["approximate_p50_ms_at_1m"]
        met["approximate_recall_at_10_ge_0.95"] = big["recall_at_10_vs_exact"] >= TARGETS["approximate_recall_at_10"]
    return {"bench": "retrieval query latency", "config": asdict(bench), "fetch_k": FETCH_K,
            "machine": machine(faiss=faiss.__version__, faiss_threads=faiss.omp_get_max_threads()),
            "results": results, "targets": TARGETS, "targets_met": met}


def main() -> None:
    """Parse the options, run the benchmark, print its figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = BenchConfig()
    parser.add_argument("--sizes", type=int, nargs="+", default=list(defaults.sizes))
    parser.add_argument("--queries", type=int, default=defaults.queries)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args()
    print(json.dumps(run(BenchConfig(sizes=tuple(args.sizes), queries=args.queries, seed=args.seed)), indent=2))


if __name__ == "__main__":
    main()
