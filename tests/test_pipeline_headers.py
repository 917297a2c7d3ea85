"""Real-world headers through the pipeline with the store: every matched series yields results or a
"not analysed" SR, every object written passes dciodvfy, header changes are audited without values;
and with every encoder failing, then highdicom's SR itself, a "not analysed" SR still goes out."""

import dataclasses
import json
from typing import Any

import highdicom as hd
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import BasicTextSRStorage, Comprehensive3DSRStorage

from dicom_node import encode
from dicom_node.config import Pipeline, Settings
from dicom_node.errors import InfrastructureError, PermanentError, UnavailableError
from dicom_node.explain.heatmap import explain_frame
from dicom_node.inference import InferenceRunner, ModelRegistry
from dicom_node.pipeline import PipelineContext, Step, default_steps, run
from dicom_node.store import InstanceStore
from tests.conftest import require_tool
from tests.encode.conftest import dciodvfy_errors
from tests.encode.oddities import ODDITIES, radiograph
from tests.inference.models import write_model
from tests.store.test_store import put
from tests.test_pipeline import job_for

ALL = ("sc", "sr", "seg", "pm", "gsps")
SR_CLASSES = (Comprehensive3DSRStorage, BasicTextSRStorage)


class Recorder:
    """An audit sink that keeps what it is given."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def record(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> InferenceRunner:
    """The tiny test model, open to every modality (the oddities include CT, MR, US and NM)."""
    root = tmp_path_factory.mktemp("models")
    manifest = write_model(root, "tiny")
    manifest.write_text(manifest.read_text().replace('modalities = ["CR", "DX"]', "modalities = []"))
    return InferenceRunner(ModelRegistry(root), device="cpu")


def quick_explain(ctx: PipelineContext) -> None:
    """The pipeline's explain step with the fewest quality steps: the maps are real Grad-CAM maps
    of the model; their quality figures are not what these tests are about (and cost seconds)."""
    assert ctx.runner is not None
    loaded = ctx.runner.model(ctx.job.model)
    for item, prediction in zip(ctx.inputs, ctx.predictions, strict=True):
        top = max(prediction.probabilities, key=lambda label: prediction.probabilities[label])
        ctx.heatmaps += explain_frame(loaded, item, prediction, [top], ["gradcam"], 0, quality_steps=2)


def quick_steps() -> list[tuple[str, Step]]:
    return [(name, quick_explain if name == "explain" else step) for name, step in default_steps()]


def _run(settings: Settings, store: InstanceStore, runner: InferenceRunner, source: Dataset,
         audit: Recorder) -> tuple[PipelineContext | None, list[Dataset], Exception | None]:
    record = put(store, source)
    pipeline = Pipeline(name="p", model="tiny", explain=("gradcam",), explain_labels="all", outputs=ALL)
    configured = dataclasses.replace(settings, pipelines=(pipeline,))
    job = dataclasses.replace(job_for((record.sop_instance_uid,)), study_instance_uid=record.study_instance_uid,
                              series_instance_uid=record.series_instance_uid)
    ctx, error = None, None
    try:
        ctx = run(job, {}, settings=configured, store=store, steps=quick_steps(), runner=runner, audit=audit)
    except PermanentError as exc:
        error = exc
    written = [dcmread(p) for p in sorted((settings.node.data_dir / "results").rglob("*.dcm"))]
    return ctx, written, error


@pytest.mark.peers
@pytest.mark.parametrize("name", sorted(ODDITIES))
def test_every_oddity_yields_valid_results_through_the_pipeline(
    store: InstanceStore, settings: Settings, runner: InferenceRunner, name: str
) -> None:
    dciodvfy = require_tool("dciodvfy", "dicom3tools")
    source = ODDITIES[name]()
    audit = Recorder()
    ctx, written, error = _run(settings, store, runner, source, audit)
    assert error is None, f"{name}: {error}"  # analysed: results, not only a "not analysed" report
    assert ctx is not None and any(ds.SOPClassUID == Comprehensive3DSRStorage for ds in written)
    assert any(ds.Modality == "OT" for ds in written)  # the overlays
    for path in sorted((settings.node.data_dir / "results").rglob("*.dcm")):
        errors, output = dciodvfy_errors(dciodvfy, path)
        assert not errors, f"{name}: {output}"
    trail = json.dumps([fields for _, fields in audit.events])
    assert "PHANTOM" not in trail  # names and IDs never reach the audit trail
    assert not [e for e, _ in audit.events if e == "output_failed"]


def test_header_changes_are_counted_and_audited_without_values(
    store: InstanceStore, settings: Settings, runner: InferenceRunner
) -> None:
    source = ODDITIES["zero-pixel-spacing"]()
    source.PatientName, source.PatientID = "DOE^JANE^^^^^EXTRA", ""
    audit = Recorder()
    _run(settings, store, runner, source, audit)
    [cleaned] = [fields for event, fields in audit.events if event == "header_cleaned"]
    assert cleaned["counts"] == {"dropped": 2, "emptied": 1}
    assert {(c["keyword"], c["action"]) for c in cleaned["changes"]} == {
        ("PixelSpacing", "dropped"), ("ImagerPixelSpacing", "dropped"), ("PatientName", "emptied")}
    assert cleaned["series_instance_uid"] == str(source.SeriesInstanceUID)
    assert "DOE" not in json.dumps(cleaned)


def _failing(*_: Any, **__: Any) -> list[Dataset]:
    raise RuntimeError("injected")


def test_with_every_encoder_failing_a_not_analysed_report_still_goes_out(
    store: InstanceStore, settings: Settings, runner: InferenceRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    for kind in encode.OUTPUTS:
        monkeypatch.setitem(encode._BUILDERS, kind, _failing)
    audit = Recorder()
    source = radiograph()
    _, written, error = _run(settings, store, runner, source, audit)
    assert error is not None and "could not be encoded" in str(error)
    [report] = written
    assert report.SOPClassUID == Comprehensive3DSRStorage and report.SeriesDescription.startswith("AI not analysed")
    assert report.StudyInstanceUID == source.StudyInstanceUID
    assert {fields["output"] for event, fields in audit.events if event == "output_failed"} == set(ALL)


def test_with_highdicom_failing_too_the_minimal_report_goes_out(
    store: InstanceStore, settings: Settings, runner: InferenceRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    for kind in encode.OUTPUTS:
        monkeypatch.setitem(encode._BUILDERS, kind, _failing)

    def broken(self: Any, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("highdicom injected")

    monkeypatch.setattr(hd.sr.Comprehensive3DSR, "__init__", broken)
    source = ODDITIES["no-patient-id"]()
    _, written, error = _run(settings, store, runner, source, Recorder())
    assert error is not None
    [report] = written
    assert report.SOPClassUID == BasicTextSRStorage and report.VerificationFlag == "UNVERIFIED"
    assert report.StudyInstanceUID == source.StudyInstanceUID and report.PatientID == ""
    texts = [item.get("TextValue", "") for item in report.ContentSequence]
    assert any(text.startswith("Series not analysed: the results could not be encoded") for text in texts)
    evidence = report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_an_unreadable_series_still_gets_the_minimal_report(
    store: InstanceStore, settings: Settings, runner: InferenceRunner
) -> None:
    """Files that cannot even be read: the report is made from the job's UIDs alone."""
    record = put(store, radiograph())
    store.path_of(record).write_bytes(b"not DICOM any more")
    pipeline = Pipeline(name="p", model="tiny", outputs=ALL)
    configured = dataclasses.replace(settings, pipelines=(pipeline,))
    job = dataclasses.replace(job_for((record.sop_instance_uid,)), study_instance_uid=record.study_instance_uid,
                              series_instance_uid=record.series_instance_uid)
    with pytest.raises(PermanentError):
        run(job, {}, settings=configured, store=store, steps=default_steps(), runner=runner)
    [report] = [dcmread(p) for p in (settings.node.data_dir / "results").rglob("*.dcm")]
    assert report.SOPClassUID == BasicTextSRStorage
    assert report.StudyInstanceUID == record.study_instance_uid


@pytest.mark.parametrize("attempts", [1, 5])
def test_an_unexpected_error_is_reported_on_the_last_attempt_only(
    store: InstanceStore, settings: Settings, runner: InferenceRunner, attempts: int
) -> None:
    """Retried errors are retried; the attempt after which the job is dead leaves a report."""
    record = put(store, radiograph())
    configured = dataclasses.replace(settings, pipelines=(Pipeline(name="p", model="tiny", outputs=ALL),))
    assert configured.jobs.max_attempts == 5
    job = dataclasses.replace(job_for((record.sop_instance_uid,)), study_instance_uid=record.study_instance_uid,
                              series_instance_uid=record.series_instance_uid, attempts=attempts)

    def crash(ctx: PipelineContext) -> None:
        raise RuntimeError("injected")

    steps = [(name, crash if name == "inference" else step) for name, step in default_steps()]
    with pytest.raises(RuntimeError):
        run(job, {}, settings=configured, store=store, steps=steps, runner=runner)
    reports = [dcmread(p) for p in (settings.node.data_dir / "results").rglob("*.dcm")]
    assert [ds.SeriesDescription for ds in reports] == (["AI not analysed tiny 0.1"] if attempts == 5 else [])


@pytest.mark.parametrize("error", [InfrastructureError("the Ray actor was lost"),
                                   UnavailableError("the Ray cluster was lost")])
def test_a_lost_cluster_or_actor_never_leaves_a_report_even_on_the_last_attempt(
    store: InstanceStore, settings: Settings, runner: InferenceRunner, error: Exception
) -> None:
    """The compute was lost, the series never judged: the PACS must get no "not analysed" SR."""
    record = put(store, radiograph())
    configured = dataclasses.replace(settings, pipelines=(Pipeline(name="p", model="tiny", outputs=ALL),))
    job = dataclasses.replace(job_for((record.sop_instance_uid,)), study_instance_uid=record.study_instance_uid,
                              series_instance_uid=record.series_instance_uid, attempts=configured.jobs.max_attempts)

    def lost(ctx: PipelineContext) -> None:
        raise error

    steps = [(name, lost if name == "inference" else step) for name, step in default_steps()]
    with pytest.raises(type(error)):
        run(job, {}, settings=configured, store=store, steps=steps, runner=runner)
    assert not list((settings.node.data_dir / "results").rglob("*.dcm"))
