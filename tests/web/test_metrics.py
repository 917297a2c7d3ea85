"""/metrics: every metric docs/api.md lists appears and moves when what it counts happens,
the audit trail's lost events included; each node has its own registry."""

import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dicom_node.audit import Fanout
from dicom_node.export import Result
from dicom_node.jobs.queue import JobSpec
from dicom_node.web import Metrics
from dicom_node.web.metrics import GpuCollector
from tests.factories import ct_dataset
from tests.nodeproc import REPO
from tests.store.test_store import put
from tests.web.inprocess import App, web_app

GPU = "dicom_node_gpu_memory_allocated_bytes"


def documented() -> list[str]:
    """The metric names of docs/api.md's table under "Metrics and health"."""
    text = (REPO / "docs" / "api.md").read_text()
    section = text[text.index("## Metrics and health"):text.index("`GET /healthz`")]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `dicom_node_")]
    names = [name for row in rows for name in re.findall(r"`(dicom_node_[a-z_]+)`", row)]
    assert len(names) >= 15, names
    return names


def scrape(app: App) -> dict[str, float]:
    """Each metric's total over its labels (a histogram's: its count), from a real GET."""
    status, headers, body = app.request("GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name.endswith("_created") or sample.name.endswith(("_bucket", "_sum")):
                continue
            name = sample.name.removesuffix("_count") if family.type == "histogram" else sample.name
            if family.type == "counter" and not name.endswith("_total"):
                name += "_total"
            totals[name] = totals.get(name, 0.0) + sample.value
    return totals


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    with web_app(tmp_path / "data") as served:
        yield served


def provoke(app: App, audit: Fanout) -> None:
    """Once each thing a metric counts, through the node's own event names and database."""
    record = put(app.store, ct_dataset(seed=7), "MODALITY")
    audit.record("instance_stored", study_instance_uid=record.study_instance_uid,
                 calling_ae_title="MODALITY", size_bytes=record.size_bytes)
    audit.record("association_accepted", calling_ae_title="MODALITY")
    audit.record("association_rejected", calling_ae_title="STRANGER", reason="calling_ae_title_not_recognized")
    app.src.queue.enqueue(JobSpec("1.2.3", "1.2.3.4", ("1.2.3.4.5",), pipeline="chest", model="demo"))
    audit.record("job_finished", job_id=1, timings={"inference": 0.2, "explain": 1.5})
    for outcome in ("delivered", "deferred", "dead", "unconfirmed"):
        audit.record(f"result_{outcome}", destination="pacs", sop_instance_uid="1.2.9")
    audit.record("retention_purged", kind="input", size_bytes=4096, sop_instance_uid="1.2.8")
    app.src.outbox.enqueue(1, [Result("1.2.10", "1.2.840.10008.5.1.4.1.1.7", "1.2.3",
                                      app.src.data_dir / "results" / "y.dcm")], ["pacs"])
    app.trail.close()  # the trail's file gone: the next event is lost, and counted
    audit.record("operator_requeued_job", job_id=1, actor="test")


def test_every_documented_metric_appears_and_moves(app: App) -> None:
    audit = Fanout(app.trail, app.server.metrics)  # as the node wires them
    before = scrape(app)
    provoke(app, audit)
    after = scrape(app)
    names = documented()
    assert GPU in names
    for name in names:
        if name == GPU:
            continue  # no CUDA here: absent, as documented; its collector is tested below
        assert name in after, f"{name} documented but not served"
        if name != "dicom_node_info":
            assert after[name] > before.get(name, 0.0), f"{name} did not move"
    assert after["dicom_node_audit_write_errors_total"] == before["dicom_node_audit_write_errors_total"] + 1
    served = {n for n in after if n.startswith("dicom_node_")}
    assert served <= set(names), f"served but not documented: {served - set(names)}"


def test_the_gpu_collector_reads_each_device_at_scrape_time() -> None:
    held = {0: 1024, 1: 0}
    cuda = SimpleNamespace(is_available=lambda: True, device_count=lambda: 2,
                           memory_allocated=lambda i: held[i])
    [family] = GpuCollector(cuda).collect()
    assert family.name == GPU and [s.value for s in family.samples] == [1024, 0]
    held[1] = 4096
    [family] = GpuCollector(cuda).collect()
    assert {s.labels["device"]: s.value for s in family.samples} == {"cuda:0": 1024, "cuda:1": 4096}
    off = SimpleNamespace(is_available=lambda: False)
    assert list(GpuCollector(off).collect()) == []


def test_each_metrics_object_has_its_own_registry() -> None:
    one, two = Metrics(), Metrics()
    one.record("job_failed", timings={"collect": 0.01})
    assert one.sample("dicom_node_jobs_total", outcome="failed") == 1
    assert two.sample("dicom_node_jobs_total", outcome="failed") is None
    assert one.sample("dicom_node_job_step_seconds_bucket", step="collect", le="0.01") == 1
