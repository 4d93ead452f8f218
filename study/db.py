"""Database engines for the vote store: SQLite by default, any SQLAlchemy URL via --db/AESARENA_DB."""
from __future__ import annotations

import os
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).with_name("migrations")
BACKENDS = ("sqlite", "postgresql")


def data_home() -> Path:
    """The data home, `$AESARENA_HOME` or ./data: DB, blobs, indexes, tiny models, trained artifacts."""
    return Path(os.environ.get("AESARENA_HOME", "data"))


def default_url(home: Path | None = None) -> str:
    """`$AESARENA_DB`, else an SQLite file under the data home."""
    return os.environ.get("AESARENA_DB") or f"sqlite:///{(home or data_home()) / 'aesarena.db'}"


def _tune_sqlite(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers run beside the writer; NORMAL sync in WAL survives a killed process
    # (the WAL is in the OS before commit returns); busy_timeout queues writers instead of failing.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str | None = None, pool_size: int = 8) -> Engine:
    """Create an engine; SQLite files get WAL, busy_timeout and foreign keys, and their folder."""
    url_obj = make_url(url or default_url())
    if url_obj.get_backend_name() not in BACKENDS:
        raise ValueError(f"the vote store runs on {' or '.join(BACKENDS)}, not {url_obj.get_backend_name()}")
    if url_obj.get_backend_name() == "sqlite":
        if url_obj.database and url_obj.database != ":memory:":
            Path(url_obj.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url_obj, pool_size=pool_size, max_overflow=2 * pool_size)
        event.listen(engine, "connect", _tune_sqlite)
        return engine
    return create_engine(url_obj, pool_size=pool_size, max_overflow=2 * pool_size, pool_pre_ping=True)


def alembic_config(engine: Engine) -> Config:
    """An Alembic config bound to `engine`, so migrations run on the caller's connection."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["engine"] = engine
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Create or upgrade the schema to `revision` with Alembic (the same migrations on every backend)."""
    command.upgrade(alembic_config(engine), revision)


def current_revision(engine: Engine) -> str | None:
    """The schema revision the database is at, or None when it was never initialized."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str:
    """The newest migration's revision id."""
    return ScriptDirectory.from_config(alembic_config(None)).get_current_head()  # type: ignore[arg-type]


def sessions(engine: Engine) -> sessionmaker[Session]:
    """A session factory whose objects stay readable after commit."""
    return sessionmaker(engine, expire_on_commit=False)
