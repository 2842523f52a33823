"""A throw-away PostgreSQL server on 127.0.0.1 from Debian's binaries, for the tests that need a
real one (the reliability suite's workers, the scale-out stack). It can be stopped and started
again on the same port and data folder, which is how the scale-out tests restart it under load."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

USER = "fewshot"
PASSWORD = "s3cret-pw"  # a password in every URL shows that redaction works


class PostgresUnavailable(RuntimeError):
    """Why no server could be started (the tests skip with this reason)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin() -> Path | None:
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    found = shutil.which("initdb")
    return Path(found).parent if found and shutil.which("pg_ctl") else None


def _as_cluster_user(folder: Path, sockets: Path) -> list[str]:
    """The command prefix that runs PostgreSQL as a non-root user when we are root (initdb
    refuses root), after giving that user ``folder``."""
    if os.geteuid() != 0:
        return []
    import pwd

    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        user = pwd.getpwnam("nobody")
    for path in (folder, sockets):
        os.chown(path, user.pw_uid, user.pw_gid)
    os.chmod(folder, 0o755)
    _make_reachable(folder)
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]


def _make_reachable(folder: Path) -> None:
    """Let the cluster user traverse every parent of ``folder``. Done again before each start:
    a pytest session starting meanwhile resets its base folder to 0700."""
    for parent in folder.parents:
        if parent == Path(parent.anchor):
            break
        os.chmod(parent, os.stat(parent).st_mode | 0o011)


@dataclass
class PostgresServer:
    """One cluster in ``folder`` listening on 127.0.0.1:``port``."""

    bin_dir: Path
    folder: Path
    port: int = field(default_factory=free_port)
    prefix: list[str] = field(default_factory=list)

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{database}"

    def _pg(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        env = {**os.environ, "LC_ALL": "C", "HOME": str(self.folder)}
        if self.prefix:
            _make_reachable(self.folder)
        return subprocess.run(self.prefix + list(args), env=env, capture_output=True, text=True, timeout=timeout)

    def init(self) -> None:
        sockets = self.folder / "sock"
        sockets.mkdir(parents=True, exist_ok=True)
        self.prefix = _as_cluster_user(self.folder, sockets)
        password_file = self.folder / "pw"
        password_file.write_text(PASSWORD + "\n")
        os.chmod(password_file, 0o644)
        done = self._pg(str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", USER, "-A", "scram-sha-256",
                        f"--pwfile={password_file}", "--no-sync", "-E", "UTF8")  # fmt: skip
        if done.returncode != 0:
            raise PostgresUnavailable(f"initdb failed: {done.stderr.strip()[-300:]}")

    def start(self) -> None:
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.folder / 'sock'} -c fsync=off "
                   "-c max_connections=100")  # fmt: skip
        log = self.folder / "log"
        done = self._pg(
            str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(log), "-w", "start"
        )
        if done.returncode != 0:
            tail = log.read_text()[-300:] if log.is_file() else ""
            raise PostgresUnavailable(f"pg_ctl start failed: {done.stderr.strip()[-300:]} {tail}")

    def stop(self, mode: str = "fast") -> None:
        """``fast`` closes every client connection; ``immediate`` is a crash without shutdown."""
        done = self._pg(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")
        if done.returncode != 0 and "Is server running?" not in done.stderr:
            raise RuntimeError(f"pg_ctl stop failed: {done.stderr.strip()[-300:]}")

    def close(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)

    def create_database(self, name: str) -> None:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=USER, password=PASSWORD, dbname="postgres")
        try:
            conn.autocommit = True
            conn.cursor().execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()


def start_postgres(databases: tuple[str, ...]) -> PostgresServer:
    """A started server holding ``databases``, its cluster in a fresh folder under the system
    temp dir: not under pytest's base folder, which a pytest session starting meanwhile resets
    to 0700, and a running server that cannot reach its files any more PANICs. ``close()``
    stops it and removes the folder. Raises PostgresUnavailable, saying why, when Debian's
    postgresql binaries or psycopg2 are missing or the server does not start."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        raise PostgresUnavailable("PostgreSQL binaries not found (apt-get install postgresql; .ci/run does this)")
    try:
        import psycopg2  # noqa: F401
    except ImportError as exc:
        raise PostgresUnavailable("psycopg2 is not installed") from exc
    server = PostgresServer(bin_dir, Path(tempfile.mkdtemp(prefix="fewshot-postgres-")))
    try:
        server.init()
        server.start()
        for name in databases:
            server.create_database(name)
    except BaseException:
        server.close()
        raise
    return server
