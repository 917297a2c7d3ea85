"""The one place that chains the steps for one job.

A step is a named function of a :class:`PipelineContext`; :func:`run` calls them in order and
records each one's duration on the job. Steps are passed in, so tests (and later modules) add
their own without global registries. The chain: collect the series' instances, read them,
preprocess (decode and map to the model's input), infer, explain (the pipeline's methods, with
quality figures), encode (the pipeline's outputs as DICOM) and store them under
``data_dir/results`` (export to the PACS is added by its own module).
"""

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom import Dataset, dcmread

from dicom_node.audit import NO_AUDIT, Audit
from dicom_node.config import Pipeline, Settings
from dicom_node.encode import Producer, encode_results, not_analysed_report
from dicom_node.errors import PermanentError
from dicom_node.explain.heatmap import Heatmap, explain_frame, labels_to_explain, study_seed
from dicom_node.export.outbox import Outbox, Result
from dicom_node.inference import InferenceRunner, ModelManifest, Prediction, Preprocessed, preprocess
from dicom_node.jobs.queue import Job
from dicom_node.store import InstanceRecord, InstanceStore
from dicom_node.store.results import ResultArea

logger = logging.getLogger(__name__)


@dataclass
class PipelineContext:
    """What steps read and what they hand to the steps after them."""

    job: Job
    settings: Settings
    store: InstanceStore
    runner: InferenceRunner | None = None
    instances: list[InstanceRecord] = field(default_factory=list)
    datasets: list[Dataset] = field(default_factory=list)
    inputs: list[Preprocessed] = field(default_factory=list)
    predictions: list[Prediction] = field(default_factory=list)
    heatmaps: list[Heatmap] = field(default_factory=list)
    outputs: list[Dataset] = field(default_factory=list)
    outbox: Outbox | None = None
    saved: list[Result] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # finer than the steps: decode, each method

    def summary(self) -> dict[str, Any]:
        """What the job found, for its record: per frame, every probability and the positives."""
        return {"predictions": [
            {"sop_instance_uid": p.sop_instance_uid, "frame": p.frame, "model": p.model,
             "model_version": p.model_version, "positives": p.positives,
             "probabilities": {k: round(v, 6) for k, v in p.probabilities.items()}}
            for p in self.predictions
        ], "explanations": [
            {"sop_instance_uid": h.sop_instance_uid, "frame": h.frame, "label": h.label,
             "method": h.method, "layer": h.layer, "verdict": h.verdict,
             "quality": {k: round(v, 4) for k, v in h.quality.items()}}
            for h in self.heatmaps
        ], "outputs": [
            {"sop_class_uid": str(ds.SOPClassUID), "sop_instance_uid": str(ds.SOPInstanceUID),
             "series_instance_uid": str(ds.SeriesInstanceUID),
             "series_description": str(ds.SeriesDescription)}
            for ds in self.outputs
        ]}

    def pipeline(self) -> Pipeline | None:
        return next((p for p in self.settings.pipelines if p.name == self.job.pipeline), None)

    def model(self) -> ModelManifest:
        if self.runner is None:
            raise PermanentError("this node runs no models (no inference runner)")
        return self.runner.registry.manifest(self.job.model)


Step = Callable[[PipelineContext], None]


class StaleJobError(PermanentError):
    """An instance of the job now belongs to another study or series: the same SOP Instance UID
    was stored again elsewhere, and the newer copy won. The job must not read it (that would put
    another study's image, perhaps another patient's, into this study's results); its series,
    if anything is left in it, was marked changed and gets a newer job."""


def collect(ctx: PipelineContext) -> None:
    """Load the records of the job's instances; a missing instance or file fails permanently, and
    so does an instance that moved to another study or series since the job was made."""
    records = []
    for uid in ctx.job.instance_uids:
        record = ctx.store.index.get(uid)
        if record is None:
            raise PermanentError(f"instance {uid} of the job is no longer stored")
        check_membership(ctx.job, uid, record.study_instance_uid, record.series_instance_uid)
        if not ctx.store.path_of(record).is_file():
            raise PermanentError(f"file of instance {uid} is missing from the store")
        records.append(record)
    ctx.instances = records


def check_membership(job: Job, sop_instance_uid: str, study_instance_uid: str,
                     series_instance_uid: str) -> None:
    """Raise :class:`StaleJobError` unless the instance is in the job's study and series."""
    if (study_instance_uid, series_instance_uid) != (job.study_instance_uid, job.series_instance_uid):
        raise StaleJobError(f"instance {sop_instance_uid} of the job is now stored in study "
                            f"{study_instance_uid}, series {series_instance_uid}; a newer job covers "
                            "what is left of the series")


def read(ctx: PipelineContext) -> None:
    """Read the instances' data sets (pixels are decoded later, by preprocessing) and check that
    they are what the model is meant for."""
    datasets: list[Dataset] = []
    for record in ctx.instances:
        try:
            datasets.append(dcmread(ctx.store.path_of(record)))
        except FileNotFoundError:
            # stored again under another study or series since collect (the old copy is removed
            # once the new one is indexed): collect again says so; anything else is retried
            collect(ctx)
            raise
    ctx.datasets = datasets
    check_scope(ctx)


def check_scope(ctx: PipelineContext) -> None:
    """The model's modalities and body parts: a series outside them fails permanently, with why."""
    manifest = ctx.model()
    for ds in ctx.datasets:
        modality = str(ds.get("Modality", ""))
        if manifest.modalities and modality not in manifest.modalities:
            raise PermanentError(f"model {manifest.name} is meant for modalities "
                                 f"{list(manifest.modalities)}, not {modality!r}")
        body_part = str(ds.get("BodyPartExamined", "") or "").upper()
        if manifest.body_parts and body_part and body_part not in {b.upper() for b in manifest.body_parts}:
            raise PermanentError(f"model {manifest.name} is meant for body parts "
                                 f"{list(manifest.body_parts)}, not {body_part!r}")


def prepare(ctx: PipelineContext) -> None:
    """Decode every instance and turn its frames into model input (a bad one fails the job)."""
    spec = ctx.model().input
    ctx.inputs = [item for ds in ctx.datasets for item in preprocess(ds, spec, ctx.timings)]


def infer(ctx: PipelineContext) -> None:
    """Run the model on every frame, batched."""
    assert ctx.runner is not None
    ctx.predictions = ctx.runner.predict(ctx.job.model, ctx.inputs)


def explain(ctx: PipelineContext) -> None:
    """Explain the chosen labels of every frame with the pipeline's methods, with quality figures."""
    assert ctx.runner is not None
    config = ctx.pipeline()
    if config is None or not config.explain:
        return
    loaded = ctx.runner.model(ctx.job.model)
    randomised, sanity_passed = ctx.runner.baselines(ctx.job.model)
    seed = study_seed(ctx.job.study_instance_uid)
    for item, prediction in zip(ctx.inputs, ctx.predictions, strict=True):
        labels = labels_to_explain(prediction, config.explain_labels)
        if labels:
            ctx.heatmaps += explain_frame(loaded, item, prediction, labels, config.explain, seed,
                                          lime_samples=config.lime_samples, timings=ctx.timings,
                                          randomised=randomised, sanity_passed=sanity_passed)


def encode(ctx: PipelineContext) -> None:
    """Build the pipeline's outputs (SC, SR, SEG, PM, GSPS) for the series."""
    config = ctx.pipeline()
    if config is None or not config.outputs:
        return
    producer = Producer(config.name, ctx.model(), ctx.settings.node.ae_title)
    try:
        ctx.outputs = encode_results(ctx.datasets, ctx.predictions, ctx.heatmaps, producer, config.outputs,
                                     config.explain)
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        # the source lacks or garbles what an object needs; the message may quote header values,
        # so only its type goes into the job's reason (and the "not analysed" report)
        reason = f"the results could not be encoded from this series ({type(exc).__name__})"
        raise PermanentError(reason) from None


def store_results(ctx: PipelineContext) -> None:
    """Write the outputs under ``data_dir/results``, each atomically, for export."""
    area = ResultArea(ctx.settings.node.data_dir / "results")
    ctx.saved = [Result(str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(ds.StudyInstanceUID), area.save(ds))
                 for ds in ctx.outputs]


def destinations(ctx: PipelineContext) -> list[str]:
    """The pipeline's ``send_to``, and the calling AE where ``reply_to_caller`` names a destination."""
    config = ctx.pipeline()
    if config is None:
        return []
    names = list(config.send_to)
    if config.reply_to_caller:
        callers = {record.calling_ae_title for record in ctx.instances}
        names += [d.name for d in ctx.settings.destinations if d.ae_title in callers and d.name not in names]
    return names


def enqueue(ctx: PipelineContext) -> None:
    """Put every stored output in the outbox, once per destination."""
    if ctx.outbox is not None and ctx.saved:
        ctx.outbox.enqueue(ctx.job.id, ctx.saved, destinations(ctx))


def report_not_analysed(ctx: PipelineContext, reason: str) -> None:
    """The "not analysed" SR of a routed series that could not be analysed, stored and enqueued,
    so that silence never means "normal"."""
    config = ctx.pipeline()
    if config is None or "sr" not in config.outputs or not ctx.instances or ctx.runner is None:
        return
    sources = ctx.datasets or [dcmread(ctx.store.path_of(r), stop_before_pixels=True) for r in ctx.instances]
    producer = Producer(config.name, ctx.model(), ctx.settings.node.ae_title)
    ctx.outputs = [not_analysed_report(sources, reason, producer)]
    store_results(ctx)
    enqueue(ctx)


def default_steps() -> list[tuple[str, Step]]:
    """The steps every job runs, in order."""
    return [("collect", collect), ("read", read), ("preprocess", prepare), ("inference", infer),
            ("explain", explain), ("encode", encode), ("store", store_results), ("outbox", enqueue)]


def run_job(job: Job, timings: dict[str, float], **kwargs: Any) -> dict[str, Any]:
    """:func:`run`, returning the job's results (what a worker records on the job)."""
    return run(job, timings, **kwargs).summary()


def run(
    job: Job, timings: dict[str, float], *, settings: Settings, store: InstanceStore,
    steps: Sequence[tuple[str, Step]], runner: InferenceRunner | None = None, outbox: Outbox | None = None,
    audit: Audit = NO_AUDIT,
) -> PipelineContext:
    """Run ``steps`` for ``job``, recording each step's seconds in ``timings`` as it ends.

    A step that fails permanently once the instances are collected (wrong modality, undecodable
    pixels, ...) leaves a "not analysed" SR for the PACS, then fails the job with the reason.
    """
    ctx = PipelineContext(job=job, settings=settings, store=store, runner=runner, outbox=outbox,
                          timings=timings)
    where = {"job": job.id, "study_instance_uid": job.study_instance_uid,
             "series_instance_uid": job.series_instance_uid, "pipeline": job.pipeline}
    audit.record("job_started", **where, model=job.model, model_version=job.model_version,
                 instances=len(job.instance_uids))
    try:
        _run_steps(ctx, steps, timings)
    except Exception as exc:
        audit.record("job_failed", **where, reason=str(exc)[:500],
                     outputs=[str(ds.SOPInstanceUID) for ds in ctx.outputs], timings=dict(timings))
        raise
    manifest = ctx.model() if ctx.runner is not None else None
    config = ctx.pipeline()
    audit.record("job_finished", **where, model=job.model, model_version=manifest.version if manifest else "",
                 weights_sha256=manifest.sha256 if manifest else "",
                 methods=list(config.explain) if config else [],
                 positives=sorted({label for p in ctx.predictions for label in p.positives}),
                 outputs=[str(ds.SOPInstanceUID) for ds in ctx.outputs], timings=dict(timings))
    return ctx


def _run_steps(ctx: PipelineContext, steps: Sequence[tuple[str, Step]], timings: dict[str, float]) -> None:
    for name, step in steps:
        started = time.perf_counter()
        try:
            step(ctx)
        except StaleJobError:
            raise  # nothing to report: the instances are another series' now, and it has its own job
        except PermanentError as exc:
            try:
                report_not_analysed(ctx, str(exc))
            except Exception:
                logger.exception("job %s: the 'not analysed' report could not be made", ctx.job.id)
            raise
        finally:
            timings[name] = time.perf_counter() - started
            timings.update({key: round(value, 6) for key, value in timings.items()})
