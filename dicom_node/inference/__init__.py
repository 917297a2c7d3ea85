"""Models: the repository of manifests and weights, DICOM-to-tensor preprocessing, inference."""

from dicom_node.inference.manifest import InputSpec, Label, ModelError, ModelManifest, load_manifest
from dicom_node.inference.preprocess import LetterboxMap, Preprocessed, preprocess
from dicom_node.inference.registry import LoadedModel, ModelRegistry
from dicom_node.inference.runner import InferenceRunner, Prediction, select_device

__all__ = [
    "InferenceRunner", "InputSpec", "Label", "LetterboxMap", "LoadedModel", "ModelError",
    "ModelManifest", "ModelRegistry", "Prediction", "Preprocessed", "load_manifest", "preprocess",
    "select_device",
]
