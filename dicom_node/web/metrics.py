"""``/metrics`` in the Prometheus text format (version 0.0.4).

Counters of what happened since the process started are fed by the same events as the audit
trail (:class:`Metrics` is one more audit sink); totals and queue depths are read from the
database at each scrape.
"""

import threading
from collections import defaultdict
from typing import Any

import torch

from dicom_node import __version__
from dicom_node.web.data import Sources, read_only

BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class Metrics:
    """In-process counters and histograms, fed with audit events; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.associations: dict[str, int] = defaultdict(int)
        self.rejections: dict[str, int] = defaultdict(int)
        self.deliveries: dict[tuple[str, str], int] = defaultdict(int)
        self.jobs: dict[str, int] = defaultdict(int)
        self.received: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # calling AE -> [instances, bytes]
        self.steps: dict[str, list[float]] = {}  # step -> bucket counts..., sum, count
        self.purged: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # kind -> [deleted, bytes]

    def record(self, event: str, **fields: Any) -> None:
        with self._lock:
            if event == "instance_stored":
                counts = self.received[str(fields.get("calling_ae_title", ""))]
                counts[0] += 1
                counts[1] += int(fields.get("size_bytes", 0) or 0)
            elif event == "association_accepted":
                self.associations["accepted"] += 1
            elif event == "association_rejected":
                self.associations["rejected"] += 1
                self.rejections[str(fields.get("reason", ""))] += 1
            elif event in ("result_delivered", "result_dead", "result_deferred", "result_unconfirmed"):
                self.deliveries[(str(fields.get("destination", "")), event.removeprefix("result_"))] += 1
            elif event == "retention_purged":
                counts = self.purged[str(fields.get("kind", ""))]
                counts[0] += 1
                counts[1] += int(fields.get("size_bytes", 0) or 0)
            elif event in ("job_finished", "job_failed"):
                self.jobs[event.removeprefix("job_")] += 1
                for step, seconds in (fields.get("timings") or {}).items():
                    self._observe(step, float(seconds))

    def _observe(self, step: str, seconds: float) -> None:
        row = self.steps.setdefault(step, [0.0] * (len(BUCKETS) + 2))
        for i, bound in enumerate(BUCKETS):
            if seconds <= bound:
                row[i] += 1
        row[-2] += seconds
        row[-1] += 1

    def render(self, src: Sources, audit_errors: int = 0) -> str:
        out: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
                out.append(f"{name}{{{text}}} {_number(value)}" if text else f"{name} {_number(value)}")

        metric("dicom_node_info", "gauge", "The node's version.", [({"version": __version__}, 1)])
        with read_only(src.data_dir) as conn:
            received = conn.execute(
                "SELECT calling_ae_title, COUNT(*), COALESCE(SUM(size_bytes), 0) "
                "FROM instances GROUP BY calling_ae_title"
            ).fetchall()
            jobs = conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        metric(
            "dicom_node_stored_instances",
            "gauge",
            "Instances in the store, by the calling AE title that sent them last.",
            [({"calling_ae": ae}, n) for ae, n, _ in received],
        )
        metric(
            "dicom_node_stored_bytes",
            "gauge",
            "Bytes in the store, by the calling AE title that sent them last.",
            [({"calling_ae": ae}, size) for ae, _, size in received],
        )
        metric(
            "dicom_node_audit_write_errors_total",
            "counter",
            "Audit events that could not be written since start (see the node's log).",
            [({}, audit_errors)],
        )
        with self._lock:
            metric(
                "dicom_node_instances_received_total",
                "counter",
                "Instances stored since start (each arrival, re-sends too), by calling AE title.",
                [({"calling_ae": ae}, n) for ae, (n, _) in sorted(self.received.items())],
            )
            metric(
                "dicom_node_bytes_received_total",
                "counter",
                "Bytes of the instances stored since start, by calling AE title.",
                [({"calling_ae": ae}, size) for ae, (_, size) in sorted(self.received.items())],
            )
            metric(
                "dicom_node_associations_total",
                "counter",
                "Associations since start, by result.",
                [({"result": k}, v) for k, v in sorted(self.associations.items())],
            )
            metric(
                "dicom_node_associations_rejected_total",
                "counter",
                "Rejected associations since start, by reason.",
                [({"reason": k}, v) for k, v in sorted(self.rejections.items())],
            )
            metric(
                "dicom_node_results_total",
                "counter",
                "Result instances since start, by destination and "
                "outcome (delivered, deferred for a retry, dead, unconfirmed).",
                [({"destination": d, "outcome": o}, v) for (d, o), v in sorted(self.deliveries.items())],
            )
            metric(
                "dicom_node_purged_total",
                "counter",
                "Inputs and results deleted by the retention policy since start, by kind.",
                [({"kind": k}, n) for k, (n, _) in sorted(self.purged.items())],
            )
            metric(
                "dicom_node_purged_bytes_total",
                "counter",
                "Bytes deleted by the retention policy since start, by kind.",
                [({"kind": k}, size) for k, (_, size) in sorted(self.purged.items())],
            )
            metric(
                "dicom_node_jobs_total",
                "counter",
                "Jobs run since start, by outcome.",
                [({"outcome": k}, v) for k, v in sorted(self.jobs.items())],
            )
            out.append("# HELP dicom_node_job_step_seconds Seconds a job spent in each step.")
            out.append("# TYPE dicom_node_job_step_seconds histogram")
            for step, row in sorted(self.steps.items()):
                for bound, count in zip(BUCKETS, row, strict=False):
                    out.append(
                        f'dicom_node_job_step_seconds_bucket{{step="{_escape(step)}",le="{bound:g}"}} '
                        f"{_number(count)}"
                    )
                label = f'step="{_escape(step)}"'
                out.append(f'dicom_node_job_step_seconds_bucket{{{label},le="+Inf"}} {_number(row[-1])}')
                out.append(f"dicom_node_job_step_seconds_sum{{{label}}} {_number(row[-2])}")
                out.append(f"dicom_node_job_step_seconds_count{{{label}}} {_number(row[-1])}")
        metric(
            "dicom_node_jobs",
            "gauge",
            "Jobs by state (queue depth: queued).",
            [({"state": s}, n) for s, n in jobs],
        )
        metric(
            "dicom_node_outbox",
            "gauge",
            "Outbox records by state.",
            [({"state": s}, n) for s, n in sorted(src.outbox.counts().items())],
        )
        if torch.cuda.is_available():
            metric(
                "dicom_node_gpu_memory_allocated_bytes",
                "gauge",
                "GPU memory held by tensors, by device.",
                [
                    ({"device": f"cuda:{i}"}, torch.cuda.memory_allocated(i))
                    for i in range(torch.cuda.device_count())
                ],
            )
        return "\n".join(out) + "\n"


def _number(value: float) -> str:
    """Exact integers as integers; other values in full precision (``:g`` keeps 6 digits)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
