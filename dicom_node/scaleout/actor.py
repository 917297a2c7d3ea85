"""What runs on a Ray actor: one model version on one device, reused across jobs.

The class is plain Python (no Ray import): :class:`~dicom_node.scaleout.executor.RayExecutor`
wraps it with ``ray.remote`` and its options, and tests may call it in-process.
"""

import functools
import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import torch
from pydicom import Dataset

import dicom_node
from dicom_node import pipeline
from dicom_node.config import Settings
from dicom_node.explain.heatmap import Heatmap
from dicom_node.inference import InferenceRunner, ModelError, ModelManifest, ModelRegistry, Prediction
from dicom_node.inference.gate import GateResult
from dicom_node.inference.preprocess import preprocess
from dicom_node.inference.registry import sha256_of
from dicom_node.jobs.queue import Job

#: a model version's whole identity: its version string, the sha256 of its manifest file (labels,
#: thresholds, preprocessing, gate threshold), of its weights and of its gate's reference, and the
#: code that runs it (dicom-node's version and sources, torch's version)
Identity = dict[str, str]


#: the parts of dicom-node an actor runs: its results depend on these sources alone (a change to
#: the dashboard, the CLI or the export must not refuse every actor until each host is redeployed)
COMPUTE_PACKAGES = ("pipeline.py", "errors.py", "config.py", "inference", "explain", "phantoms", "scaleout")


@functools.cache
def code_sha256(package: Path = Path(dicom_node.__file__).parent) -> str:
    """The sha256 of the dicom-node sources an actor runs (:data:`COMPUTE_PACKAGES`): each file's
    path in the package and its text with line endings made ``\\n`` (a checkout with CRLF is the
    same code), in path order; computed once per process. ``package``: the installed one."""
    digest = hashlib.sha256()
    paths = [p for part in COMPUTE_PACKAGES
             for p in ([package / part] if part.endswith(".py") else (package / part).rglob("*.py"))]
    for path in sorted(paths):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes().replace(b"\r\n", b"\n")).digest())
    return digest.hexdigest()


def identity(manifest: ModelManifest) -> Identity:
    """What must be equal at the node and on an actor's host for their results to be the same.

    The manifest's own bytes are hashed (not only the weights' sha256 it names): two hosts with
    the same weights but other thresholds, labels or windowing would report other findings. So
    is the code: an actor host with another dicom-node (preprocessing, explainers) or another
    torch computes other numbers from the same files.
    """
    return {"version": manifest.version, "manifest_sha256": sha256_of(manifest.path),
            "weights_sha256": manifest.sha256,
            "gate_reference_sha256": manifest.gate.sha256 if manifest.gate else "",
            "dicom_node_version": dicom_node.__version__, "dicom_node_sha256": code_sha256(),
            # the release, not its build (+cpu, +cu124): a CPU node drives CUDA hosts
            "torch_version": str(torch.__version__).split("+")[0]}


def mismatch(ours: Identity, theirs: Identity) -> list[str]:
    """The identity's keys whose values differ (``theirs`` is the node's)."""
    return sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))


def compute_settings(settings: Settings) -> Settings:
    """The part of the node's settings the Ray driver and its actors need: the pipelines (their
    explain methods, labels, LIME samples), ``[inference]``, ``[models]`` and ``[workers]`` (the
    ``ray_*`` keys); the rest (the web token, TLS keys' paths, destinations) stays in the node."""
    return Settings(source=settings.source, models=settings.models, inference=settings.inference,
                    workers=settings.workers, pipelines=settings.pipelines)


@dataclass(frozen=True)
class Computed:
    """What an actor hands back for one job: the context fields the node's later steps read."""

    predictions: list[Prediction]
    gate: list[GateResult]
    heatmaps: list[Heatmap]
    abstain_reason: str  # the gate's reason to report "not analysed", or ""
    timings: dict[str, float] = field(default_factory=dict)


class ComputeActor:
    """Holds one model loaded on one device and runs :func:`pipeline.compute_steps` for jobs.

    Parameters
    ----------
    settings
        The node's settings (the pipelines' explain methods and labels, ``[inference]``).
    model
        The model's name in the repository at ``settings.models.dir`` on the actor's host.
    expected
        The model's :func:`identity` at the node: the actor refuses to start on other files (a
        host with another version of the repository: weights, manifest or gate reference).
    device
        ``"cpu"``, ``"cuda"``, ...
    threads
        torch's CPU threads in this process.

    Raises
    ------
    ModelError
        The model is missing, its files do not match their manifest, or its identity is not
        the node's.
    """

    def __init__(self, settings: Settings, model: str, expected: Identity, device: str, threads: int) -> None:
        started = time.perf_counter()
        torch.set_num_threads(threads)
        cv2.setNumThreads(threads)  # OpenCV's own pool ignores OMP_NUM_THREADS: keep to the CPUs reserved
        self.settings = settings
        registry = ModelRegistry(settings.models.dir)
        manifest = registry.manifest(model)
        here = identity(manifest)
        differ = mismatch(here, expected)
        if differ:
            shown = ", ".join(f"{k} {here.get(k, '')[:12]!r} here, {expected.get(k, '')[:12]!r} at the node"
                              for k in differ)
            raise ModelError(f"{manifest.path}: model {model} on this Ray host is not the node's ({shown}): "
                             "install the same model version, dicom-node and torch here")
        inference = settings.inference
        self.runner = InferenceRunner(registry, device, inference.batch_size, inference.bf16)
        self.runner.model(model)  # loads and checks the weights' sha256 (registry.load)
        self.runner.baselines(model)
        self.model_name = model
        self._warm_up()
        self.load_seconds = time.perf_counter() - started

    def _warm_up(self) -> None:
        """Run the model and every method the pipelines ask of it once, on a phantom: the first
        call of each pays for set-up (kernels, lazy imports, about 2 s on a CPU here), which
        belongs to the actor's start, paid once, not to its first job."""
        from dicom_node.explain.heatmap import explain_frame
        from dicom_node.phantoms import render, to_dataset

        pipelines = [p for p in self.settings.pipelines if p.model == self.model_name]
        methods = sorted({m for p in pipelines for m in p.explain})
        loaded = self.runner.model(self.model_name)
        ds = to_dataset(render(0, loaded.manifest.input.size))
        items = preprocess(ds, loaded.manifest.input)
        [prediction] = self.runner.predict(self.model_name, items[:1])
        if methods:
            randomised, passed = self.runner.baselines(self.model_name)
            explain_frame(loaded, items[0], prediction, list(prediction.probabilities)[:1], methods, 0,
                          lime_samples=64, randomised=randomised, sanity_passed=passed)

    def describe(self) -> dict[str, Any]:
        """Where the actor runs and what it holds (for the dashboard and ``/metrics``)."""
        manifest = self.runner.registry.manifest(self.model_name)
        return {"model": self.model_name, "version": manifest.version, "sha256": manifest.sha256,
                "identity": identity(manifest),
                "device": str(self.runner.device), "pid": os.getpid(), "host": os.uname().nodename,
                "threads": torch.get_num_threads(), "load_seconds": round(self.load_seconds, 3)}

    def compute(self, job: Job, datasets: Sequence[Dataset]) -> Computed:
        """Preprocess, infer, score the gate and explain ``datasets`` (the job's series, read by
        the node). A :class:`~dicom_node.errors.PermanentError` (undecodable pixels) reaches
        the node as it is, which reports the series "not analysed"."""
        if job.model != self.model_name:
            raise ModelError(f"this actor holds model {self.model_name!r}, not {job.model!r}")
        timings: dict[str, float] = {}
        # the compute steps read no store: they see the data sets the node read (as offline.py)
        ctx = pipeline.PipelineContext(job=job, settings=self.settings, store=None,  # type: ignore[arg-type]
                                       runner=self.runner, datasets=list(datasets), timings=timings)
        for name, step in pipeline.compute_steps():
            started = time.perf_counter()
            step(ctx)
            timings[name] = round(time.perf_counter() - started, 6)
            if ctx.outcome_reason:
                break  # the gate abstains: nothing to explain
        return Computed(ctx.predictions, ctx.gate, ctx.heatmaps, ctx.outcome_reason,
                        {k: round(v, 6) for k, v in timings.items()})
