"""How the Ray executor maps failures, without a cluster (milliseconds).

Two halves, as in the code: the driver process's :class:`Driver` on a fake ``ray`` module (the
actor's own error, a lost actor, a lost cluster, an actor that keeps refusing to start), and the
node's :class:`RayExecutor` on a fake driver link (what each answer does to the job, the driver's
end, queue depth, per-model readiness)."""

import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dicom_node.config import Settings, load_settings
from dicom_node.errors import InfrastructureError, PermanentError, RetryableError, UnavailableError
from dicom_node.scaleout import driver as driver_module
from dicom_node.scaleout import executor as executor_module
from dicom_node.scaleout.driver import Driver
from dicom_node.scaleout.executor import ClusterUnavailable, RayExecutor
from dicom_node.scaleout.wire import LinkClosed

IDENTITY = {"version": "1", "manifest_sha256": "a" * 64, "weights_sha256": "b" * 64, "gate_reference_sha256": ""}


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
    """What the driver calls of ``ray``; ``compute`` says what the next compute call does,
    ``refuse`` makes every new actor fail to start."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.compute: Callable[[], Any] = lambda: "computed"
        self.refuse: BaseException | None = None
        self.hang: set[int] = set()  # the actors (by number) whose start never ends
        self.waits: list[float | None] = []
        self.handles = 0

    def module(self) -> types.ModuleType:
        ray = types.ModuleType("ray")
        exceptions = types.ModuleType("ray.exceptions")
        for cls in (RayError, RayTaskError, RayActorError, GetTimeoutError):
            setattr(exceptions, cls.__name__, cls)
        ray.exceptions = exceptions  # type: ignore[attr-defined]
        ray.init = lambda **kw: self.calls.append("init")  # type: ignore[attr-defined]
        ray.shutdown = lambda: self.calls.append("shutdown")  # type: ignore[attr-defined]
        ray.put = lambda value: "ref"  # type: ignore[attr-defined]
        ray.get = lambda ref, timeout=None: ref()  # type: ignore[attr-defined]
        ray.wait = self.wait  # type: ignore[attr-defined]
        ray.kill = lambda handle, no_restart=True: self.calls.append("kill")  # type: ignore[attr-defined]
        ray.remote = lambda cls: SimpleNamespace(options=lambda **kw: SimpleNamespace(remote=self.make))  # type: ignore[attr-defined]
        return ray

    def wait(self, refs: list[Any], num_returns: int = 1, timeout: float | None = None) -> tuple[list, list]:
        self.waits.append(timeout)
        ready = [r for r in refs if r.number not in self.hang][:num_returns]
        return ready, [r for r in refs if r not in ready]

    def make(self, *args: Any) -> SimpleNamespace:
        self.handles += 1
        info = {"version": "1", "device": "cpu", "pid": self.handles, "load_seconds": 0.1}
        refuse = self.refuse

        def describe() -> dict[str, Any]:
            if refuse is not None:
                raise RayActorError(f"The actor died in __init__: {refuse}")
            return dict(info)
        describe.number = self.handles  # type: ignore[attr-defined]
        return SimpleNamespace(number=self.handles, describe=SimpleNamespace(remote=lambda: describe),
                               compute=SimpleNamespace(remote=lambda job, ref: self.compute))


def settings_of(tmp_path: Path, extra: str = "") -> Settings:
    path = tmp_path / "node.toml"
    path.write_text('[workers]\nexecutor = "ray"\nray_address = "127.0.0.1:6379"\nray_actors_per_model = 2\n'
                    f"ray_connect_seconds = 2\n{extra}")
    return load_settings(path, environ={})


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeRay]:
    ray = FakeRay()
    module = ray.module()
    monkeypatch.setitem(sys.modules, "ray", module)
    monkeypatch.setitem(sys.modules, "ray.exceptions", module.exceptions)
    monkeypatch.setattr(driver_module, "reachable", lambda address, timeout=2.0: True)
    yield ray


@pytest.fixture
def driver(tmp_path: Path, fake: FakeRay) -> tuple[Driver, list[tuple[Any, ...]]]:
    sent: list[tuple[Any, ...]] = []
    made = Driver(settings_of(tmp_path), {"demo": IDENTITY}, sent.append)
    made.connect()
    made.make(list(made.handles))
    return made, sent


# -- the driver process's side ----------------------------------------------------------------------


def test_the_driver_connects_and_reports_each_actor_ready(driver: tuple[Driver, list]) -> None:
    made, sent = driver
    assert sent[0] == ("connected",)
    assert [(m[1], m[2], m[3]["pid"]) for m in sent[1:]] == [("demo", 0, 1), ("demo", 1, 2)]
    assert made.compute("demo", 0, SimpleNamespace(), []) == ("done", "computed")


def test_the_actors_own_error_is_the_jobs(driver: tuple[Driver, list], fake: FakeRay) -> None:
    made, _ = driver

    def permanent() -> None:
        raise RayTaskError(PermanentError("wrong modality"))
    fake.compute = permanent
    kind, error = made.compute("demo", 0, SimpleNamespace(), [])
    assert kind == "task" and isinstance(error, PermanentError)

    def bug() -> None:
        raise RayTaskError(ZeroDivisionError("x"))
    fake.compute = bug
    assert made.compute("demo", 0, SimpleNamespace(), []) == ("task", "ZeroDivisionError")


@pytest.mark.parametrize("died", [RayActorError("actor died"), GetTimeoutError("hung")])
def test_a_lost_actor_is_forgotten_and_made_again_at_once(driver: tuple[Driver, list], fake: FakeRay,
                                                         died: BaseException) -> None:
    made, sent = driver

    def raise_died() -> None:
        raise died
    fake.compute = raise_died
    assert made.compute("demo", 1, SimpleNamespace(), []) == ("actor", type(died).__name__)
    assert made.handles[("demo", 1)] is None and made.handles[("demo", 0)] is not None
    assert sent[-1][:4] == ("actor", "demo", 1, None) and "lost" in sent[-1][4]
    assert made.retry_at[("demo", 1)] == 0.0 and "kill" in fake.calls
    made.make([("demo", 1)])
    assert made.handles[("demo", 1)] is not None and sent[-1][3]["pid"] == 3


def test_a_dead_actor_in_a_cluster_that_is_gone_is_a_lost_cluster(
        driver: tuple[Driver, list], fake: FakeRay, monkeypatch: pytest.MonkeyPatch) -> None:
    made, _ = driver
    monkeypatch.setattr(driver_module, "reachable", lambda address, timeout=2.0: False)

    def raise_died() -> None:
        raise RayActorError("actor died")
    fake.compute = raise_died
    assert made.compute("demo", 0, SimpleNamespace(), []) == ("cluster", "RayActorError")


def test_a_broken_connection_is_a_lost_cluster(driver: tuple[Driver, list], fake: FakeRay) -> None:
    made, _ = driver

    def raise_lost() -> None:
        raise ConnectionError("connection lost")
    fake.compute = raise_lost
    assert made.compute("demo", 0, SimpleNamespace(), []) == ("cluster", "ConnectionError")


@pytest.mark.parametrize("error", [RayError("ObjectStoreFullError: the object store is full"),
                                   RayError("WorkerCrashedError"), OSError("no space left")])
def test_any_other_error_from_ray_in_a_cluster_that_answers_is_the_jobs(
        driver: tuple[Driver, list], fake: FakeRay, monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    """A poison job (a series too big for the object store) must not take the driver and every
    actor down, to be handed back uncounted and fail the same way forever."""
    made, _ = driver

    def raise_error() -> None:
        raise error
    fake.compute = raise_error
    kind, reason = made.compute("demo", 0, SimpleNamespace(), [])
    assert kind == "job" and reason.startswith(type(error).__name__) and str(error) in reason
    assert made.handles[("demo", 0)] is not None and "kill" not in fake.calls  # the actor stays
    monkeypatch.setattr(driver_module, "reachable", lambda address, timeout=2.0: False)
    assert made.compute("demo", 0, SimpleNamespace(), []) == ("cluster", type(error).__name__)


def test_an_answer_that_cannot_be_pickled_is_the_jobs_failure(driver: tuple[Driver, list]) -> None:
    made, _ = driver
    answers: list[tuple[Any, ...]] = []

    def emit(message: tuple[Any, ...]) -> None:
        import pickle
        pickle.dumps(message)
        answers.append(message)
    made.compute = lambda *args: ("done", threading.Lock())  # type: ignore[method-assign]
    messages = iter([("compute", 7, "demo", 0, SimpleNamespace(), [])])

    def receive(conn: Any) -> tuple[Any, ...]:
        try:
            return next(messages)
        except StopIteration:
            wait_until(lambda: bool(answers), "the answer")
            raise EOFError from None
    driver_module.serve(None, receive, made, emit)
    [(name, number, (kind, reason, _))] = answers
    assert (name, number, kind) == ("answer", 7, "job") and "could not be sent" in reason and "lock" in reason


def test_an_actor_that_keeps_refusing_to_start_is_tried_again_with_a_growing_backoff(
        tmp_path: Path, fake: FakeRay) -> None:
    sent: list[tuple[Any, ...]] = []
    made = Driver(settings_of(tmp_path), {"demo": IDENTITY}, sent.append)
    made.connect()
    fake.refuse = ValueError("model demo-cxr on this Ray host is not the node's (weights_sha256 ...)")
    keeper = threading.Thread(target=made.keep_actors, daemon=True)
    keeper.start()
    deadline = time.monotonic() + 20
    while len([m for m in sent if m[0] == "actor"]) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    made.stop.set()
    made.wake.set()
    keeper.join(timeout=10)
    refused = [m for m in sent if m[0] == "actor"]
    # two slots, tried at once and again after 2 s (ray_connect_seconds), then after 4 s: no tight loop
    assert [m[5] for m in refused] == [2.0, 2.0, 4.0, 4.0] and fake.handles == 4, refused
    assert all(m[3] is None and "could not start" in m[4] and "not the node's" in m[4] for m in refused)


def test_the_actors_start_together_under_their_own_shorter_timeout(tmp_path: Path, fake: FakeRay) -> None:
    """One actor that never finishes loading must not hold the others' report back, nor wait the
    compute's timeout (600 s) per actor."""
    sent: list[tuple[Any, ...]] = []
    made = Driver(settings_of(tmp_path), {"demo": IDENTITY}, sent.append)
    made.connect()
    fake.hang = {1}
    made.make(list(made.handles))
    actors = [m for m in sent if m[0] == "actor"]
    assert [(m[2], m[3] is not None) for m in actors] == [(1, True), (0, False)]  # the ready one first
    assert "TimeoutError: not ready 180 s after it was asked for" in actors[1][4]
    assert made.handles[("demo", 1)] is not None and made.handles[("demo", 0)] is None
    assert fake.waits and all(t is not None and t <= driver_module.ACTOR_START_SECONDS for t in fake.waits)
    assert made.settings.workers.ray_call_timeout_seconds > driver_module.ACTOR_START_SECONDS


# -- the node's side ---------------------------------------------------------------------------


class FakeLink:
    """A driver process as the executor sees it; the test answers its calls."""

    def __init__(self, hello: tuple[Any, ...], on_event: Callable[..., None], on_end: Callable[..., None]) -> None:
        self.hello, self.on_event, self.on_end = hello, on_event, on_end
        self.calls: list[tuple[tuple[Any, ...], Future[Any]]] = []
        self.closed = False
        self.pid = 4242

    def call(self, name: str, *args: Any) -> "Future[Any]":
        if self.closed:
            raise LinkClosed("the Ray driver process 4242 is gone")
        future: Future[Any] = Future()
        self.calls.append(((name, *args), future))
        return future

    def close(self, grace: float = 5.0) -> None:
        if not self.closed:
            self.closed = True
            for _, future in self.calls:
                if not future.done():
                    future.set_exception(LinkClosed("the Ray driver process 4242 ended"))
            self.on_end(self, "ended (exit status killed by SIGKILL)")

    def ready(self, models: list[str], actors: int = 2) -> None:
        self.on_event(self, ("connected",))
        for model in models:
            for slot in range(actors):
                self.on_event(self, ("actor", model, slot, {"version": "1", "device": "cpu", "pid": 100 + slot,
                                                           "ready_seconds": 1.0, "load_seconds": 0.5}, "", 0.0))


class Audit:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def record(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))


def executor_of(tmp_path: Path, models: list[str], monkeypatch: pytest.MonkeyPatch,
                audit: Audit | None = None) -> tuple[RayExecutor, list[FakeLink]]:
    monkeypatch.setattr(executor_module, "identity", lambda manifest: dict(IDENTITY))
    monkeypatch.setattr(executor_module, "reachable", lambda address, timeout=2.0: True)
    links: list[FakeLink] = []

    def launch(*args: Any) -> FakeLink:
        links.append(FakeLink(*args))
        return links[-1]
    registry = SimpleNamespace(manifest=lambda model: None)
    made = RayExecutor(settings_of(tmp_path), registry, models, audit, launch)  # type: ignore[arg-type]
    made._tend()  # one round of the background thread, by hand
    return made, links


def compute_in_thread(executor: RayExecutor, model: str = "demo") -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}
    ctx = SimpleNamespace(job=SimpleNamespace(model=model), datasets=[], timings={})

    def run() -> None:
        try:
            executor.compute(ctx)  # type: ignore[arg-type]
            out["ctx"] = ctx
        except Exception as exc:
            out["error"] = exc
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def answer(executor: RayExecutor, link: FakeLink, reply: Any) -> dict[str, Any]:
    """One compute, answered with ``reply`` (an exception: the link's end)."""
    thread, out = compute_in_thread(executor)
    wait_until(lambda: bool(link.calls) and not link.calls[-1][1].done(), "the call to reach the driver")
    if isinstance(reply, BaseException):
        link.close()
    else:
        link.calls[-1][1].set_result(reply)
    thread.join(timeout=10)
    return out


def test_the_driver_and_its_actors_get_only_the_compute_settings(tmp_path: Path) -> None:
    """Not the web token (nor TLS, destinations): they would be in every actor's creation args."""
    from dicom_node.scaleout.actor import compute_settings
    settings = settings_of(tmp_path, '[web]\ntoken = "s3cret-token-value"\n[[pipelines]]\nname = "chest"\n'
                           'model = "demo-cxr"\nexplain = ["gradcam"]\nlime_samples = 7\n')
    sent = compute_settings(settings)
    assert settings.web.token and not sent.web.token and "s3cret" not in repr(sent)
    assert (sent.pipelines, sent.inference, sent.models, sent.workers) == (
        settings.pipelines, settings.inference, settings.models, settings.workers)


def test_the_node_starts_a_driver_and_computes_through_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    executor, [link] = executor_of(tmp_path, ["demo"], monkeypatch)
    assert link.hello[0] == "hello" and link.hello[2] == {"demo": IDENTITY}
    assert link.hello[1] == executor_module.compute_settings(executor.settings)
    assert "connecting" in (executor.not_ready() or "")
    link.ready(["demo"])
    assert executor.not_ready() is None and executor.claimable() == {"demo"}
    computed = SimpleNamespace(timings={"infer": 0.1}, predictions=["p"], gate=[], heatmaps=[], abstain_reason="")
    out = answer(executor, link, ("done", computed, 0.25))
    assert out["ctx"].predictions == ["p"] and link.calls[0][0][:3] == ("compute", "demo", 0)
    assert out["ctx"].timings == {"infer": 0.1, "ray_driver": 0.25}  # the driver's seconds on the call


def test_the_driver_ending_mid_job_costs_no_attempt_and_a_new_one_starts_after_a_backoff(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    audit = Audit()
    executor, links = executor_of(tmp_path, ["demo"], monkeypatch, audit)
    links[0].ready(["demo"])
    monkeypatch.setattr(executor_module, "reachable", lambda address, timeout=2.0: False)  # the GCS is gone
    out = answer(executor, links[0], LinkClosed("gone"))
    monkeypatch.setattr(executor_module, "reachable", lambda address, timeout=2.0: True)
    assert isinstance(out["error"], ClusterUnavailable) and isinstance(out["error"], UnavailableError)
    reason = executor.not_ready()
    assert reason is not None and "driver process 4242" in reason and "SIGKILL" in reason
    assert executor.claimable() == frozenset() and not any(s["alive"] for s in executor.statuses())
    assert audit.events == [("ray_driver_ended", {"pid": 4242, "reason": "ended (exit status killed by SIGKILL)"})]
    executor._tend()
    assert len(links) == 1  # the backoff (ray_connect_seconds) first: no tight loop of drivers
    executor._next_launch = 0.0
    executor._tend()
    assert len(links) == 2
    links[1].ready(["demo"])
    assert executor.not_ready() is None


def test_the_driver_ending_mid_job_while_the_cluster_answers_costs_the_attempt(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The job may be what ended it (the driver OOM-killed while unpickling its series)."""
    executor, links = executor_of(tmp_path, ["demo"], monkeypatch)
    links[0].ready(["demo"])
    out = answer(executor, links[0], LinkClosed("gone"))
    assert isinstance(out["error"], InfrastructureError) and not isinstance(out["error"], UnavailableError)
    assert "while the Ray cluster at 127.0.0.1:6379 answered" in str(out["error"])


def test_a_job_that_ray_fails_in_a_cluster_that_answers_costs_the_attempt_and_keeps_the_driver(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    executor, [link] = executor_of(tmp_path, ["demo"], monkeypatch)
    link.ready(["demo"])
    out = answer(executor, link, ("job", "ObjectStoreFullError: the object store is full"))
    assert isinstance(out["error"], InfrastructureError) and not isinstance(out["error"], UnavailableError)
    assert "ObjectStoreFullError" in str(out["error"]) and not link.closed
    assert executor.not_ready() is None and all(s["alive"] for s in executor.statuses())


def test_a_job_that_brings_the_cluster_down_each_time_ends_dead_after_max_attempts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The backstop: answered "cluster" at every try (no attempt spent each time), the job is
    still counted after ``max_handbacks`` hand-backs in a row, and ends dead with a reason."""
    from dicom_node.jobs.memory import MemoryJobBackend
    from dicom_node.jobs.queue import JobQueue, JobSpec, JobState, QueuePolicy
    from dicom_node.jobs.worker import Worker

    executor, links = executor_of(tmp_path, ["demo"], monkeypatch)
    now = [1000.0]
    policy = QueuePolicy(max_attempts=3, max_handbacks=4)
    queue = JobQueue(MemoryJobBackend(), policy, clock=lambda: now[0])
    job = queue.enqueue(JobSpec("1.2.3", "1.2.3.4", ("1.2.3.4.5",), "p", "demo", "1"))
    assert job is not None

    def run(job: Any, timings: dict[str, float]) -> None:
        executor.compute(SimpleNamespace(job=job, datasets=[], timings=timings))  # type: ignore[arg-type]
    worker = Worker(queue, run, "w0", models=executor.claimable)
    tries = 0
    while (current := queue.get(job.id)) is not None and current.state == JobState.QUEUED:
        assert tries < 50, f"still queued after {tries} tries: {current}"
        executor._next_launch = 0.0
        executor._tend()  # a fresh driver each time, as after a lost cluster
        links[-1].ready(["demo"])
        now[0] += policy.max_backoff_seconds + 1
        thread = threading.Thread(target=worker.run_once, daemon=True)
        thread.start()
        wait_until(lambda: bool(links[-1].calls), "the call to reach the driver")
        links[-1].calls[-1][1].set_result(("cluster", "ObjectStoreFullError"))
        thread.join(timeout=10)
        wait_until(lambda: links[-1].closed, "the driver to be dropped")
        tries += 1
    assert current is not None and current.state == JobState.DEAD and current.attempts == 3
    assert tries == 3 * 4 and "handed back 4 times in a row" in current.reason and "ObjectStoreFullError" in current.reason


def test_a_lost_actor_costs_an_attempt_and_only_that_actor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    executor, [link] = executor_of(tmp_path, ["demo"], monkeypatch)
    link.ready(["demo"])
    thread, out = compute_in_thread(executor)
    wait_until(lambda: bool(link.calls), "the call to reach the driver")
    # the driver's order: its "lost" event, then the answer
    link.on_event(link, ("actor", "demo", 0, None, "lost (RayActorError); a new one is being made", 0.0))
    link.calls[-1][1].set_result(("actor", "RayActorError"))
    thread.join(timeout=10)
    assert isinstance(out["error"], InfrastructureError) and not isinstance(out["error"], UnavailableError)
    assert sorted(s["alive"] for s in executor.statuses()) == [False, True] and not link.closed
    assert executor.claimable() == {"demo"}  # its other actor goes on
    assert executor.not_ready() is None


def ready_event(slot: int, pid: int) -> tuple[Any, ...]:
    return ("actor", "demo", slot, {"version": "1", "device": "cpu", "pid": pid, "ready_seconds": 1.0,
                                    "load_seconds": 0.5}, "", 0.0)


def test_a_replacement_ready_before_the_lost_answer_stays_alive_and_starts_afresh(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver makes the replacement as soon as it has sent "lost": its "ready" may reach the
    node before the answer of the job the old actor died under. The new actor must stay usable,
    with none of the old one's busy time or jobs."""
    executor, [link] = executor_of(tmp_path, ["demo"], monkeypatch)
    link.ready(["demo"])
    thread, out = compute_in_thread(executor)
    wait_until(lambda: bool(link.calls), "the call to reach the driver")
    link.on_event(link, ("actor", "demo", 0, None, "lost (RayActorError); a new one is being made", 0.0))
    time.sleep(0.05)  # the old actor's busy time, which must not go to the new one
    link.on_event(link, ready_event(0, 200))
    link.calls[-1][1].set_result(("actor", "RayActorError"))
    thread.join(timeout=10)
    assert isinstance(out["error"], InfrastructureError)
    slot = {s["slot"]: s for s in executor.statuses()}[0]
    assert slot["alive"] and slot["pid"] == 200 and not slot["busy"] and slot["jobs"] == 0
    assert executor.slots[0].busy_seconds == 0.0 and slot["failures"] == 1
    assert executor.claimable() == {"demo"}


def test_an_actor_the_driver_no_longer_has_costs_no_attempt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    executor, [link] = executor_of(tmp_path, ["demo"], monkeypatch)
    link.ready(["demo"])
    out = answer(executor, link, ("absent", "no live Ray actor 0 of model demo in the driver"))
    assert isinstance(out["error"], UnavailableError) and "in the driver" in str(out["error"])
    assert not link.closed and executor.not_ready() is None


def test_an_actors_failures_are_the_jobs_it_died_under_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    executor, [link] = executor_of(tmp_path, ["demo"], monkeypatch)
    link.ready(["demo"])
    answer(executor, link, ("task", PermanentError("wrong modality")))
    answer(executor, link, ("job", "ObjectStoreFullError"))
    assert [s["failures"] for s in executor.statuses()] == [0, 0]
    assert sum(s["jobs"] for s in executor.statuses()) == 2


def test_a_lost_cluster_answer_replaces_the_driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    executor, [link] = executor_of(tmp_path, ["demo"], monkeypatch)
    link.ready(["demo"])
    out = answer(executor, link, ("cluster", "RaySystemError"))
    assert isinstance(out["error"], ClusterUnavailable)
    wait_until(lambda: link.closed, "the driver to be closed")
    assert executor.not_ready() is not None and executor.claimable() == frozenset()


def test_the_actors_own_errors_stay_the_jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    executor, [link] = executor_of(tmp_path, ["demo"], monkeypatch)
    link.ready(["demo"])
    assert isinstance(answer(executor, link, ("task", PermanentError("wrong modality")))["error"], PermanentError)
    error = answer(executor, link, ("task", "ZeroDivisionError"))["error"]
    assert isinstance(error, RetryableError) and "ZeroDivisionError" in str(error)
    assert executor.not_ready() is None and not link.closed


def test_a_gcs_that_stops_answering_replaces_the_driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    executor, [link] = executor_of(tmp_path, ["demo"], monkeypatch)
    link.ready(["demo"])
    monkeypatch.setattr(executor_module, "reachable", lambda address, timeout=2.0: False)
    executor._tend()
    assert not link.closed  # one missed probe may be a blip
    executor._tend()
    wait_until(lambda: link.closed, "the driver to be closed")
    assert executor.not_ready() == ("the Ray driver process 4242 was replaced: the Ray cluster at 127.0.0.1:6379 "
                                    "stopped answering; starting another")


def test_each_waiting_worker_counts_once_in_the_queue_depth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    executor, [link] = executor_of(tmp_path, ["demo"], monkeypatch)
    link.ready(["demo"])
    runs = [compute_in_thread(executor) for _ in range(5)]  # two at the actors, three waiting
    wait_until(lambda: len(link.calls) == 2 and sum(executor._waiting.values()) == 3, "three workers waiting")
    depths = [s["queue_depth"] for s in executor.statuses()]
    assert sum(depths) == 5 and sorted(depths) == [2, 3], depths
    done = ("done", SimpleNamespace(timings={}, predictions=[], gate=[], heatmaps=[], abstain_reason=""))
    while len(link.calls) < 5 or not all(f.done() for _, f in link.calls):
        wait_until(lambda: any(not f.done() for _, f in link.calls), "a call to answer")
        for _, future in link.calls:
            if not future.done():
                future.set_result(done)
    for thread, out in runs:
        thread.join(timeout=10)
        assert "ctx" in out
    assert [s["queue_depth"] for s in executor.statuses()] == [0, 0]


def test_only_models_with_a_free_actor_are_claimable_and_a_freed_actor_wakes_the_claimers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker must not claim a job of model a and wait for a's busy actors while b's idle."""
    executor, [link] = executor_of(tmp_path, ["a", "b"], monkeypatch)
    freed: list[int] = []
    executor._on_free = lambda: freed.append(1)
    link.ready(["a", "b"])
    assert executor.claimable() == {"a", "b"} and len(freed) == 4  # each actor made
    runs = [compute_in_thread(executor, "a") for _ in range(2)]
    wait_until(lambda: len(link.calls) == 2, "both of a's actors busy")
    assert executor.claimable() == {"b"}
    runs.append(compute_in_thread(executor, "a"))  # a third: waits for one of a's actors
    wait_until(lambda: executor._waiting["a"] == 1, "a worker waiting for a")
    done = ("done", SimpleNamespace(timings={}, predictions=[], gate=[], heatmaps=[], abstain_reason=""))
    link.calls[0][1].set_result(done)
    wait_until(lambda: len(link.calls) == 3, "the waiting worker to take the freed actor")
    assert executor.claimable() == {"b"} and len(freed) == 5
    for _, future in link.calls[1:]:
        future.set_result(done)
    for thread, out in runs:
        thread.join(timeout=10)
        assert "ctx" in out
    assert executor.claimable() == {"a", "b"} and len(freed) == 7


def test_a_model_whose_actor_is_refused_holds_back_only_its_own_jobs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    audit = Audit()
    executor, [link] = executor_of(tmp_path, ["good", "bad"], monkeypatch, audit)
    link.ready(["good"])
    refused = "could not start: ModelError: model bad on this Ray host is not the node's (weights_sha256 ...)"
    for slot in (0, 1):
        link.on_event(link, ("actor", "bad", slot, None, refused, 2.0))
        link.on_event(link, ("actor", "bad", slot, None, refused, 4.0))  # the same reason again: audited once
    assert executor.claimable() == {"good"}
    reason = executor.not_ready()
    assert reason is not None and "['bad']" in reason and "not the node's" in reason and "trying again in 4 s" in reason
    assert [e for e, _ in audit.events] == ["ray_actor_refused", "ray_actor_refused"]
    assert {(f["model"], f["slot"], f["version"]) for _, f in audit.events} == {("bad", 0, "1"), ("bad", 1, "1")}
    statuses = {(s["model"], s["slot"]): s for s in executor.statuses()}
    assert "not the node's" in statuses[("bad", 0)]["problem"] and statuses[("good", 0)]["problem"] == ""
    with pytest.raises(ClusterUnavailable, match="no live Ray actor of model bad"):
        executor.compute(SimpleNamespace(job=SimpleNamespace(model="bad"), datasets=[], timings={}))  # type: ignore[arg-type]


def test_the_actors_page_shows_why_a_slot_has_no_actor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dicom_node.web.pages import actors

    executor, [link] = executor_of(tmp_path, ["demo"], monkeypatch)
    link.on_event(link, ("connected",))
    link.on_event(link, ("actor", "demo", 0, None, "could not start: ModelError: <weights> differ", 2.0))
    page = actors(executor.statuses()).decode()
    assert "could not start: ModelError: &lt;weights&gt; differ (trying again in 2 s)" in page


def test_a_driver_that_never_connects_is_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    executor, links = executor_of(tmp_path, ["demo"], monkeypatch)
    executor._tend()
    assert not links[0].closed  # still connecting, within its time
    executor._launched -= executor_module.CONNECT_SECONDS + 1
    executor._tend()
    wait_until(lambda: links[0].closed, "the driver to be closed")
    assert "did not connect" in (executor.not_ready() or "")
