"""The node's side of the Ray executor: keep a Ray driver process, hand it a job's compute.

The node never imports Ray. The driver (``ray.init``, the actor handles) runs in a child process
(:mod:`dicom_node.scaleout.driver`, linked by :class:`~dicom_node.scaleout.wire.DriverLink`): Ray
ends the process its driver lives in when the cluster's GCS is lost, and the DICOM endpoint must
outlive that. When the child ends, for any reason (GCS lost, a crash, the OOM killer), the calls
in flight fail: with :class:`ClusterUnavailable` when the cluster's address does not answer (the
queue hands the job back without counting the attempt), else with an
:class:`~dicom_node.errors.InfrastructureError` (counted: the job may be what ended it).
:meth:`RayExecutor.not_ready` says why, and a new child is started, with backoff, once the
cluster's address answers again; it reconnects and remakes the actors.

The queue alone decides what runs again. Ray's own retries are off; an actor that dies mid-job
fails the job's attempt with an :class:`~dicom_node.errors.InfrastructureError` (counted, never a
"not analysed" report), the queue retries it with backoff, and the driver makes a replacement.
"""

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Protocol

from dicom_node.audit import Audit, NoAudit
from dicom_node.config import Settings
from dicom_node.errors import DicomNodeError, InfrastructureError, RetryableError, UnavailableError
from dicom_node.inference import ModelRegistry
from dicom_node.jobs.queue import QueuePolicy
from dicom_node.pipeline import PipelineContext
from dicom_node.scaleout.actor import Computed, compute_settings, identity
from dicom_node.scaleout.wire import DriverLink, LinkClosed, reachable

logger = logging.getLogger(__name__)

#: how much longer than ``ray_call_timeout_seconds`` the node waits for the driver's answer
#: before it deems the driver hung and replaces it (the driver's own timeout answers first)
ANSWER_GRACE_SECONDS = 30.0
#: failed probes of the GCS's port in a row after which the driver is replaced (a lost GCS can
#: leave Ray's calls hanging up to a minute before Ray ends the driver)
PROBES_MISSED = 2
#: the longest wait before the next driver after drivers that kept ending
MAX_DRIVER_BACKOFF_SECONDS = 60.0
#: a driver not connected this long after it started is replaced (``ray.init`` hanging)
CONNECT_SECONDS = 120.0
#: the job timing (``PipelineContext.timings``) of the seconds the driver process spent on the
#: call (Ray's part and the actor's steps); the rest of the call's time is the link's
DRIVER_TIMING = "ray_driver"


class ClusterUnavailable(UnavailableError):
    """The Ray cluster, or every actor of the job's model, is out of reach for now."""


class Link(Protocol):
    """What the executor needs of a driver process (:class:`DriverLink`; a fake in tests)."""

    @property
    def pid(self) -> int: ...

    def call(self, name: str, *args: Any) -> Any: ...
    def close(self, grace: float = 5.0) -> None: ...


Launch = Callable[[tuple[Any, ...], Callable[[Any, tuple[Any, ...]], None], Callable[[Any, str], None]], Link]


@dataclass
class ActorStatus:
    """One actor slot as the node sees it: where its actor runs and how busy it has been."""

    model: str
    slot: int
    alive: bool = False
    info: dict[str, Any] = field(default_factory=dict)  # ComputeActor.describe()
    problem: str = ""  # why it is not alive: its last start's error, or that it was lost
    refused: str = ""  # the last reason its actor could not start (audited when it changes)
    busy: bool = False
    waiting: int = 0  # this slot's share of the workers waiting for an actor of its model
    jobs: int = 0
    failures: int = 0  # jobs under which the slot's actor died (not the jobs' own errors)
    busy_seconds: float = 0.0
    since: float = 0.0  # monotonic time the actor became usable
    generation: int = 0  # which of the slot's actors: one more at each actor made

    def utilisation(self, now: float) -> float:
        """Share of its life the actor spent on jobs, 0..1."""
        alive = now - self.since
        return min(1.0, self.busy_seconds / alive) if self.alive and alive > 0 else 0.0

    def as_record(self, now: float) -> dict[str, Any]:
        """For the JSON API and the dashboard."""
        return {"model": self.model, "slot": self.slot, "alive": self.alive,
                "device": self.info.get("device", ""), "host": self.info.get("host", ""),
                "pid": self.info.get("pid", 0), "version": self.info.get("version", ""),
                "busy": self.busy, "queue_depth": self.waiting + int(self.busy), "jobs": self.jobs,
                "failures": self.failures, "utilisation": round(self.utilisation(now), 4),
                "load_seconds": self.info.get("load_seconds", 0.0),
                "ready_seconds": self.info.get("ready_seconds", 0.0), "problem": self.problem}


def share(waiting: int, slots: Sequence[ActorStatus]) -> None:
    """Spread a model's waiting workers over its slots, each counted once: the slots' queue
    depths add up to the model's (a waiting worker takes whichever actor frees first)."""
    for i, slot in enumerate(slots):
        slot.waiting = waiting // len(slots) + int(i < waiting % len(slots))


class RayExecutor:
    """Runs :func:`pipeline.compute_steps` of jobs on Ray actors, ``ray_actors_per_model`` per model.

    Parameters
    ----------
    settings
        The node's settings (``[workers]`` ``ray_*`` keys, ``[inference]``).
    registry
        The node's model repository: each model's identity, which its actors must have.
    models
        The models the pipelines use.
    audit
        Where an actor that refuses to start, and a lost driver, are recorded.
    launch
        Starts a driver process (tests give a fake).
    on_free
        Called when an actor becomes free (a job ended, an actor was made): the workers waiting
        to claim may claim now.
    """

    def __init__(self, settings: Settings, registry: ModelRegistry, models: Sequence[str],
                 audit: Audit | None = None, launch: Launch = DriverLink,
                 on_free: Callable[[], None] = lambda: None) -> None:
        self.settings = settings
        w = settings.workers
        self.identities = {m: identity(registry.manifest(m)) for m in sorted(set(models))}
        self.slots = [ActorStatus(m, i) for m in self.identities for i in range(w.ray_actors_per_model)]
        self.audit = audit or NoAudit()
        self._launch = launch
        self._on_free = on_free
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._link: Link | None = None
        self._connected = False
        self._problem = "connecting to the Ray cluster"
        self._waiting: dict[str, int] = dict.fromkeys(self.identities, 0)
        self._backoff = QueuePolicy(
            backoff_seconds=w.ray_connect_seconds,
            max_backoff_seconds=max(w.ray_connect_seconds, MAX_DRIVER_BACKOFF_SECONDS))
        self._ends = 0  # driver ends in a row without a connection in between
        self._next_launch = 0.0
        self._missed = 0
        self._launched = 0.0  # monotonic time the current driver was started
        self._dropping: Link | None = None  # the driver being replaced, and why
        self._dropped_why = ""

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> "RayExecutor":
        """Start the driver process in the background; :meth:`not_ready` says how far it got."""
        self._thread = threading.Thread(target=self._keep, name="ray-executor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the background thread and the driver process (the actors die with it)."""
        self._stop.set()
        self._wake.set()
        with self._lock:
            link, self._link, self._connected = self._link, None, False
        if link is not None:  # first: the driver dies with the thread that started it
            link.close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def not_ready(self) -> str | None:
        """Why the node cannot run every model's jobs now, or None (``/readyz``)."""
        with self._lock:
            if not self._connected:
                return self._problem
            missing = sorted({s.model for s in self.slots} - self._live())
            if missing:
                why = "; ".join(sorted({f"{s.model} #{s.slot}: {s.problem}" for s in self.slots
                                        if s.model in missing and s.problem}))
                return f"no Ray actor of model(s) {missing} is running ({why or 'starting'})"
        return None

    def claimable(self) -> frozenset[str]:
        """The models whose jobs can run now: more free live actors than workers already
        waiting for one. Workers claim only their jobs, so none takes a job of a model whose
        actors are all busy while another model's actor idles."""
        with self._lock:
            if not self._connected or self._dropping is self._link:  # being replaced: nothing runs
                return frozenset()
            free = {m: 0 for m in self.identities}
            for s in self.slots:
                free[s.model] += int(s.alive and not s.busy)
            return frozenset(m for m, n in free.items() if n > self._waiting[m])

    def _live(self) -> set[str]:
        return {s.model for s in self.slots if s.alive}

    def statuses(self) -> list[dict[str, Any]]:
        """Every actor slot, for the dashboard, the JSON API and ``/metrics``."""
        now = time.monotonic()
        with self._lock:
            return [s.as_record(now) for s in self.slots]

    # -- the pipeline step ------------------------------------------------------------------------

    def compute(self, ctx: PipelineContext) -> None:
        """The remote step: the job's data sets to an actor of its model, through the driver
        process; its predictions, gate scores and heatmaps back into the context."""
        slot, link, generation = self._acquire(ctx.job.model)
        started = time.monotonic()
        kind = ""
        try:
            kind, payload, seconds = self._ask(link, slot, ctx)
        finally:
            self._release(slot, generation, time.monotonic() - started, lost=kind == "actor")
        if kind == "task":  # the actor's own code raised: a PermanentError stays one
            if isinstance(payload, DicomNodeError):
                raise payload
            raise RetryableError(f"the Ray actor failed ({payload})")
        if kind == "actor":  # the slot is marked down by the driver's own "lost" event, in order
            logger.warning("Ray actor %d of model %s lost (%s); a new one is being made", slot.slot,
                           slot.model, payload)
            raise InfrastructureError(f"the Ray actor of model {ctx.job.model} was lost ({payload}); "
                                      "the queue runs the job again")
        if kind == "absent":  # the driver had lost it as this worker took it: not the job's attempt
            raise ClusterUnavailable(f"{payload}; the job waits for a new actor without spending an attempt")
        if kind == "job":  # Ray failed on this job in a cluster that answers: the attempt counts
            raise InfrastructureError(f"Ray failed on this job ({payload}); the queue runs it again")
        if kind != "done":
            self._drop(link, f"the Ray cluster was lost ({payload})")
            raise ClusterUnavailable(f"the Ray cluster was lost ({payload}); the job waits for it "
                                     "without spending an attempt")
        computed: Computed = payload
        ctx.timings.update(computed.timings)
        if seconds is not None:
            ctx.timings[DRIVER_TIMING] = seconds
        ctx.predictions, ctx.gate, ctx.heatmaps = computed.predictions, computed.gate, computed.heatmaps
        ctx.outcome_reason = computed.abstain_reason

    def _ask(self, link: Link, slot: ActorStatus, ctx: PipelineContext) -> tuple[str, Any, float | None]:
        """The driver's answer and its seconds on it. A driver that ended or hung while the
        cluster is out of reach is a lost cluster (no attempt spent); while the cluster answers,
        it may be this job that brought it down (killed while unpickling a huge series, an
        answer it could not send): the attempt counts."""
        try:
            future = link.call("compute", slot.model, slot.slot, ctx.job, list(ctx.datasets))
            kind, payload, *seconds = future.result(timeout=self.settings.workers.ray_call_timeout_seconds
                                                    + ANSWER_GRACE_SECONDS)
        except LinkClosed as exc:
            raise self._lost_driver(str(exc)) from None
        except FutureTimeout:
            self._drop(link, "the Ray driver process did not answer")
            raise self._lost_driver("the Ray driver process did not answer") from None
        return kind, payload, (seconds[0] if seconds else None)

    def _lost_driver(self, what: str) -> DicomNodeError:
        """The error of a job whose driver ended or hung while it ran (see :meth:`_ask`)."""
        address = self.settings.workers.ray_address
        if not self._stop.is_set() and reachable(address):
            return InfrastructureError(f"{what} while the Ray cluster at {address} answered; the queue "
                                       "runs the job again")
        return ClusterUnavailable(f"{what}; the job waits for the cluster without spending an attempt")

    def _acquire(self, model: str) -> tuple[ActorStatus, Link, int]:
        """A free live actor of ``model``, waiting for one while the others are busy, the
        driver it belongs to, and which actor of the slot it is (its generation)."""
        with self._lock:
            mine = [s for s in self.slots if s.model == model]
            self._waiting[model] += 1
            share(self._waiting[model], mine)
            try:
                while True:
                    if not self._connected or self._link is None or not any(s.alive for s in mine):
                        raise ClusterUnavailable(self._problem if not self._connected
                                                 else f"no live Ray actor of model {model}")
                    free = [s for s in mine if s.alive and not s.busy]
                    if free:
                        chosen = min(free, key=lambda s: s.jobs)
                        chosen.busy = True
                        return chosen, self._link, chosen.generation
                    self._lock.wait(1.0)
            finally:
                self._waiting[model] -= 1
                share(self._waiting[model], mine)

    def _release(self, slot: ActorStatus, generation: int, seconds: float, lost: bool) -> None:
        """The job's end on the actor of ``generation``: its time and count go to that actor
        only (a slot whose actor was replaced meanwhile starts afresh); ``lost``: the actor died
        under the job."""
        with self._lock:
            if slot.generation == generation:
                slot.busy = False
                slot.busy_seconds += seconds
                slot.jobs += 1
            slot.failures += int(lost)
            self._lock.notify_all()
        self._on_free()

    def _drop(self, link: Link, why: str) -> None:
        """End a driver that cannot be trusted any more (once); its end is handled by :meth:`_ended`."""
        with self._lock:
            if link is not self._link or self._dropping is link:
                return
            self._dropping, self._dropped_why = link, why
        logger.warning("Ray executor: %s; replacing the driver process %d", why, link.pid)
        threading.Thread(target=link.close, name=f"ray-driver-{link.pid}-close", daemon=True).start()

    # -- the driver's messages (from its reader thread) -------------------------------------------

    def _event(self, link: Link, message: tuple[Any, ...]) -> None:
        refused: dict[str, Any] | None = None
        with self._lock:
            if link is not self._link:
                return  # a late word from a driver already replaced
            if message[0] == "connected":
                self._connected, self._ends, self._missed = True, 0, 0
                self._problem = "making the Ray actors"
                logger.info("Ray driver process %d connected to %s", link.pid,
                            self.settings.workers.ray_address)
            elif message[0] == "problem":
                self._problem = str(message[1])
            elif message[0] == "actor":
                refused = self._actor_event(*message[1:])
            self._lock.notify_all()
        # outside the lock: the audit trail writes a file, and the workers must not wait on it
        if refused is not None:
            self.audit.record("ray_actor_refused", **refused)
        if message[0] == "actor" and message[3] is not None:
            self._on_free()

    def _actor_event(self, model: str, number: int, info: dict[str, Any] | None, problem: str,
                     retry_in: float) -> dict[str, Any] | None:
        """An actor became ready, or could not start (``retry_in``: when the driver tries again);
        the audit event's fields for a new reason it could not start, else None."""
        slot = next(s for s in self.slots if (s.model, s.slot) == (model, number))
        if info is not None:
            slot.alive, slot.info, slot.problem, slot.refused = True, info, "", ""
            slot.since, slot.busy_seconds, slot.busy = time.monotonic(), 0.0, False
            slot.generation += 1
            logger.info("Ray actor %d of model %s %s ready on %s (pid %s) %.1f s after it was asked for "
                        "(model loaded in %.2f s)", number, model, info["version"], info["device"],
                        info["pid"], info["ready_seconds"], info["load_seconds"])
            return None
        slot.alive, slot.info = False, {}
        refused = None
        if not problem.startswith("lost") and problem != slot.refused:
            slot.refused = problem  # audited once per reason, not at every try
            refused = {"model": model, "version": self.identities[model]["version"], "slot": number,
                       "reason": problem}
        slot.problem = problem + (f" (trying again in {retry_in:.0f} s)" if retry_in else "")
        if retry_in:
            logger.error("Ray actor %d of model %s %s; trying again in %.0f s", number, model, problem,
                         retry_in)
        return refused

    def _ended(self, link: Link, why: str) -> None:
        with self._lock:
            if link is not self._link:
                return
            self._link, self._connected = None, False
            if self._dropping is link:
                why = f"was replaced: {self._dropped_why}"
            self._ends += 1
            wait = self._backoff.backoff(self._ends)
            self._next_launch = time.monotonic() + wait
            self._problem = f"the Ray driver process {link.pid} {why}; starting another"
            for s in self.slots:
                s.alive, s.info = False, {}
            self._lock.notify_all()
        if not self._stop.is_set():
            logger.warning("Ray executor: the driver process %d %s; the jobs wait, a new one starts in "
                           "%.1f s or once the cluster answers", link.pid, why, wait)
            self.audit.record("ray_driver_ended", pid=link.pid, reason=why)
        self._wake.set()

    # -- background: keep a driver ----------------------------------------------------------------

    def _keep(self) -> None:
        while not self._stop.is_set():
            try:
                self._tend()
            except Exception as exc:  # start over in the next round; the node stays up
                logger.warning("Ray executor: %s (%s); trying again", type(exc).__name__, exc)
                with self._lock:
                    self._problem = f"Ray executor: {type(exc).__name__}"
            self._wake.wait(self.settings.workers.ray_connect_seconds)
            self._wake.clear()

    def _tend(self) -> None:
        """Start a driver once the cluster answers (after the backoff of the last one's end);
        while one runs, replace it when the GCS stops answering."""
        address = self.settings.workers.ray_address
        with self._lock:
            link, connected = self._link, self._connected
        if link is not None:
            self._missed = 0 if reachable(address) else self._missed + 1
            if self._missed >= PROBES_MISSED:
                self._drop(link, f"the Ray cluster at {address} stopped answering")
            elif not connected and time.monotonic() - self._launched > CONNECT_SECONDS:
                self._drop(link, f"the Ray driver process did not connect in {CONNECT_SECONDS:.0f} s")
            return
        if time.monotonic() < self._next_launch:
            return
        if not reachable(address):
            with self._lock:
                self._problem = f"the Ray cluster at {address} does not answer"
            return
        hello = ("hello", compute_settings(self.settings), self.identities,
                 logging.getLogger().getEffectiveLevel())
        with self._lock:
            if self._stop.is_set():
                return
            self._missed, self._launched = 0, time.monotonic()
            self._link = self._launch(hello, self._event, self._ended)
            self._problem = f"the Ray driver process {self._link.pid} is connecting to {address}"


def worker_count(settings: Settings, local: Callable[[], int]) -> int:
    """Worker threads: ``[workers] count``, else one per actor with Ray (the slots of
    :class:`RayExecutor`), else ``local()``."""
    w = settings.workers
    if w.count:
        return w.count
    if w.executor == "ray":
        return len({p.model for p in settings.pipelines}) * w.ray_actors_per_model
    return local()


__all__ = ["ActorStatus", "ClusterUnavailable", "RayExecutor", "reachable", "worker_count"]
