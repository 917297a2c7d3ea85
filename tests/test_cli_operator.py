"""What an operator reads: job outcomes, the outbox's next tries (issue 14, operator visibility)."""

import dataclasses
import re
import time
from pathlib import Path
from unittest.mock import MagicMock

import pytest

from dicom_node.cli import main
from dicom_node.config import Destination, Pipeline, Settings
from dicom_node.errors import PermanentError
from dicom_node.export import Outbox, Result
from dicom_node.inference import InferenceRunner, ModelRegistry
from dicom_node.jobs.queue import JobQueue, JobSpec
from dicom_node.jobs.sqlite import SQLiteJobBackend
from dicom_node.phantoms import render, to_dataset
from dicom_node.pipeline import default_steps, run
from dicom_node.store import InstanceStore
from dicom_node.web import data, pages
from tests.inference.models import write_model
from tests.store.test_store import put

SR = "1.2.840.10008.5.1.4.1.1.88.22"


def _config(tmp_path: Path) -> tuple[Path, Path]:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{data_dir}"\n')
    return data_dir, config


def _two_failed_jobs(data_dir: Path) -> tuple[int, int]:
    """One failed job whose "not analysed" SR was queued and delivered, one that sent nothing."""
    backend = SQLiteJobBackend(data_dir / "index.sqlite")
    queue = JobQueue(backend)
    for series in ("1.2.3", "1.2.4"):
        queue.enqueue(JobSpec("1.2", series, (series + ".1",), pipeline="chest", model="demo"))
    ids = []
    for _ in range(2):
        job = queue.claim("w")
        assert job is not None
        queue.fail(job.id, "w", PermanentError("not a chest radiograph"), {})
        ids.append(job.id)
    backend.close()
    outbox = Outbox(data_dir / "index.sqlite")
    outbox.enqueue(ids[0], [Result("1.2.3.99", SR, "1.2", data_dir / "sr.dcm")], ["pacs"])
    [record] = outbox.due()
    sent = outbox.sending(record)
    assert sent is not None and outbox.delivered(sent)
    outbox.close()
    return ids[0], ids[1]


def test_jobs_list_and_show_tell_a_reported_failure_from_a_silent_one(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data_dir, config = _config(tmp_path)
    reported, silent = _two_failed_jobs(data_dir)
    assert main(["jobs", "list", "--config", str(config)]) == 0
    lines = {int(line.split()[0]): line for line in capsys.readouterr().out.splitlines()[1:]
             if line.split() and line.split()[0].isdigit()}
    assert "not analysed, reported (1 delivered)" in lines[reported]
    assert "failed, nothing sent" in lines[silent] and "reported" not in lines[silent]

    assert main(["jobs", "show", str(reported), "--config", str(config)]) == 0
    shown = capsys.readouterr().out
    assert "outcome      not analysed, reported (1 delivered)" in shown
    assert "1.2.3.99 to pacs: delivered" in shown
    assert main(["jobs", "show", str(silent), "--config", str(config)]) == 0
    assert "outcome      failed, nothing sent" in capsys.readouterr().out


def test_jobs_list_without_an_outbox_says_nothing_was_sent(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    data_dir, config = _config(tmp_path)
    backend = SQLiteJobBackend(data_dir / "index.sqlite")
    queue = JobQueue(backend)
    queue.enqueue(JobSpec("1.2", "1.2.3", ("1.2.3.1",), pipeline="chest", model="demo"))
    job = queue.claim("w")
    assert job is not None
    queue.fail(job.id, "w", PermanentError("no instances"), {})
    backend.close()
    assert main(["jobs", "list", "--config", str(config)]) == 0
    assert "failed, nothing sent" in capsys.readouterr().out


def test_the_dashboard_job_list_shows_the_same_outcomes(tmp_path: Path) -> None:
    data_dir, _ = _config(tmp_path)
    reported, silent = _two_failed_jobs(data_dir)
    backend = SQLiteJobBackend(data_dir / "index.sqlite")
    outbox = Outbox(data_dir / "index.sqlite")
    try:
        src = data.Sources(data_dir, JobQueue(backend), outbox, MagicMock(), ["cpu"], lambda: None)
        rows = data.jobs(src, None)
        html = pages.jobs(rows).decode()
    finally:
        outbox.close()
        backend.close()
    outcome = {row["id"]: row["outcome"] for row in rows}
    assert outcome == {reported: "not analysed, reported (1 delivered)", silent: "failed, nothing sent"}
    assert ">outcome<" in html
    assert "not analysed, reported (1 delivered)" in html and "failed, nothing sent" in html


def test_outbox_list_says_when_each_pending_record_is_tried_next(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data_dir, config = _config(tmp_path)
    outbox = Outbox(data_dir / "index.sqlite")
    results = [Result(f"1.2.3.{i}", SR, "1.2", data_dir / f"{i}.dcm") for i in (1, 2)]
    outbox.enqueue(1, results, ["pacs"])
    later, done = outbox.due()

    due = time.time() + 185
    assert outbox.retry_later(later, "pacs: association rejected", due)
    sent = outbox.sending(done)
    assert sent is not None and outbox.delivered(sent)
    outbox.close()
    assert main(["outbox", "list", "--config", str(config)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "NEXT TRY" in out[1]
    pending = next(line for line in out if "1.2.3.1" in line)
    delivered = next(line for line in out if "1.2.3.2" in line)
    relative = re.search(r"\(in (\d+)m (\d\d)s\)", pending)
    assert relative is not None, pending
    assert 125 <= 60 * int(relative[1]) + int(relative[2]) <= 185  # 185 s, less the seconds it took
    absolute = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(due))
    assert absolute in pending
    assert delivered.split()[1] == "delivered" and " - " in delivered


def test_jobs_failed_by_the_pipeline_show_whether_their_report_went_out(
        tmp_path: Path, settings: Settings, store: InstanceStore,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The real chain: a knee series on a chest model fails permanently; with an ``sr`` output
    and a destination its "not analysed" SR is queued; without, nothing is."""
    data_dir = settings.node.data_dir
    queue = JobQueue(SQLiteJobBackend(data_dir / "index.sqlite"))
    outbox = Outbox(data_dir / "index.sqlite")
    pacs = Destination("pacs", "ORTHANC", "127.0.0.1", 4242)
    write_model(tmp_path / "models", "tiny", extra="")
    manifest = tmp_path / "models" / "tiny" / "model.toml"
    manifest.write_text(manifest.read_text().replace("[scope]\n", '[scope]\nbody_parts = ["CHEST"]\n'))
    runner = InferenceRunner(ModelRegistry(tmp_path / "models"), device="cpu")
    ids = {}
    for seed, outputs in ((1, ("sc", "sr")), (2, ("sc",))):
        source = to_dataset(render(seed, 64), modality="CR")  # a complete header (the phantom's)
        source.BodyPartExamined = "KNEE"  # that the model is not meant for
        record = put(store, source)
        pipeline = Pipeline(name="p", model="tiny", outputs=outputs, send_to=("pacs",))
        configured = dataclasses.replace(settings, destinations=(pacs,), pipelines=(pipeline,))
        queue.enqueue(JobSpec(record.study_instance_uid, record.series_instance_uid,
                              (record.sop_instance_uid,), pipeline="p", model="tiny"))
        job = queue.claim("w")
        assert job is not None
        with pytest.raises(PermanentError) as failure:
            run(job, {}, settings=configured, store=store, steps=default_steps(), runner=runner, outbox=outbox)
        queue.fail(job.id, "w", failure.value, {})
        ids[outputs] = job.id
    queue.backend.close()
    outbox.close()
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{data_dir}"\n')
    assert main(["jobs", "list", "--config", str(config)]) == 0
    lines = {int(line.split()[0]): line for line in capsys.readouterr().out.splitlines()[1:]
             if line.split() and line.split()[0].isdigit()}
    assert "not analysed, reported (1 pending)" in lines[ids[("sc", "sr")]]
    assert "failed, nothing sent" in lines[ids[("sc",)]]
