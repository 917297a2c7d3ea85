"""The node's side of the Ray executor: connect, keep the actors, hand them a job's compute.

The queue alone decides what runs again. Ray's own retries are off (actors are made with
``max_restarts=0`` and ``max_task_retries=0``): an actor that dies mid-job fails the job's attempt
with an :class:`~dicom_node.errors.InfrastructureError` (counted, never a "not analysed" report),
the queue retries it with backoff, and a replacement actor is made in the background. Any other
error from Ray (the cluster gone: a ``ConnectionError`` under Ray Client, a system error) drops
the connection and every actor, raises :class:`ClusterUnavailable` (the queue hands the job back
without counting the attempt) and the background thread connects again. While the cluster cannot
be reached or a model has no live actor, :meth:`RayExecutor.not_ready` says why: workers claim no
job (none waits on an attempt it cannot use) and ``/readyz`` answers 503, while ingest goes on.
"""

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from dicom_node.config import Settings
from dicom_node.errors import DicomNodeError, InfrastructureError, RetryableError, UnavailableError
from dicom_node.inference import ModelRegistry
from dicom_node.pipeline import PipelineContext
from dicom_node.scaleout.actor import ComputeActor, Computed

logger = logging.getLogger(__name__)


class ClusterUnavailable(UnavailableError):
    """The Ray cluster, or every actor of the job's model, is out of reach for now."""


@dataclass
class ActorStatus:
    """One actor as the node sees it: where it runs and how busy it has been."""

    model: str
    slot: int
    handle: Any = None  # the Ray actor handle; None until made, and after it died
    info: dict[str, Any] = field(default_factory=dict)  # ComputeActor.describe()
    busy: bool = False
    waiting: int = 0  # workers waiting for this model's actors (its queue depth)
    jobs: int = 0
    failures: int = 0
    busy_seconds: float = 0.0
    since: float = 0.0  # monotonic time the actor became usable

    def utilisation(self, now: float) -> float:
        """Share of its life the actor spent on jobs, 0..1."""
        alive = now - self.since
        return min(1.0, self.busy_seconds / alive) if self.handle is not None and alive > 0 else 0.0

    def as_record(self, now: float) -> dict[str, Any]:
        """For the JSON API and the dashboard."""
        return {"model": self.model, "slot": self.slot, "alive": self.handle is not None,
                "device": self.info.get("device", ""), "host": self.info.get("host", ""),
                "pid": self.info.get("pid", 0), "version": self.info.get("version", ""),
                "busy": self.busy, "queue_depth": self.waiting + int(self.busy), "jobs": self.jobs,
                "failures": self.failures, "utilisation": round(self.utilisation(now), 4),
                "load_seconds": self.info.get("load_seconds", 0.0),
                "ready_seconds": self.info.get("ready_seconds", 0.0)}


def reachable(address: str, timeout: float = 2.0) -> bool:
    """Whether ``HOST:PORT`` (or ``ray://HOST:PORT``) accepts a TCP connection: ``ray.init`` on an
    address nobody answers blocks for minutes, so it is only called after this says yes."""
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if not parts.hostname or not parts.port:
        return False
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=timeout):
            return True
    except OSError:
        return False


class RayExecutor:
    """Runs :func:`pipeline.compute_steps` of jobs on Ray actors, ``ray_actors_per_model`` per model.

    Parameters
    ----------
    settings
        The node's settings (``[workers]`` ``ray_*`` keys, ``[inference]``).
    registry
        The node's model repository: the sha256 each actor must find.
    models
        The models the pipelines use.
    """

    def __init__(self, settings: Settings, registry: ModelRegistry, models: Sequence[str]) -> None:
        self.settings = settings
        self.registry = registry
        w = settings.workers
        self.slots = [ActorStatus(m, i) for m in sorted(set(models)) for i in range(w.ray_actors_per_model)]
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._connected = False
        self._generation = 0  # counts connections: a late error of an old one must not drop a new one
        self._problem = "connecting to the Ray cluster"
        self._remote: Any = None  # ray.remote(ComputeActor), made once connected

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> "RayExecutor":
        """Connect and make the actors in the background; :meth:`not_ready` says how far it got."""
        self._thread = threading.Thread(target=self._keep, name="ray-executor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the background thread and leave the cluster (the actors die with the driver)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._connected:
            import ray
            ray.shutdown()
            self._connected = False

    def not_ready(self) -> str | None:
        """Why no job should be claimed now, or None."""
        with self._lock:
            if not self._connected:
                return self._problem
            missing = sorted({s.model for s in self.slots} - {s.model for s in self.slots if s.handle})
            if missing:
                return f"no Ray actor of model(s) {missing} is running yet ({self._problem})"
        return None

    def statuses(self) -> list[dict[str, Any]]:
        """Every actor slot, for the dashboard, the JSON API and ``/metrics``."""
        now = time.monotonic()
        with self._lock:
            return [s.as_record(now) for s in self.slots]

    # -- the pipeline step ------------------------------------------------------------------------

    def compute(self, ctx: PipelineContext) -> None:
        """The remote step: the job's data sets to an actor of its model through Ray's object
        store; its predictions, gate scores and heatmaps back into the context."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        slot, generation = self._acquire(ctx.job.model)
        handle = slot.handle
        started = time.monotonic()
        failed = True
        try:
            ref = ray.put(list(ctx.datasets))
            call = handle.compute.remote(ctx.job, ref)
            computed: Computed = ray.get(call, timeout=self.settings.workers.ray_call_timeout_seconds)
            failed = False
        except RayTaskError as exc:  # the actor's code raised: a PermanentError stays one
            cause = getattr(exc, "cause", None)
            if isinstance(cause, DicomNodeError):
                raise cause from None
            raise RetryableError(f"the Ray actor failed ({type(cause or exc).__name__})") from None
        except Exception as exc:  # not the job's code: the actor, or the whole cluster, is gone
            actor_only = isinstance(exc, (RayActorError, GetTimeoutError))
            if actor_only and reachable(self.settings.workers.ray_address):
                self._lost(slot, handle, exc)
                raise InfrastructureError(f"the Ray actor of model {ctx.job.model} was lost "
                                          f"({type(exc).__name__}); the queue runs the job again") from None
            self._disconnect(generation, f"the Ray cluster was lost ({type(exc).__name__}); connecting again")
            raise ClusterUnavailable(f"the Ray cluster was lost ({type(exc).__name__}); the job waits for "
                                     "it without spending an attempt") from None
        finally:
            self._release(slot, time.monotonic() - started, failed)
        ctx.timings.update(computed.timings)
        ctx.predictions, ctx.gate, ctx.heatmaps = computed.predictions, computed.gate, computed.heatmaps
        ctx.outcome_reason = computed.abstain_reason

    def _acquire(self, model: str) -> tuple[ActorStatus, int]:
        """A free live actor of ``model``, waiting for one while the others are busy, and the
        connection it belongs to."""
        with self._lock:
            mine = [s for s in self.slots if s.model == model]
            for s in mine:
                s.waiting += 1
            try:
                while True:
                    if not self._connected or not any(s.handle for s in mine):
                        raise ClusterUnavailable(self.not_ready_locked(model))
                    free = [s for s in mine if s.handle is not None and not s.busy]
                    if free:
                        chosen = min(free, key=lambda s: s.jobs)
                        chosen.busy = True
                        return chosen, self._generation
                    self._lock.wait(1.0)
            finally:
                for s in mine:
                    s.waiting -= 1

    def not_ready_locked(self, model: str) -> str:
        return self._problem if not self._connected else f"no live Ray actor of model {model}"

    def _release(self, slot: ActorStatus, seconds: float, failed: bool) -> None:
        with self._lock:
            slot.busy = False
            slot.busy_seconds += seconds
            slot.jobs += 1
            slot.failures += int(failed)
            self._lock.notify_all()

    def _lost(self, slot: ActorStatus, handle: Any, exc: BaseException) -> None:
        """The actor died (or hung): forget it (unless it was replaced meanwhile), kill what is
        left, make another soon."""
        logger.warning("Ray actor %d of model %s lost (%s); a new one is being made", slot.slot, slot.model,
                       type(exc).__name__)
        with self._lock:
            if slot.handle is handle:
                slot.handle = None
                slot.info = {}
        if handle is not None:
            import ray
            with contextlib.suppress(Exception):  # already gone
                ray.kill(handle, no_restart=True)
        self._wake.set()

    def _disconnect(self, generation: int, problem: str) -> None:
        """The cluster is gone: forget the connection and every actor (their handles are dead),
        leave it (so the next ``ray.init`` is a fresh one) and let the background thread connect
        again. Only once per connection: a late error of an old one must not drop the new one."""
        with self._lock:
            if generation != self._generation or not self._connected:
                return
            self._generation += 1
            self._connected = False
            self._problem = problem
            for s in self.slots:
                s.handle, s.info = None, {}
            self._lock.notify_all()
        logger.warning("Ray executor: %s", problem)
        self._shutdown()
        self._wake.set()

    @staticmethod
    def _shutdown() -> None:
        import ray
        with contextlib.suppress(Exception):  # leaving a cluster that is gone may fail too
            ray.shutdown()

    # -- background: connect and keep the actors ---------------------------------------------------

    def _keep(self) -> None:
        while not self._stop.is_set():
            try:
                self._connect()
                self._make_actors()
            except Exception as exc:  # start over: connect again in the next round; the node stays up
                logger.warning("Ray executor: %s (%s); trying again", type(exc).__name__, exc)
                self._disconnect(self._generation, f"Ray executor: {type(exc).__name__}")
                with self._lock:
                    self._problem = f"Ray executor: {type(exc).__name__}"
            self._wake.wait(self.settings.workers.ray_connect_seconds)
            self._wake.clear()

    def _connect(self) -> None:
        if self._connected:
            return
        address = self.settings.workers.ray_address
        if not reachable(address):
            with self._lock:
                self._problem = f"the Ray cluster at {address} does not answer"
            return
        import ray
        try:
            ray.init(address=address, namespace="dicom-node", log_to_driver=False,
                     logging_level=logging.WARNING, configure_logging=False)
        except Exception:
            self._shutdown()  # else the next try fails with "init called twice"
            raise
        self._remote = ray.remote(ComputeActor)
        with self._lock:
            self._connected = True
            self._problem = "making the Ray actors"
        logger.info("connected to the Ray cluster at %s", address)

    def _make_actors(self) -> None:
        """Make every missing actor and wait for it to load its model (the cold start, once)."""
        if not self._connected:
            return
        import ray
        w = self.settings.workers
        missing = [s for s in self.slots if s.handle is None]
        threads = self.settings.inference.threads or max(1, int(w.ray_cpus_per_actor))
        device = "cuda" if w.ray_gpus_per_actor > 0 else "cpu"
        asked = time.monotonic()
        made = [(s, self._remote.options(num_cpus=w.ray_cpus_per_actor, num_gpus=w.ray_gpus_per_actor,
                                         max_restarts=0, max_task_retries=0).remote(
                    self.settings, s.model, self.registry.manifest(s.model).sha256, device, threads))
                for s in missing]
        for slot, handle in made:
            try:
                info = ray.get(handle.describe.remote(), timeout=w.ray_call_timeout_seconds)
            except Exception as exc:
                cause = getattr(exc, "cause", None) or exc
                logger.error("Ray actor of model %s could not start: %s", slot.model, cause)
                with self._lock:
                    self._problem = f"a Ray actor of model {slot.model} could not start: {cause}"[:300]
                with contextlib.suppress(Exception):  # already gone, or the cluster with it
                    ray.kill(handle, no_restart=True)
                continue
            # the cold start: a Ray worker process, its imports and the model, paid once per actor
            info["ready_seconds"] = round(time.monotonic() - asked, 3)
            with self._lock:
                slot.handle, slot.info, slot.since = handle, info, time.monotonic()
                slot.busy_seconds = 0.0
                self._lock.notify_all()
            logger.info("Ray actor %d of model %s %s ready on %s (pid %s) %.1f s after it was asked for "
                        "(model loaded in %.2f s)", slot.slot, slot.model, info["version"], info["device"],
                        info["pid"], info["ready_seconds"], info["load_seconds"])


def worker_count(settings: Settings, executor: RayExecutor | None, local: Callable[[], int]) -> int:
    """Worker threads: ``[workers] count``, else one per actor with Ray, else ``local()``."""
    if settings.workers.count:
        return settings.workers.count
    return len(executor.slots) if executor is not None else local()
