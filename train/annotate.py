"""`python -m train.annotate`: VisionPrefer-style AI feedback. A critic rates generated images on the four aspects
(prompt-following, aesthetic, fidelity, harmlessness), each from 1 to 5 with a one-sentence rationale; the score
differences between two images of one prompt become a preference pair, stored as a model judge's vote.

- Images: the generation battles in the vote store that have both images (people's and studies' battles), or,
  with `--prompts`, one seeded image per profile generator per prompt, paired generator against generator, as
  VisionPrefer paired its prompts × generators.
- The answer must read `Score: N. Reason: …` on one line, N a whole number from 1 to 5 and a reason with words
  in it, and nothing else. Where the critic's tokenizer can spell that opening, decoding is constrained to it, so
  the model only picks the score and writes the reason; every answer is still parsed, and one that does not parse
  is counted as invalid for its aspect and dropped, never guessed.
- Each aspect's choice is the higher score (a tie when equal); an aspect invalid on either side is left unjudged.
  The overall choice compares the means over the aspects judged on both sides; a pair without one gets no vote.
- Votes go to a participant of kind "judge" (one per critic), so they never reach the people's board; they show
  on the model judges' board, and `train.data` takes them with `judges="include"` or `"only"` (`train.reward
  --judges only` trains VP-Score on AI feedback alone).
- A re-run skips every pair of images (same prompt, same two images, either side) this critic has already voted
  on, so votes are never doubled; a study's pinned pair shown to many participants is annotated once.

    python -m train.annotate --profile tiny --critic tiny-llava --home data [--limit 100] [--json]
    python -m train.annotate --profile gpu --critic aesexpert --prompts prompts.txt [--generators a b] [--seed 0]
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import aliased
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from engines.critic import Critic, GenerationSettings
from engines.generator import GenerationError
from engines.registry import Profile, Registry, load_profile
from study.blobs import BlobStore, Output
from study.db import default_url, make_engine, upgrade
from study.models import Blob, Comparison, Participant, System, Vote
from study.participants import judge_pseudonym, load_secret
from study.tasks import TASK_ASPECTS
from study.votes import Matchup, VoteService
from train.judge import read_queries

TASK = "generation"
ASPECTS = TASK_ASPECTS[TASK]
SCORES = range(1, 6)
# VisionPrefer's four questions, asked of one image at a time; 5 is always the good end.
QUESTIONS = {
    "prompt_following": "How well does this image follow the prompt \"{prompt}\"?",
    "aesthetic": "How beautiful is this image: its composition, colour and light?",
    "fidelity": "How faithful and free of artifacts is this image (shapes, anatomy, text, detail)?",
    "harmlessness": "How harmless is this image (free of violence, gore, nudity and hate)?",
}
FORMAT = (" Rate it from 1 (worst) to 5 (best) and give a one-sentence reason, on one line, exactly as: "
          "Score: N. Reason: your reason.")
OPENING = " Score: {score}. Reason:"  # what constrained decoding forces, the model choosing the score
ANSWER = re.compile(r"Score\s*:\s*([1-5])\s*\.\s*Reason\s*:\s*(.*)")  # `.` stops at a line break
SECOND = re.compile(r"\bScore\s*:")
WORD = re.compile(r"\w")


@dataclass(frozen=True)
class Rating:
    """One parsed answer: the score and its rationale."""

    score: int
    reason: str


def parse_rating(answer: str) -> Rating | None:
    """The score and reason of an answer in the required format, or None for anything else: another score, no
    words in the reason, a second rating, a second line, or text before the score."""
    found = ANSWER.fullmatch((answer or "").strip())
    if found is None:
        return None
    reason = found.group(2).strip()
    if not WORD.search(reason) or SECOND.search(reason):
        return None
    return Rating(int(found.group(1)), reason)


def choice_between(a: float, b: float) -> str:
    """a, b or tie, by the higher score."""
    return "a" if a > b else "b" if b > a else "tie"


def pair_from_scores(scores_a: Mapping[str, Rating | None], scores_b: Mapping[str, Rating | None]
                     ) -> tuple[str | None, dict[str, str]]:
    """The overall choice (None when no aspect was judged on both sides) and each judged aspect's choice."""
    judged = [a for a in ASPECTS if scores_a.get(a) is not None and scores_b.get(a) is not None]
    if not judged:
        return None, {}
    aspects = {a: choice_between(scores_a[a].score, scores_b[a].score) for a in judged}
    mean_a = sum(scores_a[a].score for a in judged) / len(judged)
    mean_b = sum(scores_b[a].score for a in judged) / len(judged)
    return choice_between(mean_a, mean_b), aspects


# Constrained decoding


@dataclass(frozen=True)
class Vocabulary:
    """The critic's tokens that end a line (generation stops there) and those that cannot open a reason (special
    tokens, blanks, punctuation alone), found once by decoding every token on its own."""

    size: int
    line_breaks: torch.Tensor
    not_words: torch.Tensor


def vocabulary(tokenizer: Any) -> Vocabulary:
    """Sort the tokenizer's tokens into line breaks and non-words."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    special = set(tokenizer.all_special_ids)
    return Vocabulary(len(tokenizer), torch.tensor([i for i, t in enumerate(texts) if "\n" in t], dtype=torch.long),
                      torch.tensor([i for i, t in enumerate(texts) if i in special or not WORD.search(t)],
                                   dtype=torch.long))


def score_openings(critic: Critic, question: str) -> tuple[tuple[int, ...], ...] | None:
    """Each score's opening `Score: N. Reason:` as the tokens that follow this question's prompt, tokenized in
    context; None when the tokenizer cannot spell the five apart (e.g. a vocabulary without digits)."""
    encode = critic.tokenizer
    base = encode(critic.prompt((), question)).input_ids
    openings = []
    for score in SCORES:
        full = encode(critic.prompt((), question, OPENING.format(score=score))).input_ids
        if full[:len(base)] != base:
            return None
        openings.append(tuple(full[len(base):]))
    spelled = all(o and encode.unk_token_id not in o for o in openings)
    prefix_free = not any(a != b and b[:len(a)] == a for a in openings for b in openings)
    return tuple(openings) if spelled and prefix_free and len(set(openings)) == len(openings) else None


class ScoreFormat(LogitsProcessor):
    """Lets the answer start only with one of the openings, then only with a word: the model picks the score
    (greedy picks the likeliest of the five) and writes the reason."""

    def __init__(self, openings: Sequence[tuple[int, ...]], prompt_length: int, vocab: Vocabulary) -> None:
        self.openings, self.prompt_length, self.vocab = tuple(openings), prompt_length, vocab

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        for row, generated in enumerate(input_ids[:, self.prompt_length:].tolist()):
            step, so_far = len(generated), tuple(generated)
            following = sorted({o[step] for o in self.openings if len(o) > step and o[:step] == so_far})
            if following:
                keep = torch.tensor(following, device=scores.device)
                allowed = scores[row, keep]
                scores[row] = float("-inf")
                scores[row, keep] = allowed
            elif so_far in self.openings:  # the reason's first token: a word, not a blank or a line break
                scores[row, self.vocab.not_words.to(scores.device)] = float("-inf")
                scores[row, self.vocab.size:] = float("-inf")  # embedding rows padded past the tokenizer
        return scores


class EndOfLine(StoppingCriteria):
    """Stops once a token with a line break is generated: the answer is one line, and nothing after it counts."""

    def __init__(self, vocab: Vocabulary) -> None:
        self.line_breaks = vocab.line_breaks

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        return torch.isin(input_ids[:, -1], self.line_breaks.to(input_ids.device))


def ask(critic: Critic, vocab: Vocabulary, image: Image.Image, question: str, max_new_tokens: int) -> str:
    """The critic's greedy one-line answer, constrained to the score format where its tokenizer allows."""
    openings = score_openings(critic, question)
    greedy = GenerationSettings(max_new_tokens=max_new_tokens).generate_kwargs()

    def work() -> str:
        inputs = critic.inputs(image, question, reserve=max_new_tokens)
        length = inputs["input_ids"].shape[1]
        constraint = [ScoreFormat(openings, length, vocab)] if openings else []
        with torch.inference_mode():
            out = critic.model.generate(**inputs, **greedy, pad_token_id=critic.pad_token_id,
                                        logits_processor=LogitsProcessorList(constraint),
                                        stopping_criteria=StoppingCriteriaList([EndOfLine(vocab)]))
        return critic.tokenizer.decode(out[0, length:], skip_special_tokens=True).strip()

    return critic.on_model_thread(work)


# Which images


@dataclass(frozen=True)
class ImagePair:
    """Two stored images of one prompt from two systems, and where they came from (kept in the vote's battle)."""

    prompt: str
    system_a: str
    system_b: str
    output_a: str  # sha256 in the blob store
    output_b: str
    media_a: str
    media_b: str
    origin: dict[str, Any]

    @property
    def key(self) -> tuple[str, str, str]:
        """The prompt and the two images, sides ignored: what one critic votes on once."""
        return (self.prompt, *sorted((self.output_a, self.output_b)))


def annotated(votes: VoteService, critic: str) -> set[tuple[str, str, str]]:
    """The pairs this critic has already voted on (a battle opened but never voted, after a crash, is not)."""
    query = (select(Comparison.prompt, Comparison.output_a, Comparison.output_b, Comparison.meta)
             .join(Vote, Vote.comparison_id == Comparison.id).join(Participant, Vote.participant_id == Participant.id)
             .where(Comparison.task == TASK, Participant.kind == "judge"))
    with votes.session() as s:
        return {(row.prompt or "", *sorted((row.output_a, row.output_b))) for row in s.execute(query)
                if (row.meta or {}).get("critic") == critic}


def stored_pairs(votes: VoteService) -> list[ImagePair]:
    """Every generation battle with two stored images that was not itself a judge's, oldest first."""
    blob_a, blob_b, sys_a, sys_b = aliased(Blob), aliased(Blob), aliased(System), aliased(System)
    judges = select(Participant.id).where(Participant.kind == "judge")
    query = (select(Comparison.id, Comparison.prompt, Comparison.output_a, Comparison.output_b,
                    blob_a.media_type.label("media_a"), blob_b.media_type.label("media_b"),
                    sys_a.name.label("system_a"), sys_b.name.label("system_b"))
             .join(blob_a, Comparison.output_a == blob_a.sha256).join(blob_b, Comparison.output_b == blob_b.sha256)
             .join(sys_a, Comparison.system_a_id == sys_a.id).join(sys_b, Comparison.system_b_id == sys_b.id)
             .where(Comparison.task == TASK, blob_a.media_type.like("image/%"), blob_b.media_type.like("image/%"),
                    Comparison.participant_id.is_(None) | Comparison.participant_id.not_in(judges))
             .order_by(Comparison.id))
    with votes.session() as s:
        return [ImagePair(row.prompt or "", row.system_a, row.system_b, row.output_a, row.output_b, row.media_a,
                          row.media_b, {"annotates": row.id}) for row in s.execute(query)]


def generated_pairs(votes: VoteService, registry: Registry, prompts: Sequence[str], generators: Sequence[str],
                    seed: int, tally: Tally) -> Iterator[ImagePair]:
    """Per prompt, one image per generator with the seed, stored, then every pair of generators; a prompt that
    a generator refuses (too long, blocked by its safety checker) is skipped and counted."""
    for prompt in prompts:
        made = {}
        try:
            for name in generators:
                generator = registry.engine(TASK, name)  # builds under the engine's lock, so not inside it
                with registry.lock(TASK, name):
                    made[name] = generator.generate(prompt, seed)
        except GenerationError as error:
            tally.prompts_skipped += 1
            tqdm.write(f"skipped {prompt[:60]!r}: {error}", file=sys.stderr)
            continue
        stored = {name: votes.store_output(Output(result.png(), "image/png")) for name, result in made.items()}
        for a, b in itertools.combinations(generators, 2):
            yield ImagePair(made[a].prompt, a, b, stored[a], stored[b], "image/png", "image/png",
                            {"seed": seed, "settings": {"a": made[a].settings, "b": made[b].settings}})


# Scoring and storing


@dataclass
class Tally:
    """What an annotation run did; per aspect, valid + invalid = asked."""

    pairs: int = 0  # pairs rated in this run
    already_annotated: int = 0  # pairs skipped: this critic voted on them before
    images_scored: int = 0
    asked: int = 0
    valid: Counter = field(default_factory=Counter)
    invalid: Counter = field(default_factory=Counter)
    votes: int = 0
    ties: int = 0  # overall
    aspect_ties: Counter = field(default_factory=Counter)
    unjudged: int = 0  # pairs with no aspect valid on both sides: no vote
    prompts_skipped: int = 0  # --prompts only: a generator refused the prompt
    constrained: bool | None = None  # whether decoding was held to the score format

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with every aspect present in the per-aspect counts."""
        per_aspect = {name: {a: getattr(self, name)[a] for a in ASPECTS} for name in ("valid", "invalid", "aspect_ties")}
        return {**asdict(self), **per_aspect}


class Rater:
    """Asks the critic the four questions about an image, once per (image, prompt) in a run."""

    def __init__(self, critic: Critic, blobs: BlobStore, max_new_tokens: int, tally: Tally) -> None:
        self.critic, self.blobs, self.max_new_tokens, self.tally = critic, blobs, max_new_tokens, tally
        self.vocab = vocabulary(critic.tokenizer)
        self.tally.constrained = score_openings(critic, QUESTIONS["aesthetic"] + FORMAT) is not None
        self._seen: dict[tuple[str, str], dict[str, Rating | None]] = {}

    def ratings(self, sha: str, prompt: str) -> dict[str, Rating | None]:
        """Each aspect's parsed rating of the stored image, None where the answer was invalid."""
        if (sha, prompt) not in self._seen:
            image = Image.open(io.BytesIO(self.blobs.get(sha))).convert("RGB")
            self._seen[sha, prompt] = {a: self._rate(image, prompt, a) for a in ASPECTS}
            self.tally.images_scored += 1
        return self._seen[sha, prompt]

    def _rate(self, image: Image.Image, prompt: str, aspect: str) -> Rating | None:
        answer = ask(self.critic, self.vocab, image, QUESTIONS[aspect].format(prompt=prompt) + FORMAT,
                     self.max_new_tokens)
        rating = parse_rating(answer)
        self.tally.asked += 1
        (self.tally.valid if rating else self.tally.invalid)[aspect] += 1
        return rating


def store_pair(votes: VoteService, judge_id: int, critic: str, pair: ImagePair,
               ratings_a: Mapping[str, Rating | None], ratings_b: Mapping[str, Rating | None]
               ) -> tuple[str | None, dict[str, str]]:
    """Store the pair the ratings give as the judge's vote on the judge's own copy of the battle; the overall and
    per-aspect choices, (None, {}) when no aspect was judged on both sides and nothing was stored."""
    overall, aspects = pair_from_scores(ratings_a, ratings_b)
    if overall is None:
        return None, {}
    meta = {**pair.origin, "critic": critic,
            "ratings": {side: {a: asdict(r) if r else None for a, r in ratings.items()}
                        for side, ratings in (("a", ratings_a), ("b", ratings_b))}}
    opened = votes.open_comparison(Matchup(TASK, pair.system_a, pair.system_b), pair.prompt,
                                   Output(votes.blobs.get(pair.output_a), pair.media_a),
                                   Output(votes.blobs.get(pair.output_b), pair.media_b),
                                   participant_id=judge_id, meta=meta)
    votes.record_vote(opened.token, overall, aspects, participant_id=judge_id)
    return overall, aspects


@dataclass(frozen=True)
class AnnotateConfig:
    """Which critic rates which images, and where the votes go."""

    profile: str
    critic: str
    home: Path
    db: str | None = None
    limit: int | None = None  # at most this many new pairs
    prompts: tuple[str, ...] = ()  # fresh images of these prompts instead of the stored battles
    generators: tuple[str, ...] = ()  # with prompts: default every generator of the profile
    seed: int = 0
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be at least 1, got {self.limit}")
        if self.generators and not self.prompts:
            raise ValueError("--generators picks who draws the --prompts; give the prompts too")
        GenerationSettings(max_new_tokens=self.max_new_tokens)  # refuses an impossible length now, not mid-run


def _check(config: AnnotateConfig, profile: Profile) -> list[str]:
    """The generators to draw with (none for stored battles), after refusing names the profile lacks."""
    critics = [spec.name for spec in profile.systems.get("critique", ())]
    if config.critic not in critics:
        raise ValueError(f"{config.critic!r} is not a critic of the {profile.name} profile: {', '.join(critics)}")
    if not config.prompts:
        return []
    known = [spec.name for spec in profile.systems.get(TASK, ())]
    generators = list(dict.fromkeys(config.generators or known))
    if unknown := sorted(set(generators) - set(known)):
        raise ValueError(f"{', '.join(unknown)}: not generators of the {profile.name} profile ({', '.join(known)})")
    if len(generators) < 2:
        raise ValueError("pairs need at least two generators")
    return generators


def _register(votes: VoteService, profile: Profile, generators: Iterable[str]) -> None:
    """Add generators the store has never seen; known ones keep their settings (an admin may have disabled one)."""
    known = {info.name for info in votes.systems(TASK, enabled_only=False)}
    for spec in profile.systems.get(TASK, ()):
        if spec.name in generators and spec.name not in known:
            votes.register_system(TASK, spec.name, engine=spec.engine, config=spec.settings, weight=spec.weight)


def run(config: AnnotateConfig) -> Tally:
    """Rate every pair of images this critic has not voted on yet and store the pairs as its judge votes."""
    profile = load_profile(config.profile)
    generators = _check(config, profile)
    engine = make_engine(config.db or default_url(config.home))
    upgrade(engine)
    votes = VoteService(engine, BlobStore(config.home / "blobs"))
    registry = Registry(profile, config.home)
    critic = registry.engine("critique", config.critic)
    if not isinstance(critic, Critic):
        raise ValueError(f"{config.critic!r} is a {type(critic).__name__}, not a chatting critic")
    judge_id = votes.participant(judge_pseudonym(load_secret(config.home), config.critic), kind="judge")
    tally = Tally()
    rater = Rater(critic, votes.blobs, config.max_new_tokens, tally)
    _register(votes, profile, generators)
    if config.prompts:
        pairs: Iterable[ImagePair] = generated_pairs(votes, registry, config.prompts, generators, config.seed, tally)
        total = len(config.prompts) * math.comb(len(generators), 2)
    else:
        pairs = stored_pairs(votes)
        total = len(pairs)
    done = annotated(votes, config.critic)
    progress = tqdm(pairs, desc="annotating", unit="pair", total=total)
    for pair in progress:
        if config.limit is not None and tally.pairs >= config.limit:
            break
        if pair.key in done:
            tally.already_annotated += 1
            continue
        tally.pairs += 1
        done.add(pair.key)
        ratings = [rater.ratings(sha, pair.prompt) for sha in (pair.output_a, pair.output_b)]
        overall, aspects = store_pair(votes, judge_id, config.critic, pair, *ratings)
        if overall is None:
            tally.unjudged += 1
            continue
        tally.votes += 1
        tally.ties += overall == "tie"
        tally.aspect_ties.update(a for a, choice in aspects.items() if choice == "tie")
    progress.close()
    return tally


def report(tally: Tally) -> str:
    """The tally in words."""
    invalid = ", ".join(f"{a} {tally.invalid[a]}" for a in ASPECTS)
    lines = [f"{tally.pairs} pairs rated ({tally.already_annotated} skipped: already annotated by this critic)",
             f"{tally.images_scored} images scored, {tally.asked} answers; invalid and dropped: {invalid}",
             f"{tally.votes} judge votes stored ({tally.ties} overall ties); {tally.unjudged} pairs without an aspect "
             "valid on both sides",
             "answers constrained to the score format" if tally.constrained else
             "answers NOT constrained: the critic's tokenizer cannot spell the score format"]
    if tally.prompts_skipped:
        lines.append(f"{tally.prompts_skipped} prompts skipped: a generator refused them")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the options, annotate, print the tally."""
    parser = argparse.ArgumentParser(prog="python -m train.annotate", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", required=True)
    parser.add_argument("--critic", required=True, help="the profile's critic that rates the images")
    parser.add_argument("--home", type=Path, default=Path("data"))
    parser.add_argument("--db", help="SQLAlchemy URL (default: SQLite under the data home)")
    parser.add_argument("--limit", type=int, help="rate at most this many new pairs")
    parser.add_argument("--prompts", type=Path,
                        help="rate fresh images of these prompts (a text file, one per line, or a JSON list) "
                             "instead of the stored battles")
    parser.add_argument("--generators", nargs="*", default=(), help="with --prompts: who draws (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="with --prompts: the seed of every image")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="the longest answer, in tokens")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        prompts = read_queries(args.prompts) if args.prompts else ()
        tally = run(AnnotateConfig(args.profile, args.critic, args.home, args.db, args.limit, prompts,
                                   tuple(args.generators), args.seed, args.max_new_tokens))
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(tally.to_dict(), indent=2) if args.json else report(tally))
    return 0


if __name__ == "__main__":
    sys.exit(main())
