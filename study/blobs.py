"""Content-addressed blob store: outputs are kept once under their sha256, written atomically."""
from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

MAX_BLOB_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class Output:
    """One side's output: an image (PNG/WebP), a text, or a ranking as JSON."""

    data: bytes
    media_type: str

    @property
    def sha256(self) -> str:
        """The content address of these bytes."""
        return hashlib.sha256(self.data).hexdigest()


class BlobStore:
    """Files under `root/ab/abcdef…`; the database row records the media type and size."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, sha256: str) -> Path:
        """Where the blob with this address lives."""
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 address: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def put(self, output: Output) -> str:
        """Store the bytes once and return their address; existing content is never rewritten."""
        if len(output.data) > MAX_BLOB_BYTES:
            raise ValueError(f"output is {len(output.data)} bytes; the limit is {MAX_BLOB_BYTES}")
        sha = output.sha256
        target = self.path(sha)
        if target.exists():
            return sha
        target.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a crash never leaves a truncated blob under a valid address.
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(output.data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return sha

    def get(self, sha256: str) -> bytes:
        """The bytes stored under this address."""
        return self.path(sha256).read_bytes()
