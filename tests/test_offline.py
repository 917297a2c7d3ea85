"""``dicom-node explain`` as an operator reads it: files and descriptions named, honest exit codes."""

from pathlib import Path

import pytest

from dicom_node.cli import main
from tests.test_cli import EXPLAIN_CONFIG

MODELS = Path(__file__).resolve().parents[1] / "models"


def _config(tmp_path: Path) -> Path:
    config = tmp_path / "node.toml"
    config.write_text(EXPLAIN_CONFIG.format(models=MODELS))
    return config


def _ct(folder: Path) -> Path:
    from dicom_node.phantoms.cross_section import cross_section

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "axial-ct.dcm"
    cross_section(3, "CT", size=64).dataset.save_as(path, enforce_file_format=True)
    return path


def test_explain_names_files_and_series_descriptions(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from dicom_node.phantoms import write_study

    inputs = tmp_path / "in"
    [written] = write_study(inputs / "cr", 1, seed=3_000_002, size=256, findings={"nodule": True})
    chest = written.rename(written.with_name("chest-pa.dcm"))
    ct = _ct(inputs)
    assert main(["explain", str(inputs), "--out", str(tmp_path / "out"), "--config", str(_config(tmp_path))]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split()[:3] == ["FILES", "SERIES", "DESCRIPTION"]
    chest_row = next(r for r in rows if str(chest) in r)
    assert "Phantom chest PA CR" in chest_row and "analysed: nodule" in chest_row
    ct_row = next(r for r in rows if str(ct) in r)
    assert "Phantom chest axial CT" in ct_row and "not routed" in ct_row
    assert not any(len(word) == 24 and word.startswith("…") for r in rows for word in r.split())


def test_explain_exits_1_when_nothing_was_analysed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ct = _ct(tmp_path / "in")
    assert main(["explain", str(ct), "--out", str(tmp_path / "out"), "--config", str(_config(tmp_path))]) == 1
    out = capsys.readouterr().out
    assert "not routed" in out and "nothing was analysed" in out


def test_explain_on_an_empty_folder_says_no_dicom_files_found(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["explain", str(empty), "--out", str(tmp_path / "out"), "--config", str(_config(tmp_path))]) == 1
    assert f"no DICOM files found in {empty}" in capsys.readouterr().out


def test_explain_words_its_own_message_for_files_that_are_not_dicom(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "notes.txt").write_text("not DICOM")
    (inputs / "truncated.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")
    assert main(["explain", str(inputs), "--out", str(tmp_path / "out"), "--config", str(_config(tmp_path))]) == 1
    out = capsys.readouterr().out
    assert f"skipped {inputs / 'notes.txt'}: not a DICOM file" in out
    assert f"skipped {inputs / 'truncated.dcm'}:" in out
    assert "force" not in out.lower() and "no DICOM files found" in out


def test_explain_writes_nothing_for_a_series_of_several_patients(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pydicom import dcmread

    from dicom_node.phantoms import write_study

    paths = write_study(tmp_path / "in", 2, seed=3_000_002, size=256)
    second = dcmread(paths[1])
    second.PatientID = "ANOTHER-PATIENT"  # same study and series UIDs: a broken anonymiser
    second.save_as(paths[1], enforce_file_format=True)
    out_dir = tmp_path / "out"
    assert main(["explain", str(tmp_path / "in"), "--out", str(out_dir), "--config", str(_config(tmp_path))]) == 1
    out = capsys.readouterr().out
    assert "instances of several patients in one study/series: not analysed; nothing written" in out
    assert not list(out_dir.rglob("*.dcm"))


def test_explain_abstains_on_input_unlike_the_models_as_serve_does(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """An inverted radiograph is outside the demo model's validated input: no finding is written,
    only the "not analysed" report naming the gate's score and threshold."""
    from pydicom import dcmread

    from tests.inference.ood import as_chest_cr, inverted

    inputs = tmp_path / "in"
    inputs.mkdir()
    ds = as_chest_cr(inverted(4_000_123, 256), 4_000_123)
    ds.save_as(inputs / "inverted.dcm", enforce_file_format=True)
    out = tmp_path / "out"
    assert main(["explain", str(inputs), "--out", str(out), "--config", str(_config(tmp_path))]) == 1
    assert "not analysed: outside the validated input" in capsys.readouterr().out
    [report] = [dcmread(p) for p in out.rglob("*.dcm")]
    texts = [str(element.value) for element in report.iterall() if element.keyword == "TextValue"]
    assert report.Modality == "SR" and any("outside the validated input" in text for text in texts)
