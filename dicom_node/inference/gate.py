"""The input-distribution gate: is this frame like the inputs the model version was validated on?

Each frame is described by one vector: the model's CAM-layer activations pooled over the layer's
grid (captured during the forward pass that makes the prediction: no second forward) and a few
image-level statistics of the preprocessed input on a 32 x 32 grid (intensity quantiles, edge
strength along each axis, left-right asymmetry, and an 8 x 8 thumbnail of mean intensities,
which catch what pooled features cannot see: inversion, rotation, cropping, another layout). The score is the
Mahalanobis distance of that vector to the reference (its mean and a shrunk covariance), divided
by the square root of its length, so thresholds read alike across models. The reference is an
``.npz`` file next to the weights, named with its SHA-256 in the manifest's ``[gate]`` table
together with the threshold.
"""

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from dicom_node.inference.architectures import PlainCNN
from dicom_node.inference.manifest import ModelError, ModelManifest

THUMBNAIL = 8
GRID = 32  # image statistics are taken on a 32 x 32 block average of the input
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
SHRINKAGE = 0.05  # the covariance is pulled this far toward its diagonal: a few hundred images
#: The format of the reference file; a file with another version is refused.
FORMAT = 1
# nearest-rank quantiles of the sorted grid
_RANKS = np.array([round(q * (GRID * GRID - 1)) for q in QUANTILES])
_MEAN = len(QUANTILES)  # where the mean sits among the statistics; then the standard deviation, ...
STATISTICS = len(QUANTILES) + 5 + THUMBNAIL * THUMBNAIL  # image statistics a frame
# how many values are summed of the squares and of each difference image: down, across, mirrored
_COUNTS = (GRID * GRID, (GRID - 1) * GRID, GRID * (GRID - 1), GRID * GRID)


class ReferenceError(ValueError):
    """A gate reference file is missing, unreadable or does not fit the model."""


@dataclass(frozen=True)
class GateResult:
    """One frame's out-of-distribution score against its model version's threshold."""

    sop_instance_uid: str
    frame: int
    score: float
    threshold: float

    @property
    def outside(self) -> bool:
        """True when the frame is outside the validated input."""
        return not self.score <= self.threshold  # a NaN score (non-finite input) is outside too

    def describe(self) -> str:
        """The reason text: names the score and the threshold."""
        verdict = "above" if self.outside else "within"
        return (f"out-of-distribution score {self.score:.2f} {verdict} the model's threshold "
                f"{self.threshold:.2f} (instance {self.sop_instance_uid} frame {self.frame + 1})")


def pool(activations: torch.Tensor) -> np.ndarray:
    """A layer's output averaged over its grid: (frames, channels, ...) -> (frames, channels)."""
    values = activations.float()
    return (values.mean(dim=tuple(range(2, values.ndim))) if values.ndim > 2 else values).cpu().numpy()


def pool_into(module: torch.nn.Module, layer_name: str,
              features: list[np.ndarray]) -> torch.utils.hooks.RemovableHandle:
    """A forward hook appending layer ``layer_name``'s output pooled over its grid (:func:`pool`),
    (frames, channels), to ``features``; remove it when done."""
    layer = module.get_submodule(layer_name)  # walks the dotted path only, not every module

    def capture(_module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> None:
        features.append(pool(output))

    return layer.register_forward_hook(capture)


class FeatureCapture:
    """Forward passes that also give the CAM layer's activations pooled over its grid, (frames,
    channels), from the pass that makes the prediction: no second forward. Use it as a context
    manager around the passes.

    One of the node's own networks (:class:`~dicom_node.inference.architectures.PlainCNN`)
    whose CAM layer is the last feature module returns that mean itself
    (:meth:`~dicom_node.inference.architectures.PlainCNN.forward_pooled`: the global average
    pooling its classifier reads), so it is neither hooked nor averaged a second time. In float32
    the two are the same mean; under bf16 autocast that module averages in bf16 where :func:`pool`
    averages in float32, so the vectors differ by bf16 rounding (the reference is calibrated in
    float32; on the demo model bf16 moves scores by up to 0.03 either way, against a threshold of
    1.88). Any other model (TorchScript, torchvision, a network of the node's own explained at
    another layer) gets a forward hook on the layer (:func:`pool_into`); a submodule of a user's
    model that happens to be named ``pooled_layer`` is never taken for that method.
    """

    def __init__(self, module: torch.nn.Module, manifest: ModelManifest) -> None:
        self.module, self.manifest = module, manifest
        self.direct = isinstance(module, PlainCNN) and module.pooled_layer(manifest.cam_layer) == "avg_pool"
        self._pooled: list[np.ndarray] = []
        self._hook = None if self.direct else pool_into(module, manifest.cam_layer, self._pooled)

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """The module's output for ``batch`` and the pooled CAM-layer activations, (frames, channels).

        Raises
        ------
        ModelError
            As :func:`one_capture`.
        """
        if self.direct:
            assert isinstance(self.module, PlainCNN)
            output, mean = self.module.forward_pooled(batch)
            if mean.dtype != torch.float32 or mean.device.type != "cpu":  # bf16, CUDA
                mean = mean.float().cpu()
            return output, mean.reshape(len(mean), -1).numpy()
        output = self.module(batch)
        return output, one_capture(self._pooled, self.manifest)

    def close(self) -> None:
        """Remove the hook, if any."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def __enter__(self) -> "FeatureCapture":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def one_capture(pooled: list[np.ndarray], manifest: ModelManifest) -> np.ndarray:
    """The one capture :func:`pool_into` made during a forward pass, taken out of ``pooled``.

    Raises
    ------
    ModelError
        The CAM layer ran more or less than once in the pass (a module the network calls twice,
        such as torchvision's ResNet ``layer4.1.relu``, or one it never calls): the vector would
        describe the wrong activations, so the manifest's ``cam_layer`` is refused.
    """
    count = len(pooled)
    if count != 1:
        pooled.clear()
        raise ModelError(f"{manifest.path}: key 'cam_layer' = {manifest.cam_layer!r} ran {count} times in "
                         "one forward pass; expected a layer the network runs exactly once (such as a "
                         "whole block, 'layer4', rather than a module it reuses)")
    return pooled.pop()


def image_statistics(arrays: np.ndarray) -> np.ndarray:
    """Image-level statistics of preprocessed inputs, (frames, channels, size, size) -> (frames, k).

    The channels are averaged (a colour input is judged on its luminance) and the image is first
    averaged down to a :data:`GRID` x :data:`GRID` grid: the statistics describe layout and
    contrast, not fine detail. Then: :data:`QUANTILES` (nearest rank), mean, standard deviation,
    mean absolute difference between neighbours along each axis (a rotated chest swaps them), the
    log of the mean left-right asymmetry (a chest is not a mirror image: the heart lies to one
    side; "exactly symmetric" must be far from "a little symmetric"), and an :data:`THUMBNAIL` x
    :data:`THUMBNAIL` thumbnail of block means.

    Written for its cost, which the gate adds to every batch's inference. It runs with cold
    caches (right after preprocessing, the forward pass before it evicted them), where each numpy
    call costs several times what it does in a loop: so as few calls as possible. The grid, the
    quantiles and the thumbnail are one call each over the whole batch; the sums are OpenCV's
    (one call each, accumulated in float64) frame by frame. No BLAS call: its threads would
    contend with the model's own on a small CPU (a matrix product here made the step 20 times
    slower right after a forward pass).
    """
    images = _grid(np.asarray(arrays, dtype=np.float32))
    frames = len(images)
    out = np.empty((frames, STATISTICS), dtype=np.float32)
    out[:, :len(QUANTILES)] = np.partition(images.reshape(frames, GRID * GRID), _RANKS, axis=1)[:, _RANKS]
    out[:, _MEAN + 5:] = _block_mean(images, THUMBNAIL).reshape(frames, -1)
    for row, grid in zip(out, images, strict=True):
        # mean and standard deviation accumulated in float64 (in float32, E[x^2] - mean^2
        # cancels to noise when the mean is large against the spread: -1024 plus a little)
        mean, std = cv2.meanStdDev(grid)
        row[_MEAN:_MEAN + 5] = (
            mean[0, 0], std[0, 0],
            cv2.norm(grid[1:], grid[:-1], cv2.NORM_L1) / _COUNTS[1],
            cv2.norm(grid[:, 1:], grid[:, :-1], cv2.NORM_L1) / _COUNTS[2],
            math.log(cv2.norm(grid, cv2.flip(grid, 1), cv2.NORM_L1) / _COUNTS[3] + 1e-4))
    return out


def _grid(arrays: np.ndarray) -> np.ndarray:
    """(frames, channels, size, size) to their luminance averaged over blocks, (frames, GRID, GRID)
    (the last rows and columns dropped when size is not a multiple; inputs are 32 px or more, see
    the manifest)."""
    channels, size = arrays.shape[1], arrays.shape[-1]
    images = arrays[:, 0] if channels == 1 else arrays.mean(axis=1)
    side = size // GRID * GRID
    return _block_mean(images[:, :side, :side], GRID)


def _block_mean(images: np.ndarray, grid: int) -> np.ndarray:
    """(frames, side, side) averaged over blocks to (frames, grid, grid), ``side`` a multiple of
    ``grid``. The frames are stacked into one tall image: a block never straddles two frames, and
    OpenCV's area resampling by a whole factor is the block mean, at a fifth of numpy's cost."""
    frames, side = images.shape[0], images.shape[-1]
    tall = np.ascontiguousarray(images).reshape(frames * side, side)
    return cv2.resize(tall, (grid, frames * grid), interpolation=cv2.INTER_AREA).reshape(frames, grid, grid)


def frame_vectors(features: np.ndarray, statistics: np.ndarray) -> np.ndarray:
    """The gate's description of each frame: pooled features (frames, channels), then its image
    statistics (:func:`image_statistics`)."""
    return np.concatenate([np.asarray(features).reshape(len(statistics), -1), statistics], axis=1,
                          dtype=np.float64)


@dataclass(frozen=True)
class Reference:
    """The validated inputs of one model version, summarised: a mean and a whitening matrix."""

    mean: np.ndarray  # (k,)
    scale: np.ndarray  # (k,) per-dimension standard deviation, floored
    precision: np.ndarray  # (k, k) inverse of the shrunk correlation matrix
    feature_count: int  # how many of the k dimensions are the model's pooled features
    images: int  # how many frames it was fitted on
    weights_sha256: str = ""  # the weights whose activations it describes (set by calibration)

    def score(self, vectors: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """The out-of-distribution score of each row of ``vectors`` (frames, k), or of the rows of
        each batch's vectors in turn (as :meth:`InferenceRunner.logits` appends them)."""
        if not isinstance(vectors, np.ndarray):  # one batch (the usual series) is not copied
            vectors = vectors[0] if len(vectors) == 1 else np.concatenate(vectors)
        if vectors.dtype != np.float64:
            vectors = vectors.astype(np.float64)
        if vectors.ndim != 2 or vectors.shape[1] != self.mean.shape[0]:
            raise ReferenceError(f"the reference describes {self.mean.shape[0]} values a frame; "
                                 f"got {vectors.shape[1:] if vectors.ndim == 2 else vectors.shape}")
        whitening, offset = self._whitening
        whitened = vectors @ whitening
        whitened -= offset
        return np.sqrt(np.einsum("ij,ij->i", whitened, whitened))

    @functools.cached_property
    def _whitening(self) -> tuple[np.ndarray, np.ndarray]:
        """``W`` and ``mean @ W`` with ``W W^T = diag(1/scale) precision diag(1/scale) / k``, so that
        the score (the distance divided by the square root of k, the vector's length) is one
        product and a sum of squares (made once, on first use)."""
        try:
            whitening = np.linalg.cholesky(self.precision) / (self.scale[:, None] * np.sqrt(len(self.mean)))
        except np.linalg.LinAlgError:
            raise ReferenceError("its precision matrix is not positive definite") from None
        return whitening, self.mean @ whitening


def fit_reference(vectors: np.ndarray, feature_count: int) -> Reference:
    """Fit a :class:`Reference` to the rows of ``vectors`` (frames, k), at least 10 frames.

    Raises
    ------
    ReferenceError
        If there are fewer than 10 frames or values that are not finite.
    """
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.ndim != 2 or len(vectors) < 10 or not np.isfinite(vectors).all():
        raise ReferenceError(f"a reference needs at least 10 frames of finite values; got {vectors.shape}")
    mean = vectors.mean(axis=0)
    std = vectors.std(axis=0)
    # a constant dimension (an always-empty corner) still needs a scale: a tenth of the typical one
    scale = np.maximum(std, max(float(np.median(std)) * 0.1, 1e-6))
    correlation = np.cov(((vectors - mean) / scale).T)
    shrunk = (1 - SHRINKAGE) * correlation + SHRINKAGE * np.diag(np.diag(correlation) + 1e-3)
    return Reference(mean, scale, np.linalg.inv(shrunk), feature_count, len(vectors))


def save_reference(reference: Reference, path: Path) -> None:
    """Write ``reference`` to ``path`` (``.npz``), atomically."""
    partial = path.with_name(path.name + ".partial.npz")
    np.savez(partial, format=np.int64(FORMAT), mean=reference.mean, scale=reference.scale,
             precision=reference.precision, feature_count=np.int64(reference.feature_count),
             images=np.int64(reference.images), weights_sha256=np.str_(reference.weights_sha256))
    partial.replace(path)


def load_reference(path: Path) -> Reference:
    """Read a reference written by :func:`save_reference`.

    Raises
    ------
    ReferenceError
        Naming the file and what is wrong with it.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            if int(data["format"]) != FORMAT:
                raise ReferenceError(f"{path}: reference format {int(data['format'])}; expected {FORMAT}")
            reference = Reference(data["mean"], data["scale"], data["precision"], int(data["feature_count"]),
                                  int(data["images"]), str(data["weights_sha256"]))
    except (OSError, KeyError, ValueError) as exc:
        if isinstance(exc, ReferenceError):
            raise
        raise ReferenceError(f"{path}: not a gate reference ({type(exc).__name__}: {exc})") from None
    k = reference.mean.shape[0]
    if reference.scale.shape != (k,) or reference.precision.shape != (k, k):
        raise ReferenceError(f"{path}: inconsistent shapes in the reference")
    return reference
