"""A throwaway local PostgreSQL server (initdb + pg_ctl) for tests, benchmarks and trials."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path


def find_pg_bin() -> Path | None:
    """The folder holding initdb and pg_ctl, or None when no PostgreSQL server is installed."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(candidates[-1]).parent if candidates else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class TempPostgres:
    """A private cluster on a unix socket; PostgreSQL refuses to run as root, so root runs it as `postgres`."""

    root: Path
    port: int
    bin_dir: Path
    user: str | None

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the `aesarena` database (psycopg 3 over the unix socket)."""
        return f"postgresql+psycopg://postgres@/aesarena?host={self.root}&port={self.port}"

    def _run(self, *args: str) -> None:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if self.user:
            command = ["runuser", "-u", self.user, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stderr.strip()}")

    @classmethod
    def start(cls) -> "TempPostgres":
        """initdb a fresh cluster in a temp folder, start it, and create the database."""
        bin_dir = find_pg_bin()
        if bin_dir is None:
            raise RuntimeError("no PostgreSQL server binaries (initdb) found; install the `postgresql` package")
        root = Path(tempfile.mkdtemp(prefix="aesarena-pg-"))
        user = "postgres" if os.geteuid() == 0 else None
        if user:
            entry = pwd.getpwnam(user)
            os.chown(root, entry.pw_uid, entry.pw_gid)
        server = cls(root, _free_port(), bin_dir, user)
        try:
            server._setup()
        except BaseException:
            server.stop()
            raise
        return server

    def _setup(self) -> None:
        root = self.root
        self._run("initdb", "-D", str(root / "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self._run("pg_ctl", "-D", str(root / "data"), "-l", str(root / "log"), "-w", "start", "-o",
                  f"-p {self.port} -k {root} -c listen_addresses='' -c max_connections=200")
        self._run("createdb", "-h", str(root), "-p", str(self.port), "-U", "postgres", "aesarena")

    def stop(self) -> None:
        """Stop the server and delete its files."""
        try:
            if (self.root / "data" / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
