"""The Ray driver process: ``ray.init``, the actors, and the node's compute calls forwarded to them.

Started by :class:`~dicom_node.scaleout.wire.DriverLink` as ``python -m dicom_node.scaleout.driver FD``
(FD: its end of a socket pair). Ray's core worker ends the process it lives in when the GCS is
lost; living here, it ends this process, never the node. The node notices the end of the stream,
hands the calls in flight back and starts another driver when the cluster answers again.

Ray's own retries are off (``max_restarts=0``, ``max_task_retries=0``): the node's queue alone
decides what runs again. Each answer says what failed: ``done`` (the job's results), ``absent``
(the actor was lost before the call: the node had not heard yet), ``task`` (the actor's own code
raised), ``actor`` (the actor died or hung in a cluster that still answers), ``job`` (any other
error of Ray's while the cluster still answers: a full object store, a lost object, a crashed
worker, an answer that cannot be pickled: the job's attempt, counted; this process and the actor
stay) or ``cluster`` (the cluster's address does not answer, or the connection to it broke: the
node drops this process and starts another).
"""

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from dicom_node.config import Settings
from dicom_node.errors import DicomNodeError
from dicom_node.jobs.queue import Job, QueuePolicy
from dicom_node.scaleout.actor import ComputeActor, Identity
from dicom_node.scaleout.wire import reachable

logger = logging.getLogger(__name__)

Emit = Callable[[tuple[Any, ...]], None]
Key = tuple[str, int]  # (model, slot)

#: prctl's option: the signal this process gets when its parent ends (linux/prctl.h)
PR_SET_PDEATHSIG = 1
#: the longest wait between two tries at making an actor that keeps failing to start
MAX_ACTOR_BACKOFF_SECONDS = 300.0
#: how long the actors asked for at once have to load their model and warm up (measured: a few
#: seconds on a CPU here); one not ready by then is refused and tried again after the backoff
ACTOR_START_SECONDS = 180.0


class Driver:
    """The actors of every model, made, remade with backoff, and called.

    Parameters
    ----------
    settings
        The node's settings (``[workers]`` ``ray_*`` keys, ``[inference]``).
    identities
        Each model's identity at the node (:func:`~dicom_node.scaleout.actor.identity`): an
        actor on a host whose model files differ refuses to start.
    emit
        Sends a message to the node.
    """

    def __init__(self, settings: Settings, identities: dict[str, Identity], emit: Emit) -> None:
        self.settings = settings
        self.identities = identities
        self.emit = emit
        w = settings.workers
        self.handles: dict[Key, Any] = {(m, i): None for m in sorted(identities)
                                        for i in range(w.ray_actors_per_model)}
        self.failures: dict[Key, int] = dict.fromkeys(self.handles, 0)
        self.retry_at: dict[Key, float] = dict.fromkeys(self.handles, 0.0)
        self.backoff = QueuePolicy(backoff_seconds=w.ray_connect_seconds,
                                   max_backoff_seconds=max(w.ray_connect_seconds, MAX_ACTOR_BACKOFF_SECONDS))
        self.stop = threading.Event()
        self.wake = threading.Event()
        self._lock = threading.Lock()
        self._remote: Any = None

    def connect(self) -> None:
        """Attach to the cluster; a failure ends this process (the node starts another later)."""
        import ray
        ray.init(address=self.settings.workers.ray_address, namespace="dicom-node", log_to_driver=False,
                 logging_level=logging.WARNING, configure_logging=False)
        self._remote = ray.remote(ComputeActor)
        self.emit(("connected",))

    def keep_actors(self) -> None:
        """Make the missing actors whose backoff has passed, until :attr:`stop`."""
        while not self.stop.is_set():
            now = time.monotonic()
            with self._lock:
                missing = [k for k, h in self.handles.items() if h is None]
                due = [k for k in missing if self.retry_at[k] <= now]
                later = [self.retry_at[k] for k in missing if self.retry_at[k] > now]
            if due:
                self.make(due)
                continue
            self.wake.wait(min(later) - now if later else None)
            self.wake.clear()

    def make(self, keys: Sequence[Key]) -> None:
        """Ask for the actors of ``keys`` at once, then wait for each to load its model (the
        cold start, paid once per actor); one that fails to start is tried again after a backoff
        that doubles with each failure in a row."""
        import ray
        w = self.settings.workers
        threads = self.settings.inference.threads or max(1, int(w.ray_cpus_per_actor))
        device = "cuda" if w.ray_gpus_per_actor > 0 else "cpu"
        asked = time.monotonic()
        options = self._remote.options(num_cpus=w.ray_cpus_per_actor, num_gpus=w.ray_gpus_per_actor,
                                       max_restarts=0, max_task_retries=0)
        made = {}
        for key in keys:
            handle = options.remote(self.settings, key[0], self.identities[key[0]], device, threads)
            made[handle.describe.remote()] = (key, handle)
        pending = list(made)
        while pending:  # each actor reported as soon as it is ready, not after the slower ones
            ready, pending = ray.wait(pending, num_returns=1,
                                      timeout=max(0.0, asked + ACTOR_START_SECONDS - time.monotonic()))
            if not ready:
                break
            for ref in ready:
                self._made(*made[ref], ref, asked)
        late = TimeoutError(f"not ready {ACTOR_START_SECONDS:.0f} s after it was asked for")
        for ref in pending:
            self._refused(*made[ref], late)

    def _made(self, key: Key, handle: Any, described: Any, asked: float) -> None:
        """The actor answered its ``describe`` (or raised instead: it could not start)."""
        import ray
        try:
            info = ray.get(described)
        except Exception as exc:
            self._refused(key, handle, exc)
            return
        info["ready_seconds"] = round(time.monotonic() - asked, 3)
        with self._lock:
            self.handles[key], self.failures[key] = handle, 0
        self.emit(("actor", key[0], key[1], info, "", 0.0))

    def _refused(self, key: Key, handle: Any, exc: BaseException) -> None:
        import ray
        cause = getattr(exc, "cause", None) or exc
        reason = " ".join(f"{type(cause).__name__}: {cause}".split())[:300]
        with self._lock:
            self.failures[key] += 1
            wait = self.backoff.backoff(self.failures[key])
            self.retry_at[key] = time.monotonic() + wait
        with contextlib.suppress(Exception):  # already gone, or the cluster with it
            ray.kill(handle, no_restart=True)
        self.emit(("actor", key[0], key[1], None, f"could not start: {reason}", wait))

    def compute(self, model: str, slot: int, job: Job, datasets: list[Any]) -> tuple[str, Any]:
        """One job's compute on the actor ``(model, slot)``: its answer for the node."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        with self._lock:
            handle = self.handles.get((model, slot))
        if handle is None:
            return "absent", f"no live Ray actor {slot} of model {model} in the driver"
        try:
            ref = ray.put(datasets)
            return "done", ray.get(handle.compute.remote(job, ref),
                                   timeout=self.settings.workers.ray_call_timeout_seconds)
        except RayTaskError as exc:  # the actor's code raised: a DicomNodeError stays one
            cause = getattr(exc, "cause", None)
            return "task", cause if isinstance(cause, DicomNodeError) else type(cause or exc).__name__
        except Exception as exc:  # not the job's code: the actor, the job's data, or the cluster
            if isinstance(exc, ConnectionError) or not reachable(self.settings.workers.ray_address):
                return "cluster", type(exc).__name__
            if isinstance(exc, (RayActorError, GetTimeoutError)):
                self._lost((model, slot), handle, exc)
                return "actor", type(exc).__name__
            # the cluster answers: dropping this process would kill every actor and hand the
            # job back uncounted, to fail the same way again (a series too big for the object
            # store): the attempt is the job's
            return "job", _said(exc)

    def _lost(self, key: Key, handle: Any, exc: BaseException) -> None:
        """The actor died (or hung): forget it, kill what is left, make another at once."""
        import ray
        with self._lock:
            if self.handles[key] is handle:
                self.handles[key] = None
                self.retry_at[key] = 0.0
        with contextlib.suppress(Exception):
            ray.kill(handle, no_restart=True)
        self.emit(("actor", key[0], key[1], None, f"lost ({type(exc).__name__}); a new one is being made",
                   0.0))
        self.wake.set()


def _said(exc: BaseException) -> str:
    """An error's type and first words, on one line, for a job's reason."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


def serve(conn: Any, receive: Callable[[Any], tuple[Any, ...]], driver: Driver, emit: Emit) -> None:
    """Answer the node's calls, each in its own thread, until the node closes the link."""
    def answer(number: int, args: tuple[Any, ...]) -> None:
        started = time.perf_counter()
        try:
            reply = driver.compute(*args)
        except Exception as exc:  # a bug here must not leave the node's worker waiting
            logger.exception("Ray driver: compute failed")
            reply = ("job", _said(exc))
        # with the seconds spent here (Ray's part and the actor's): the rest is the link's
        seconds = round(time.perf_counter() - started, 6)
        try:
            emit(("answer", number, (*reply, seconds)))
        except OSError:
            return  # the node is gone: nothing to tell
        except Exception as exc:  # the answer cannot be pickled: the job's failure, said so
            with contextlib.suppress(Exception):
                emit(("answer", number, ("job", f"its answer could not be sent ({_said(exc)})", seconds)))

    while True:
        try:
            message = receive(conn)
        except (EOFError, OSError):
            return
        if message[0] == "compute":
            threading.Thread(target=answer, args=(message[1], message[2:]), daemon=True).start()
        elif message[0] == "stop":
            return


def die_with(parent: int) -> None:
    """End this process when the node (pid ``parent``) is gone, even while ``ray.init`` blocks
    (minutes on an address nobody answers) and so never reads the end of its stream: the kernel
    kills it when its parent ends (Linux ``PR_SET_PDEATHSIG``; the node starts drivers from its
    executor's long-lived thread, whose end would count as the parent's), and a thread checks
    the parent every second elsewhere, or should the GIL be free."""
    with contextlib.suppress(Exception):  # not Linux, or no libc: the thread alone
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it ended before the line above: nothing will signal us
        os._exit(4)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(4)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: Sequence[str]) -> int:
    """The process: read the node's hello, connect, keep the actors, serve, leave. ``argv``:
    the program, the socket's fd, and the node's pid."""
    import socket

    from dicom_node.scaleout.wire import receive, send

    if len(argv) > 2:
        die_with(int(argv[2]))
    conn = socket.socket(fileno=int(argv[1]))
    conn.set_inheritable(False)  # Ray's helpers must not keep the node's socket open
    lock = threading.Lock()

    def emit(message: tuple[Any, ...]) -> None:
        send(conn, message, lock)

    _, settings, identities, level = receive(conn)
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s ray-driver[%(process)d] %(name)s: %(message)s")
    driver = Driver(settings, identities, emit)
    try:
        driver.connect()
    except Exception as exc:
        logger.warning("Ray driver: could not connect to %s: %s", settings.workers.ray_address,
                       type(exc).__name__)
        with contextlib.suppress(Exception):
            emit(("problem", f"connecting to the Ray cluster failed ({type(exc).__name__})"))
        return 1
    threading.Thread(target=_keep_or_end, args=(driver,), name="actors", daemon=True).start()
    serve(conn, receive, driver, emit)
    driver.stop.set()
    driver.wake.set()
    _leave()
    return 0


def _keep_or_end(driver: Driver) -> None:
    """:meth:`Driver.keep_actors`; an error it did not expect (Ray failing under it) ends the
    process: the node sees its end and starts a fresh driver, rather than keep one that makes
    no more actors."""
    try:
        driver.keep_actors()
    except Exception:
        logger.exception("Ray driver: making the actors failed; ending this driver process")
        os._exit(3)


def _leave(grace: float = 5.0) -> None:
    """``ray.shutdown()`` (the actors end with their driver), unless the cluster is gone and it
    hangs: the process ends anyway."""
    import ray
    leaving = threading.Thread(target=ray.shutdown, daemon=True)
    leaving.start()
    leaving.join(grace)


if __name__ == "__main__":
    code = main(sys.argv)
    sys.stdout.flush()
    os._exit(code)  # Ray's threads must not keep a process the node considers gone
