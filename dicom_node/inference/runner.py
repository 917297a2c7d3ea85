"""Running models: device choice, models loaded once per runner, batched inference."""

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dicom_node.inference.gate import FeatureCapture, frame_vectors, image_statistics
from dicom_node.inference.preprocess import Preprocessed
from dicom_node.inference.registry import LoadedModel, ModelRegistry
from dicom_node.inference.segment import VolumeSegmentation, segment_volume
from dicom_node.inference.volume import Volume

logger = logging.getLogger(__name__)


def select_device(preference: str = "auto") -> torch.device:
    """``"auto"``: the first CUDA device when there is one, else the CPU; or exactly what is asked.

    Raises
    ------
    ValueError
        If a CUDA device is asked for and none is available.
    """
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {preference!r} asked for, but CUDA is not available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {preference!r} asked for, but there are "
                         f"{torch.cuda.device_count()} CUDA device(s)")
    return device


@dataclass(frozen=True)
class Prediction:
    """A model's output for one frame of one instance, with the provenance every output needs."""

    sop_instance_uid: str
    frame: int
    model: str
    model_version: str
    weights_sha256: str
    probabilities: dict[str, float]
    thresholds: dict[str, float]
    #: set by the input-distribution gate when the frame is above its threshold and the pipeline
    #: reports anyway (``out_of_distribution = "warn"``): every finding then says so
    outside_validated_input: bool = False

    @property
    def positives(self) -> list[str]:
        """Labels at or above their manifest threshold."""
        return [name for name, p in self.probabilities.items() if p >= self.thresholds[name]]


class InferenceRunner:
    """Runs the repository's models on one device; each model is loaded on first use, once.

    One runner per worker thread: a loaded model is used by one thread at a time.

    Parameters
    ----------
    registry
        The model repository.
    device
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    batch_size
        Frames per forward pass.
    bf16
        Autocast to bfloat16 on CUDA (ignored on the CPU).
    """

    def __init__(self, registry: ModelRegistry, device: str = "auto", batch_size: int = 16,
                 bf16: bool = False) -> None:
        self.registry = registry
        self.device = select_device(device)
        self.batch_size = batch_size
        self.bf16 = bf16 and self.device.type == "cuda"
        self._models: dict[str, LoadedModel] = {}
        self._baselines: dict[str, tuple[torch.nn.Module, bool]] = {}

    def model(self, name: str) -> LoadedModel:
        if name not in self._models:
            self._models[name] = self.registry.load(name, self.device)
            logger.info("model %s %s loaded on %s", name, self._models[name].manifest.version, self.device)
        return self._models[name]

    def baselines(self, name: str) -> tuple[torch.nn.Module, bool]:
        """The model with randomised weights (a baseline of the quality figures) and whether its
        version passed the sanity check, per the cache next to its weights (never computed here:
        ``dicom-node models verify`` does that). Made once per model."""
        if name not in self._baselines:
            from dicom_node.explain.heatmap import RANDOMISED_SEED  # explain imports inference
            from dicom_node.explain.quality import randomised_copy
            from dicom_node.explain.sanity import cached_result

            loaded = self.model(name)
            result = cached_result(loaded.manifest)
            self._baselines[name] = (randomised_copy(loaded.module, RANDOMISED_SEED),
                                     result is not None and result.passed)
        return self._baselines[name]

    def logits(self, name: str, inputs: Sequence[Preprocessed],
               features: list[np.ndarray] | None = None) -> torch.Tensor:
        """Raw outputs, (frames, labels), float32 on the CPU.

        Parameters
        ----------
        features
            When given, receives each batch's input-distribution gate vectors (frames, k)
            (:func:`~dicom_node.inference.gate.frame_vectors`): the batch's image statistics,
            taken just before its forward pass while the batch is still in the cache, and its
            CAM-layer activations pooled over the layer's grid by that same forward pass.
        """
        loaded = self.model(name)
        outputs = []
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16
                    else contextlib.nullcontext())
        capture = None if features is None else FeatureCapture(loaded.module, loaded.manifest)
        with torch.inference_mode(), autocast, capture or contextlib.nullcontext():
            for start in range(0, len(inputs), self.batch_size):
                chunk = np.stack([p.array for p in inputs[start:start + self.batch_size]])
                batch = torch.from_numpy(chunk).to(self.device, non_blocking=True).contiguous(
                    memory_format=torch.channels_last)
                if capture is None or features is None:
                    outputs.append(loaded.module(batch).float().cpu())
                    continue
                statistics = image_statistics(chunk)  # before the forward pass evicts the batch
                output, pooled = capture.forward(batch)
                outputs.append(output.float().cpu())
                features.append(frame_vectors(pooled, statistics))
        return torch.cat(outputs) if outputs else torch.empty(0, len(loaded.manifest.labels))

    def segment(self, name: str, volume: Volume) -> VolumeSegmentation:
        """A segmentation model's masks of ``volume`` on its source grid (bf16 autocast on CUDA
        when the runner has it)."""
        return segment_volume(self.model(name), volume, self.bf16)

    def predict(self, name: str, inputs: Sequence[Preprocessed],
                features: list[np.ndarray] | None = None) -> list[Prediction]:
        """Probabilities (sigmoid of the logits: multi-label) for every preprocessed frame;
        ``features`` as in :meth:`logits`."""
        manifest = self.model(name).manifest
        probabilities = torch.sigmoid(self.logits(name, inputs, features)).numpy()
        thresholds = {label.name: label.threshold for label in manifest.labels}
        return [
            Prediction(p.sop_instance_uid, p.frame, manifest.name, manifest.version, manifest.sha256,
                       {label: float(v) for label, v in zip(manifest.label_names, row, strict=True)},
                       thresholds)
            for p, row in zip(inputs, probabilities, strict=True)
        ]
