"""The actor's class in-process (no Ray): it checks the weights' sha256 the node names."""

from collections.abc import Iterator
from pathlib import Path

import cv2
import pytest
import torch

from dicom_node.config import ModelsSettings, Pipeline, Settings
from dicom_node.inference import ModelError, ModelRegistry
from dicom_node.scaleout.actor import ComputeActor
from tests.nodeproc import REPO

SETTINGS = Settings(models=ModelsSettings(dir=REPO / "models"),
                    pipelines=(Pipeline(name="chest", model="demo-cxr", explain=("gradcam",)),))


@pytest.fixture(autouse=True)
def threads() -> Iterator[None]:
    """An actor sets its process's thread counts: give this test process its own back."""
    before = torch.get_num_threads(), cv2.getNumThreads()
    yield
    torch.set_num_threads(before[0])
    cv2.setNumThreads(before[1])


def test_an_actor_refuses_weights_other_than_the_nodes() -> None:
    with pytest.raises(ModelError, match="the node runs 000000000000"):
        ComputeActor(SETTINGS, "demo-cxr", "0" * 64, "cpu", 1)


def test_an_actor_checks_its_own_files_too(tmp_path: Path) -> None:
    copy = tmp_path / "models" / "demo-cxr"
    copy.mkdir(parents=True)
    source = REPO / "models" / "demo-cxr"
    for path in source.iterdir():
        if path.is_file():
            copy.joinpath(path.name).write_bytes(path.read_bytes())
    manifest = ModelRegistry(REPO / "models").manifest("demo-cxr")
    weights = copy / manifest.weights.name
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # damaged on the Ray host
    weights.write_bytes(bytes(data))
    settings = Settings(models=ModelsSettings(dir=tmp_path / "models"), pipelines=SETTINGS.pipelines)
    with pytest.raises(ModelError, match="sha256"):
        ComputeActor(settings, "demo-cxr", manifest.sha256, "cpu", 1)


def test_an_actor_describes_its_model_and_device() -> None:
    sha256 = ModelRegistry(REPO / "models").manifest("demo-cxr").sha256
    info = ComputeActor(SETTINGS, "demo-cxr", sha256, "cpu", 1).describe()
    assert (info["model"], info["sha256"], info["device"], info["threads"]) == ("demo-cxr", sha256, "cpu", 1)
