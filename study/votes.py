"""The vote service every tab uses: pick a matchup, open a comparison, record a vote exactly once."""
from __future__ import annotations

import random
import secrets
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, Select, bindparam, func, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from study.abuse import AbuseRules, screen
from study.blobs import BlobStore, Output
from study.db import sessions
from study.models import Blob, Comparison, Participant, System, Vote, VoteAspect, utcnow
from study.tasks import check_aspects, check_choice, check_task


class VoteError(ValueError):
    """A vote or comparison the service refuses; the message is meant for the voter."""


class UnknownComparison(VoteError):
    """The token names no comparison."""


class ExpiredComparison(VoteError):
    """The comparison is past its deadline."""


class ConflictingVote(VoteError):
    """The comparison already has a different vote."""


class NotYourComparison(VoteError):
    """The comparison was shown to someone else."""


class RateLimited(VoteError):
    """The voter has cast as many votes this hour as the arena takes from one person."""


@dataclass(frozen=True)
class VoteConfig:
    """Limits of the vote service."""

    comparison_ttl: timedelta = timedelta(hours=24)
    max_reason_chars: int = 2000
    max_prompt_chars: int = 20000
    max_latency_ms: int = 7 * 24 * 3600 * 1000
    abuse: AbuseRules = field(default_factory=AbuseRules)


@dataclass(frozen=True)
class Matchup:
    """Two systems of one task, sides already randomized by the server."""

    task: str
    system_a: str
    system_b: str


@dataclass(frozen=True)
class OpenedComparison:
    """What the server hands out: the token and the anonymous outputs' addresses."""

    token: str
    task: str
    system_a: str
    system_b: str
    output_a: str
    output_b: str
    expires_at: datetime


@dataclass(frozen=True)
class VoteReceipt:
    """The stored vote; `repeated` is True when this call found the identical vote already there."""

    vote_id: int
    token: str
    task: str
    choice: str
    aspects: dict[str, str]
    system_a: str
    system_b: str
    counts_for_board: bool
    created_at: datetime
    repeated: bool = False
    confidence: int | None = None
    flags: tuple[str, ...] = ()  # why the abuse screening kept the vote off the public board


@dataclass(frozen=True)
class SystemInfo:
    """A contestant as the tabs and the leaderboard see it."""

    id: int
    task: str
    name: str
    engine: str
    config: dict[str, Any] = field(default_factory=dict)
    version: str = "1"
    source: str = "config"
    parent: str | None = None
    enabled: bool = True
    weight: float = 1.0
    run_card: dict[str, Any] | None = None  # what a trained system was trained on, how, and what it measured


def _by_token() -> Select:
    a, b = aliased(System), aliased(System)
    return (select(Comparison.id, Comparison.task, Comparison.expires_at, Comparison.participant_id,
                   Comparison.system_a_id, Comparison.system_b_id,
                   a.name.label("system_a"), b.name.label("system_b"), Vote.id.label("vote_id"))
            .join(a, Comparison.system_a_id == a.id).join(b, Comparison.system_b_id == b.id)
            .outerjoin(Vote, Vote.comparison_id == Comparison.id)
            .where(Comparison.token == bindparam("token")))


def _insert_blob(s: Session):
    """An INSERT of the session's dialect, which offers ON CONFLICT DO NOTHING on both backends."""
    return {"sqlite": sqlite, "postgresql": postgresql}[s.get_bind().dialect.name].insert(Blob)


def _votes() -> Select:
    a, b = aliased(System), aliased(System)
    return (select(Vote.id.label("vote_id"), Comparison.token, Comparison.task, Vote.choice,
                   a.name.label("system_a"), b.name.label("system_b"), Vote.counts_for_board, Vote.created_at,
                   Vote.confidence, Vote.flags)
            .join(Comparison, Vote.comparison_id == Comparison.id)
            .join(a, Comparison.system_a_id == a.id).join(b, Comparison.system_b_id == b.id))


# Built once: constructing these aliased joins per vote cost more than the database work itself.
_BY_TOKEN = _by_token()
_VOTES = _votes()
_VOTE_OF_COMPARISON = _VOTES.where(Vote.comparison_id == bindparam("comparison_id"))


class VoteService:
    """The single door to the vote store for tabs, CLI, studies and trainers."""

    def __init__(self, engine: Engine, blobs: BlobStore, config: VoteConfig = VoteConfig(),
                 rng: random.Random | None = None) -> None:
        self.engine = engine
        self.blobs = blobs
        self.config = config
        self.session = sessions(engine)
        # Side assignment must not be predictable from outside, so the default is the OS generator.
        self.rng = rng or random.SystemRandom()

    # systems

    def register_system(self, task: str, name: str, *, engine: str = "", config: Mapping[str, Any] | None = None,
                        version: str = "1", source: str = "config", parent: str | None = None,
                        weight: float = 1.0, enabled: bool = True,
                        run_card: Mapping[str, Any] | None = None) -> SystemInfo:
        """Create the system, or update its settings when (task, name) already exists."""
        check_task(task)
        if not name.strip():
            raise ValueError("a system needs a non-empty name")
        if weight < 0:
            raise ValueError(f"sampling weight must be >= 0, got {weight}")
        with self.session.begin() as s:
            parent_id = self._system_id(s, task, parent) if parent else None
            row = s.scalar(select(System).where(System.task == task, System.name == name))
            if row is None:
                row = System(task=task, name=name)
                s.add(row)
            row.engine, row.config, row.version, row.source = engine, dict(config or {}), version, source
            row.parent_id, row.weight, row.enabled = parent_id, weight, enabled
            row.run_card = dict(run_card) if run_card is not None else None
            s.flush()
            return self._info(row, parent)

    def systems(self, task: str, enabled_only: bool = True) -> list[SystemInfo]:
        """The task's systems, ordered by name."""
        parent = aliased(System)
        query = (select(System, parent.name).outerjoin(parent, System.parent_id == parent.id)
                 .where(System.task == check_task(task)).order_by(System.name))
        if enabled_only:
            query = query.where(System.enabled)
        with self.session() as s:
            return [self._info(row, parent_name) for row, parent_name in s.execute(query)]

    def set_enabled(self, task: str, name: str, enabled: bool) -> None:
        """Switch a system in or out of new matchups; its votes stay."""
        with self.session.begin() as s:
            s.get_one(System, self._system_id(s, task, name)).enabled = enabled

    # participants

    def participant(self, pseudonym: str, kind: str = "human") -> int:
        """The id of the participant with this pseudonym, created on first sight."""
        query = select(Participant.id).where(Participant.pseudonym == pseudonym)
        with self.session() as s:
            if (found := s.scalar(query)) is not None:
                return found
            s.add(Participant(pseudonym=pseudonym, kind=kind))
            try:
                s.commit()
            except IntegrityError:  # another request created the same pseudonym first
                s.rollback()
            return s.scalar(query)

    # comparisons

    def pick_matchup(self, task: str, weights: Mapping[str, float] | None = None, same_system_rate: float = 0.0,
                     among: Collection[str] | None = None, parent_rate: float = 0.0) -> Matchup:
        """Two enabled systems (of `among`, if given) drawn ∝ w_a·w_b, sides randomized."""
        # With probability `same_system_rate` one system meets itself (two seeds): a voter-consistency check.
        # With probability `parent_rate` a system with an enabled parent meets that parent: did training help?
        candidates = [c for c in self.systems(task) if among is None or c.name in among]
        weight = {c.name: (weights or {}).get(c.name, c.weight) for c in candidates}
        for name, rate in (("same_system_rate", same_system_rate), ("parent_rate", parent_rate)):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {rate}")
        if parent_rate and self.rng.random() < parent_rate:
            children = [c for c in candidates if c.parent in weight and weight[c.name] * weight[c.parent] > 0]
            if children:
                child = self.rng.choices(children, weights=[weight[c.name] for c in children])[0]
                first, second = (child.name, child.parent) if self.rng.random() < 0.5 else (child.parent, child.name)
                return Matchup(task, first, second)
        if same_system_rate and self.rng.random() < same_system_rate:
            names = [name for name, w in weight.items() if w > 0]
            if names:
                name = self.rng.choices(names, weights=[weight[n] for n in names])[0]
                return Matchup(task, name, name)
        pairs = [(a.name, b.name) for i, a in enumerate(candidates) for b in candidates[i + 1:]
                 if weight[a.name] * weight[b.name] > 0]
        if not pairs:
            raise VoteError(f"the {task} arena needs at least two enabled systems with positive weight")
        first, second = self.rng.choices(pairs, weights=[weight[a] * weight[b] for a, b in pairs])[0]
        if self.rng.random() < 0.5:
            first, second = second, first
        return Matchup(task, first, second)

    def open_comparison(self, matchup: Matchup, prompt: str | None, output_a: Output, output_b: Output,
                        participant_id: int | None = None, meta: Mapping[str, Any] | None = None) -> OpenedComparison:
        """Store both outputs in the blob store and issue an unguessable token for the vote."""
        if prompt is not None and len(prompt) > self.config.max_prompt_chars:
            raise VoteError(f"the prompt is {len(prompt)} characters; the limit is {self.config.max_prompt_chars}")
        sha_a, sha_b = self.blobs.put(output_a), self.blobs.put(output_b)
        token = secrets.token_urlsafe(32)
        expires_at = utcnow() + self.config.comparison_ttl
        with self.session.begin() as s:
            ids = [self._system_id(s, matchup.task, name) for name in (matchup.system_a, matchup.system_b)]
            for output, sha in ((output_a, sha_a), (output_b, sha_b)):
                self._blob_row(s, output, sha)
            s.add(Comparison(token=token, task=matchup.task, prompt=prompt, system_a_id=ids[0], system_b_id=ids[1],
                             output_a=sha_a, output_b=sha_b, meta=dict(meta or {}),
                             participant_id=participant_id, expires_at=expires_at))
        return OpenedComparison(token, matchup.task, matchup.system_a, matchup.system_b, sha_a, sha_b, expires_at)

    def store_output(self, output: Output) -> str:
        """Store an output outside any comparison (a study's pinned outputs) and return its address."""
        sha = self.blobs.put(output)
        with self.session.begin() as s:
            self._blob_row(s, output, sha)
        return sha

    @staticmethod
    def _blob_row(s: Session, output: Output, sha: str) -> None:
        # Two rounds may store the same output at once (one query, one ranking): first writer wins.
        s.execute(_insert_blob(s).values(sha256=sha, media_type=output.media_type, size=len(output.data),
                                         created_at=utcnow()).on_conflict_do_nothing())

    # votes

    def record_vote(self, token: str, choice: str, aspects: Mapping[str, str] | None = None,
                    reason: str | None = None, latency_ms: int | None = None,
                    participant_id: int | None = None, counts_for_board: bool = True,
                    confidence: int | None = None, screened: bool = True) -> VoteReceipt:
        """Record the vote on `token` exactly once; the identical repeat returns the stored vote.

        `confidence` (1–5) is how sure the voter says they are, as HPIR asks of retrieval judgements.
        `screened` applies the public arena's abuse screening (study/abuse.py) to a person's vote: a flagged
        vote is stored off the board, and a voter over the hourly limit is refused (RateLimited)."""
        try:
            check_choice(choice)
        except ValueError as error:
            raise VoteError(str(error)) from None
        reason = (reason or "").strip() or None
        if reason and len(reason) > self.config.max_reason_chars:
            raise VoteError(f"the reason is {len(reason)} characters; the limit is {self.config.max_reason_chars}")
        if latency_ms is not None and not 0 <= latency_ms <= self.config.max_latency_ms:
            raise VoteError(f"latency {latency_ms} ms is out of range")
        if confidence is not None and (isinstance(confidence, bool) or confidence not in range(1, 6)):
            raise VoteError(f"confidence must be a whole number from 1 to 5, got {confidence!r}")
        with self.engine.connect() as conn:
            comparison = self._comparison(conn, token)
            try:
                aspects = check_aspects(comparison.task, aspects)
            except ValueError as error:
                raise VoteError(str(error)) from None
            if comparison.vote_id is not None:
                return self._same_or_conflict(self._stored_vote(conn, comparison.id), choice, aspects, confidence)
            if comparison.participant_id is not None and comparison.participant_id != participant_id:
                raise NotYourComparison("this comparison was shown to another session; start a new round")
            now = utcnow()
            if comparison.expires_at is not None and now > comparison.expires_at:
                raise ExpiredComparison("this comparison has expired; start a new round")
            flags: tuple[str, ...] = ()
            if screened:
                winner = {"a": comparison.system_a_id, "b": comparison.system_b_id}.get(choice)
                verdict = screen(conn, participant_id, winner, now, self.config.abuse)
                if verdict.retry_after is not None:
                    minutes = max(1, -(-int(verdict.retry_after.total_seconds()) // 60))
                    raise RateLimited(f"you have cast {self.config.abuse.max_votes_per_hour} votes in the past hour, "
                                      f"the most the arena takes from one person; please come back in {minutes} "
                                      "minutes")
                flags = verdict.flags
                counts_for_board = counts_for_board and not flags
            try:
                vote_id = conn.execute(
                    insert(Vote).returning(Vote.id),
                    {"comparison_id": comparison.id, "choice": choice, "reason": reason, "latency_ms": latency_ms,
                     "confidence": confidence, "participant_id": participant_id,
                     "counts_for_board": counts_for_board, "flags": ",".join(flags) or None, "created_at": now},
                ).scalar_one()
                if aspects:
                    conn.execute(insert(VoteAspect),
                                 [{"vote_id": vote_id, "aspect": k, "choice": v} for k, v in aspects.items()])
                conn.commit()
            except IntegrityError:  # a concurrent request voted on the same comparison first
                conn.rollback()
                return self._same_or_conflict(self._stored_vote(conn, comparison.id), choice, aspects, confidence)
        return VoteReceipt(vote_id, token, comparison.task, choice, aspects, comparison.system_a,
                           comparison.system_b, counts_for_board, now, confidence=confidence, flags=flags)

    def list_votes(self, task: str | None = None, limit: int = 100, offset: int = 0) -> list[VoteReceipt]:
        """Votes, newest first."""
        query = _VOTES.order_by(Vote.id.desc()).limit(limit).offset(offset)
        if task:
            query = query.where(Comparison.task == check_task(task))
        with self.session() as s:
            rows = s.execute(query).all()
            aspects = self._aspects(s, [row.vote_id for row in rows])
        return [self._receipt(row, aspects.get(row.vote_id, {})) for row in rows]

    def count_votes(self, task: str | None = None, system: str | None = None) -> int:
        """How many votes there are, optionally for one task and one system (either side)."""
        query = select(func.count(Vote.id)).join(Comparison, Vote.comparison_id == Comparison.id)
        if task:
            query = query.where(Comparison.task == check_task(task))
        with self.session() as s:
            if system:
                if not task:
                    raise ValueError("counting by system needs the task too")
                sid = self._system_id(s, task, system)
                query = query.where((Comparison.system_a_id == sid) | (Comparison.system_b_id == sid))
            return s.scalar(query) or 0

    # internals

    @staticmethod
    def _info(row: System, parent: str | None) -> SystemInfo:
        return SystemInfo(row.id, row.task, row.name, row.engine, dict(row.config or {}), row.version,
                          row.source, parent, row.enabled, row.weight, row.run_card)

    @staticmethod
    def _system_id(s: Session, task: str, name: str) -> int:
        found = s.scalar(select(System.id).where(System.task == task, System.name == name))
        if found is None:
            raise VoteError(f"no system named {name!r} in the {task} arena")
        return found

    @staticmethod
    def _comparison(conn: Connection, token: str):
        row = None
        if isinstance(token, str) and 0 < len(token) <= 64:
            row = conn.execute(_BY_TOKEN, {"token": token}).one_or_none()
        if row is None:
            raise UnknownComparison("unknown comparison token; start a new round")
        return row

    @classmethod
    def _stored_vote(cls, conn: Connection | Session, comparison_id: int) -> VoteReceipt | None:
        row = conn.execute(_VOTE_OF_COMPARISON, {"comparison_id": comparison_id}).one_or_none()
        if row is None:
            return None
        return cls._receipt(row, cls._aspects(conn, [row.vote_id]).get(row.vote_id, {}))

    @staticmethod
    def _aspects(conn: Connection | Session, vote_ids: list[int]) -> dict[int, dict[str, str]]:
        found: dict[int, dict[str, str]] = {}
        if vote_ids:
            query = select(VoteAspect.vote_id, VoteAspect.aspect, VoteAspect.choice)
            for vote_id, aspect, choice in conn.execute(query.where(VoteAspect.vote_id.in_(vote_ids))):
                found.setdefault(vote_id, {})[aspect] = choice
        return found

    @staticmethod
    def _receipt(row, aspects: dict[str, str], repeated: bool = False) -> VoteReceipt:
        return VoteReceipt(row.vote_id, row.token, row.task, row.choice, aspects, row.system_a, row.system_b,
                           row.counts_for_board, row.created_at, repeated, row.confidence,
                           tuple(row.flags.split(",")) if row.flags else ())

    @staticmethod
    def _same_or_conflict(stored: VoteReceipt | None, choice: str, aspects: dict[str, str],
                          confidence: int | None) -> VoteReceipt:
        if stored is None:
            raise VoteError("the vote could not be stored; please try again")
        if stored.choice != choice or stored.aspects != aspects or stored.confidence != confidence:
            raise ConflictingVote(f"this comparison already has a different vote ({stored.choice}); "
                                  "votes cannot be changed")
        return VoteReceipt(**{**stored.__dict__, "repeated": True})
