"""``dicom-node models calibrate NAME FOLDER``: the reference written next to the weights, the
``[gate]`` lines printed (or written with ``--update``), the held-out false-abstention rate."""

import re
import shutil
from pathlib import Path

import pytest

from dicom_node.cli import main
from dicom_node.inference import InferenceRunner, ModelRegistry, load_manifest
from dicom_node.inference.calibrate import read_folder
from dicom_node.inference.registry import sha256_of
from dicom_node.phantoms import render, to_dataset

REPO_MODELS = Path(__file__).resolve().parents[2] / "models"


@pytest.fixture
def models(tmp_path: Path) -> Path:
    shutil.copytree(REPO_MODELS / "demo-cxr", tmp_path / "models" / "demo-cxr",
                    ignore=shutil.ignore_patterns("reference.npz"))
    return tmp_path / "models"


def _folder(tmp_path: Path, count: int) -> Path:
    folder = tmp_path / "site"
    (folder / "sub").mkdir(parents=True)
    for i in range(count):
        ds = to_dataset(render(8_000_000 + i, 128), modality="DX" if i % 2 else "CR")
        ds.save_as(folder / "sub" / f"{i}.dcm", enforce_file_format=True)
    (folder / "README.txt").write_text("not DICOM: skipped")
    return folder


def test_calibrate_writes_the_reference_and_prints_the_lines_and_the_rate(
    models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _folder(tmp_path, 30)
    manifest = models / "demo-cxr" / "model.toml"
    before = manifest.read_text()
    assert main(["models", "calibrate", "demo-cxr", str(folder), "--set", f"models.dir={models}"]) == 0
    out = capsys.readouterr().out
    reference = models / "demo-cxr" / "reference.npz"
    assert reference.is_file() and manifest.read_text() == before  # printed, not written
    rate = re.search(r"false-abstention rate on 6 held-out frame\(s\): (\d+\.\d)%", out)
    assert rate is not None and 0.0 <= float(rate.group(1)) <= 100.0, out
    assert "reference of 24 frame(s)" in out and f'sha256 = "{sha256_of(reference)}"' in out
    assert "put these lines in" in out and re.search(r"^threshold = \d+\.\d+$", out, re.M)

    assert main(["models", "calibrate", "demo-cxr", str(folder), "--update", "--set", f"models.dir={models}"]) == 0
    assert "updated with" in capsys.readouterr().out
    gate = load_manifest(manifest).gate
    assert gate is not None and gate.sha256 == sha256_of(reference) and gate.action == "abstain"
    assert manifest.read_text().count("[gate]") == 1
    assert ModelRegistry(models).load("demo-cxr").reference is not None


def test_calibrate_refuses_a_folder_with_too_few_images(
    models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _folder(tmp_path, 5)
    assert main(["models", "calibrate", "demo-cxr", str(folder), "--set", f"models.dir={models}"]) == 2
    assert "at least 20 frames; got 5" in capsys.readouterr().err
    assert not (models / "demo-cxr" / "reference.npz").exists()


def test_a_dicom_file_without_pixels_in_the_folder_is_skipped_not_fatal(tmp_path: Path) -> None:
    """A site's folder holds reports too (an SR has no Pixel Data): calibration skips them."""
    folder = _folder(tmp_path, 3)
    report = to_dataset(render(8_100_000, 128))
    del report.PixelData
    report.save_as(folder / "report.dcm", enforce_file_format=True)
    runner = InferenceRunner(ModelRegistry(REPO_MODELS), "cpu")
    assert len(read_folder(folder, runner, "demo-cxr")) == 3
