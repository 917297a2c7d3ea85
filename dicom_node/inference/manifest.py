"""Model manifests: ``models/<name>/model.toml``, read strictly.

Every problem raises :class:`ModelError` naming the file, the key, the value and what was
expected, on one line. Example::

    name = "demo-cxr"
    version = "1.0.0"
    architecture = "small_cnn"
    weights = "weights.pt"
    sha256 = "3f5c..."
    cam_layer = "features.conv3"
    intended_use = "Research demo trained on synthetic phantoms, not for clinical use."

    [input]
    size = 256
    channels = 1
    normalization = "zero_one"   # zero_one | imagenet | xrv
    multiframe = "middle"        # middle | all
    # window_center / window_width: used when the file has no VOI window

    [scope]
    modalities = ["CR", "DX"]
    body_parts = ["CHEST"]

    [[labels]]
    name = "nodule"
    threshold = 0.5
    code = ["SCT", "27925004", "Nodule"]   # optional: coding scheme, value, meaning

    [gate]                          # optional: the input-distribution gate (dicom-node models calibrate)
    reference = "reference.npz"
    sha256 = "0c1d..."
    threshold = 1.59
    action = "abstain"              # abstain | warn: what a frame above the threshold gets by default

A segmentation model (``task = "segmentation"``) gives one output channel per label (a sigmoid
each, thresholded on the source grid) and runs on the series assembled as a volume::

    task = "segmentation"
    architecture = "attention_unet"
    cam_layer = "model.1.submodule.1.merge"   # the layer Seg-Grad-CAM uses (a decoder merge)

    [network]                       # the architecture's parameters (attention_unet only)
    spatial_dims = 3                # 3: one 3D pass; 2: the model grid's slices as one batch
    channels = [8, 16, 32]
    strides = [2, 2]

    [input]
    volume = [32, 64, 64]           # the model grid (slices, rows, columns); no ``size``
    channels = 1
    normalization = "zscore_nonzero"   # zscore_nonzero | zscore

It has no ``[gate]`` yet: the input-distribution gate scores 2D frames.
"""

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_node.errors import ConfigError

ARCHITECTURES = (
    "small_cnn", "compact_cnn", "densenet121", "resnet18", "resnet50", "efficientnet_b0", "torchscript",
    "attention_unet",
)
TASKS = ("classification", "segmentation")
#: Architectures whose output is a map per label (task "segmentation") rather than a logit per label.
SEGMENTATION_ARCHITECTURES = ("attention_unet",)
NORMALIZATIONS = ("zero_one", "imagenet", "xrv")
#: For MR volumes, whose intensities have no absolute scale: z-score over the voxels that are not
#: 0 (the background outside the head stays 0; MONAI NormalizeIntensity(nonzero=True)), or over all.
VOLUME_NORMALIZATIONS = ("zscore_nonzero", "zscore")
MULTIFRAME_POLICIES = ("middle", "all")
GATE_ACTIONS = ("abstain", "warn")


class ModelError(ConfigError):
    """A model manifest or its weights are not usable."""


@dataclass(frozen=True)
class Label:
    """One output of a multi-label model."""

    name: str
    threshold: float = 0.5
    code: tuple[str, str, str] | None = None  # (coding scheme designator, value, meaning)


@dataclass(frozen=True)
class InputSpec:
    """How DICOM pixels become the model's input tensor."""

    size: int
    channels: int = 1
    normalization: str = "zero_one"
    multiframe: str = "middle"
    window_center: float | None = None
    window_width: float | None = None
    volume: tuple[int, int, int] | None = None  # a segmentation model's grid (slices, rows, columns)


@dataclass(frozen=True)
class NetworkSpec:
    """The ``[network]`` table of an ``attention_unet``: MONAI ``AttentionUnet``'s parameters."""

    spatial_dims: int
    channels: tuple[int, ...]
    strides: tuple[int, ...]

    def parameters(self) -> dict[str, Any]:
        return {"spatial_dims": self.spatial_dims, "channels": self.channels, "strides": self.strides}


@dataclass(frozen=True)
class GateSpec:
    """The ``[gate]`` table: the reference of validated inputs and the score above which a frame is
    outside them."""

    reference: Path
    sha256: str
    threshold: float
    action: str = "abstain"


@dataclass(frozen=True)
class ModelManifest:
    """A validated ``model.toml``; paths are absolute."""

    path: Path
    name: str
    version: str
    architecture: str
    weights: Path
    sha256: str
    labels: tuple[Label, ...]
    input: InputSpec
    cam_layer: str
    intended_use: str
    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    gate: GateSpec | None = None
    sanity_accepted_failure: str = ""  # [sanity] accepted_failure: why a failed sanity check is accepted
    task: str = "classification"  # or "segmentation": one map per label, on the series as a volume
    network: NetworkSpec | None = None

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(label.name for label in self.labels)


class _Reader:
    """Typed access to a TOML table that reports mistakes with file and key."""

    def __init__(self, path: Path, table: dict[str, Any], prefix: str = "") -> None:
        self.path, self.table, self.prefix = path, table, prefix

    def fail(self, key: str, expected: str) -> ModelError:
        value = self.table.get(key, "<missing>")
        return ModelError(
            f"{self.path}: key '{self.prefix}{key}' = {value!r} is invalid; expected {expected}")

    def get(self, key: str, kind: type | tuple[type, ...], expected: str, default: Any = ...) -> Any:
        if key not in self.table:
            if default is ...:
                raise ModelError(f"{self.path}: required key '{self.prefix}{key}' is missing ({expected})")
            return default
        value = self.table[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise self.fail(key, expected)
        return value

    def choice(self, key: str, allowed: tuple[str, ...], default: Any = ...) -> str:
        value = self.get(key, str, f"one of {list(allowed)}", default)
        if value not in allowed:
            raise self.fail(key, f"one of {list(allowed)}")
        return str(value)

    def strings(self, key: str) -> tuple[str, ...]:
        value = self.get(key, list, "a list of strings", [])
        if not all(isinstance(v, str) for v in value):
            raise self.fail(key, "a list of strings")
        return tuple(value)

    def sub(self, key: str, known: set[str]) -> "_Reader":
        reader = _Reader(self.path, self.get(key, dict, f"a table [{key}]", {}), f"{self.prefix}{key}.")
        reader.only(known)
        return reader

    def only(self, known: set[str]) -> None:
        unknown = sorted(set(self.table) - known)
        if unknown:
            where = f"table '{self.prefix[:-1]}'" if self.prefix else "the manifest"
            raise ModelError(f"{self.path}: unknown key(s) {unknown} in {where}; "
                             f"expected keys from {sorted(known)}")

    def number(self, key: str, expected: str, default: Any = ...) -> Any:
        value = self.get(key, (int, float), expected, default)
        if value is not None and value is not default and not math.isfinite(value):
            raise self.fail(key, expected)
        return value


def _labels(reader: _Reader) -> tuple[Label, ...]:
    entries = reader.get("labels", list, "an array of tables [[labels]] with name and threshold")
    labels = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise reader.fail("labels", "an array of tables [[labels]]")
        item = _Reader(reader.path, entry, f"labels[{i}].")
        item.only({"name", "threshold", "code"})
        threshold = float(item.number("threshold", "a number in (0, 1)", 0.5))
        if not 0 < threshold < 1:
            raise item.fail("threshold", "a number in (0, 1)")
        code = item.get("code", list, "[scheme, value, meaning]", None)
        if code is not None and (len(code) != 3 or not all(isinstance(c, str) and c for c in code)):
            raise item.fail("code", "[scheme, value, meaning], three non-empty strings")
        labels.append(Label(item.get("name", str, "a label name"), threshold,
                            tuple(code) if code else None))
    names = [label.name for label in labels]
    if not labels or len(set(names)) != len(names):
        raise reader.fail("labels", "at least one label, names unique")
    return tuple(labels)


def _volume_input(reader: _Reader, network: "NetworkSpec | None") -> InputSpec:
    expected = "[slices, rows, columns], three sizes from 1 to 1024"
    grid = reader.get("volume", list, expected)
    if len(grid) != 3 or not all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 1024
                                 for n in grid):
        raise reader.fail("volume", expected)
    if network is not None:
        factor = math.prod(network.strides)
        axes = grid if network.spatial_dims == 3 else grid[1:]
        if any(n % factor for n in axes):
            raise reader.fail("volume", f"sizes divisible by {factor} (the product of network.strides) on "
                                        f"the {network.spatial_dims} axes the network sees")
    channels = reader.get("channels", int, "1", 1)
    if channels != 1:
        raise reader.fail("channels", "1 (a volume has one channel)")
    return InputSpec(0, 1, reader.choice("normalization", VOLUME_NORMALIZATIONS, "zscore_nonzero"),
                     volume=(grid[0], grid[1], grid[2]))


def _network(top: _Reader, architecture: str) -> NetworkSpec | None:
    if architecture not in SEGMENTATION_ARCHITECTURES:
        if "network" in top.table:
            raise top.fail("network", f"no [network] table for architecture {architecture!r}")
        return None
    if "network" not in top.table:
        raise ModelError(f"{top.path}: required table [network] is missing (spatial_dims, channels, "
                         f"strides of {architecture})")
    reader = top.sub("network", {"spatial_dims", "channels", "strides"})
    dims = reader.get("spatial_dims", int, "2 or 3")
    if dims not in (2, 3):
        raise reader.fail("spatial_dims", "2 or 3")
    channels = reader.get("channels", list, "a list of at least 2 channel counts, each >= 1")
    if len(channels) < 2 or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1
                                    for c in channels):
        raise reader.fail("channels", "a list of at least 2 channel counts, each >= 1")
    strides = reader.get("strides", list, "one stride per channel count but the first, each >= 1")
    if len(strides) != len(channels) - 1 or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1
                                                    for n in strides):
        raise reader.fail("strides", f"{len(channels) - 1} strides (one per channel count but the first), "
                                     "each >= 1")
    return NetworkSpec(dims, tuple(channels), tuple(strides))


def _input(reader: _Reader) -> InputSpec:
    size = reader.get("size", int, "the input side in pixels, 32 to 4096")
    channels = reader.get("channels", int, "1 or 3", 1)
    if not 32 <= size <= 4096:
        raise reader.fail("size", "the input side in pixels, 32 to 4096")
    if channels not in (1, 3):
        raise reader.fail("channels", "1 or 3")
    center = reader.number("window_center", "a finite number", None)
    width = reader.number("window_width", "a finite number greater than 1", None)
    if (center is None) != (width is None) or (width is not None and width <= 1):
        raise reader.fail("window_width", "window_center and window_width together, width > 1")
    return InputSpec(size, channels, reader.choice("normalization", NORMALIZATIONS, "zero_one"),
                     reader.choice("multiframe", MULTIFRAME_POLICIES, "middle"),
                     None if center is None else float(center), None if width is None else float(width))


def _sha256(reader: _Reader, what: str) -> str:
    value = str(reader.get("sha256", str, f"{what}'s SHA-256, 64 hex digits")).lower()
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise reader.fail("sha256", f"{what}'s SHA-256, 64 hex digits")
    return value


def _gate(top: _Reader) -> GateSpec | None:
    if "gate" not in top.table:
        return None
    reader = top.sub("gate", {"reference", "sha256", "threshold", "action"})
    threshold = float(reader.number("threshold", "a positive number (the out-of-distribution score)"))
    if threshold <= 0:
        raise reader.fail("threshold", "a positive number (the out-of-distribution score)")
    reference = reader.get("reference", str, "the reference file, relative to the manifest")
    return GateSpec(reader.path.parent / reference,
                    _sha256(reader, "the reference file"), threshold,
                    reader.choice("action", GATE_ACTIONS, "abstain"))


def load_manifest(path: Path) -> ModelManifest:
    """Read and check one ``model.toml`` (the weights file is checked by the registry).

    Raises
    ------
    ModelError
        Naming the file, the key, the value and what was expected.
    """
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ModelError(f"{path}: not UTF-8 text; a model manifest is a UTF-8 TOML file") from None
    except OSError as exc:
        raise ModelError(f"{path}: cannot read model manifest ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ModelError(f"{path}: not valid TOML ({exc})") from None
    top = _Reader(path, document)
    top.only({"name", "version", "architecture", "weights", "sha256", "labels", "input", "cam_layer",
              "intended_use", "scope", "gate", "sanity", "task", "network"})
    sha256 = _sha256(top, "the weights file")
    architecture = top.choice("architecture", ARCHITECTURES)
    task = top.choice("task", TASKS, "classification")
    if (task == "segmentation") != (architecture in SEGMENTATION_ARCHITECTURES):
        kind = "segmentation" if architecture in SEGMENTATION_ARCHITECTURES else "classification"
        raise top.fail("task", f"{kind!r}: architecture {architecture!r} is a {kind} network")
    if task == "segmentation" and "gate" in top.table:
        raise top.fail("gate", "no [gate] for a segmentation model: the input-distribution gate scores "
                               "2D frames (not yet volumes)")
    network = _network(top, architecture)
    scope = top.sub("scope", {"modalities", "body_parts"})
    cam_layer = top.get("cam_layer", str, "the name of the layer CAM methods use")
    if not cam_layer.strip():
        raise top.fail("cam_layer", "the name of a layer of the model, not empty")
    return ModelManifest(
        path=path,
        name=top.get("name", str, "the model's name"),
        version=top.get("version", str, "a version string"),
        architecture=architecture,
        weights=(path.parent / top.get("weights", str, "the weights file, relative to the manifest")),
        sha256=sha256,
        labels=_labels(top),
        input=(_volume_input(top.sub("input", {"volume", "channels", "normalization"}), network)
               if task == "segmentation" else
               _input(top.sub("input", {"size", "channels", "normalization", "multiframe",
                                        "window_center", "window_width"}))),
        cam_layer=cam_layer,
        intended_use=top.get("intended_use", str, "the intended-use statement"),
        modalities=scope.strings("modalities"),
        body_parts=scope.strings("body_parts"),
        gate=_gate(top),
        sanity_accepted_failure=top.sub("sanity", {"accepted_failure"}).get(
            "accepted_failure", str, "why the model's failed sanity check is accepted", ""),
        task=task,
        network=network,
    )
