"""``/metrics`` through ``prometheus_client``, one registry per node.

Counters and histograms of what happened since the process started are fed by the same events
as the audit trail (:class:`Metrics` is one more audit sink). What the database holds (stored
instances, jobs and outbox records by state) and the audit trail's lost events are read at each
scrape by custom collectors (:class:`DatabaseCollector`, :class:`AuditCollector`), so a figure is
never stale and never kept twice.
"""

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from prometheus_client import CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dicom_node import __version__
from dicom_node.audit import Audit
from dicom_node.web.data import Sources, read_only

BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
#: What ``/metrics`` answers with (the text format ``generate_latest`` writes).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Audit events the outbox reports, named ``result_<outcome>``.
RESULT_EVENTS = ("result_delivered", "result_dead", "result_deferred", "result_unconfirmed")


class Metrics:
    """The node's metrics in their own :class:`~prometheus_client.CollectorRegistry` (nothing
    global: two nodes in one process, or two tests, never share a counter); an audit sink."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        Info("dicom_node", "The node's version.", registry=r).info({"version": __version__})
        self.received = Counter("dicom_node_instances_received_total",
                                "Instances stored since start (each arrival, re-sends too), "
                                "by calling AE title.", ["calling_ae"], registry=r)
        self.received_bytes = Counter("dicom_node_bytes_received_total",
                                      "Bytes of the instances stored since start, by calling AE title.",
                                      ["calling_ae"], registry=r)
        self.associations = Counter("dicom_node_associations_total", "Associations since start, by result.",
                                    ["result"], registry=r)
        self.rejections = Counter("dicom_node_associations_rejected_total",
                                  "Rejected associations since start, by reason.", ["reason"], registry=r)
        self.results = Counter("dicom_node_results_total",
                               "Result instances since start, by destination and outcome "
                               "(delivered, deferred for a retry, dead, unconfirmed).",
                               ["destination", "outcome"], registry=r)
        self.purged = Counter("dicom_node_purged_total",
                              "Inputs and results deleted by the retention policy since start, by kind.",
                              ["kind"], registry=r)
        self.purged_bytes = Counter("dicom_node_purged_bytes_total",
                                    "Bytes deleted by the retention policy since start, by kind.",
                                    ["kind"], registry=r)
        self.jobs = Counter("dicom_node_jobs_total", "Jobs run since start, by outcome.", ["outcome"],
                            registry=r)
        self.steps = Histogram("dicom_node_job_step_seconds", "Seconds a job spent in each step.", ["step"],
                               buckets=BUCKETS, registry=r)
        r.register(GpuCollector())

    def record(self, event: str, **fields: Any) -> None:
        """Count one audit event (never raises on a field it does not know)."""
        if event == "instance_stored":
            ae = str(fields.get("calling_ae_title", ""))
            self.received.labels(ae).inc()
            self.received_bytes.labels(ae).inc(int(fields.get("size_bytes", 0) or 0))
        elif event == "association_accepted":
            self.associations.labels("accepted").inc()
        elif event == "association_rejected":
            self.associations.labels("rejected").inc()
            self.rejections.labels(str(fields.get("reason", ""))).inc()
        elif event in RESULT_EVENTS:
            self.results.labels(str(fields.get("destination", "")), event.removeprefix("result_")).inc()
        elif event == "retention_purged":
            kind = str(fields.get("kind", ""))
            self.purged.labels(kind).inc()
            self.purged_bytes.labels(kind).inc(int(fields.get("size_bytes", 0) or 0))
        elif event in ("job_finished", "job_failed"):
            self.jobs.labels(event.removeprefix("job_")).inc()
            for step, seconds in (fields.get("timings") or {}).items():
                self.steps.labels(str(step)).observe(float(seconds))

    def watch(self, src: Sources, audit: Audit) -> None:
        """Add what is read at each scrape: the database's figures and ``audit``'s lost events."""
        self.registry.register(DatabaseCollector(src))
        self.registry.register(ActorCollector(src))
        self.registry.register(AuditCollector(audit))

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)

    def sample(self, name: str, **labels: str) -> float | None:
        """One sample's value (e.g. ``sample("dicom_node_jobs_total", outcome="failed")``), None if absent."""
        return self.registry.get_sample_value(name, labels)


class DatabaseCollector(Collector):
    """Gauges read from the node's database at scrape time (read-only: works on a full disk)."""

    def __init__(self, src: Sources) -> None:
        self.src = src

    def collect(self) -> Iterable[Metric]:
        with read_only(self.src.data_dir) as conn:
            received = conn.execute(
                "SELECT calling_ae_title, COUNT(*), COALESCE(SUM(size_bytes), 0) "
                "FROM instances GROUP BY calling_ae_title"
            ).fetchall()
            jobs = conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        yield _gauge("dicom_node_stored_instances",
                     "Instances in the store, by the calling AE title that sent them last.",
                     "calling_ae", [(ae, n) for ae, n, _ in received])
        yield _gauge("dicom_node_stored_bytes",
                     "Bytes in the store, by the calling AE title that sent them last.", "calling_ae",
                     [(ae, size) for ae, _, size in received])
        yield _gauge("dicom_node_jobs", "Jobs by state (queue depth: queued).", "state", jobs)
        yield _gauge("dicom_node_outbox", "Outbox records by state.", "state",
                     sorted(self.src.outbox.counts().items()))


class ActorCollector(Collector):
    """The Ray executor's actors at scrape time (nothing with the local executor): up, busy,
    queue depth, utilisation and jobs, by model, slot, device and host."""

    LABELS = ("model", "slot", "device", "host")
    GAUGES = (("alive", "dicom_node_ray_actor_up", "1 while the actor is alive and loaded."),
              ("busy", "dicom_node_ray_actor_busy", "1 while the actor runs a job."),
              ("queue_depth", "dicom_node_ray_actor_queue_depth",
               "Jobs at the actor or waiting for an actor of its model."),
              ("utilisation", "dicom_node_ray_actor_utilisation",
               "Share of the actor's life spent on jobs (0..1)."))

    def __init__(self, src: Sources) -> None:
        self.src = src

    def collect(self) -> Iterator[Metric]:
        actors = self.src.actors()
        if not actors:
            return
        jobs = CounterMetricFamily("dicom_node_ray_actor_jobs", "Jobs the actor ran (its slot's).",
                                   labels=self.LABELS)
        for key, name, text in self.GAUGES:
            family = GaugeMetricFamily(name, text, labels=self.LABELS)
            for a in actors:
                family.add_metric(_actor_labels(a), float(a[key]))
            yield family
        for a in actors:
            jobs.add_metric(_actor_labels(a), a["jobs"])
        yield jobs


def _actor_labels(actor: dict[str, Any]) -> list[str]:
    return [str(actor["model"]), str(actor["slot"]), str(actor["device"]), str(actor["host"])]


class AuditCollector(Collector):
    """``dicom_node_audit_write_errors_total``: the events the audit trail could not write,
    as the trail itself counts them (:attr:`AuditTrail.errors`, one per event lost)."""

    def __init__(self, audit: Audit) -> None:
        self.audit = audit

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "dicom_node_audit_write_errors",
            "Audit events that could not be written since start (see the node's log).")
        family.add_metric([], audit_errors(self.audit))
        yield family


class GpuCollector(Collector):
    """GPU memory held by tensors, by device; nothing on a machine without CUDA."""

    def __init__(self, cuda: Any = torch.cuda) -> None:
        self.cuda = cuda

    def collect(self) -> Iterator[Metric]:
        if not self.cuda.is_available():
            return
        devices = range(self.cuda.device_count())
        yield _gauge("dicom_node_gpu_memory_allocated_bytes", "GPU memory held by tensors, by device.",
                     "device", [(f"cuda:{i}", self.cuda.memory_allocated(i)) for i in devices])


def audit_errors(audit: Audit) -> int:
    """Events lost by ``audit`` (or by each sink of a :class:`~dicom_node.audit.Fanout`)."""
    sinks = getattr(audit, "sinks", (audit,))
    return sum(int(getattr(sink, "errors", 0)) for sink in sinks)


def _gauge(name: str, help_text: str, label: str, samples: Iterable[tuple[str, float]]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, help_text, labels=[label])
    for value, count in samples:
        family.add_metric([str(value)], count)
    return family

