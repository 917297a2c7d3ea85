"""The pipeline chain: steps in order, timings recorded, missing inputs fail permanently."""

from pathlib import Path

import pytest

from dicom_node.config import Settings
from dicom_node.errors import PermanentError
from dicom_node.jobs.queue import Job, JobState
from dicom_node.pipeline import PipelineContext, collect, default_steps, run
from dicom_node.store import InstanceRecord, InstanceStore
from tests.factories import ct_dataset
from tests.store.test_store import put


def job_for(uids: tuple[str, ...], study: str = "1.2", series: str = "1.2.3") -> Job:
    return Job(id=1, key="k", study_instance_uid=study, series_instance_uid=series, instance_uids=uids,
               pipeline="p", model="tiny", model_version="1", version=1, state=JobState.RUNNING,
               reason="", attempts=1, not_before=0, lease_owner="w", lease_expires_at=0, created_at=0,
               updated_at=0, finished_at=0)


def job_of(records: list[InstanceRecord]) -> Job:
    """The job of these records, which share a study and series."""
    return job_for(tuple(r.sop_instance_uid for r in records), records[0].study_instance_uid,
                   records[0].series_instance_uid)


def test_steps_run_in_order_and_each_is_timed(store: InstanceStore, settings: Settings) -> None:
    first = ct_dataset()
    records = [put(store, first), put(store, ct_dataset(study=first.StudyInstanceUID, series=first.SeriesInstanceUID))]
    order: list[str] = []

    def later(ctx: PipelineContext) -> None:
        order.append(f"later saw {len(ctx.instances)}")

    timings: dict[str, float] = {}
    ctx = run(job_of(records), timings, settings=settings,
              store=store, steps=[("collect", collect), ("later", later)])
    assert order == ["later saw 2"]
    assert [r.sop_instance_uid for r in ctx.instances] == [r.sop_instance_uid for r in records]
    assert list(timings) == ["collect", "later"] and all(t >= 0 for t in timings.values())


def test_a_missing_instance_fails_permanently(store: InstanceStore, settings: Settings) -> None:
    timings: dict[str, float] = {}
    with pytest.raises(PermanentError, match="no longer stored"):
        run(job_for(("1.2.3.999",)), timings, settings=settings, store=store, steps=default_steps())
    assert "collect" in timings  # the failed step's time is kept


def test_a_missing_file_fails_permanently(store: InstanceStore, settings: Settings) -> None:
    record = put(store, ct_dataset())
    Path(store.path_of(record)).unlink()
    with pytest.raises(PermanentError, match="missing from the store"):
        run(job_of([record]), {}, settings=settings, store=store,
            steps=default_steps())


def _runner(tmp_path: Path):
    from dicom_node.inference import InferenceRunner, ModelRegistry
    from tests.inference.models import write_model

    write_model(tmp_path / "models", "tiny")
    return InferenceRunner(ModelRegistry(tmp_path / "models"), device="cpu")


def test_a_radiograph_series_is_read_preprocessed_and_inferred(
    store: InstanceStore, settings: Settings, tmp_path: Path
) -> None:
    from dicom_node.phantoms import render, to_dataset

    study, series = "1.2.826.0.1.3680043.10.1543.7", "1.2.826.0.1.3680043.10.1543.7.1"
    records = []
    for seed, photometric in ((1, "MONOCHROME2"), (2, "MONOCHROME1")):
        ds = to_dataset(render(seed, 256), modality="DX", photometric=photometric,
                        study_uid=study, series_uid=series)
        records.append(put(store, ds))
    timings: dict[str, float] = {}
    ctx = run(job_of(records), timings, settings=settings,
              store=store, steps=default_steps(), runner=_runner(tmp_path))
    steps = ["collect", "read", "preprocess", "inference", "explain", "encode", "store", "outbox"]
    assert [name for name in timings if name in steps] == steps and "decode" in timings
    assert [p.sop_instance_uid for p in ctx.predictions] == [r.sop_instance_uid for r in records]
    assert all(set(p.probabilities) == {"nodule", "consolidation", "effusion", "cardiomegaly"}
               for p in ctx.predictions)
    assert ctx.predictions[0].model == "tiny" and ctx.inputs[0].array.shape == (1, 64, 64)
    summary = ctx.summary()["predictions"]
    assert [s["sop_instance_uid"] for s in summary] == [r.sop_instance_uid for r in records]
    assert set(summary[0]["probabilities"]) == {"nodule", "consolidation", "effusion", "cardiomegaly"}


def test_a_series_of_another_modality_fails_permanently_with_the_reason(
    store: InstanceStore, settings: Settings, tmp_path: Path
) -> None:
    record = put(store, ct_dataset())
    with pytest.raises(PermanentError, match=r"meant for modalities \['CR', 'DX'\], not 'CT'"):
        run(job_of([record]), {}, settings=settings, store=store,
            steps=default_steps(), runner=_runner(tmp_path))


def test_a_body_part_outside_the_models_scope_fails_permanently(
    store: InstanceStore, settings: Settings, tmp_path: Path
) -> None:
    from dicom_node.phantoms import render, to_dataset
    from tests.inference.models import write_model

    ds = to_dataset(render(5, 128), modality="CR")
    ds.BodyPartExamined = "KNEE"
    record = put(store, ds)
    from dicom_node.inference import InferenceRunner, ModelRegistry

    write_model(tmp_path / "models", "tiny", extra='')
    manifest = tmp_path / "models" / "tiny" / "model.toml"
    manifest.write_text(manifest.read_text().replace('[scope]\n', '[scope]\nbody_parts = ["CHEST"]\n'))
    runner = InferenceRunner(ModelRegistry(tmp_path / "models"), device="cpu")
    with pytest.raises(PermanentError, match=r"meant for body parts \['CHEST'\], not 'KNEE'"):
        run(job_of([record]), {}, settings=settings, store=store,
            steps=default_steps(), runner=runner)


def test_positive_labels_are_explained_with_provenance_and_quality(
    store: InstanceStore, settings: Settings, tmp_path: Path
) -> None:
    import dataclasses

    import numpy as np

    from dicom_node.config import Pipeline
    from dicom_node.inference import InferenceRunner, ModelRegistry
    from dicom_node.phantoms import render, to_dataset

    repo_models = Path(__file__).resolve().parents[1] / "models"
    runner = InferenceRunner(ModelRegistry(repo_models), device="cpu")
    ds = to_dataset(render(6_000_000, 512, findings={"nodule": True, "consolidation": True}))
    record = put(store, ds)
    pipeline = Pipeline(name="p", model="demo-cxr", explain=("gradcam", "lime"), lime_samples=100)
    configured = dataclasses.replace(settings, pipelines=(pipeline,))
    job = dataclasses.replace(job_of([record]), model="demo-cxr")
    timings: dict[str, float] = {}
    ctx = run(job, timings, settings=configured, store=store, steps=default_steps(), runner=runner)
    assert {"explain", "explain.gradcam", "explain.lime", "quality", "decode"} <= set(timings)
    assert timings["explain.gradcam"] + timings["explain.lime"] + timings["quality"] <= timings["explain"]
    assert sorted((h.label, h.method) for h in ctx.heatmaps) == [
        ("consolidation", "gradcam"), ("consolidation", "lime"), ("nodule", "gradcam"), ("nodule", "lime")]
    for heatmap in ctx.heatmaps:
        assert heatmap.native_map.shape == (ds.Rows, ds.Columns)
        assert heatmap.model == "demo-cxr" and heatmap.weights_sha256 == runner.model("demo-cxr").manifest.sha256
        assert np.isfinite(heatmap.native_map).all()
        assert {"deletion_auc", "insertion_auc", "deletion_auc_random", "sparseness"} <= set(heatmap.quality)
    gradcam = next(h for h in ctx.heatmaps if h.method == "gradcam" and h.label == "consolidation")
    assert "stability" in gradcam.quality
    assert gradcam.quality["deletion_auc"] < gradcam.quality["deletion_auc_random"]
    lime_map = next(h for h in ctx.heatmaps if h.method == "lime" and h.label == "nodule")
    assert "rank_agreement_gradcam" in lime_map.quality
    assert len(ctx.summary()["explanations"]) == 4
    # default outputs: an overlay per heatmap and one SR, written under results/ for export
    kinds = sorted(ds.Modality for ds in ctx.outputs)
    assert kinds == ["OT"] * 4 + ["SR"] and {"encode", "store"} <= set(timings)
    written = sorted(p.name for p in (settings.node.data_dir / "results").rglob("*.dcm"))
    assert written == sorted(f"{ds.SOPInstanceUID}.dcm" for ds in ctx.outputs)
    assert {o["sop_instance_uid"] for o in ctx.summary()["outputs"]} == {ds.SOPInstanceUID for ds in ctx.outputs}


def test_results_go_to_send_to_and_back_to_a_calling_ae_that_is_a_destination(settings: Settings) -> None:
    import dataclasses
    from types import SimpleNamespace

    from dicom_node.config import Destination, Pipeline
    from dicom_node.pipeline import PipelineContext, destinations

    pacs = Destination("pacs", "ORTHANC", "127.0.0.1", 4242)
    viewer = Destination("viewer", "WORKSTATION", "127.0.0.1", 104)
    for reply, expected in ((False, ["pacs"]), (True, ["pacs", "viewer"])):
        pipeline = Pipeline(name="p", model="m", send_to=("pacs",), reply_to_caller=reply)
        configured = dataclasses.replace(settings, destinations=(pacs, viewer), pipelines=(pipeline,))
        ctx = PipelineContext(job=job_for(("1.2.3",)), settings=configured, store=None)  # type: ignore[arg-type]
        ctx.instances = [SimpleNamespace(calling_ae_title="WORKSTATION")]  # type: ignore[list-item]
        assert destinations(ctx) == expected
        ctx.instances = [SimpleNamespace(calling_ae_title="ORTHANC")]  # type: ignore[list-item]
        assert destinations(ctx) == ["pacs"]  # already a destination: sent once
