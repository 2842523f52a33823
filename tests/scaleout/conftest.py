"""Fixtures of the scale-out tests: one stack per session (PostgreSQL, S3, tracking server on
127.0.0.1) and client machines, each a fresh folder that shares nothing but the URLs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.scaleout.stack import Machine, PostgresUnavailable, Stack, StackUnavailable, start_stack

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test in this folder carries the ``scaleout`` mark (``pytest -m scaleout``)."""
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.scaleout)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    try:
        started = start_stack(tmp_path_factory.mktemp("stack"))
    except (StackUnavailable, PostgresUnavailable) as exc:
        pytest.skip(f"scale-out stack unavailable: {exc}")
    try:
        yield started
    finally:
        started.close()


@pytest.fixture
def machine(stack: Stack, synthetic_data_dir: Path, tmp_path: Path) -> Iterator[Callable[..., Machine]]:
    """``machine("host-a", experiment="x")``: a client host with its own folder and data copy."""

    made: list[Machine] = []

    def make(name: str, experiment: str | None = None) -> Machine:
        extra = {"MLFLOW_EXPERIMENT_NAME": experiment} if experiment else {}
        made.append(Machine(tmp_path / name, stack.tracking_uri, synthetic_data_dir, extra))
        return made[-1]

    yield make
    for host in made:  # a failed test leaves no worker behind
        for job in host.started:
            job.kill()


@pytest.fixture
def client(stack: Stack) -> MlflowClient:
    """The operator's view of the server (the test process talks HTTP only)."""
    return MlflowClient(stack.tracking_uri)
