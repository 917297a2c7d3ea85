"""The actor's class in-process (no Ray): it refuses a model whose identity (version, manifest,
weights, gate reference) is not the node's."""

import re
from collections.abc import Iterator
from pathlib import Path

import cv2
import pytest
import torch

from dicom_node.config import ModelsSettings, Pipeline, Settings
from dicom_node.inference import ModelError, ModelRegistry
from dicom_node.scaleout.actor import ComputeActor, identity
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


def node_identity() -> dict[str, str]:
    return identity(ModelRegistry(REPO / "models").manifest("demo-cxr"))


@pytest.mark.parametrize("key", ["weights_sha256", "manifest_sha256", "gate_reference_sha256", "version",
                                 "dicom_node_version", "dicom_node_sha256", "torch_version"])
def test_an_actor_refuses_a_model_other_than_the_nodes(key: str) -> None:
    """The code too: a host with another dicom-node or torch computes other numbers."""
    assert node_identity()[key] or key == "gate_reference_sha256"
    expected = {**node_identity(), key: "0" * 64}
    with pytest.raises(ModelError) as caught:
        ComputeActor(SETTINGS, "demo-cxr", expected, "cpu", 1)
    message = str(caught.value)
    assert f"{key} " in message and "'000000000000' at the node" in message, message
    assert [k for k in node_identity() if re.search(rf"[(,] {k} '|\({k} '", message)] == [key]  # only what differs


def test_the_code_hash_is_that_of_the_compute_sources_wherever_they_are_installed(tmp_path: Path) -> None:
    """Another install path, compiled files and CRLF line endings leave it; a change to what an
    actor does not run (the dashboard) leaves it; a change to what it runs does not."""
    import shutil

    import dicom_node
    from dicom_node.scaleout.actor import code_sha256

    here = Path(dicom_node.__file__).parent
    there = tmp_path / "site-packages" / "dicom_node"
    shutil.copytree(here, there, ignore=shutil.ignore_patterns("__pycache__"))
    (there / "inference" / "__pycache__").mkdir()
    (there / "inference" / "__pycache__" / "gate.cpython-311.pyc").write_bytes(b"compiled")
    gate = there / "inference" / "gate.py"
    gate.write_bytes(gate.read_bytes().replace(b"\n", b"\r\n"))
    assert code_sha256(there) == code_sha256() == node_identity()["dicom_node_sha256"]
    server = there / "web" / "server.py"
    server.write_text(server.read_text() + "\n# the dashboard changed\n")
    assert code_sha256.__wrapped__(there) == code_sha256()
    gate.write_text(gate.read_text() + "\n# the gate changed\n")
    assert code_sha256.__wrapped__(there) != code_sha256()
    assert node_identity()["torch_version"] == torch.__version__.split("+")[0]



def copy_model(tmp_path: Path) -> Path:
    copy = tmp_path / "models" / "demo-cxr"
    copy.mkdir(parents=True)
    for path in (REPO / "models" / "demo-cxr").iterdir():
        if path.is_file():
            copy.joinpath(path.name).write_bytes(path.read_bytes())
    return copy


def test_an_actor_on_a_host_with_other_thresholds_is_refused(tmp_path: Path) -> None:
    """Same weights, same gate reference, another threshold in model.toml: other findings."""
    copy = copy_model(tmp_path)
    manifest = copy / "model.toml"
    manifest.write_text(manifest.read_text().replace("threshold = 0.5", "threshold = 0.4", 1))
    settings = Settings(models=ModelsSettings(dir=tmp_path / "models"), pipelines=SETTINGS.pipelines)
    with pytest.raises(ModelError, match=r"manifest_sha256 .* at the node"):
        ComputeActor(settings, "demo-cxr", node_identity(), "cpu", 1)


def test_an_actor_checks_its_own_files_too(tmp_path: Path) -> None:
    copy = copy_model(tmp_path)
    manifest = ModelRegistry(REPO / "models").manifest("demo-cxr")
    weights = copy / manifest.weights.name
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # damaged on the Ray host
    weights.write_bytes(bytes(data))
    settings = Settings(models=ModelsSettings(dir=tmp_path / "models"), pipelines=SETTINGS.pipelines)
    with pytest.raises(ModelError, match="sha256"):
        ComputeActor(settings, "demo-cxr", node_identity(), "cpu", 1)


def test_an_actor_describes_its_model_and_device() -> None:
    sha256 = ModelRegistry(REPO / "models").manifest("demo-cxr").sha256
    info = ComputeActor(SETTINGS, "demo-cxr", node_identity(), "cpu", 1).describe()
    assert (info["model"], info["sha256"], info["device"], info["threads"]) == ("demo-cxr", sha256, "cpu", 1)
    assert info["identity"] == node_identity()
