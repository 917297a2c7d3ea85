"""`dicom-node serve` and `dicom-node echo` as a user runs them, in a child process."""

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_node.cli import main
from dicom_node.store import InstanceStore
from tests.factories import ct_dataset
from tests.ingest.test_scp import association, send
from tests.nodeproc import NodeProcess, free_port


def _counts(data_dir: Path) -> tuple[int, int, int]:
    store = InstanceStore(data_dir)
    try:
        return store.index.counts()
    finally:
        store.close()


def test_serve_stops_cleanly_on_sigterm_and_keeps_everything(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path)
    with node:
        assert send(node.port, *[ct_dataset() for _ in range(3)]) == [(0, "")] * 3
        assert node.stop(signal.SIGTERM) == 0
    log = node.log.read_text()
    assert "stopping" in log and "stopped" in log
    assert _counts(node.data_dir) == (3, 3, 3)

    with node.start():  # restarted on the same data_dir
        assert send(node.port, ct_dataset()) == [(0, "")]
        assert node.stop(signal.SIGINT) == 0
    assert _counts(node.data_dir)[2] == 4


def test_sigterm_aborts_an_association_that_outlives_the_grace(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path, grace=0.5)
    with node, association(node.port) as assoc:
        assert assoc.send_c_store(ct_dataset()).Status == 0
        started = time.monotonic()
        assert node.stop(signal.SIGTERM) == 0  # the open association does not hold it up
        assert time.monotonic() - started < 10
        assoc.dul.join(timeout=5)
        assert assoc.is_aborted
    assert _counts(node.data_dir)[2] == 1


def test_sigkill_mid_transfer_loses_nothing_that_was_acknowledged(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path)
    acknowledged: list[str] = []

    def sender() -> None:
        with association(node.port) as assoc:
            for _ in range(200):
                ds = ct_dataset(size=256)
                try:
                    rsp = assoc.send_c_store(ds)
                except (RuntimeError, ValueError):
                    return  # association gone
                if getattr(rsp, "Status", None) == 0:
                    acknowledged.append(ds.SOPInstanceUID)
                if not assoc.is_established:
                    return

    with node:
        thread = threading.Thread(target=sender)
        thread.start()
        deadline = time.monotonic() + 30
        while len(acknowledged) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        node.stop(signal.SIGKILL)
        thread.join(timeout=30)
    assert len(acknowledged) >= 20

    with node.start():
        node.stop()
    store = InstanceStore(node.data_dir)
    try:
        assert list(store.files.tmp.iterdir()) == []  # interrupted writes were cleaned up
        for uid in acknowledged:
            record = store.index.get(uid)
            assert record is not None, f"acknowledged instance {uid} lost"
            assert len(dcmread(store.path_of(record)).PixelData) == 256 * 256 * 2
        for record in store.index.instances():  # nothing indexed is partial
            assert dcmread(store.path_of(record)).SOPInstanceUID == record.sop_instance_uid
    finally:
        store.close()


def test_a_second_node_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    with NodeProcess(tmp_path) as node:
        result = subprocess.run(
            [sys.executable, "-m", "dicom_node", "serve", "--config", str(node.config),
             "--port", str(free_port())],
            capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 2
        assert "in use by another dicom-node process" in result.stderr


def test_echo_command(tmp_path: Path, node, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "echo.toml"
    config.write_text('[node]\nae_title = "ECHO_SCU"\n')
    assert main(["echo", f"XAI_NODE@127.0.0.1:{node.port}", "--config", str(config)]) == 0
    assert "success" in capsys.readouterr().out
    assert main(["echo", f"WRONG@127.0.0.1:{node.port}", "--config", str(config)]) == 1
    assert "rejected" in capsys.readouterr().out
    assert main(["echo", f"X@127.0.0.1:{free_port()}", "--config", str(config), "--timeout", "2"]) == 1
    assert main(["echo", "not-a-peer", "--config", str(config)]) == 2
    assert "expected AET@HOST:PORT" in capsys.readouterr().err


def test_module_entry_point_and_version() -> None:
    result = subprocess.run([sys.executable, "-m", "dicom_node", "--version"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("dicom-node ")


def test_jobs_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dicom_node.errors import PermanentError
    from dicom_node.jobs.queue import JobQueue, JobSpec
    from dicom_node.jobs.sqlite import SQLiteJobBackend

    data = tmp_path / "data"
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{data}"\n')
    assert main(["jobs", "list", "--config", str(config)]) == 0
    assert "has no database yet" in capsys.readouterr().out

    data.mkdir()
    backend = SQLiteJobBackend(data / "index.sqlite")
    queue = JobQueue(backend)
    for series in ("1.2.3", "1.2.4"):
        queue.enqueue(JobSpec("1.2", series, (series + ".1",), pipeline="chest", model="demo"))
    failed = queue.claim("w")
    assert failed is not None
    queue.fail(failed.id, "w", PermanentError("not a chest radiograph"), {"collect": 0.012})
    backend.close()

    assert main(["jobs", "list", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "failed" in out and "queued" in out and "not a chest radiograph" in out
    assert main(["jobs", "list", "--state", "failed", "--config", str(config)]) == 0
    assert "queued" not in capsys.readouterr().out
    assert main(["jobs", "show", str(failed.id), "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "time collect" in out and "0.012 s" in out and "1.2.3.1" in out
    assert main(["jobs", "show", "99", "--config", str(config)]) == 1
    assert main(["jobs", "requeue", "--failed", "--config", str(config)]) == 0
    assert f"requeued 1 job(s): {failed.id}" in capsys.readouterr().out
    assert main(["jobs", "requeue", str(failed.id), "--config", str(config)]) == 1
    assert "only failed, dead or done jobs" in capsys.readouterr().err


def test_outbox_commands_show_sends_and_unconfirmed_records(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from dicom_node.export import DeliveryState, Outbox, Result

    data = tmp_path / "data"
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{data}"\n')
    data.mkdir()
    outbox = Outbox(data / "index.sqlite")
    outbox.enqueue(1, [Result("1.2.3.4", "1.2.840.10008.5.1.4.1.1.7", "1.2.3", data / "x.dcm")], ["pacs"])
    [record] = outbox.due()
    for _ in range(3):  # three sends, none answered
        sent = outbox.sending(record)
        assert sent is not None
        assert outbox.retry_later(sent, "pacs: no response (timeout or abort)", 0.0, timed_out=True)
        [record] = outbox.due()
    sent = outbox.sending(record)
    assert sent is not None and outbox.unconfirmed(sent, "pacs: no response (timeout or abort)")
    outbox.close()

    assert main(["outbox", "list", "--state", "unconfirmed", "--config", str(config)]) == 0
    header, line = capsys.readouterr().out.splitlines()[1:3]
    assert header.split()[:4] == ["ID", "STATE", "TRY", "SENT"]
    assert line.split()[:4] == ["1", "unconfirmed", "4", "4"]
    assert main(["outbox", "retry", "--dead", "--config", str(config)]) == 0
    assert "0 record(s) pending again" in capsys.readouterr().out
    assert main(["outbox", "retry", "--unconfirmed", "--config", str(config)]) == 0
    assert "1 record(s) pending again: 1" in capsys.readouterr().out
    outbox = Outbox(data / "index.sqlite")
    [record] = outbox.list()
    outbox.close()
    assert (record.state, record.sends, record.timeouts) == (DeliveryState.PENDING, 4, 0)


EXPLAIN_CONFIG = """
[models]
dir = "{models}"
[[pipelines]]
name = "chest"
model = "demo-cxr"
match = {{ modality = ["CR", "DX"] }}
explain = ["gradcam"]
outputs = ["sc", "sr"]
"""


def test_explain_runs_the_pipeline_on_files_without_a_network(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from dicom_node.phantoms import write_study
    from dicom_node.phantoms.cross_section import cross_section

    config = tmp_path / "node.toml"
    config.write_text(EXPLAIN_CONFIG.format(models=Path(__file__).resolve().parents[1] / "models"))
    inputs = tmp_path / "in"
    write_study(inputs / "cr", 1, seed=3_000_002, size=256, findings={"nodule": True})
    piece = cross_section(3, "CT", size=64)
    piece.dataset.save_as(inputs / "ct.dcm", enforce_file_format=True)
    (inputs / "notes.txt").write_text("not DICOM")
    out = tmp_path / "out"
    assert main(["explain", str(inputs), "--out", str(out), "--config", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "skipped" in printed and "notes.txt" in printed
    assert "analysed: nodule" in printed and "not routed" in printed
    written = [dcmread(p) for p in out.rglob("*.dcm")]
    assert sorted(ds.Modality for ds in written) == ["OT", "SR"]  # the nodule's overlay and the report
    assert main(["explain", str(inputs / "ct.dcm"), "--out", str(out), "--pipeline", "chest",
                 "--config", str(config)]) == 1  # forced onto a chest X-ray model: nothing analysed
    assert "not analysed: model demo-cxr is meant for modalities" in capsys.readouterr().out
    reports = [ds for ds in map(dcmread, out.rglob("*.dcm")) if ds.StudyInstanceUID == piece.dataset.StudyInstanceUID]
    assert [ds.SeriesDescription for ds in reports] == ["AI not analysed demo-cxr 3.0.0"]
    assert main(["explain", str(inputs), "--out", str(out), "--pipeline", "nope", "--config", str(config)]) == 2
