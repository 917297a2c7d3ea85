"""``dicom-node explain``: the node's pipeline on files, without a network or a data folder.

Files are grouped by series (a study and a Series Instance UID: two studies sharing a Series
Instance UID are two series) and routed to pipelines as ``serve`` routes them (or all go to
``--pipeline``); each series runs read, preprocess, inference, explain and encode, and its
results are written under ``OUT/<study>/<series>/<instance>.dcm``. A series that cannot be
analysed gets its "not analysed" SR. A progress bar shows on a terminal when there are several
series; a summary table ends the run, naming each series by its files and Series Description.
Exit code 0 when at least one series was analysed and none failed with an error; 1 when nothing
was analysed (no DICOM files, nothing routed, every series "not analysed") or any series erred.
"""

import dataclasses
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from dicom_node import pipeline as steps
from dicom_node.config import Pipeline, Settings
from dicom_node.encode import Producer, not_analysed
from dicom_node.errors import ConfigError, PermanentError
from dicom_node.inference import InferenceRunner, ModelRegistry
from dicom_node.jobs.queue import Job, JobState
from dicom_node.jobs.routing import SeriesFacts, route
from dicom_node.store.files import input_files
from dicom_node.store.index import SeriesKey
from dicom_node.store.results import ResultArea


def _unreadable(exc: Exception) -> str:
    """Why a file is skipped, in the node's words (pydicom's would suggest force=True)."""
    if isinstance(exc, InvalidDicomError):
        return "not a DICOM file (no DICOM preamble or file meta information)"
    if isinstance(exc, AttributeError):
        return "a DICOM file without a Study or Series Instance UID"
    if isinstance(exc, OSError):
        return f"cannot be read ({exc.strerror or type(exc).__name__})"
    return f"a damaged DICOM file ({type(exc).__name__})"


def _series(inputs: Sequence[Path], out: TextIO) -> dict[SeriesKey, list[tuple[Path, Dataset]]]:
    groups: dict[SeriesKey, list[tuple[Path, Dataset]]] = defaultdict(list)
    for path in input_files(inputs):
        try:
            header = dcmread(path, stop_before_pixels=True)
            key = SeriesKey(str(header.StudyInstanceUID), str(header.SeriesInstanceUID))
            groups[key].append((path, header))
        except (InvalidDicomError, AttributeError, OSError, ValueError, EOFError) as exc:
            print(f"skipped {path}: {_unreadable(exc)}", file=out)
    return groups


def _job(series: SeriesKey, headers: Sequence[Dataset], pipeline: Pipeline, model_version: str) -> Job:
    now = time.time()
    study_uid, series_uid = series
    return Job(0, f"offline/{study_uid}/{series_uid}/{pipeline.name}", study_uid, series_uid,
               tuple(str(h.SOPInstanceUID) for h in headers), pipeline.name, pipeline.model, model_version, 1,
               JobState.RUNNING, "", 1, now, "offline", now, now, now, now)


class _Progress:
    """A one-line bar on a terminal; silent otherwise."""

    def __init__(self, total: int, stream: TextIO = sys.stderr) -> None:
        self.total, self.done, self.stream = total, 0, stream
        self.shown = total > 1 and stream.isatty()

    def step(self, label: str) -> None:
        self.done += 1
        if self.shown:
            filled = round(30 * self.done / self.total)
            bar = "#" * filled + "." * (30 - filled)
            self.stream.write(f"\r[{bar}] {self.done}/{self.total} {label[:40]:<40}")
            self.stream.flush()
            if self.done == self.total:
                self.stream.write("\n")


def _gate(ctx: steps.PipelineContext) -> None:
    """The input-distribution gate, as in ``serve``: an abstention is this series' "not analysed"
    report, written with the others' results."""
    reason = steps.gate_decision(ctx)
    if reason is not None:
        raise PermanentError(reason)


OFFLINE_STEPS = (steps.check_scope, steps.PREPARE, steps.INFER, _gate, steps.EXPLAIN, steps.ENCODE)


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the summary: a series through one pipeline (or none)."""

    files: str  # the series' first file, and how many more
    description: str  # its Series Description
    modality: str
    pipeline: str
    result: str  # "analysed: ...", "not analysed: ...", "not routed: ...", "error: ..."
    outputs: int
    seconds: float


def _label(members: Sequence[tuple[Path, Dataset]]) -> tuple[str, str]:
    """The series as an operator knows it: its first file (and how many more), its description."""
    first, header = members[0]
    more = f" (+{len(members) - 1})" if len(members) > 1 else ""
    description = " ".join(str(header.get("SeriesDescription", "") or "").split()) or "(no description)"
    return f"{first}{more}", description


def explain_files(settings: Settings, inputs: Sequence[Path], out_dir: Path, pipeline_name: str | None,
                  out: TextIO) -> int:
    """Run the pipelines on ``inputs`` and write the results under ``out_dir``; see the module."""
    registry = ModelRegistry(settings.models.dir)
    pipelines = settings.pipelines
    if pipeline_name is not None:
        pipelines = tuple(p for p in pipelines if p.name == pipeline_name)
        if not pipelines:
            names = [p.name for p in settings.pipelines]
            raise ConfigError(f"--pipeline {pipeline_name!r}: expected one of {names}")
    inference = settings.inference
    runner = InferenceRunner(registry, inference.device, inference.batch_size, inference.bf16)
    groups = _series(inputs, out)
    if not groups:
        print(f"no DICOM files found in {' '.join(map(str, inputs))}", file=out)
        return 1
    local = dataclasses.replace(settings, node=dataclasses.replace(settings.node, data_dir=out_dir))
    rows: list[Row] = []
    progress = _Progress(len(groups))
    for series, members in groups.items():
        headers = [h for _, h in members]
        files, description = _label(members)
        chosen = route(_facts(headers), pipelines) if pipeline_name is None else None
        if chosen is not None and not chosen.pipelines:
            rows.append(Row(files, description, str(headers[0].get("Modality", "")), "-",
                            "not routed: " + chosen.reason, 0, 0.0))
        for pipeline in chosen.pipelines if chosen is not None else pipelines:
            status, count, seconds = _run(local, registry, runner, pipeline, series, members)
            rows.append(Row(files, description, str(headers[0].get("Modality", "")), pipeline.name, status,
                            count, seconds))
        progress.step(members[0][0].name)
    _summary(rows, out_dir, out)
    if any(row.result.startswith("error") for row in rows):
        return 1
    if not any(row.result.startswith("analysed") for row in rows):
        print("nothing was analysed", file=out)
        return 1
    return 0


def _facts(headers: Sequence[Dataset]) -> SeriesFacts:
    first = headers[0]
    return SeriesFacts(str(first.get("Modality", "")), str(first.get("BodyPartExamined", "") or ""),
                       str(first.get("SeriesDescription", "") or ""), "", str(first.get("Manufacturer", "")),
                       frozenset(str(h.SOPClassUID) for h in headers))


def _run(settings: Settings, registry: ModelRegistry, runner: InferenceRunner, pipeline: Pipeline,
         series: SeriesKey, members: Sequence[tuple[Path, Dataset]]) -> tuple[str, int, float]:
    """One series through one pipeline, its results written: the result, the outputs, the seconds."""
    started = time.perf_counter()
    headers = [h for _, h in members]
    manifest = registry.manifest(pipeline.model)
    job = _job(series, headers, pipeline, manifest.version)
    ctx = steps.PipelineContext(job=job, settings=settings, store=None, runner=runner)  # type: ignore[arg-type]
    try:
        ctx.datasets = [dcmread(path) for path, _ in members]
        steps.check_one_patient(ctx.datasets)
        for step in OFFLINE_STEPS:
            step(ctx)
        found = (ctx.segmentation.found() if ctx.segmentation is not None
                 else sorted({label for p in ctx.predictions for label in p.positives}))
        status = "analysed: " + (", ".join(found) or "no finding above threshold")
    except steps.MixedPatientsError as exc:  # a report would reference both patients' images
        status, ctx.outputs = f"not analysed: {exc}; nothing written", []
    except Exception as exc:  # a damaged file must not stop the other series, nor go unreported
        # only a PermanentError's message is ours; others may quote header values
        reason = str(exc) if isinstance(exc, PermanentError) else f"processing failed ({type(exc).__name__})"
        status = f"not analysed: {reason}"
        producer = Producer(pipeline.name, manifest, settings.node.ae_title, settings.node.institution_name)
        if "sr" not in pipeline.outputs:
            status = f"error: {status} (and no 'sr' output to report it)"
        try:
            ctx.outputs = [not_analysed(ctx.datasets or headers, reason, producer, job.study_instance_uid,
                                        job.series_instance_uid)] if "sr" in pipeline.outputs else []
        except Exception as report_exc:
            status, ctx.outputs = f"error: {status}; the report failed ({type(report_exc).__name__})", []
    area = ResultArea(settings.node.data_dir)  # --out itself
    try:
        for ds in ctx.outputs:
            area.save(ds)
    except OSError as exc:
        status = f"error: writing the results failed: {exc.strerror or exc}"
    return status, len(ctx.outputs), time.perf_counter() - started


def _summary(rows: list[Row], out_dir: Path, out: TextIO) -> None:
    """A table: each series by its files and description, then what became of it."""
    width = max([5] + [len(r.files) for r in rows])
    print(f"{'FILES':<{width}}  {'SERIES DESCRIPTION':<24} {'MOD':<4} {'PIPELINE':<10} {'OUT':>3} "
          f"{'SECONDS':>8}  RESULT", file=out)
    for r in rows:
        described = r.description if len(r.description) <= 24 else r.description[:23] + "…"
        print(f"{r.files:<{width}}  {described:<24} {r.modality:<4} {r.pipeline:<10} {r.outputs:>3} "
              f"{r.seconds:>8.2f}  {r.result}", file=out)
    print(f"{sum(r.outputs for r in rows)} result file(s) in {out_dir}", file=out)
