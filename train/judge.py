"""`python -m train.judge`: a critic judges pairs of retrieval rankers on a list of queries, as the aesthetic
retrieval paper's LMM-as-judge does, and its votes go into the vote store marked as a model judge's.

Judge votes never count on the human board (`python -m study leaderboard --task retrieval --judges-only` shows
theirs). The report gives, per ranker pair, the win rate and the win+similar rate of each side.

    python -m train.judge --profile tiny --queries queries.txt --critic tiny-llava [--k 5] [--json]
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from engines.judge import judge
from engines.registry import Registry, load_profile
from engines.retrieval import Ranking
from study.blobs import BlobStore, Output
from study.db import default_url, make_engine, upgrade
from study.participants import judge_pseudonym, load_secret
from study.votes import Matchup, VoteService

TASK = "retrieval"
CHOICE = {"a": "a", "b": "b", "similar": "tie"}  # "similar" is stored as a tie, which BT counts half each


@dataclass(frozen=True)
class JudgeConfig:
    """Who judges which rankers on which queries, and where the votes go."""

    profile: str
    queries: tuple[str, ...]
    critic: str
    home: Path
    db: str | None = None
    k: int = 5
    systems: tuple[str, ...] = ()  # default: every ranker of the profile


def read_queries(path: Path) -> tuple[str, ...]:
    """Queries from a text file (one per line) or a JSON list; blank lines are dropped."""
    text = path.read_text(encoding="utf-8")
    queries = json.loads(text) if path.suffix == ".json" else text.splitlines()
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise ValueError(f"{path}: expected a JSON list of strings or one query per line")
    found = tuple(q.strip() for q in queries if q.strip())
    if not found:
        raise ValueError(f"{path} holds no queries")
    return found


def _row(ranking: Ranking) -> list[Image.Image]:
    images = []
    for hit in ranking.hits:
        with Image.open(hit.thumb) as thumb:
            images.append(thumb.convert("RGB"))
    return images


def run(config: JudgeConfig) -> pd.DataFrame:
    """Judge every ranker pair on every query, store the votes, and tally them per pair."""
    profile = load_profile(config.profile)
    rankers = [spec.name for spec in profile.systems.get(TASK, ())]
    systems = list(config.systems or rankers)
    if unknown := sorted(set(systems) - set(rankers)):
        raise ValueError(f"{', '.join(unknown)}: not rankers of the {profile.name} profile ({', '.join(rankers)})")
    if len(systems) < 2:
        raise ValueError("a judge compares pairs: name at least two rankers")
    critics = [spec.name for spec in profile.systems.get("critique", ())]
    if config.critic not in critics:
        raise ValueError(f"{config.critic!r} is not a critic of the {profile.name} profile: {', '.join(critics)}")
    engine = make_engine(config.db or default_url(config.home))
    upgrade(engine)
    votes = VoteService(engine, BlobStore(config.home / "blobs"))
    for spec in profile.systems[TASK]:
        votes.register_system(TASK, spec.name, engine=spec.engine, config=spec.settings, weight=spec.weight)
    registry = Registry(profile, config.home)
    critic = registry.engine("critique", config.critic)
    judge_id = votes.participant(judge_pseudonym(load_secret(config.home), config.critic), kind="judge")
    tally = []
    pairs = list(itertools.combinations(systems, 2))
    for query, (a, b) in tqdm(list(itertools.product(config.queries, pairs)), desc="judging", unit="pair"):
        ranking_a, ranking_b = (registry.engine(TASK, name).search(query, config.k) for name in (a, b))
        result = judge(critic, query, _row(ranking_a), _row(ranking_b))
        opened = votes.open_comparison(Matchup(TASK, a, b), query, Output(ranking_a.to_json(), "application/json"),
                                       Output(ranking_b.to_json(), "application/json"), participant_id=judge_id,
                                       meta={"judge": config.critic, "answers": [result.first, result.second]})
        votes.record_vote(opened.token, CHOICE[result.verdict], participant_id=judge_id,
                          reason=f"asked A-over-B: {result.first!r}; asked B-over-A: {result.second!r}")
        tally.append({"system_a": a, "system_b": b, "verdict": result.verdict,
                      "invalid": (result.first_pick is None) + (result.second_pick is None)})
    return report(pd.DataFrame(tally))


def report(tally: pd.DataFrame) -> pd.DataFrame:
    """Per pair: judged queries, wins of each side, similar, and each side's win and win+similar rates."""
    rows = []
    for (a, b), group in tally.groupby(["system_a", "system_b"], sort=False):
        n, wins_a, wins_b = len(group), int((group.verdict == "a").sum()), int((group.verdict == "b").sum())
        similar = n - wins_a - wins_b
        rows.append({"system_a": a, "system_b": b, "queries": n, "a_wins": wins_a, "b_wins": wins_b,
                     "similar": similar, "a_win_rate": wins_a / n, "a_win_or_similar": (wins_a + similar) / n,
                     "b_win_rate": wins_b / n, "b_win_or_similar": (wins_b + similar) / n,
                     "invalid_answers": int(group.invalid.sum())})
    return pd.DataFrame(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the options, judge, print the report."""
    parser = argparse.ArgumentParser(prog="python -m train.judge", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", required=True)
    parser.add_argument("--queries", type=Path, required=True, help="a text file, one query per line, or a JSON list")
    parser.add_argument("--critic", required=True, help="the profile's critic that judges")
    parser.add_argument("--systems", nargs="*", default=(), help="rankers to compare (default: all)")
    parser.add_argument("--k", type=int, default=5, help="results per row")
    parser.add_argument("--home", type=Path, default=Path("data"))
    parser.add_argument("--db", help="SQLAlchemy URL (default: SQLite under the data home)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        config = JudgeConfig(args.profile, read_queries(args.queries), args.critic, args.home, args.db, args.k,
                             tuple(args.systems))
        table = run(config)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(table.to_json(orient="records", indent=2) if args.json else table.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
