"""Tiny model repositories built in tests: a manifest writer and seeded weights."""

from pathlib import Path

import torch

from dicom_node.inference.architectures import BUILDERS
from dicom_node.inference.registry import sha256_of

LABELS = ("nodule", "consolidation", "effusion", "cardiomegaly")


def write_model(
    root: Path, name: str = "tiny", architecture: str = "small_cnn", labels: tuple[str, ...] = LABELS,
    size: int = 64, channels: int = 1, cam_layer: str = "features.conv3", extra: str = "",
    normalization: str = "zero_one", seed: int = 0,
) -> Path:
    """A model folder with seeded random weights and a manifest; returns the manifest's path."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    weights = folder / "weights.pt"
    if architecture == "torchscript":
        module = torch.jit.script(BUILDERS["small_cnn"](len(labels), channels).eval())
        module.save(str(weights))
    else:
        torch.save(BUILDERS[architecture](len(labels), channels).state_dict(), weights)
    label_tables = "".join(f'\n[[labels]]\nname = "{label}"\nthreshold = 0.5\n' for label in labels)
    manifest = folder / "model.toml"
    manifest.write_text(
        f'name = "{name}"\nversion = "0.1"\narchitecture = "{architecture}"\nweights = "weights.pt"\n'
        f'sha256 = "{sha256_of(weights)}"\ncam_layer = "{cam_layer}"\n'
        f'intended_use = "tests only"\n{extra}\n'
        f'[input]\nsize = {size}\nchannels = {channels}\nnormalization = "{normalization}"\n'
        f'[scope]\nmodalities = ["CR", "DX"]\n{label_tables}'
    )
    return manifest
