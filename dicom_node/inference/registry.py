"""The model repository: ``<models.dir>/<name>/model.toml`` plus weights and ``MODEL_CARD.md``.

:meth:`ModelRegistry.verify` checks every model at start-up (manifest, weights file and its
sha256, that the weights fit the architecture, that the model has one output per label, that
the CAM layer exists, and the input-distribution gate's reference file, its sha256 and that it
describes this model's frames) and raises one :class:`ModelError` naming the file and key.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dicom_node.inference.architectures import build
from dicom_node.inference.gate import (
    FeatureCapture,
    Reference,
    ReferenceError,
    frame_vectors,
    image_statistics,
    load_reference,
)
from dicom_node.inference.manifest import ModelError, ModelManifest, load_manifest


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to run: eval mode, on its device, with its manifest."""

    manifest: ModelManifest
    module: nn.Module
    device: torch.device
    reference: Reference | None = None  # the input-distribution gate's, when the manifest has one


def check_file(manifest: Path, key: str, path: Path, sha_key: str, sha256: str, noun: str,
               hint: str = "") -> None:
    """``path`` (named by ``key`` in ``manifest``) exists and its sha256 is the one ``sha_key`` gives.

    Raises
    ------
    ModelError
        Naming the manifest, the key and what is wrong.
    """
    if not path.is_file():
        raise ModelError(f"{manifest}: key {key!r} = {path.name!r} is invalid; expected an existing file "
                         f"next to the manifest{hint}")
    actual = sha256_of(path)
    if actual != sha256:
        raise ModelError(f"{manifest}: key {sha_key!r} = {sha256!r} does not match the {noun} file (sha256 "
                         f"{actual}); the file changed or the manifest is wrong")


class ModelRegistry:
    """The models in one repository folder, read from their manifests.

    Parameters
    ----------
    directory
        The repository: one folder per model, each with a ``model.toml``.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.manifests: dict[str, ModelManifest] = {}
        if not directory.is_dir():
            return
        for path in sorted(directory.glob("*/model.toml")):
            manifest = load_manifest(path)
            if manifest.name != path.parent.name:
                raise ModelError(f"{path}: key 'name' = {manifest.name!r} is invalid; "
                                 f"expected the folder's name {path.parent.name!r}")
            self.manifests[manifest.name] = manifest

    def names(self) -> list[str]:
        return sorted(self.manifests)

    def manifest(self, name: str) -> ModelManifest:
        try:
            return self.manifests[name]
        except KeyError:
            raise ModelError(f"{self.directory}: no model {name!r}; "
                             f"the repository has {self.names()}") from None

    def load(self, name: str, device: torch.device | str = "cpu") -> LoadedModel:
        """Build the model, load and check its weights, and move it to ``device`` in eval mode."""
        manifest = self.manifest(name)
        check_file(manifest.path, "weights", manifest.weights, "sha256", manifest.sha256, "weights")
        try:
            module = build(manifest.architecture, len(manifest.labels), manifest.input.channels,
                           manifest.weights, manifest.network.parameters() if manifest.network else None)
        except ValueError as exc:
            raise ModelError(f"{manifest.path}: key 'weights' = {manifest.weights.name!r}: {exc}") from None
        _check_layer(manifest, module)
        module = module.to(device).eval()
        if (torch.device(device).type == "cpu" and manifest.architecture != "torchscript"
                and manifest.task == "classification"):
            # oneDNN's convolutions are about 1.6x faster on channels-last tensors on these CPUs
            module = module.to(memory_format=torch.channels_last)
        _check_outputs(manifest, module, torch.device(device))
        reference = _reference(manifest, module, torch.device(device))
        return LoadedModel(manifest, module, torch.device(device), reference)

    def verify(self) -> list[ModelManifest]:
        """Load every model once on the CPU; raise on the first that is not usable."""
        for name in self.names():
            self.load(name)
        return [self.manifests[n] for n in self.names()]


def _check_layer(manifest: ModelManifest, module: nn.Module) -> None:
    layers = dict(module.named_modules())
    if manifest.cam_layer not in layers:
        candidates = [n for n, m in layers.items() if isinstance(m, nn.Conv2d | nn.Sequential) and n][-5:]
        raise ModelError(f"{manifest.path}: key 'cam_layer' = {manifest.cam_layer!r} is invalid; "
                         f"expected a layer of the model, e.g. one of {candidates}")


def _check_outputs(manifest: ModelManifest, module: nn.Module, device: torch.device) -> None:
    if manifest.task == "segmentation":
        _check_maps(manifest, module, device)
        return
    spec = manifest.input
    probe = torch.zeros(1, spec.channels, spec.size, spec.size, device=device)
    try:
        with torch.inference_mode():
            out = module(probe)
    except Exception as exc:  # a foreign TorchScript file may fail in any way
        raise ModelError(f"{manifest.path}: the model fails on a {tuple(probe.shape)} input: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] != len(manifest.labels):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"{manifest.path}: key 'labels' lists {len(manifest.labels)} labels but the "
                         f"model outputs {shape}; expected (batch, {len(manifest.labels)})")


def _check_maps(manifest: ModelManifest, module: nn.Module, device: torch.device) -> None:
    """A segmentation model maps its grid to one channel per label on the same grid."""
    assert manifest.input.volume is not None and manifest.network is not None
    grid = manifest.input.volume
    # a 2D network sees the grid's slices as a batch; one slice is probe enough
    shape = (1, 1, *grid) if manifest.network.spatial_dims == 3 else (1, 1, *grid[1:])
    probe = torch.zeros(shape, device=device)
    try:
        with torch.inference_mode():
            out = module(probe)
    except Exception as exc:
        raise ModelError(f"{manifest.path}: the model fails on a {shape} input: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    expected = (1, len(manifest.labels), *shape[2:])
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        found = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"{manifest.path}: key 'labels' lists {len(manifest.labels)} labels but the "
                         f"model outputs {found}; expected {expected} (one map per label)")


def _reference(manifest: ModelManifest, module: nn.Module, device: torch.device) -> Reference | None:
    """The gate's reference: the file named in ``[gate]``, its sha256, and that it describes the
    frames of this model (its pooled CAM-layer channels and the image statistics)."""
    gate = manifest.gate
    if gate is None:
        return None
    where = f"{manifest.path}: key 'gate.reference' = {gate.reference.name!r}"
    check_file(manifest.path, "gate.reference", gate.reference, "gate.sha256", gate.sha256, "reference",
               " (dicom-node models calibrate writes it)")
    spec = manifest.input
    probe = torch.zeros(1, spec.channels, spec.size, spec.size, device=device)
    try:
        with torch.inference_mode(), FeatureCapture(module, manifest) as capture:
            pooled = capture.forward(probe)[1]
        reference = load_reference(gate.reference)
        if reference.weights_sha256 != manifest.sha256:
            stale = reference.weights_sha256[:12] or "?"
            raise ReferenceError(f"it describes the activations of weights {stale}, "
                                 f"not of these ({manifest.sha256[:12]})")
        reference.score(frame_vectors(pooled, image_statistics(probe.cpu().numpy())))
    except ReferenceError as exc:
        raise ModelError(f"{where}: {exc}; calibrate it again for these weights") from None
    return reference
