"""Building a model version's gate reference from images the site trusts (``models calibrate``).

The frames go through the same preprocessing and the same forward pass as inference. A seeded
fifth of them is held out; the reference is fitted on the rest. The threshold is the 99.5th
percentile of out-of-fold scores (5-fold, each fold scored by a reference fitted without it, so
no frame judges itself) times a margin of 1.25, and the false-abstention rate is measured on
the held-out fifth, which played no part in either.
"""

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from dicom_node.errors import PermanentError
from dicom_node.inference.gate import Reference, fit_reference, save_reference
from dicom_node.inference.preprocess import Preprocessed, preprocess
from dicom_node.inference.registry import sha256_of
from dicom_node.inference.runner import InferenceRunner
from dicom_node.store.files import input_files

logger = logging.getLogger(__name__)

QUANTILE = 0.995
MARGIN = 1.25
HELD_OUT = 0.2
FOLDS = 5
MINIMUM_FRAMES = 20


@dataclass(frozen=True)
class Calibration:
    """A fitted reference, its threshold and how it did on the held-out frames."""

    reference: Reference
    threshold: float
    held_out_scores: np.ndarray

    @property
    def false_abstention(self) -> float:
        """The share of held-out in-distribution frames the gate would abstain on."""
        return float((self.held_out_scores > self.threshold).mean()) if len(self.held_out_scores) else 0.0


def vectors(runner: InferenceRunner, name: str, inputs: Sequence[Preprocessed]) -> np.ndarray:
    """The gate's vectors of ``inputs``, from one forward pass of model ``name``."""
    features: list[np.ndarray] = []
    runner.predict(name, inputs, features)
    return np.concatenate(features)


def calibrate(frames: np.ndarray, feature_count: int, seed: int = 0) -> Calibration:
    """Hold out a seeded fifth of ``frames`` (gate vectors), fit on the rest, set the threshold.

    Raises
    ------
    ValueError
        With fewer than :data:`MINIMUM_FRAMES` frames.
    """
    if len(frames) < MINIMUM_FRAMES:
        raise ValueError(f"calibration needs at least {MINIMUM_FRAMES} frames; got {len(frames)}")
    order = np.random.default_rng(seed).permutation(len(frames))
    held = order[:max(1, round(len(frames) * HELD_OUT))]
    fit = frames[np.sort(order[len(held):])]
    fold = np.arange(len(fit)) % FOLDS
    out_of_fold = np.concatenate([fit_reference(fit[fold != k], feature_count).score(fit[fold == k])
                                  for k in range(FOLDS)])
    threshold = float(np.quantile(out_of_fold, QUANTILE)) * MARGIN
    reference = fit_reference(fit, feature_count)
    return Calibration(reference, round(threshold, 4), reference.score(frames[held]))


def read_folder(folder: Path, runner: InferenceRunner, name: str) -> list[Preprocessed]:
    """Every DICOM file under ``folder`` the model can read, preprocessed as for inference; files
    that are not DICOM or cannot be decoded are skipped (counted in the log)."""
    spec = runner.model(name).manifest.input
    inputs: list[Preprocessed] = []
    skipped = 0
    for path in input_files([folder]):
        try:
            inputs += preprocess(dcmread(path), spec)
        # PermanentError: preprocess's own refusals (no pixel data, undecodable, unsupported
        # photometric); the others: what pydicom raises for a file that is not DICOM or is broken
        except (PermanentError, InvalidDicomError, ValueError, AttributeError, KeyError, NotImplementedError,
                OSError) as exc:
            skipped += 1
            logger.info("calibration: %s skipped (%s)", path.name, type(exc).__name__)
    if skipped:
        logger.warning("calibration: %d file(s) under %s skipped (not DICOM or not decodable)",
                       skipped, folder)
    return inputs


def gate_lines(reference_name: str, sha256: str, threshold: float, action: str = "abstain") -> str:
    """The ``[gate]`` table for ``model.toml``."""
    return (f'[gate]\nreference = "{reference_name}"\nsha256 = "{sha256}"\nthreshold = {threshold}\n'
            f'action = "{action}"\n')


def write(calibration: Calibration, manifest_path: Path, update: bool,
          reference_name: str = "reference.npz") -> str:
    """Write the reference next to the weights; with ``update`` replace (or add) the manifest's
    ``[gate]`` table, keeping its action. Returns the table's text."""
    path = manifest_path.parent / reference_name
    save_reference(calibration.reference, path)
    text = manifest_path.read_text(encoding="utf-8")
    action = re.search(r'(?ms)^\[gate\]$.*?^action\s*=\s*"(\w+)"', text)
    lines = gate_lines(reference_name, sha256_of(path), calibration.threshold,
                       action.group(1) if action else "abstain")
    if update:
        # the [gate] table runs to the next table header or the end of the file
        kept = re.sub(r"(?ms)^\[gate\]$.*?(?=^\[|\Z)", "", text).rstrip("\n")
        manifest_path.write_text(f"{kept}\n\n{lines}", encoding="utf-8")
    return lines


def calibrate_model(models_dir: Path, name: str, folder: Path, update: bool,
                    seed: int = 0) -> tuple[str, str]:
    """``dicom-node models calibrate``: the report to print and the ``[gate]`` table.

    The model is loaded without its present gate: a retrained model's old reference no longer
    matches, and it is what this replaces.

    Raises
    ------
    ValueError
        If the folder holds too few usable frames.
    """
    import dataclasses

    from dicom_node.inference.registry import ModelRegistry

    registry = ModelRegistry(models_dir)
    manifest = registry.manifest(name)
    registry.manifests[name] = dataclasses.replace(manifest, gate=None)
    runner = InferenceRunner(registry, device="cpu")
    inputs = read_folder(folder, runner, name)
    frames = vectors(runner, name, inputs)
    result = calibrate(frames, frames.shape[1] - _statistics_length(inputs), seed)
    result = dataclasses.replace(result, reference=dataclasses.replace(result.reference,
                                                                       weights_sha256=manifest.sha256))
    lines = write(result, manifest.path, update)
    held = len(result.held_out_scores)
    report = (f"{name} {manifest.version}: reference of {result.reference.images} frame(s) written to "
              f"{manifest.path.parent / 'reference.npz'}\n"
              f"threshold {result.threshold} (1.25 x the 99.5th percentile of out-of-fold scores)\n"
              f"false-abstention rate on {held} held-out frame(s): {result.false_abstention:.1%} "
              f"(highest held-out score {float(result.held_out_scores.max()):.3f})\n")
    report += (f"{manifest.path} updated with:\n" if update else f"put these lines in {manifest.path}:\n")
    return report, lines


def _statistics_length(inputs: Sequence[Preprocessed]) -> int:
    from dicom_node.inference.gate import image_statistics

    return int(image_statistics(inputs[0].array[None]).shape[1]) if inputs else 0
