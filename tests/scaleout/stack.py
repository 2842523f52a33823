"""The several-machine stack on 127.0.0.1, started from packages only: PostgreSQL (MLflow's
backend store and the Optuna storage), an S3 object store (moto's server mode), and
``mlflow server`` proxying artifacts to S3. Each client "machine" is a process with its own
working folder, temp dir and home, sharing nothing with the others but the server's URL and
the Optuna storage URL (what users set on real hosts)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.postgres_server import PostgresServer, PostgresUnavailable, free_port, start_postgres

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BUCKET = "fewshot-artifacts"
MLFLOW_DB, OPTUNA_DB = "mlflow", "optuna"
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class StackUnavailable(RuntimeError):
    """A package the stack needs is missing (the tests skip with this reason)."""


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s: {log.read_text()[-2000:]}")


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc), including those in their own sessions:
    torchrun starts each rank with ``start_new_session``, out of reach of a group kill."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        found += [int(c) for c in children]
        todo += [int(c) for c in children]
    return found


def _stop_group(proc: subprocess.Popen | None, sig: int = signal.SIGTERM) -> None:
    """Signal ``proc``, its process group and every descendant (servers fork workers,
    torchrun spawns ranks), then reap it."""
    if proc is None or proc.poll() is not None:
        return
    for pid in [proc.pid, *descendants(proc.pid)]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(os.getpgid(pid), sig)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        _stop_group(proc, signal.SIGKILL)


@dataclass
class Service:
    """A server process started in its own session (so a kill takes its workers too)."""

    name: str
    command: list[str]
    health_url: str
    folder: Path
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    starts: int = 0

    def start(self, timeout: float = 120) -> None:
        self.starts += 1
        log = self.folder / f"{self.name}-{self.starts}.log"
        with open(log, "w") as out:
            self.proc = subprocess.Popen(self.command, cwd=self.folder, env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        _wait_http(self.health_url, self.proc, log, timeout)

    def kill(self) -> None:
        """SIGKILL, as a crashed host: no shutdown, in-flight requests cut."""
        _stop_group(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        _stop_group(self.proc)


def object_store(folder: Path) -> Service:
    port = free_port()
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    env = {**os.environ, **S3_KEYS}
    return Service("s3", command, f"http://127.0.0.1:{port}/moto-api/", folder, env)


def tracking_server(folder: Path, backend_uri: str, s3_endpoint: str, workers: int) -> Service:
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
               "--artifacts-destination", f"s3://{BUCKET}/mlflow", "--host", "127.0.0.1", "--port", str(port),
               "--workers", str(workers)]  # fmt: skip
    # only the server holds the bucket's endpoint and keys: clients reach S3 through it
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env.update(MLFLOW_S3_ENDPOINT_URL=s3_endpoint, **S3_KEYS)
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no background job runner: nothing here uses it
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    return Service("mlflow", command, f"http://127.0.0.1:{port}/health", folder, env)


@dataclass
class Stack:
    folder: Path
    postgres: PostgresServer
    s3: Service
    server: Service

    @property
    def tracking_uri(self) -> str:
        return self.server.health_url.removesuffix("/health")

    @property
    def s3_endpoint(self) -> str:
        return self.s3.health_url.removesuffix("/moto-api/")

    @property
    def optuna_url(self) -> str:
        return self.postgres.url(OPTUNA_DB, driver="postgresql+psycopg2")

    def bucket_keys(self, prefix: str = "") -> list[str]:
        """Every object key in the bucket under ``prefix`` (read with boto3, as S3 holds them)."""
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.s3_endpoint, **_boto_keys())
        keys: list[str] = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
            keys += [item["Key"] for item in page.get("Contents", [])]
        return keys

    def restart_server(self, down_seconds: float = 0.0) -> None:
        self.server.kill()
        time.sleep(down_seconds)
        self.server.start()

    def close(self) -> None:
        self.server.stop()
        self.s3.stop()
        self.postgres.close()


def _boto_keys() -> dict[str, str]:
    return {"aws_access_key_id": S3_KEYS["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": S3_KEYS["AWS_SECRET_ACCESS_KEY"],
            "region_name": S3_KEYS["AWS_DEFAULT_REGION"]}  # fmt: skip


def check_packages() -> None:
    for module, package in (("moto.server", "moto[server]"), ("boto3", "boto3"), ("psycopg2", "psycopg2-binary")):
        try:
            __import__(module)
        except ImportError as exc:
            raise StackUnavailable(f"{package} is not installed (pip install -e '.[dev]'; .ci/run does this)") from exc


def start_stack(folder: Path, workers: int = 1) -> Stack:
    """PostgreSQL with the two databases, the bucket, and the tracking server, all on 127.0.0.1."""
    check_packages()
    import boto3

    postgres = start_postgres((MLFLOW_DB, OPTUNA_DB))
    s3 = server = None
    try:
        s3 = object_store(folder)
        s3.start()
        endpoint = s3.health_url.removesuffix("/moto-api/")
        boto3.client("s3", endpoint_url=endpoint, **_boto_keys()).create_bucket(Bucket=BUCKET)
        server = tracking_server(folder, postgres.url(MLFLOW_DB, driver="postgresql+psycopg2"), endpoint, workers)
        server.start(timeout=240)  # the first start migrates the empty database
    except BaseException:
        for service in (server, s3):
            if service is not None:
                service.stop()
        postgres.close()
        raise
    return Stack(folder, postgres, s3, server)


@dataclass
class Machine:
    """One client host: its own working folder, TMPDIR and HOME, a copy of the data, and only
    MLFLOW_TRACKING_URI pointing at the server. MLflow's telemetry is off, as on an offline
    cluster: when its client gives up on the unreachable telemetry endpoint it unsets an
    environment variable that a concurrent request reads (seen: a log_batch failed with
    KeyError '_MLFLOW_TELEMETRY_SESSION_ID' in benchmarks/tracking_load.py)."""

    folder: Path
    tracking_uri: str
    data_source: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    started: list[Job] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("tmp", "home"):
            (self.folder / name).mkdir(parents=True, exist_ok=True)
        if self.data_source is not None and not (self.folder / "data").exists():
            shutil.copytree(self.data_source, self.folder / "data")

    @property
    def data_dir(self) -> Path:
        return self.folder / "data"

    def env(self) -> dict[str, str]:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.folder / "home"),
               "TMPDIR": str(self.folder / "tmp"), "PYTHONPATH": str(PROJECT_ROOT), "LC_ALL": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": self.tracking_uri,
               "MLFLOW_DISABLE_TELEMETRY": "true"}  # fmt: skip
        return {**env, **self.extra_env}

    def start(self, *command: str, log_name: str = "") -> Job:
        """Start ``command`` here in a new session (its children die with it); output to a log file."""
        log = self.folder / f"{log_name or 'job'}-{len(self.started) + 1}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(list(command), cwd=self.folder, env=self.env(), stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self.started.append(Job(proc, log))
        return self.started[-1]

    def python(self, module: str, *args: str, log_name: str = "") -> Job:
        return self.start(sys.executable, "-m", module, *args, log_name=log_name or module.rsplit(".", 1)[-1])

    def torchrun(self, nproc: int, module: str, *args: str) -> Job:
        return self.python("torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m", module,
                           *args, log_name="torchrun")  # fmt: skip


@dataclass
class Job:
    proc: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = 300) -> str:
        """Wait for the job; on timeout its whole process group is killed and the test fails."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"timed out after {timeout:.0f} s: {self.output()[-3000:]}") from None
        return self.output()

    def kill(self) -> None:
        _stop_group(self.proc, signal.SIGKILL)

    def wait_for(self, condition, timeout: float = 240, poll: float = 0.1) -> None:
        """Until ``condition()`` holds; fails if the job exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"the job exited ({self.proc.returncode}) first: {self.output()[-3000:]}")
            time.sleep(poll)
        self.kill()
        raise AssertionError(f"condition not met within {timeout:.0f} s: {self.output()[-3000:]}")


__all__ = ["Job", "Machine", "PostgresUnavailable", "Stack", "StackUnavailable", "start_stack"]
