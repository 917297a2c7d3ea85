"""The embedded default: one process running the SCP, the scheduler and the workers.

Everything shares one data folder (files + SQLite). :class:`Node` only wires the parts together
and starts and stops them in the right order; each part can be run on its own in tests.
"""

import fcntl
import importlib.util
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dicom_node import pipeline
from dicom_node.audit import AuditTrail, Fanout
from dicom_node.config import Settings
from dicom_node.dicomweb import DicomWebContext
from dicom_node.encode import VOLUME_OUTPUTS
from dicom_node.errors import ConfigError
from dicom_node.explain.prototypes import IDENTITIES_FILE, PROTOTYPE_ARCHITECTURE, PROTOTYPE_METHODS
from dicom_node.explain.volume import VOLUME_METHODS
from dicom_node.export import DestinationWorker, Exporter, Outbox
from dicom_node.inference import InferenceRunner, ModelManifest, ModelRegistry
from dicom_node.ingest.scp import IngestServer, start_ingest
from dicom_node.jobs.queue import JobQueue, QueuePolicy
from dicom_node.jobs.scheduler import Scheduler
from dicom_node.jobs.sqlite import SQLiteJobBackend
from dicom_node.jobs.worker import Worker
from dicom_node.retention import DiskMarks, Planner, Purger, Retention, read_usage, store_floor
from dicom_node.retention.disk import check_marks
from dicom_node.scaleout.executor import worker_count
from dicom_node.store import InstanceStore
from dicom_node.store.db import DATABASE_NAME
from dicom_node.store.device import installation_device_uid
from dicom_node.store.results import ResultArea
from dicom_node.tls import check_files, web_context
from dicom_node.web import Metrics, Sources, WebServer, check_exposure

if TYPE_CHECKING:
    from dicom_node.scaleout import RayExecutor

logger = logging.getLogger(__name__)


def check_models(settings: Settings, registry: ModelRegistry) -> None:
    """Every model in the repository is usable and every pipeline names one of them.

    Raises
    ------
    ConfigError
        One line naming the file and key at fault (a ModelError for a model's files).
    """
    registry.verify()
    for i, pipeline_ in enumerate(settings.pipelines):
        if pipeline_.model not in registry.manifests:
            raise ConfigError(
                f"{settings.source}: key 'pipelines[{i}].model' = {pipeline_.model!r} is invalid; "
                f"expected a model of the repository {settings.models.dir}: {registry.names()}"
            )
        manifest = registry.manifest(pipeline_.model)
        check_task(settings, i, manifest.task)
        check_prototypes(settings, i, manifest)


def check_task(settings: Settings, index: int, task: str) -> None:
    """A pipeline's explanation methods and outputs fit its model's task (a segmentation model
    makes ``seg``, ``sc`` and ``sr`` only), and a segmentation model's pipeline runs on the node's
    own workers (the Ray executor runs the classification steps only)."""
    pipeline_ = settings.pipelines[index]
    segmentation = task == "segmentation"
    wrong = [m for m in pipeline_.explain if (m in VOLUME_METHODS) != segmentation]
    if wrong:
        expected = (f"some of {list(VOLUME_METHODS)}" if segmentation
                    else "classification methods (not attention, seggradcam)")
        raise ConfigError(f"{settings.source}: key 'pipelines[{index}].explain' = {list(pipeline_.explain)} "
                          f"is invalid for {task} model {pipeline_.model!r}; expected {expected}")
    unmade = [kind for kind in pipeline_.outputs if kind not in VOLUME_OUTPUTS]
    if segmentation and unmade:
        raise ConfigError(f"{settings.source}: key 'pipelines[{index}].outputs' = {list(pipeline_.outputs)} "
                          f"of pipeline {pipeline_.name!r}: segmentation model {pipeline_.model!r} makes no "
                          f"{unmade}; expected some of {list(VOLUME_OUTPUTS)}")
    if segmentation and settings.workers.executor == "ray":
        raise ConfigError(f"{settings.source}: key 'workers.executor' = \"ray\" cannot run pipeline "
                          f"{pipeline_.name!r}: its model {pipeline_.model!r} is a segmentation model, which "
                          "runs on the node's own workers (executor = \"local\")")


def check_prototypes(settings: Settings, index: int, manifest: ModelManifest) -> None:
    """``prototypes`` only for a prototype network with its prototypes' identities beside its
    manifest, explained on the node's own workers (the Ray executor carries predictions and
    heatmaps back, not prototype evidence)."""
    pipeline_ = settings.pipelines[index]
    if not set(PROTOTYPE_METHODS) & set(pipeline_.explain):
        return
    key = f"{settings.source}: key 'pipelines[{index}].explain' = {list(pipeline_.explain)}"
    architecture = manifest.architecture
    if architecture != PROTOTYPE_ARCHITECTURE:
        raise ConfigError(f"{key} is invalid for model {pipeline_.model!r} (architecture {architecture!r}); "
                          f"expected {list(PROTOTYPE_METHODS)} only for a {PROTOTYPE_ARCHITECTURE!r} model")
    identities = manifest.path.parent / IDENTITIES_FILE
    if not identities.is_file():
        raise ConfigError(f"{key} needs the prototypes' identities of model {pipeline_.model!r}: "
                          f"{identities} is missing")
    if settings.workers.executor == "ray":
        raise ConfigError(f"{settings.source}: key 'workers.executor' = \"ray\" cannot run pipeline "
                          f"{pipeline_.name!r}: its prototype explanations run on the node's own workers "
                          "(executor = \"local\")")


def check_ray(settings: Settings) -> None:
    """With ``[workers] executor = "ray"``, Ray must be installed: only the executor's driver
    process imports it, so ask now, or a node without Ray would say "not ready" forever instead
    of exiting with a config error."""
    if settings.workers.executor == "ray" and importlib.util.find_spec("ray") is None:
        raise ConfigError(f"{settings.source}: key 'workers.executor' = \"ray\" needs Ray, which is not "
                          "installed: pip install 'dicom-node[ray]'")


def model_version(registry: ModelRegistry, name: str) -> str:
    """A model's version and weights digest: what makes results of one model differ from another's."""
    manifest = registry.manifest(name)
    return f"{manifest.version}+{manifest.sha256[:12]}"


def default_worker_count() -> int:
    """One worker per GPU when CUDA is available, else one."""
    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


def worker_device(setting: str, index: int) -> str:
    """The device of worker ``index``: with ``"auto"`` and several GPUs, one GPU per worker."""
    if setting != "auto":
        return setting
    return f"cuda:{index % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"


def lock_data_dir(data_dir: Path) -> int:
    """Hold an exclusive lock on the data folder so two nodes never share it."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(data_dir / "node.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(f"node.data_dir = {str(data_dir)!r} is not a usable folder: "
                          f"{exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"{data_dir}: data_dir is in use by another dicom-node process") from None
    return fd


def tick_interval(stable_seconds: float) -> float:
    """How often the scheduler looks for complete series."""
    return min(1.0, max(0.1, stable_seconds / 4))


class Node:
    """The whole node in one process: SCP threads, a scheduler thread, worker threads and an
    exporter thread per destination."""

    def __init__(
        self, settings: Settings, steps: Sequence[tuple[str, pipeline.Step]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.steps = list(steps) if steps is not None else pipeline.default_steps()
        self.clock = clock
        self._stop = threading.Event()
        self._exporters: dict[str, DestinationWorker] = {}  # one per destination, woken by the outbox
        self._work_due = threading.Event()  # set when the scheduler has queued jobs
        self._threads: list[threading.Thread] = []  # the scheduler and the workers
        self._exporter_threads: list[threading.Thread] = []
        self._lock_fd: int | None = None
        self.ingest: IngestServer | None = None

    def start(self) -> None:
        """Check the models, recover from any earlier crash, then start receiving and working."""
        s = self.settings
        if s.web.enabled:
            check_exposure(s.web)  # before anything listens
        check_files(s)  # TLS certificates, keys and CAs: a wrong file is a config error, now
        self.registry = ModelRegistry(s.models.dir)
        check_models(s, self.registry)
        if s.inference.threads:
            torch.set_num_threads(s.inference.threads)
        check_ray(s)
        runners = self._runners()
        self._lock_fd = lock_data_dir(s.node.data_dir)
        device = installation_device_uid(s.node.data_dir)  # made at the first start, then kept
        self.trail = AuditTrail(s.node.data_dir / "audit", s.audit.max_bytes, s.audit.backups,
                                clock=self.clock)
        self.metrics = Metrics()
        self.audit = Fanout(self.trail, self.metrics)
        self.floor = self._store_floor()
        self.executor = self._executor()
        try:
            self._start_rest(device, runners)
        except BaseException:
            if self.executor is not None:  # its driver process must not outlive a failed start
                self.executor.stop()
            raise

    def _start_rest(self, device: str, runners: list[InferenceRunner]) -> None:
        """What :meth:`start` does once the executor runs."""
        s = self.settings
        self.store = InstanceStore(s.node.data_dir, self.floor, clock=self.clock, audit=self.audit)
        self.results = ResultArea(s.node.data_dir / "results")
        self.results.remove_temporaries()
        self.backend = SQLiteJobBackend(s.node.data_dir / DATABASE_NAME)
        policy = QueuePolicy(s.jobs.max_attempts, s.jobs.backoff_seconds,
                             s.jobs.max_backoff_seconds, s.jobs.lease_seconds)
        self.queue = JobQueue(self.backend, policy, clock=self.clock)
        self.outbox = Outbox(s.node.data_dir / DATABASE_NAME, clock=self.clock,
                             on_enqueue=self._wake_exporters)
        self.purger = Purger(s.node.data_dir / DATABASE_NAME, self.store, self.outbox, self.results,
                             self.audit, self.clock)
        self._resume_purge()  # before recover(), which would index the files a killed purge left
        self.store.recover()
        self.exporter = Exporter(self.outbox, s.destinations, s.export, s.node.ae_title, clock=self.clock,
                                 audit=self.audit, tls=s.tls, source=s.source)
        self.exporter.bury_unconfigured()  # a destination removed from the config since the last run
        released = self.queue.release_running()
        if released:
            logger.warning("%d job(s) interrupted by the last stop are queued again", released)
        try:
            self.ingest = start_ingest(s, self.store, self.audit)
        except OSError as exc:
            self._close(clean=True)
            ports = ([f"node.port = {s.node.port}"] if "plain" in s.node.listen else []) + \
                ([f"tls.port = {s.tls.port}"] if "tls" in s.node.listen else [])
            raise ConfigError(f"{s.source}: cannot listen on node.bind = {s.node.bind!r}, "
                              f"{' or '.join(ports)}: {exc.strerror or exc}") from None
        self.scheduler = Scheduler(self.store, self.queue, s.pipelines, s.study.stable_seconds,
                                   partial(model_version, self.registry), clock=self.clock)
        self._spawn("scheduler", self._schedule_loop)
        planner = Planner(self.store.index, self.queue, self.outbox, self.results, s.jobs.lease_seconds,
                          self.clock)
        self.retention = Retention(s.retention, planner, self.purger, s.node.data_dir, clock=self.clock)
        if self.retention.enabled:
            self._spawn("retention", partial(self.retention.run_until, self._stop))
        for exporter in self.exporter.workers():
            self._exporters[exporter.name] = exporter
            self._spawn(f"exporter-{exporter.name}", partial(exporter.run_until, self._stop),
                        self._exporter_threads)
        self.web: WebServer | None = None
        if s.web.enabled:
            sources = Sources(s.node.data_dir, self.queue, self.outbox, self.registry,
                              sorted({str(r.device) for r in runners}), self._not_ready,
                              self.floor, self.executor.statuses if self.executor else list)
            try:
                dicomweb = (DicomWebContext(self.store, self.audit, s.ingest.max_instance_size,
                                            public_url=s.web.public_url) if s.web.dicomweb else None)
                self.web = WebServer(s.web, sources, self.metrics, self.audit, dicomweb,
                                     web_context(s) if s.web.tls else None).start()
            except OSError as exc:
                self.stop()
                raise ConfigError(f"{s.source}: cannot serve the dashboard on web.bind = {s.web.bind!r}, "
                                  f"web.port = {s.web.port}: {exc.strerror or exc}") from None
        for i, inference in enumerate(runners):
            runner = partial(pipeline.run_job, settings=s, store=self.store, steps=self.steps,
                             runner=inference, outbox=self.outbox, audit=self.audit, jobs=self.queue,
                             device_uid=device)
            # with Ray, a model without a live actor holds back its own jobs only
            worker = Worker(self.queue, runner, f"{os.getpid()}/worker-{i}",
                            models=self.executor.claimable if self.executor else None)
            self._spawn(f"worker-{i}", partial(worker.run_until, self._stop, s.workers.poll_seconds,
                                               self._work_due))

    def _resume_purge(self) -> None:
        try:
            self.purger.resume()
        except Exception:  # a database error, say: the intents stay for the next round or start
            logger.exception("retention: resuming an interrupted purge failed; the node starts anyway")

    def _store_floor(self) -> int:
        """The free space below which C-STOREs are refused: the stop mark raises the store's own
        floor (one free-space guard for C-STORE and /readyz). A purge mark at or below it is a
        config error: stores would be refused before it was ever passed."""
        s = self.settings
        usage = read_usage(s.node.data_dir)
        floor = store_floor(usage, s.store.min_free_space, s.retention.stop_above_percent)
        try:
            check_marks(DiskMarks.from_settings(s.retention), usage, floor, str(s.source))
        except ConfigError:
            self.trail.close()
            assert self._lock_fd is not None
            os.close(self._lock_fd)
            self._lock_fd = None
            raise
        return floor

    def _not_ready(self) -> str | None:
        """Why the node cannot take work now, or None: the SCP listens and the database answers."""
        if self.ingest is None or self._stop.is_set():
            return "stopping" if self._stop.is_set() else "the DICOM server is not listening"
        try:
            self.queue.list(None, 1)
        except Exception as exc:
            return f"the database does not answer: {type(exc).__name__}"
        return self.executor.not_ready() if self.executor else None

    def _executor(self) -> "RayExecutor | None":
        """With ``[workers] executor = "ray"``: the Ray executor, started (a refused actor and a
        lost driver go to the audit trail; a freed actor wakes the workers), and the steps that
        hand it the compute (unless the caller gave its own steps)."""
        s = self.settings
        if s.workers.executor != "ray":
            return None
        from dicom_node.scaleout import RayExecutor
        executor = RayExecutor(s, self.registry, [p.model for p in s.pipelines], self.audit,
                               on_free=self._work_due.set)
        if self.steps == pipeline.default_steps():
            self.steps = pipeline.remote_steps(executor.compute)
        return executor.start()

    def _runners(self) -> list[InferenceRunner]:
        """One inference runner per worker, each on its device; a bad device is a config error.
        With Ray the node's runners only read manifests (the actors load the models): CPU."""
        s = self.settings
        count = worker_count(s, default_worker_count)
        try:
            return [InferenceRunner(self.registry, "cpu" if s.workers.executor == "ray" else
                                    worker_device(s.inference.device, i), s.inference.batch_size,
                                    s.inference.bf16)
                    for i in range(count)]
        except ValueError as exc:
            raise ConfigError(f"{s.source}: key 'inference.device' = {s.inference.device!r} is "
                              f"invalid: {exc}") from None

    def _spawn(self, name: str, target: Callable[[], None],
               threads: list[threading.Thread] | None = None) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        (self._threads if threads is None else threads).append(thread)

    def _schedule_loop(self) -> None:
        interval = tick_interval(self.settings.study.stable_seconds)
        while not self._stop.wait(interval):
            try:
                if self.scheduler.tick():
                    self._work_due.set()
            except Exception:
                logger.exception("scheduler tick failed; trying again")

    def _wake_exporters(self, destinations: Collection[str]) -> None:
        """Results were queued for ``destinations``: their exporters need not wait for the poll."""
        for name in destinations:
            if name in self._exporters:
                self._exporters[name].wake()

    def stop(self) -> None:
        """Stop receiving and starting jobs, let running jobs finish within the grace, release the
        rest, close. The exporters' associations in hand are aborted: their records stay pending."""
        s = self.settings
        self._stop.set()  # no new jobs from here on
        web_clean = True
        if getattr(self, "web", None) is not None:
            web_clean = self.web.stop()  # type: ignore[union-attr]  # False: a STOW-RS accept still writing
        for exporter in self._exporters.values():
            exporter.wake()
            exporter.abort()  # a send to a slow PACS need not outlive the grace; it goes again
        self._work_due.set()
        # Both graces run from the signal, side by side: jobs finish while associations do.
        deadline = time.monotonic() + s.workers.shutdown_grace_seconds
        ingest_clean = True
        if self.ingest is not None:
            ingest_clean = self.ingest.stop(s.ingest.shutdown_grace_seconds)
        for thread in self._threads + self._exporter_threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        # Clean is about the store's files: an exporter writes none, and a send it cut short is
        # counted and goes again on the next start.
        busy = [t.name for t in self._threads if t.is_alive()]
        clean = not busy and ingest_clean and web_clean  # a handler still writing: check the files next start
        exporting = [t.name for t in self._exporter_threads if t.is_alive()]
        if exporting:
            logger.warning("%s still busy at stop (a destination slow to connect)", exporting)
        if busy:
            released = self.queue.release_running("the node stopped before the job finished")
            logger.warning("%s still busy at stop; %d job(s) queued again", busy, released)
        self._close(clean)

    def _close(self, clean: bool) -> None:
        if getattr(self, "executor", None) is not None:
            self.executor.stop()  # type: ignore[union-attr]
        self.backend.close()
        self.purger.close()
        self.outbox.close()
        self.trail.close()
        self.store.close(clean_shutdown=clean)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
