"""No cross-patient mix-up when a sender reuses the Study Instance UID too: two patients'
instances with the same study and series UIDs are one job, and that job makes and sends nothing
(not even a "not analysed" report, which would reference both patients' images); it fails with
a reason, an ERROR and the audit event ``patients_mixed_in_series``."""

import dataclasses
import json
import logging
from functools import partial
from typing import Any

import pytest
from pydicom import Dataset

from dicom_node.config import Settings
from dicom_node.encode.common import check_one_series
from dicom_node.export.outbox import Outbox
from dicom_node.inference import InferenceRunner
from dicom_node.jobs.memory import MemoryJobBackend
from dicom_node.jobs.queue import JobQueue, JobState
from dicom_node.jobs.worker import Worker
from dicom_node.pipeline import MixedPatientsError, default_steps, run, run_job
from dicom_node.store import InstanceStore
from dicom_node.store.db import DATABASE_NAME
from dicom_node.store.patient import differing_identity
from tests.factories import new_uid
from tests.store.test_store import put
from tests.test_pipeline_series_key import PIPELINE, radiograph, runner, tick

__all__ = ["runner"]  # the fixture, imported for the tests here

REASON = "instances of several patients in one study/series: not analysed"


class Recorder:
    """An audit sink that keeps the events."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def record(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))


def test_two_patients_sharing_study_and_series_uids_get_nothing_made_or_sent(
    store: InstanceStore, settings: Settings, runner: InferenceRunner, caplog: pytest.LogCaptureFixture
) -> None:
    study, series = new_uid(), new_uid()
    alpha, beta = radiograph(11, study, series, "ALPHA"), radiograph(21, study, series, "BETA")
    put(store, alpha)
    put(store, beta)
    queue = JobQueue(MemoryJobBackend())
    [job] = tick(store, queue)
    assert set(job.instance_uids) == {alpha.SOPInstanceUID, beta.SOPInstanceUID}
    pipeline = dataclasses.replace(PIPELINE, send_to=("pacs",))
    configured = dataclasses.replace(settings, pipelines=(pipeline,))
    audit = Recorder()
    outbox = Outbox(settings.node.data_dir / DATABASE_NAME)
    try:
        worker = Worker(queue, partial(run_job, settings=configured, store=store, steps=default_steps(),
                                       runner=runner, outbox=outbox, audit=audit, jobs=queue), "w")
        with caplog.at_level(logging.ERROR, logger="dicom_node.pipeline"):
            after = worker.run_once()
        assert outbox.list() == []  # nothing sent
    finally:
        outbox.close()
    assert after is not None and after.state == JobState.FAILED and after.attempts == 1  # not retried
    assert after.reason == f"MixedPatientsError: {REASON}"
    assert not (settings.node.data_dir / "results").exists()  # nothing made, not even a report
    [(_, mixed)] = [(e, f) for e, f in audit.events if e == "patients_mixed_in_series"]
    assert mixed == {"job": job.id, "study_instance_uid": study, "series_instance_uid": series,
                     "pipeline": "chest", "attributes": ["PatientID", "PatientName"],
                     "instances": list(job.instance_uids)}
    [failed] = [f for e, f in audit.events if e == "job_failed"]
    assert failed["outputs"] == [] and failed["reason"] == REASON
    [logged] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert f"job {job.id}:" in logged and "several patients" in logged
    written = json.dumps(audit.events) + logged
    assert not any(value in written for value in ("ALPHA", "BETA"))  # attribute names, never values


def test_one_patient_whose_headers_differ_only_in_padding_or_absence_is_analysed(
    store: InstanceStore, settings: Settings, runner: InferenceRunner
) -> None:
    study, series = new_uid(), new_uid()
    first, second = radiograph(11, study, series, "ALPHA"), radiograph(21, study, series, "ALPHA")
    first.PatientName, first.PatientBirthDate = "ALPHA^TEST^^", "19700101"
    second.PatientID = "ID-ALPHA "
    for ds in (first, second):
        put(store, ds)
    [job] = tick(store, JobQueue(MemoryJobBackend()))
    ctx = run(job, {}, settings=dataclasses.replace(settings, pipelines=(PIPELINE,)), store=store,
              steps=default_steps(), runner=runner)
    assert ctx.outputs and {p.sop_instance_uid for p in ctx.predictions} == set(job.instance_uids)


def test_a_mixed_job_outside_the_models_scope_still_gets_no_report(
    store: InstanceStore, settings: Settings, runner: InferenceRunner
) -> None:
    """The patient check comes first: a scope failure would otherwise leave a "not analysed"
    report referencing both patients' images."""
    study, series = new_uid(), new_uid()
    for seed, name in ((11, "ALPHA"), (21, "BETA")):
        ds = radiograph(seed, study, series, name)
        ds.BodyPartExamined = "FOOT"
        put(store, ds)
    [job] = tick(store, JobQueue(MemoryJobBackend()))
    with pytest.raises(MixedPatientsError):
        run(job, {}, settings=dataclasses.replace(settings, pipelines=(PIPELINE,)), store=store,
            steps=default_steps(), runner=runner)
    assert not (settings.node.data_dir / "results").exists()


def identity(**values: str) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3", "1.2.3.4"
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(("a", "b", "differing"), [
    ({"PatientID": "7"}, {"PatientID": "8"}, ["PatientID"]),
    ({"PatientID": "7", "IssuerOfPatientID": "H1"}, {"PatientID": "7", "IssuerOfPatientID": "H2"},
     ["IssuerOfPatientID"]),
    ({"PatientName": "DOE^JOHN"}, {"PatientName": "DOE^JANE"}, ["PatientName"]),
    ({"PatientName": "DOE^JOHN"}, {"PatientName": "Doe^John"}, ["PatientName"]),  # case is kept
    ({"PatientBirthDate": "19700101"}, {"PatientBirthDate": "19700102"}, ["PatientBirthDate"]),
    ({"PatientName": "DOE^JOHN^^", "PatientID": " 7"}, {"PatientName": "DOE^JOHN", "PatientID": "7"}, []),
    ({"PatientName": "DOE^JOHN=", "PatientID": "7"}, {"PatientName": "DOE ^JOHN"}, []),
    ({"PatientID": "7", "PatientBirthDate": "19700101"}, {"PatientID": "7"}, []),  # absent is no value
    ({}, {}, []),
])
def test_patient_identity_compares_present_normalised_values(
    a: dict[str, str], b: dict[str, str], differing: list[str]
) -> None:
    assert differing_identity([identity(**a), identity(**b)]) == differing


def test_an_encoder_refuses_sources_of_several_patients_without_quoting_them() -> None:
    with pytest.raises(ValueError, match="several patients") as info:
        check_one_series([identity(PatientID="SECRET-7"), identity(PatientID="SECRET-8")])
    assert "SECRET" not in str(info.value)
    check_one_series([identity(PatientID="SECRET-7"), identity(PatientID="SECRET-7")])
