"""Fixtures for the job tests: a clock tests move by hand, and both queue backends."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.jobs.memory import MemoryJobBackend
from dicom_node.jobs.queue import JobQueue, QueuePolicy
from dicom_node.jobs.sqlite import SQLiteJobBackend

POLICY = QueuePolicy(max_attempts=3, backoff_seconds=10, max_backoff_seconds=25, lease_seconds=60)


class FakeClock:
    """Seconds since the epoch that only move when a test says so."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["memory", "sqlite"])
def queue(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> Iterator[JobQueue]:
    if request.param == "memory":
        yield JobQueue(MemoryJobBackend(), POLICY, clock=clock)
        return
    backend = SQLiteJobBackend(tmp_path / "index.sqlite")
    yield JobQueue(backend, POLICY, clock=clock)
    backend.close()
