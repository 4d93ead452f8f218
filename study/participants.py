"""Participant pseudonyms: a keyed hash of the client address and session; no address is stored."""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from pathlib import Path


def client_address(headers: Mapping[str, str], peer: str | None) -> str:
    """The client's address: the first `x-forwarded-for` hop (Spaces proxy), else the socket peer."""
    forwarded = {k.lower(): v for k, v in headers.items()}.get("x-forwarded-for", "")
    first = forwarded.split(",")[0].strip()
    return first or (peer or "unknown")


def pseudonym(secret: bytes, address: str, session: str) -> str:
    """HMAC-SHA256 of address and session under the server secret, as 64 hex characters."""
    return hmac.new(secret, f"{address}\x1f{session}".encode(), hashlib.sha256).hexdigest()


def judge_pseudonym(secret: bytes, judge: str) -> str:
    """The pseudonym of a model judge, kept apart from human pseudonyms by its prefix."""
    return hmac.new(secret, f"judge\x1f{judge}".encode(), hashlib.sha256).hexdigest()


def load_secret(home: Path) -> bytes:
    """`AESARENA_SECRET`, else a random secret kept in the data home so pseudonyms survive restarts."""
    if env := os.environ.get("AESARENA_SECRET"):
        return env.encode()
    path = Path(home) / "secret"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
    return path.read_text().strip().encode()
