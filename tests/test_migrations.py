"""Alembic migrations: from empty, step by step from each previous revision, and back down."""
from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from study.db import alembic_config, current_revision, head_revision, make_engine, upgrade
from study.models import Base


def _revisions() -> list[str]:
    script = ScriptDirectory.from_config(alembic_config(None))
    return [r.revision for r in reversed(list(script.walk_revisions()))]


def _schema_diff(engine) -> list:
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), Base.metadata)


def test_from_empty_to_head_matches_the_models(db_url: str) -> None:
    engine = make_engine(db_url)
    assert current_revision(engine) is None
    upgrade(engine)
    assert current_revision(engine) == head_revision()
    assert _schema_diff(engine) == [], "the migrations and the ORM models disagree"
    assert {"systems", "participants", "blobs", "comparisons", "votes", "vote_aspects"} <= set(
        inspect(engine).get_table_names())
    engine.dispose()


def test_each_revision_upgrades_from_its_predecessor_keeping_data(db_url: str) -> None:
    engine = make_engine(db_url)
    previous = "base"
    for revision in _revisions():
        command.upgrade(alembic_config(engine), revision)
        assert current_revision(engine) == revision, f"upgrade {previous} -> {revision} did not land"
        if previous == "base":  # the first revision creates `systems`; later ones must keep its rows
            with engine.begin() as conn:
                conn.execute(text("INSERT INTO systems (task, name, engine, config, version, source, enabled, "
                                  "weight, created_at) VALUES ('generation', 'kept', '', '{}', '1', 'config', "
                                  "true, 1.0, CURRENT_TIMESTAMP)"))
        previous = revision
    upgrade(engine)  # upgrading a database already at head is a no-op
    with engine.connect() as conn:
        assert conn.execute(text("SELECT name FROM systems")).scalar_one() == "kept"
    assert _schema_diff(engine) == []
    engine.dispose()


def test_downgrade_to_base_and_back(db_url: str) -> None:
    engine = make_engine(db_url)
    upgrade(engine)
    command.downgrade(alembic_config(engine), "base")
    assert current_revision(engine) is None
    assert "votes" not in inspect(engine).get_table_names()
    upgrade(engine)
    assert _schema_diff(engine) == []
    engine.dispose()
