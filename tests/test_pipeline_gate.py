"""The gate step: an out-of-distribution series gets a "not analysed" SR naming the score and the
threshold (or, with ``out_of_distribution = "warn"``, findings coded "outside the validated
input"); the scores reach the job's results, ``jobs show`` and the audit trail."""

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset

from dicom_node.cli import format_job
from dicom_node.config import Pipeline, Settings
from dicom_node.inference import InferenceRunner, ModelRegistry
from dicom_node.jobs.queue import JobState
from dicom_node.phantoms import render, to_dataset
from dicom_node.pipeline import OUTSIDE_BANNER, PipelineContext, default_steps, gate_notes, run
from dicom_node.store import InstanceStore
from tests.inference.ood import as_chest_cr, inverted
from tests.store.test_store import put
from tests.test_pipeline import job_of

REPO_MODELS = Path(__file__).resolve().parents[1] / "models"


@pytest.fixture(scope="module")
def runner() -> InferenceRunner:
    return InferenceRunner(ModelRegistry(REPO_MODELS), device="cpu")


class Recorder:
    """An audit trail that keeps its events in a list."""

    def __init__(self) -> None:
        self.events: list[dict[str, object]] = []

    def record(self, event: str, **fields: object) -> None:
        self.events.append({"event": event, **fields})


def _codes(items: Iterator[Dataset] | list[Dataset]) -> list[str]:
    found = []
    for item in items:
        for name in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
            if name in item:
                found.append(str(item[name][0].CodeValue))
        found += _codes(item.get("ContentSequence", []))
    return found


def _texts(items: list[Dataset]) -> list[str]:
    found = []
    for item in items:
        if "TextValue" in item:
            found.append(str(item.TextValue))
        found += _texts(list(item.get("ContentSequence", [])))
    return found


def _run(settings: Settings, store: InstanceStore, runner: InferenceRunner, ds: Dataset,
         **pipeline: object) -> tuple[PipelineContext, Recorder]:
    configured = dataclasses.replace(settings, pipelines=(Pipeline(name="p", model="demo-cxr", **pipeline),))
    job = dataclasses.replace(job_of([put(store, ds)]), model="demo-cxr")
    audit = Recorder()
    ctx = run(job, {}, settings=configured, store=store, steps=default_steps(), runner=runner, audit=audit)
    return ctx, audit


def test_an_out_of_distribution_series_gets_a_not_analysed_report_naming_score_and_threshold(
    store: InstanceStore, settings: Settings, runner: InferenceRunner
) -> None:
    ctx, audit = _run(settings, store, runner, as_chest_cr(inverted(7_000_000, 256), 7_000_000))
    threshold = runner.model("demo-cxr").manifest.gate.threshold  # type: ignore[union-attr]
    assert ctx.outcome == "not analysed, reported" and len(ctx.gate) == 1 and ctx.gate[0].outside
    assert "explain" not in ctx.timings and "encode" not in ctx.timings  # the job ended at the gate
    assert ctx.predictions == [] and ctx.heatmaps == []
    [report] = ctx.outputs
    assert report.Modality == "SR" and "DN100" not in _codes([report])  # the comment says it, uncoded
    comment = next(t for t in _texts([report]) if t.startswith("Series not analysed: outside the validated"))
    assert f"score {ctx.gate[0].score:.2f}" in comment and f"threshold {threshold:.2f}" in comment
    summary = ctx.summary()
    assert summary["outcome"] == "not analysed, reported" and summary["gate"]["max_score"] == ctx.gate[0].score
    assert summary["gate"]["action"] == "abstain" and summary["predictions"] == []
    finished = next(e for e in audit.events if e["event"] == "job_finished")
    assert finished["gate"] == summary["gate"] and finished["outcome"] == "not analysed, reported"
    shown = format_job(dataclasses.replace(ctx.job, state=JobState.DONE, results=summary), [])
    assert f"out-of-distribution score {ctx.gate[0].score:.3f} (threshold {threshold:.3f}) OUTSIDE" in shown
    assert "gate         not analysed, reported: outside the validated input" in shown
    assert "outcome      failed, nothing sent" in shown  # no outbox record given: the PACS heard nothing


def test_with_warn_every_finding_carries_the_coded_evaluation_and_the_banner_says_so(
    store: InstanceStore, settings: Settings, runner: InferenceRunner
) -> None:
    ds = as_chest_cr(inverted(7_000_001, 256), 7_000_001)
    ctx, _ = _run(settings, store, runner, ds, out_of_distribution="warn", explain_labels="top-1")
    assert ctx.outcome == "" and ctx.gate[0].outside
    assert [p.outside_validated_input for p in ctx.predictions] == [True]
    report = next(o for o in ctx.outputs if o.Modality == "SR")
    codes = _codes([report])
    assert codes.count("DN321") == len(ctx.predictions[0].probabilities) == 4  # one per finding
    assert [h.notes for h in ctx.heatmaps] == [()]  # the warning joins on the way to the overlay
    note = OUTSIDE_BANNER.format(score=ctx.gate[0].score, threshold=ctx.gate[0].threshold)
    assert [h.notes for h in gate_notes(ctx)] == [(note,)]
    assert ctx.summary()["gate"]["action"] == "warn"


def test_an_in_distribution_series_is_analysed_with_its_score_recorded(
    store: InstanceStore, settings: Settings, runner: InferenceRunner
) -> None:
    ctx, _ = _run(settings, store, runner, to_dataset(render(7_000_002, 256)), explain=())
    assert ctx.outcome == "" and not ctx.gate[0].outside and "gate" in ctx.timings
    report = next(o for o in ctx.outputs if o.Modality == "SR")
    assert "DN321" not in _codes([report])
    assert ctx.summary()["gate"]["frames"][0]["outside"] is False
