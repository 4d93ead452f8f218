"""Ranked-DPO alignment of a retrieval ranker (arXiv 2406.09397): fine-tune its CLIP text tower so that search
prefers what people, and the paper's partial order, prefer; register the result as a new ranker beside its parent.

Preferences come from two sources:
- votes: a retrieval vote prefers one ranked row to the other. At each rank where the two rows show different
  images, each shown in one row only, the winning row's image is preferred to the losing row's.
- grid: the paper's u×v partial order. Of the parent's top u·v·stride results for a query, every stride-th is
  kept; they fall, in semantic order, into u tiers of v, and inside a tier the v are ordered by aesthetic score.
  The image at (tier i, place j) is preferred to every (i', j') with i ≤ i' and j ≤ j': O((uv)²) pairs a query.

Loss: with s(q, x) = logit_scale·cos(q, x), the log-probability of image x among the gallery up to the query's
normalizer (which cancels within a pair), h = β·[(s_θ(w) − s_ref(w)) − (s_θ(l) − s_ref(l))] and label smoothing
ε: L = −(1 − ε)·log σ(h) − ε·log σ(−h), plus λ times CLIP's symmetric contrastive (NCE) loss on the gallery's own
captions, so that plain retrieval does not regress. The reference is the parent, frozen.

Only the text tower is tuned. The image tower, and with it every gallery index built with the parent, stays as it
is: the aligned ranker searches the same index with new query embeddings, so a million-image gallery is never
re-embedded. Guard: text-to-image recall@k of held-out captions (kept out of the NCE batches) is measured before
and after; a run whose recall falls by more than `recall_tolerance` keeps its weights but is not registered.

    python -m train.retrieval_dpo --home data --parent clip --out runs/aligned --steps 200
    accelerate launch --multi_gpu --num_processes 2 -m train.retrieval_dpo …
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from engines.embedder import text_tower_state
from engines.gallery import EMBEDDINGS
from engines.retrieval import Ranker, RankerSettings
from study.blobs import BlobStore
from study.db import default_url, make_engine
from study.tasks import TASK_ASPECTS
from study.votes import VoteService
from train.data import PairFilter, decided, preference_pairs, split_of
from train.judge import read_queries
from train.runs import StepTimer, checkpoint_path, data_hash, finished_at, latest_checkpoint, write_run_card

TASK = "retrieval"
SOURCES = ("votes", "grid")
TEXT_TOWER = "text_tower.safetensors"


@dataclass(frozen=True)
class RetrievalDPOConfig:
    """The parent ranker, the preference sources, and the Ranked-DPO, NCE and guard settings."""

    home: Path
    out: Path
    parent: str  # a retrieval system of the vote store
    name: str = ""  # the trained system's name; default: "<parent>+aligned"
    db: str | None = None
    sources: tuple[str, ...] = SOURCES
    queries: tuple[str, ...] = ()  # grid queries; default: the queries of the retrieval votes
    vote_aspect: str = "overall"  # which judgement of a vote ranks the rows: overall or one HPIR aspect
    tiers: int = 4  # u
    places: int = 4  # v
    stride: int = 2
    steps: int = 200
    batch_size: int = 8  # queries per step
    lr: float = 1e-5
    beta: float = 0.1
    label_smoothing: float = 0.1
    nce_weight: float = 0.5
    nce_batch: int = 32
    recall_k: int = 5
    recall_tolerance: float = 0.02
    holdout_share: float = 0.2  # gallery captions kept out of the NCE loss to measure recall on
    checkpoint_every: int = 50
    seed: int = 0
    filters: PairFilter = field(default_factory=PairFilter)
    export: Path | None = None  # a parquet file of `python -m study export` to take the pairs from

    def __post_init__(self) -> None:
        if not self.sources or set(self.sources) - set(SOURCES):
            raise ValueError(f"sources must be some of {', '.join(SOURCES)}, got {self.sources}")
        if self.vote_aspect != "overall" and self.vote_aspect not in TASK_ASPECTS[TASK]:
            raise ValueError(f"vote_aspect must be overall or one of {', '.join(TASK_ASPECTS[TASK])}")
        if min(self.tiers, self.places, self.stride, self.steps, self.batch_size, self.nce_batch, self.recall_k) < 1:
            raise ValueError(f"counts and sizes must be positive: {self}")
        if self.beta <= 0 or not 0 <= self.label_smoothing < 0.5 or self.nce_weight < 0 or self.recall_tolerance < 0:
            raise ValueError("beta must be positive, label_smoothing in [0, 0.5), nce_weight and recall_tolerance ≥ 0")
        if not 0 < self.holdout_share < 1:
            raise ValueError(f"holdout_share must be between 0 and 1, got {self.holdout_share}")


def grid_pairs(rows: np.ndarray, aesthetic: np.ndarray, tiers: int, places: int, stride: int
               ) -> list[tuple[int, int]]:
    """The u×v partial order over a query's results (`rows` in semantic order, `aesthetic` their scores) as
    (preferred, other) row pairs; with fewer results, fewer tiers."""
    picked = np.arange(len(rows))[::stride]
    tiers = min(tiers, len(picked) // places)
    if tiers == 0:
        return []
    grid = picked[:tiers * places].reshape(tiers, places)
    # Inside a tier, best aesthetic first; equal scores keep the semantic order.
    grid = np.take_along_axis(grid, np.argsort(-aesthetic[grid], axis=1, kind="stable"), axis=1)
    cells = [(i, j) for i in range(tiers) for j in range(places)]
    return [(int(rows[grid[i, j]]), int(rows[grid[k, m]])) for i, j in cells for k, m in cells
            if i <= k and j <= m and (i, j) != (k, m)]


def vote_pairs(winner: Sequence[int | None], loser: Sequence[int | None]) -> list[tuple[int, int]]:
    """Rank-wise (preferred, other) pairs from two rows of gallery rows (None: not in the parent's gallery)."""
    shared = set(winner) & set(loser)
    return [(w, l) for w, l in zip(winner, loser)
            if w is not None and l is not None and w != l and w not in shared and l not in shared]


def dpo_loss(policy_margin: torch.Tensor, ref_margin: torch.Tensor, beta: float, smoothing: float) -> torch.Tensor:
    """Conservative (label-smoothed) DPO on per-pair score margins s(w) − s(l)."""
    h = beta * (policy_margin - ref_margin)
    return (-(1 - smoothing) * F.logsigmoid(h) - smoothing * F.logsigmoid(-h)).mean()


def nce_loss(texts: torch.Tensor, images: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric contrastive loss between unit text and image embeddings of matching rows."""
    logits = scale * texts @ images.T
    target = torch.arange(len(texts), device=texts.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


class TextTower(nn.Module):
    """The CLIP model seen through its text tower: tokens → unit embeddings. The image tower is dropped, since
    the gallery's stored embeddings stand for it, and everything else is frozen."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = copy.deepcopy(clip)
        self.clip.visual = nn.Identity()
        trainable = text_tower_state(self.clip).keys()
        for name, parameter in self.clip.named_parameters():
            parameter.requires_grad_(name in trainable)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_text(tokens), dim=-1)


@dataclass(frozen=True)
class QueryPairs:
    """One query's preferences: the text the ranker searches with, and (preferred, other) gallery rows."""

    query: str
    text: str
    pairs: tuple[tuple[int, int], ...]
    split: str


def _parent_settings(votes: VoteService, parent: str) -> dict[str, Any]:
    for system in votes.systems(TASK, enabled_only=False):
        if system.name == parent:
            RankerSettings.from_settings(system.config)  # refuse a parent whose settings no ranker takes
            return dict(system.config)
    raise ValueError(f"there is no retrieval system {parent!r} in the vote store")


def _searched_text(ranker: Ranker, query: str) -> str:
    return ranker.rephraser.rephrase(query).text if ranker.rephraser is not None else query


def _vote_preferences(pairs: pd.DataFrame, aspect: str, blobs: BlobStore, row_of: dict[str, int]
                      ) -> dict[str, list[tuple[int, int]]]:
    found: dict[str, list[tuple[int, int]]] = {}
    for row in decided(pairs, None if aspect == "overall" else aspect).itertuples():
        files = [[item["file"] for item in json.loads(blobs.path(sha).read_bytes())["items"]]
                 for sha in (row.chosen, row.rejected)]
        found.setdefault(row.prompt, []).extend(vote_pairs(*[[row_of.get(f) for f in side] for side in files]))
    return found


def _grid_preferences(ranker: Ranker, queries: Sequence[str], config: RetrievalDPOConfig, aesthetic: np.ndarray
                      ) -> dict[str, list[tuple[int, int]]]:
    found = {}
    fetch = config.tiers * config.places * config.stride
    for query in queries:
        vector = ranker.embedder.embed_texts([_searched_text(ranker, query)])
        rows = ranker.gallery.vectors.search(vector, fetch)[1][0]
        rows = rows[rows >= 0]
        found[query] = grid_pairs(rows, aesthetic[rows], config.tiers, config.places, config.stride)
    return found


def collect(config: RetrievalDPOConfig, ranker: Ranker, engine: Any, blobs: BlobStore
            ) -> tuple[list[QueryPairs], pd.DataFrame | None]:
    """Every query's preferences from the configured sources, and the votes they came from."""
    row_of = {str(f): i for i, f in enumerate(ranker.gallery.items["file"])}
    by_query: dict[str, list[tuple[int, int]]] = {}
    pairs = None
    if "votes" in config.sources:
        pairs = preference_pairs(engine, blobs, TASK, config.filters, config.export)
        for query, found in _vote_preferences(pairs, config.vote_aspect, blobs, row_of).items():
            by_query.setdefault(query, []).extend(found)
    if "grid" in config.sources:
        queries = config.queries or tuple(sorted(set(pairs.prompt.dropna()) if pairs is not None else ()))
        if not queries:
            raise ValueError("the grid source needs queries: pass --queries or train on the retrieval votes' queries")
        items = ranker.gallery.items
        column = "low_level" if ranker.settings.method == "low-level" else "laion"
        aesthetic = items[column].to_numpy(dtype=np.float32)
        if np.isnan(aesthetic).any():
            raise ValueError(f"the gallery has no {column} aesthetic scores to order the grid by")
        for query, found in _grid_preferences(ranker, queries, config, aesthetic).items():
            by_query.setdefault(query, []).extend(found)
    preferences = [QueryPairs(q, _searched_text(ranker, q), tuple(dict.fromkeys(p)), split_of(q, config.filters))
                   for q, p in sorted(by_query.items()) if p]
    if not [p for p in preferences if p.split == "train"]:
        raise ValueError("no training preferences: no decided votes with differing images, and no grid pairs")
    return preferences, pairs


def _collate(batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {"tokens": torch.stack([b["tokens"] for b in batch]),
            "query": torch.cat([torch.full((len(b["winner"]),), i) for i, b in enumerate(batch)]),
            **{key: torch.cat([b[key] for b in batch]) for key in ("winner", "loser", "ref_margin")}}


def preference_accuracy(texts: np.ndarray, images: np.ndarray, preferences: Sequence[QueryPairs]) -> float | None:
    """Share of pairs whose preferred image scores higher for its query (ties count half); `texts` are the
    preferences' query embeddings, in order."""
    if not preferences:
        return None
    margins = np.concatenate([images[[w for w, _ in p.pairs]] @ t - images[[l for _, l in p.pairs]] @ t
                              for t, p in zip(texts, preferences)])
    return float(np.mean((margins > 0) + 0.5 * (margins == 0)))


def caption_recall(texts: np.ndarray, rows: np.ndarray, ranker: Ranker, k: int) -> float | None:
    """Text-to-image recall@k of captions over the whole gallery: how often a caption finds its own image."""
    if not len(rows):
        return None
    found = ranker.gallery.vectors.search(texts, k)[1]
    return float(np.mean([row in hits for row, hits in zip(rows, found)]))


def recall_refusal(before: float | None, after: float | None, tolerance: float, k: int) -> str | None:
    """Why the aligned ranker may not be registered, or None: recall fell by more than the tolerance."""
    if before is None or after is None or before - after <= tolerance:
        return None
    return f"recall@{k} of held-out captions fell from {before:.3f} to {after:.3f}, more than the tolerance {tolerance}"


def _embed(tower: nn.Module, tokens: torch.Tensor, device: torch.device, batch: int = 256) -> np.ndarray:
    with torch.inference_mode():
        parts = [tower(tokens[i:i + batch].to(device)).float().cpu().numpy() for i in range(0, len(tokens), batch)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)


@dataclass
class _Evaluation:
    """What the metrics are measured on: the preferences' queries and the held-out captions, tokenized once."""

    ranker: Ranker
    images: np.ndarray
    preferences: list[QueryPairs]
    query_tokens: torch.Tensor
    caption_tokens: torch.Tensor
    caption_rows: np.ndarray
    recall_k: int

    def measure(self, tower: nn.Module, device: torch.device) -> tuple[dict[str, float | None], np.ndarray]:
        """Preference accuracy per split and caption recall, and the query embeddings they came from."""
        texts = _embed(tower, self.query_tokens, device)
        metrics = {f"preference_accuracy_{split}": preference_accuracy(
            texts[[p.split == split for p in self.preferences]], self.images,
            [p for p in self.preferences if p.split == split]) for split in ("train", "test")}
        metrics[f"caption_recall_at_{self.recall_k}"] = caption_recall(
            _embed(tower, self.caption_tokens, device), self.caption_rows, self.ranker, self.recall_k)
        return metrics, texts


def _caption_rows(items: pd.DataFrame, config: RetrievalDPOConfig) -> tuple[np.ndarray, np.ndarray]:
    """Gallery rows with a caption, for the NCE loss and held out for the recall guard (a stable hash of the file)."""
    has_caption = (items["caption"].fillna("").astype(str).str.strip() != "").to_numpy()
    split = PairFilter(test_share=config.holdout_share, seed=config.filters.seed)
    held_out = np.array([split_of(str(f), split) == "test" for f in items["file"]], dtype=bool)
    return np.flatnonzero(has_caption & ~held_out), np.flatnonzero(has_caption & held_out)


def _examples(preferences: list[QueryPairs], tokens: torch.Tensor, parent_texts: np.ndarray, images: np.ndarray,
              scale: float) -> list[dict[str, torch.Tensor]]:
    """Training queries with their pairs and the reference margins, which the frozen parent gives once."""
    examples = []
    for i, p in enumerate(preferences):
        if p.split == "train":
            winner, loser = (np.array(side) for side in zip(*p.pairs))
            ref = scale * (images[winner] - images[loser]) @ parent_texts[i]
            examples.append({"tokens": tokens[i], "winner": torch.from_numpy(winner),
                             "loser": torch.from_numpy(loser), "ref_margin": torch.from_numpy(ref.astype(np.float32))})
    return examples


def train(config: RetrievalDPOConfig) -> dict[str, Any]:
    """Align the parent's text tower, save it, register the aligned ranker if recall holds, write the run card."""
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device = accelerator.device
    set_seed(config.seed)
    engine = make_engine(config.db or default_url(config.home))
    blobs = BlobStore(config.home / "blobs")
    votes = VoteService(engine, blobs)
    parent = _parent_settings(votes, config.parent)
    with accelerator.main_process_first():  # the first process indexes the bundled gallery, once
        ranker = Ranker(parent, device=str(device), dtype="float32", home=config.home)
    preferences, pairs = collect(config, ranker, engine, blobs)
    nce_rows, recall_rows = _caption_rows(ranker.gallery.items, config)
    if config.nce_weight > 0 and len(nce_rows) < 2:
        raise ValueError("the NCE regularizer needs a gallery with captions; index one with captions or pass "
                         "--nce-weight 0")
    tokenizer, clip = ranker.embedder.tokenizer, ranker.embedder.model
    captions = ranker.gallery.items["caption"].fillna("").astype(str)
    images_np = np.load(ranker.gallery.folder / EMBEDDINGS).astype(np.float32)
    evaluation = _Evaluation(ranker, images_np, preferences, tokenizer([p.text for p in preferences]),
                             tokenizer(list(captions.iloc[recall_rows])), recall_rows, config.recall_k)
    scale = float(clip.logit_scale.detach().exp())
    before, parent_texts = evaluation.measure(TextTower(clip).to(device).eval(), device)
    examples = _examples(preferences, evaluation.query_tokens, parent_texts, images_np, scale)

    images = torch.from_numpy(images_np).to(device)
    tower = TextTower(clip)
    optimizer = torch.optim.AdamW([p for p in tower.parameters() if p.requires_grad], lr=config.lr)
    loader = DataLoader(examples, batch_size=config.batch_size, shuffle=True, collate_fn=_collate)
    tower, optimizer, loader = accelerator.prepare(tower, optimizer, loader)
    nce_tokens = tokenizer(list(captions.iloc[nce_rows])) if config.nce_weight > 0 else None
    nce_draw = np.random.default_rng([config.seed, accelerator.process_index])
    step, resumed = 0, None
    if (latest := latest_checkpoint(config.out)) is not None:
        step, path = latest
        accelerator.load_state(str(path))
        resumed = step
    history: list[float] = []
    timer = StepTimer()
    bar = tqdm(total=config.steps, initial=step, desc="Ranked-DPO", disable=not accelerator.is_main_process)
    while step < config.steps:
        for batch in loader:
            tokens, pick = batch["tokens"], None
            if nce_tokens is not None:
                pick = nce_draw.choice(len(nce_rows), size=min(config.nce_batch, len(nce_rows)), replace=False)
                tokens = torch.cat([tokens, nce_tokens[pick].to(device)])
            # One forward for queries and captions together: DDP expects one forward per backward.
            texts = tower(tokens)
            queries = texts[:len(batch["tokens"])][batch["query"]]
            margin = scale * ((queries * images[batch["winner"]]).sum(-1) - (queries * images[batch["loser"]]).sum(-1))
            loss = dpo_loss(margin, batch["ref_margin"], config.beta, config.label_smoothing)
            if pick is not None:
                caption_images = images[torch.from_numpy(nce_rows[pick]).to(device)]
                loss = loss + config.nce_weight * nce_loss(texts[len(batch["tokens"]):], caption_images,
                                                           torch.tensor(scale, device=device))
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            history.append(float(loss.detach()))
            timer.tick()
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]:.4f}")
            if step % config.checkpoint_every == 0 or step == config.steps:
                accelerator.save_state(str(checkpoint_path(config.out, step)))
            if step >= config.steps:
                break
    bar.close()
    accelerator.wait_for_everyone()
    trained = accelerator.unwrap_model(tower).eval()
    after, _ = evaluation.measure(trained, device)
    recall_key = f"caption_recall_at_{config.recall_k}"
    refused = recall_refusal(before[recall_key], after[recall_key], config.recall_tolerance, config.recall_k)
    name = config.name or f"{config.parent}+aligned"
    weights = config.out / TEXT_TOWER
    train_prefs = [p for p in preferences if p.split == "train"]
    test_prefs = [p for p in preferences if p.split == "test"]
    card = {
        "task": TASK, "trainer": "train.retrieval_dpo", "parent": config.parent, "system": name,
        "data": {"hash": data_hash(pairs) if pairs is not None else None,
                 "votes": len(pairs) if pairs is not None else 0,
                 "queries": {"train": len(train_prefs), "test": len(test_prefs)},
                 "pairs": {"train": sum(len(p.pairs) for p in train_prefs),
                           "test": sum(len(p.pairs) for p in test_prefs)},
                 "captions": {"nce": len(nce_rows), "recall": len(recall_rows)},
                 "filters": asdict(config.filters)},
        "settings": {k: v for k, v in asdict(config).items() if k not in ("home", "out", "filters", "db", "queries")},
        "processes": accelerator.num_processes, "resumed_from_step": resumed, "steps": step,
        "metrics": {**{f"{k}_before": v for k, v in before.items()}, **{f"{k}_after": v for k, v in after.items()}},
        "first_loss": history[0] if history else None, "last_loss": history[-1] if history else None,
        "median_step_s": timer.median,
        "registered": refused is None, "refused": refused, "finished_at": finished_at(),
    }
    if accelerator.is_main_process:
        config.out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in text_tower_state(trained.clip).items()}, weights)
        written = write_run_card(config.out, card)
        if refused is None:
            settings = {**parent, "embedder": {**parent["embedder"], "text_weights": str(weights.resolve())}}
            votes.register_system(TASK, name, engine="engines.retrieval:Ranker", config=settings, source="trained",
                                  parent=config.parent, version=(card["data"]["hash"] or "grid")[:12],
                                  run_card=written)
    return card


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the options, train, print the run card; exit 1 when the recall guard refused the result."""
    parser = argparse.ArgumentParser(prog="python -m train.retrieval_dpo", description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path("data"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--parent", required=True, help="the retrieval system to align")
    parser.add_argument("--name", default="", help="the trained system's name (default: PARENT+aligned)")
    parser.add_argument("--db", help="SQLAlchemy URL (default: SQLite under the data home)")
    parser.add_argument("--pairs", type=Path, help="take the pairs from this export instead of the vote store")
    parser.add_argument("--sources", default=",".join(SOURCES), help="votes, grid or both, comma-separated")
    parser.add_argument("--queries", type=Path, help="grid queries: one per line, or a JSON list")
    parser.add_argument("--vote-aspect", default="overall")
    defaults = RetrievalDPOConfig(Path(), Path(), "")
    for option in ("tiers", "places", "stride", "steps", "batch_size", "nce_batch", "recall_k", "checkpoint_every",
                   "seed"):
        parser.add_argument(f"--{option.replace('_', '-')}", type=int, default=getattr(defaults, option))
    for option in ("lr", "beta", "label_smoothing", "nce_weight", "recall_tolerance", "holdout_share"):
        parser.add_argument(f"--{option.replace('_', '-')}", type=float, default=getattr(defaults, option))
    parser.add_argument("--test-share", type=float, default=0.1)
    parser.add_argument("--judges", choices=("exclude", "include", "only"), default="exclude")
    args = parser.parse_args(argv)
    try:
        queries = read_queries(args.queries) if args.queries else ()
        card = train(RetrievalDPOConfig(
            args.home, args.out, args.parent, args.name, args.db, tuple(s.strip() for s in args.sources.split(",")),
            queries, args.vote_aspect, args.tiers, args.places, args.stride, args.steps, args.batch_size, args.lr,
            args.beta, args.label_smoothing, args.nce_weight, args.nce_batch, args.recall_k, args.recall_tolerance,
            args.holdout_share, args.checkpoint_every, args.seed,
            PairFilter(judges=args.judges, test_share=args.test_share), args.pairs))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if PartialState().is_main_process:
        print(json.dumps(card, indent=2, default=str))
        if card["refused"]:
            print(f"error: not registered: {card['refused']}", file=sys.stderr)
    return 1 if card["refused"] else 0


if __name__ == "__main__":
    sys.exit(main())
