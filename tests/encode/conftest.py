"""Sources (CR MONOCHROME1, DX, CT, MR) with a known lesion, heatmaps on it, and the demo model's
manifest as the producer."""

import subprocess
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydicom import Dataset

from dicom_node.encode import Producer
from dicom_node.explain.heatmap import Heatmap
from dicom_node.inference import ModelRegistry
from dicom_node.inference.runner import Prediction
from dicom_node.phantoms import render, to_dataset
from dicom_node.phantoms.cross_section import cross_section

MODELS = Path(__file__).resolve().parents[2] / "models"
KINDS = ("CR", "DX", "CT", "MR", "CR-odd")


@dataclass
class Case:
    source: Dataset
    lesion: np.ndarray
    predictions: list[Prediction]
    heatmaps: list[Heatmap]


@pytest.fixture(scope="session")
def producer() -> Producer:
    return Producer("chest", ModelRegistry(MODELS).manifest("demo-cxr"), "XAI_NODE", "St Elsewhere Hospital")


def make_case(kind: str, producer: Producer, methods: tuple[str, ...] = ("gradcam",)) -> Case:
    if kind in ("CR", "DX", "CR-odd"):
        phantom = render(11, 256, findings={"nodule": True})
        modality = kind[:2]
        source = to_dataset(phantom, modality=modality, photometric="MONOCHROME2" if kind == "DX" else "MONOCHROME1")
        lesion = phantom.masks["nodule"]
        if kind == "CR-odd":  # what peers send: no orientation, values a writer must not copy
            del source.PatientOrientation
            source.PatientSex, source.PatientBirthDate, source.StudyTime = "m", "1980-01-01", "9:30"
    else:
        piece = cross_section(5, kind, size=128)
        source, lesion = piece.dataset, piece.lesion
    manifest = producer.manifest
    probabilities = {"nodule": 0.91, "consolidation": 0.12, "effusion": 0.03, "cardiomegaly": 0.55}
    prediction = Prediction(str(source.SOPInstanceUID), 0, manifest.name, manifest.version, manifest.sha256,
                            probabilities, {label.name: label.threshold for label in manifest.labels})
    native = cv2.GaussianBlur(lesion.astype(np.float32), (0, 0), 4)
    quality = {"deletion_auc": 0.12, "insertion_auc": 0.8, "deletion_auc_random": 0.4, "stability": 0.93,
               "sparseness": 0.7}
    heatmaps = [
        Heatmap(str(source.SOPInstanceUID), 0, label, probabilities[label], method, manifest.cam_layer,
                manifest.name, manifest.version, manifest.sha256, native[::2, ::2],
                native if label == "nodule" else np.roll(native, 40, axis=0), quality)
        for method in methods for label in ("nodule", "cardiomegaly")
    ]
    return Case(source, lesion, [prediction], heatmaps)


# dciodvfy cannot tell paired body parts apart and asks for Laterality on any General Series.
KNOWN_FALSE_POSITIVE = "Missing attribute Type 2C Conditional Element=<Laterality> Module=<GeneralSeries>"


def dciodvfy_errors(dciodvfy: str, path: Path) -> tuple[list[str], str]:
    """The errors dciodvfy reports on ``path`` (the known false positive left out), and its output."""
    result = subprocess.run([dciodvfy, str(path)], capture_output=True, timeout=60, check=False)
    output = (result.stdout + result.stderr).decode("latin-1")
    errors = [line for line in output.splitlines()
              if line.startswith("Error") and KNOWN_FALSE_POSITIVE not in line]
    return errors, output
