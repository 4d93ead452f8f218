"""Alembic environment: runs on the engine that study.db hands over, never on a URL in an ini file."""
from __future__ import annotations

from alembic import context

from study.db import make_engine
from study.models import Base

engine = context.config.attributes.get("engine") or make_engine()
with engine.begin() as connection:
    # render_as_batch lets ALTERs work on SQLite, which rebuilds tables instead.
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
