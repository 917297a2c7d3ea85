"""The one place that chains the steps for one job.

A step is a named function of a :class:`PipelineContext`; :func:`run` calls them in order and
records each one's duration on the job. Steps are passed in, so tests (and later modules) add
their own without global registries. The chain: collect the series' instances, read them,
preprocess (decode and map to the model's input), infer, gate (is each frame like the inputs the
model was validated on? if not, abstain with a "not analysed" report, or warn), explain (the
pipeline's methods, with quality figures), encode (the pipeline's outputs as DICOM) and store
them under ``data_dir/results`` (export to the PACS is added by its own module).
"""

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import Comprehensive3DSRStorage

from dicom_node.audit import NO_AUDIT, Audit
from dicom_node.config import Pipeline, Settings
from dicom_node.encode import (
    Encoded,
    Producer,
    Revision,
    encode_series,
    encode_volume,
    not_analysed,
    report_reference,
)
from dicom_node.errors import InfrastructureError, PermanentError
from dicom_node.explain.heatmap import Heatmap, explain_frame, labels_to_explain, study_seed
from dicom_node.explain.prototypes import (
    PROTOTYPE_METHODS,
    PrototypeExplanation,
    explain_frame_prototypes,
    model_identities,
)
from dicom_node.explain.volume import VOLUME_METHODS, VolumeMap, explain_volume
from dicom_node.export.outbox import Outbox, Result
from dicom_node.inference import InferenceRunner, ModelManifest, Prediction, Preprocessed, preprocess
from dicom_node.inference.gate import GateResult
from dicom_node.inference.segment import VolumeSegmentation
from dicom_node.inference.volume import Volume, VolumeError, assemble
from dicom_node.jobs.queue import Job, JobQueue
from dicom_node.logs import patient_values, redacted_traceback
from dicom_node.store import InstanceRecord, InstanceStore
from dicom_node.store.patient import differing_identity

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
    prototypes: list[PrototypeExplanation] = field(default_factory=list)  # a prototype network's
    outputs: list[Dataset] = field(default_factory=list)
    outbox: Outbox | None = None
    saved: list[Result] = field(default_factory=list)
    jobs: JobQueue | None = None  # the earlier versions of the job's series, for superseding
    timings: dict[str, float] = field(default_factory=dict)  # finer than the steps: decode, each method
    audit: Audit = NO_AUDIT
    features: list[np.ndarray] = field(default_factory=list)  # the gate's frame vectors, per batch
    gate: list[GateResult] = field(default_factory=list)  # per frame, when the model has a gate
    outcome: str = ""  # set by a step that ends the job early, e.g. "not analysed, reported"
    outcome_reason: str = ""
    device_uid: str = ""  # the installation's (store.device); "" derives one from the AE title
    volume: Volume | None = None  # a segmentation model's input: the series as one volume
    segmentation: VolumeSegmentation | None = None
    volume_maps: list[VolumeMap] = field(default_factory=list)
    failed_outputs: list[tuple[str, str]] = field(default_factory=list)  # (kind, error type) not made

    def gate_summary(self) -> dict[str, Any]:
        """The gate's scores and threshold, the action taken, and the job's outcome if it ended early."""
        if not self.gate:
            return {}
        outside = [g for g in self.gate if g.outside]
        return {"gate": {
            "threshold": self.gate[0].threshold, "max_score": max(g.score for g in self.gate),
            "frames_outside": len(outside), "action": gate_action(self) if outside else "",
            "frames": [{"sop_instance_uid": g.sop_instance_uid, "frame": g.frame, "score": g.score,
                        "outside": g.outside} for g in self.gate],
        }, **({"outcome": self.outcome, "outcome_reason": self.outcome_reason} if self.outcome else {})}

    def summary(self) -> dict[str, Any]:
        """What the job found, for its record: per frame, every probability and the positives."""
        segmented = {"segmentation": self.segmentation.summary()} if self.segmentation is not None else {}
        return {**self.gate_summary(), **segmented, "predictions": [
            {"sop_instance_uid": p.sop_instance_uid, "frame": p.frame, "model": p.model,
             "model_version": p.model_version, "positives": p.positives,
             "outside_validated_input": p.outside_validated_input,
             "probabilities": {k: round(v, 6) for k, v in p.probabilities.items()}}
            for p in self.predictions
        ], "explanations": [
            {"label": m.label, "method": m.method, "layer": m.layer} for m in self.volume_maps
        ] + [
            {"sop_instance_uid": h.sop_instance_uid, "frame": h.frame, "label": h.label,
             "method": h.method, "layer": h.layer, "verdict": h.verdict,
             "quality": {k: round(v, 4) for k, v in h.quality.items()}}
            for h in self.heatmaps
        ], **({"prototypes": [p.summary() for p in self.prototypes]} if self.prototypes else {}), "outputs": [
            {"sop_class_uid": str(ds.SOPClassUID), "sop_instance_uid": str(ds.SOPInstanceUID),
             "series_instance_uid": str(ds.SeriesInstanceUID),
             "series_description": str(ds.SeriesDescription)}
            for ds in self.outputs
        ], **({"outputs_failed": [{"output": kind, "error": error} for kind, error in self.failed_outputs]}
              if self.failed_outputs else {})}

    def pipeline(self) -> Pipeline | None:
        return next((p for p in self.settings.pipelines if p.name == self.job.pipeline), None)

    def model(self) -> ModelManifest:
        if self.runner is None:
            raise PermanentError("this node runs no models (no inference runner)")
        return self.runner.registry.manifest(self.job.model)


Step = Callable[[PipelineContext], None]
Noted = TypeVar("Noted", Heatmap, PrototypeExplanation)  # an explanation of a frame, with banner notes


class StaleJobError(PermanentError):
    """An instance of the job now belongs to another study or series: the same SOP Instance UID
    was stored again elsewhere, and the newer copy won. The job must not read it (that would put
    another study's image, perhaps another patient's, into this study's results); its series,
    if anything is left in it, was marked changed and gets a newer job."""


class MixedPatientsError(PermanentError):
    """The job's instances name more than one patient (Patient ID, Issuer, Name or Birth Date
    differ) although they share one study and series: a sender reused the UIDs. Nothing is made,
    not even a "not analysed" report, since any object would file one patient's images or
    findings under the other; the job's reason, an ERROR and the audit event
    ``patients_mixed_in_series`` say so instead.

    Attributes
    ----------
    attributes
        Keywords of the identity attributes that differ (never their values).
    """

    def __init__(self, attributes: Sequence[str]) -> None:
        super().__init__("instances of several patients in one study/series: not analysed")
        self.attributes = list(attributes)


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
        except (InvalidDicomError, ValueError, EOFError) as exc:  # a damaged file stays damaged
            reason = f"instance {record.sop_instance_uid} cannot be read ({type(exc).__name__})"
            raise PermanentError(reason) from None
    check_one_patient(datasets)
    ctx.datasets = datasets
    check_scope(ctx)


def check_one_patient(datasets: Sequence[Dataset]) -> None:
    """Raise :class:`MixedPatientsError` unless every data set names the same patient."""
    differing = differing_identity(datasets)
    if differing:
        raise MixedPatientsError(differing)


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
    """Run the model on every frame, batched; for a gated model keep each frame's gate vector (its
    image statistics and the pooled CAM-layer activations of the same forward pass)."""
    assert ctx.runner is not None
    gated = ctx.runner.model(ctx.job.model).reference is not None
    ctx.predictions = ctx.runner.predict(ctx.job.model, ctx.inputs, ctx.features if gated else None)


def gate_action(ctx: PipelineContext) -> str:
    """``abstain`` or ``warn``: the pipeline's ``out_of_distribution``, else the model's ``[gate]``."""
    config, spec = ctx.pipeline(), ctx.model().gate
    if config is not None and config.out_of_distribution != "model":
        return config.out_of_distribution
    return spec.action if spec is not None else "abstain"


def gate(ctx: PipelineContext) -> None:
    """Score every frame against the model version's reference. Any frame above the threshold:
    with ``abstain`` the series' findings are not reported (a "not analysed" SR names the score
    and the threshold, and the job ends there); with ``warn`` its findings are marked."""
    reason = gate_decision(ctx)
    if reason is not None:
        abstain(ctx, reason)


def abstain(ctx: PipelineContext, reason: str) -> None:
    """End the job "not analysed" with ``reason``: the report is stored and enqueued."""
    report_not_analysed(ctx, reason)
    ctx.outcome = "not analysed, reported" if ctx.saved else "not analysed"
    ctx.outcome_reason = reason


def gate_decision(ctx: PipelineContext) -> str | None:
    """The gate's scores on the context; with ``warn``, findings of frames above the threshold are
    marked. Returns why the series is not analysed when the gate abstains (its predictions are then
    dropped: not reported as findings, not even on the job's record), else None."""
    assert ctx.runner is not None
    loaded = ctx.runner.model(ctx.job.model)
    spec = loaded.manifest.gate
    if loaded.reference is None or spec is None or not ctx.inputs:
        return None
    scores = loaded.reference.score(ctx.features)
    ctx.gate = [GateResult(item.sop_instance_uid, item.frame, round(float(score), 4), spec.threshold)
                for item, score in zip(ctx.inputs, scores, strict=True)]
    outside = {(g.sop_instance_uid, g.frame) for g in ctx.gate if g.outside}
    if not outside:
        return None
    if gate_action(ctx) == "warn":
        ctx.predictions = [
            dataclasses.replace(p, outside_validated_input=(p.sop_instance_uid, p.frame) in outside)
            for p in ctx.predictions]
        return None
    worst = max(ctx.gate, key=lambda g: g.score)
    ctx.predictions = []
    return (f"outside the validated input: {len(outside)} of {len(ctx.gate)} frame(s) above the "
            f"threshold; {worst.describe()}")


def explain(ctx: PipelineContext) -> None:
    """Explain the chosen labels of every frame with the pipeline's methods: the heatmap methods
    with quality figures, ``prototypes`` (a prototype network) with the most activated prototypes."""
    assert ctx.runner is not None
    config = ctx.pipeline()
    if config is None or not config.explain:
        return
    loaded = ctx.runner.model(ctx.job.model)
    methods = [m for m in config.explain if m not in PROTOTYPE_METHODS]  # the heatmap methods
    randomised, sanity_passed = ctx.runner.baselines(ctx.job.model) if methods else (None, False)
    prototypes = any(m in PROTOTYPE_METHODS for m in config.explain)
    identities = model_identities(loaded) if prototypes else None
    seed = study_seed(ctx.job.study_instance_uid)
    for item, prediction in zip(ctx.inputs, ctx.predictions, strict=True):
        labels = labels_to_explain(prediction, config.explain_labels)
        if labels and methods:
            ctx.heatmaps += explain_frame(loaded, item, prediction, labels, methods, seed,
                                          lime_samples=config.lime_samples, timings=ctx.timings,
                                          randomised=randomised, sanity_passed=sanity_passed)
        if labels and identities is not None:
            started = time.perf_counter()
            ctx.prototypes += explain_frame_prototypes(loaded, item, prediction, labels, identities)
            ctx.timings["explain.prototypes"] = (ctx.timings.get("explain.prototypes", 0.0)
                                                 + time.perf_counter() - started)


def encode(ctx: PipelineContext) -> None:
    """Build the pipeline's outputs (SC, SR, SEG, PM, GSPS) for the series."""
    encode_with(ctx, lambda config, producer, earlier: encode_series(
        ctx.datasets, ctx.predictions, gate_notes(ctx), producer, config.outputs, config.explain, earlier,
        prototypes=with_gate_notes(ctx, ctx.prototypes)))


def encode_with(ctx: PipelineContext, build: Callable[[Pipeline, Producer, Revision], Encoded]) -> None:
    """``build`` the pipeline's outputs into ``ctx.outputs``; a failure (every kind failed, or the
    sources unfit) fails the job permanently, with the error's type only. One policy for both
    tasks: when some kinds fail and others are made, the others are sent, and each failed kind is
    an ERROR in the log, an ``output_failed`` audit event and an ``outputs_failed`` entry on the
    job's record (``dicom-node jobs show`` prints it as "not made")."""
    config = ctx.pipeline()
    if config is None or not config.outputs:
        return
    producer = _producer(ctx, config)
    earlier = revision(ctx)  # a database error here is retried, not a "not analysed" series
    try:
        encoded = build(config, producer, earlier)
    except Exception as exc:
        # the source lacks or garbles what an object needs; the message may quote header values,
        # so only its type goes into the job's reason (and the "not analysed" report)
        log_encode_failure(ctx, exc)
        reason = f"the results could not be encoded from this series ({type(exc).__name__})"
        raise PermanentError(reason) from None
    audit_encoding(ctx, encoded)
    if encoded.failed and not encoded.objects:  # no findings to draw is not a failure; this is
        kinds = ", ".join(f"{kind} ({error})" for kind, error in encoded.failed)
        raise PermanentError(f"the results could not be encoded from this series: {kinds or 'none made'}")
    ctx.outputs = encoded.objects


def audit_encoding(ctx: PipelineContext, encoded: Encoded) -> None:
    """Header attributes changed before copying (names and reasons, never values) and output kinds
    that failed, in the audit trail: every drop counted."""
    where = {"job": ctx.job.id, "study_instance_uid": ctx.job.study_instance_uid,
             "series_instance_uid": ctx.job.series_instance_uid, "pipeline": ctx.job.pipeline}
    if encoded.changes:
        counts: dict[str, int] = {}
        for change in encoded.changes:
            counts[change.action.value] = counts.get(change.action.value, 0) + 1
        ctx.audit.record("header_cleaned", **where, counts=counts,
                         changes=[change.as_record() for change in encoded.changes])
    for kind, error in encoded.failed:
        logger.error("job %s: %s output failed (%s); the other outputs are sent", ctx.job.id, kind, error)
        ctx.audit.record("output_failed", **where, output=kind, error=error)
    ctx.failed_outputs = list(encoded.failed)


def log_encode_failure(ctx: PipelineContext, exc: BaseException) -> None:
    """The traceback of a failed encoding, at DEBUG, with the series' patient values redacted
    (highdicom's messages quote the values they refuse)."""
    if not logger.isEnabledFor(logging.DEBUG):
        return
    try:
        sources = ctx.datasets or [dcmread(ctx.store.path_of(r), stop_before_pixels=True)
                                   for r in ctx.instances]
    except Exception:  # without the values to redact, no traceback
        logger.debug("job %s: encoding failed (%s); traceback withheld: the sources cannot be read",
                     ctx.job.id, type(exc).__name__)
        return
    logger.debug("job %s: encoding failed:\n%s", ctx.job.id, redacted_traceback(exc, patient_values(sources)))


def revision(ctx: PipelineContext) -> Revision:
    """The job's version and the reports of its series' earlier versions, newest first, as their
    records list them: a later instance makes a new version, whose report supersedes theirs."""
    earlier = [j for j in ctx.jobs.versions_of(ctx.job) if j.version < ctx.job.version] if ctx.jobs else []
    predecessors: dict[str, Dataset] = {}
    replaces = 0
    for job in sorted(earlier, key=lambda j: j.version, reverse=True):
        for output in job.results.get("outputs", []):
            uid = output["sop_instance_uid"]
            if output["sop_class_uid"] == Comprehensive3DSRStorage and uid not in predecessors:
                predecessors[uid] = report_reference(job.study_instance_uid, output["series_instance_uid"],
                                                     output["sop_class_uid"], uid)
                replaces = replaces or job.version
    return Revision(ctx.job.version, tuple(predecessors.values()), replaces)


def gate_notes(ctx: PipelineContext) -> list[Heatmap]:
    """The heatmaps, those of frames outside the validated input with a banner line saying so."""
    return with_gate_notes(ctx, ctx.heatmaps)


def with_gate_notes(ctx: PipelineContext, explanations: Sequence[Noted]) -> list[Noted]:
    """``explanations`` of frames, those of frames outside the validated input with a banner line
    saying so."""
    outside = {(g.sop_instance_uid, g.frame): g for g in ctx.gate if g.outside}
    return [_noted(item, outside.get((item.sop_instance_uid, item.frame))) for item in explanations]


def _noted(item: Noted, gate_: GateResult | None) -> Noted:
    if gate_ is None:
        return item
    return dataclasses.replace(item, notes=(*item.notes, OUTSIDE_BANNER.format(
        score=gate_.score, threshold=gate_.threshold)))


OUTSIDE_BANNER = "OUTSIDE THE VALIDATED INPUT: score {score:.2f} > threshold {threshold:.2f}"


def store_results(ctx: PipelineContext) -> None:
    """Write the outputs under ``data_dir/results``, each atomically, for export."""
    ctx.saved = [Result(str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(ds.StudyInstanceUID),
                        ctx.store.save_result(ds)) for ds in ctx.outputs]


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


def _producer(ctx: PipelineContext, config: Pipeline) -> Producer:
    node = ctx.settings.node
    return Producer(config.name, ctx.model(), node.ae_title, node.institution_name, ctx.device_uid)


def report_not_analysed(ctx: PipelineContext, reason: str) -> None:
    """The "not analysed" SR of a routed series that could not be analysed, stored and enqueued,
    so that silence never means "normal"."""
    config = ctx.pipeline()
    if config is None or "sr" not in config.outputs or ctx.runner is None:
        return
    producer = _producer(ctx, config)
    ctx.outputs = [not_analysed(_headers(ctx), reason, producer, ctx.job.study_instance_uid,
                                ctx.job.series_instance_uid)]
    store_results(ctx)
    enqueue(ctx)


def _headers(ctx: PipelineContext) -> list[Dataset]:
    """The series' headers for the report, as far as they can be read: the report needs none."""
    if ctx.datasets:
        return ctx.datasets
    try:
        return [dcmread(ctx.store.path_of(r), stop_before_pixels=True) for r in ctx.instances]
    except Exception:  # unreadable files: the minimal report needs only the job's UIDs
        return []


@dataclass(frozen=True)
class ByTask:
    """A step that depends on the job's model's task: ``classification`` models run frame by
    frame, ``segmentation`` models on the series assembled as one volume. Equal when its two
    steps are (``default_steps() == default_steps()``)."""

    classification: Step
    segmentation: Step

    def __call__(self, ctx: PipelineContext) -> None:
        step = self.segmentation if ctx.model().task == "segmentation" else self.classification
        step(ctx)


def assemble_volume(ctx: PipelineContext) -> None:
    """The series as one volume; a series that is not one (a gap, uneven spacing, mixed
    orientations...) fails permanently, and its "not analysed" report names why."""
    try:
        ctx.volume = assemble(ctx.datasets)
    except VolumeError as exc:
        raise PermanentError(f"the series is not one regular volume: {exc}") from None


def segment(ctx: PipelineContext) -> None:
    """Run the segmentation model on the volume; masks on the source grid."""
    assert ctx.runner is not None and ctx.volume is not None
    ctx.segmentation = ctx.runner.segment(ctx.job.model, ctx.volume)


def explain_segmentation(ctx: PipelineContext) -> None:
    """The pipeline's volume methods (``attention``, ``seggradcam``) for every label with a lesion.
    Skipped when ``sc`` is not among the outputs: the maps are shown only as SC overlays."""
    assert ctx.runner is not None and ctx.segmentation is not None
    config = ctx.pipeline()
    if config is None or not config.explain or "sc" not in config.outputs:
        return
    methods = [m for m in config.explain if m in VOLUME_METHODS]
    if not methods:
        raise PermanentError(f"pipeline {config.name}: explanation methods {list(config.explain)} do not "
                             f"apply to segmentation model {ctx.job.model}; use some of "
                             f"{list(VOLUME_METHODS)}")
    started = time.perf_counter()
    ctx.volume_maps = explain_volume(ctx.runner.model(ctx.job.model), ctx.segmentation, methods)
    ctx.timings["explain.volume"] = time.perf_counter() - started


def encode_segmentation(ctx: PipelineContext) -> None:
    """The SEG, SC overlays and SR of the segmented volume (the pipeline's ``outputs``)."""
    result = ctx.segmentation
    assert result is not None
    encode_with(ctx, lambda config, producer, earlier: encode_volume(
        ctx.datasets, result, ctx.volume_maps, producer, config.outputs,
        [m for m in config.explain if m in VOLUME_METHODS], earlier))


#: The steps that differ by task, each pair named once (``dicom-node explain`` runs them too).
PREPARE = ByTask(prepare, assemble_volume)
INFER = ByTask(infer, segment)
EXPLAIN = ByTask(explain, explain_segmentation)
ENCODE = ByTask(encode, encode_segmentation)


def default_steps() -> list[tuple[str, Step]]:
    """The steps every job runs, in order. Where a segmentation model differs (:class:`ByTask`):
    preprocess assembles the volume, inference segments it, explain maps the attention gates and
    Seg-Grad-CAM, encode makes SEG, SC and SR. The gate has no reference for a segmentation
    model (its manifest may have no [gate]) and passes."""
    return [("collect", collect), ("read", read), ("preprocess", PREPARE), ("inference", INFER),
            ("gate", gate), ("explain", EXPLAIN), ("encode", ENCODE), ("store", store_results),
            ("outbox", enqueue)]


def compute_steps() -> list[tuple[str, Step]]:
    """The compute-heavy steps a remote executor runs (on a Ray actor); the gate there only scores
    and decides, leaving its reason in ``outcome_reason`` for :func:`report_gate` in the node."""
    return [("preprocess", prepare), ("inference", infer), ("gate", score_gate), ("explain", explain)]


def score_gate(ctx: PipelineContext) -> None:
    """The gate's scores and decision without the report (made in the node, which stores)."""
    ctx.outcome_reason = gate_decision(ctx) or ""


def report_gate(ctx: PipelineContext) -> None:
    """In the node: the "not analysed" report of a series the remote gate abstained on."""
    if ctx.outcome_reason and not ctx.outcome:
        abstain(ctx, ctx.outcome_reason)


def remote_steps(compute: Step) -> list[tuple[str, Step]]:
    """:func:`default_steps` with :func:`compute_steps` replaced by ``compute``, one call to an
    executor that runs them elsewhere and fills the context's predictions, gate and heatmaps."""
    return [("collect", collect), ("read", read), ("compute", compute), ("report_gate", report_gate),
            ("encode", encode), ("store", store_results), ("outbox", enqueue)]


def run_job(job: Job, timings: dict[str, float], **kwargs: Any) -> dict[str, Any]:
    """:func:`run`, returning the job's results (what a worker records on the job)."""
    return run(job, timings, **kwargs).summary()


def run(
    job: Job, timings: dict[str, float], *, settings: Settings, store: InstanceStore,
    steps: Sequence[tuple[str, Step]], runner: InferenceRunner | None = None, outbox: Outbox | None = None,
    audit: Audit = NO_AUDIT, jobs: JobQueue | None = None, device_uid: str = "",
) -> PipelineContext:
    """Run ``steps`` for ``job``, recording each step's seconds in ``timings`` as it ends.

    A step that fails permanently once the instances are collected (wrong modality, undecodable
    pixels, ...) leaves a "not analysed" SR for the PACS, then fails the job with the reason.
    """
    ctx = PipelineContext(job=job, settings=settings, store=store, runner=runner, outbox=outbox,
                          timings=timings, jobs=jobs, audit=audit, device_uid=device_uid)
    where = {"job": job.id, "study_instance_uid": job.study_instance_uid,
             "series_instance_uid": job.series_instance_uid, "pipeline": job.pipeline}
    audit.record("job_started", **where, model=job.model, model_version=job.model_version,
                 instances=len(job.instance_uids))
    try:
        _run_steps(ctx, steps, timings)
    except Exception as exc:
        if isinstance(exc, MixedPatientsError):
            report_mixed_patients(job, exc, audit)
        audit.record("job_failed", **where, reason=str(exc)[:500],
                     outputs=[str(ds.SOPInstanceUID) for ds in ctx.outputs], timings=dict(timings))
        raise
    manifest = ctx.model() if ctx.runner is not None else None
    config = ctx.pipeline()
    audit.record("job_finished", **where, **ctx.gate_summary(), model=job.model,
                 model_version=manifest.version if manifest else "",
                 weights_sha256=manifest.sha256 if manifest else "",
                 methods=list(config.explain) if config else [],
                 positives=sorted({label for p in ctx.predictions for label in p.positives}
                                  | set(ctx.segmentation.found() if ctx.segmentation is not None else [])),
                 outputs=[str(ds.SOPInstanceUID) for ds in ctx.outputs], timings=dict(timings))
    return ctx


def report_mixed_patients(job: Job, exc: MixedPatientsError, audit: Audit) -> None:
    """An ERROR and the audit event of a job whose instances name several patients (UIDs and
    attribute keywords only): the PACS gets nothing, so an administrator must hear."""
    logger.error("job %s: the instances of series %s of study %s name several patients (%s differ): "
                 "not analysed, nothing sent; fix the sender's UIDs and send the study again", job.id,
                 job.series_instance_uid, job.study_instance_uid, ", ".join(exc.attributes))
    audit.record("patients_mixed_in_series", job=job.id, study_instance_uid=job.study_instance_uid,
                 series_instance_uid=job.series_instance_uid, pipeline=job.pipeline,
                 attributes=exc.attributes, instances=list(job.instance_uids))


def _run_steps(ctx: PipelineContext, steps: Sequence[tuple[str, Step]], timings: dict[str, float]) -> None:
    for name, step in steps:
        started = time.perf_counter()
        try:
            step(ctx)
        except StaleJobError:
            raise  # nothing to report: the instances are another series' now, and it has its own job
        except MixedPatientsError:
            raise  # any report would reference several patients' images; run() says it elsewhere
        except PermanentError as exc:
            _report_safely(ctx, str(exc))
            raise
        except InfrastructureError:
            raise  # the compute was lost, the series never judged: no report, even on the last attempt
        except Exception as exc:
            # retried by the queue, except on the last attempt: the job is dead after it
            if ctx.job.attempts >= ctx.settings.jobs.max_attempts:
                _report_safely(ctx, f"the series could not be processed ({type(exc).__name__}, "
                                    f"{ctx.job.attempts} attempts)")
            raise
        finally:
            timings[name] = time.perf_counter() - started
            timings.update({key: round(value, 6) for key, value in timings.items()})
        if ctx.outcome:
            break  # the step ended the job (the gate abstained): the later steps have nothing to do


def _report_safely(ctx: PipelineContext, reason: str) -> None:
    try:
        report_not_analysed(ctx, reason)
    except Exception as report_exc:  # the traceback may quote patient values: redacted, at DEBUG
        logger.error("job %s: the 'not analysed' report could not be made (%s)", ctx.job.id,
                     type(report_exc).__name__)
        log_encode_failure(ctx, report_exc)
