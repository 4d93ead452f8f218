"""Shared fixtures: the vote store on SQLite and on a real PostgreSQL server started for the session."""
from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from app import build_app
from engines import registry
from demos.context import Settings
from study.blobs import BlobStore, Output
from study.db import make_engine, upgrade
from study.pgtemp import TempPostgres, find_pg_bin
from study.votes import Matchup, VoteService


@pytest.fixture(scope="session")
def pg_server() -> Iterator[TempPostgres]:
    """A private PostgreSQL server; skipped without server binaries, except in CI where it must run."""
    if find_pg_bin() is None:
        if os.environ.get("CI"):
            pytest.fail("CI must test PostgreSQL, but no server binaries were found (apt-get install postgresql)")
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not installed; apt-get install postgresql")
    server = TempPostgres.start()
    yield server
    server.stop()


def _reset_postgres(url: str) -> None:
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database URL on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'votes.db'}"
    server: TempPostgres = request.getfixturevalue("pg_server")
    _reset_postgres(server.url)
    return server.url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """An engine on a freshly migrated database."""
    engine = make_engine(db_url)
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def service(engine: Engine, tmp_path: Path) -> VoteService:
    """The vote service over a fresh database and blob store."""
    return VoteService(engine, BlobStore(tmp_path / "blobs"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# One app per test module, so that votes cast by one module's tests never change another's leaderboard.
@pytest.fixture(scope="module")
def served_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A running app started with no profile and no Hub, with a few generation votes already stored."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(registry, "hub_reachable", lambda timeout=3.0: False)
        demo = build_app(Settings(profile=None, home=home, port=_free_port()))
    votes = VoteService(make_engine(f"sqlite:///{home / 'aesarena.db'}"), BlobStore(home / "blobs"))
    for name in ("strong", "weak"):
        votes.register_system("generation", name)
    for i in range(12):
        opened = votes.open_comparison(Matchup("generation", "strong", "weak"), f"prompt {i}",
                                       Output(f"s{i}".encode(), "text/plain"), Output(f"w{i}".encode(), "text/plain"))
        votes.record_vote(opened.token, "a" if i < 10 else "tie", {"aesthetic": "b"})
    _, url, _ = demo.launch(prevent_thread_lock=True, server_port=_free_port(), quiet=True)
    yield url, home
    demo.close()
