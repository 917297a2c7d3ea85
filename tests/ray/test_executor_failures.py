"""How the Ray executor maps Ray's failures, on a fake ``ray`` module (no cluster, milliseconds):
the actor's own error stays the job's, a lost actor costs an attempt, a lost cluster costs none,
drops every actor and is connected to again."""

import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dicom_node.config import load_settings
from dicom_node.errors import InfrastructureError, PermanentError, UnavailableError
from dicom_node.scaleout import executor as executor_module
from dicom_node.scaleout.executor import ClusterUnavailable, RayExecutor


class RayError(Exception):
    pass


class RayTaskError(RayError):
    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class RayActorError(RayError):
    pass


class GetTimeoutError(RayError):
    pass


class FakeRay:
    """What the executor calls of ``ray``; ``compute`` says what the next compute call does."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.init_error: BaseException | None = None
        self.compute: Callable[[], Any] = lambda: SimpleNamespace(
            timings={"infer": 0.1}, predictions=["p"], gate=[], heatmaps=[], abstain_reason="")
        self.put_error: BaseException | None = None
        self.handles = 0
        self.reachable = True

    def module(self) -> types.ModuleType:
        ray = types.ModuleType("ray")
        exceptions = types.ModuleType("ray.exceptions")
        for cls in (RayError, RayTaskError, RayActorError, GetTimeoutError):
            setattr(exceptions, cls.__name__, cls)
        ray.exceptions = exceptions  # type: ignore[attr-defined]
        ray.init = self.init  # type: ignore[attr-defined]
        ray.shutdown = lambda: self.calls.append("shutdown")  # type: ignore[attr-defined]
        ray.put = self.put  # type: ignore[attr-defined]
        ray.get = lambda ref, timeout=None: ref()  # type: ignore[attr-defined]
        ray.kill = lambda handle, no_restart=True: self.calls.append("kill")  # type: ignore[attr-defined]
        ray.remote = lambda cls: SimpleNamespace(options=lambda **kw: SimpleNamespace(remote=self.make))  # type: ignore[attr-defined]
        return ray

    def init(self, **kwargs: Any) -> None:
        self.calls.append("init")
        if self.init_error is not None:
            raise self.init_error

    def put(self, value: Any) -> str:
        if self.put_error is not None:
            raise self.put_error
        return "ref"

    def make(self, *args: Any) -> SimpleNamespace:
        self.handles += 1
        info = {"version": "1", "device": "cpu", "pid": self.handles, "load_seconds": 0.1}
        return SimpleNamespace(number=self.handles,
                               describe=SimpleNamespace(remote=lambda: lambda: dict(info)),
                               compute=SimpleNamespace(remote=lambda job, ref: self.compute))


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeRay]:
    ray = FakeRay()
    module = ray.module()
    monkeypatch.setitem(sys.modules, "ray", module)
    monkeypatch.setitem(sys.modules, "ray.exceptions", module.exceptions)
    monkeypatch.setattr(executor_module, "reachable", lambda address, timeout=2.0: ray.reachable)
    yield ray


@pytest.fixture
def executor(tmp_path: Path, fake: FakeRay) -> RayExecutor:
    path = tmp_path / "node.toml"
    path.write_text('[workers]\nexecutor = "ray"\nray_address = "127.0.0.1:6379"\nray_actors_per_model = 2\n')
    settings = load_settings(path, environ={})
    registry = SimpleNamespace(manifest=lambda model: SimpleNamespace(sha256="0" * 64))
    made = RayExecutor(settings, registry, ["demo"])  # type: ignore[arg-type]
    connect(made)
    return made


def connect(executor: RayExecutor) -> None:
    """One round of the background thread, by hand."""
    executor._connect()
    executor._make_actors()


def compute(executor: RayExecutor) -> SimpleNamespace:
    ctx = SimpleNamespace(job=SimpleNamespace(model="demo"), datasets=[], timings={})
    executor.compute(ctx)  # type: ignore[arg-type]
    return ctx


def test_a_connected_executor_computes(executor: RayExecutor) -> None:
    assert executor.not_ready() is None
    assert compute(executor).predictions == ["p"]


@pytest.mark.parametrize("lost", [ConnectionError("Ray Client: connection lost"), RayError("system error"),
                                  OSError("broken pipe")])
@pytest.mark.parametrize("where", ["put", "get"])
def test_a_lost_cluster_costs_no_attempt_drops_every_actor_and_is_connected_again(
        executor: RayExecutor, fake: FakeRay, lost: BaseException, where: str) -> None:
    if where == "put":
        fake.put_error = lost
    else:
        def raise_lost() -> None:
            raise lost
        fake.compute = raise_lost
    with pytest.raises(ClusterUnavailable) as caught:
        compute(executor)
    assert isinstance(caught.value, UnavailableError)  # the queue hands the job back, uncounted
    reason = executor.not_ready()
    assert reason is not None and "lost" in reason  # workers claim nothing more meanwhile
    assert all(s.handle is None for s in executor.slots) and fake.calls[-1] == "shutdown"
    fake.put_error, fake.compute = None, FakeRay().compute
    connect(executor)  # the background thread's next round
    assert fake.calls.count("init") == 2 and executor.not_ready() is None
    assert compute(executor).predictions == ["p"]


@pytest.mark.parametrize("died", [RayActorError("actor died"), GetTimeoutError("hung")])
def test_a_lost_actor_in_a_live_cluster_costs_an_attempt_and_only_that_actor(
        executor: RayExecutor, fake: FakeRay, died: BaseException) -> None:
    def raise_died() -> None:
        raise died
    fake.compute = raise_died
    with pytest.raises(InfrastructureError) as caught:
        compute(executor)
    assert not isinstance(caught.value, UnavailableError)  # counted: a job that kills actors dies
    assert sorted(s.handle is None for s in executor.slots) == [False, True] and "shutdown" not in fake.calls
    assert executor._connected


def test_a_dead_actor_in_a_cluster_that_is_gone_is_a_lost_cluster(executor: RayExecutor, fake: FakeRay) -> None:
    def raise_died() -> None:
        raise RayActorError("actor died")
    fake.compute = raise_died
    fake.reachable = False
    with pytest.raises(ClusterUnavailable):
        compute(executor)
    assert not executor._connected and all(s.handle is None for s in executor.slots)


def test_the_actors_own_permanent_error_stays_the_jobs(executor: RayExecutor, fake: FakeRay) -> None:
    def raise_task() -> None:
        raise RayTaskError(PermanentError("wrong modality"))
    fake.compute = raise_task
    with pytest.raises(PermanentError, match="wrong modality"):
        compute(executor)
    assert executor.not_ready() is None and "shutdown" not in fake.calls


def test_a_failed_init_is_shut_down_so_the_next_try_is_a_fresh_one(tmp_path: Path, fake: FakeRay) -> None:
    fake.init_error = ConnectionError("GCS went away during init")
    path = tmp_path / "node.toml"
    path.write_text('[workers]\nexecutor = "ray"\nray_address = "127.0.0.1:6379"\n')
    registry = SimpleNamespace(manifest=lambda model: SimpleNamespace(sha256="0" * 64))
    executor = RayExecutor(load_settings(path, environ={}), registry, ["demo"])  # type: ignore[arg-type]
    with pytest.raises(ConnectionError):
        connect(executor)
    assert fake.calls == ["init", "shutdown"] and executor.not_ready() is not None
    fake.init_error = None
    connect(executor)
    assert executor.not_ready() is None


def test_a_late_error_of_an_old_connection_does_not_drop_the_new_one(executor: RayExecutor) -> None:
    old = executor._generation
    executor._disconnect(old, "the Ray cluster was lost (ConnectionError)")
    connect(executor)
    executor._disconnect(old, "the Ray cluster was lost (ConnectionError)")  # a second worker, late
    assert executor.not_ready() is None
