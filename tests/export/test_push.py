"""``dicom-node send`` against the node itself: compressed files go as they are."""

import shutil
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from dicom_node.cli import main
from dicom_node.ingest.scp import IngestServer
from dicom_node.store import InstanceStore
from tests.factories import ct_dataset

# what pydicom ships: JPEG baseline/extended, JPEG 2000 (lossy and lossless), JPEG-LS, RLE (grey, RGB)
SHIPPED = ("JPEG-lossy.dcm", "JPEG2000.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
           "MR_small_RLE.dcm", "SC_rgb_rle.dcm")


def _compressed(folder: Path) -> dict[str, str]:
    """Compressed files in ``folder``: each file's name and its transfer syntax."""
    folder.mkdir()
    for name in SHIPPED:
        path = get_testdata_file(name)
        assert path is not None, name
        shutil.copy(path, folder / name)
    for name, syntax in (("ct-rle.dcm", RLELossless), ("ct-jls.dcm", JPEGLSLossless),
                         ("ct-j2k.dcm", JPEG2000Lossless)):
        ds = ct_dataset(size=64)
        ds.compress(syntax)  # pydicom's RLE; pyjpegls and pylibjpeg-openjpeg encoders
        ds.save_as(folder / name, enforce_file_format=True)
    return {p.name: str(dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID)
            for p in folder.iterdir()}


def _config(tmp_path: Path) -> Path:
    config = tmp_path / "send.toml"
    config.write_text('[node]\nae_title = "SENDER"\n')
    return config


def test_send_delivers_compressed_files_in_their_own_transfer_syntax(
        tmp_path: Path, node: IngestServer, store: InstanceStore, capsys: pytest.CaptureFixture[str]) -> None:
    syntaxes = _compressed(tmp_path / "in")
    assert set(syntaxes.values()) == {"1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90",
                                      "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.5"}  # JPEG, -LS, 2000 x2, RLE
    assert main(["send", str(tmp_path / "in"), "--to", f"XAI_NODE@127.0.0.1:{node.port}",
                 "--config", str(_config(tmp_path))]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sorted(line.split(": ")[0].rsplit("/", 1)[1] for line in lines if line.endswith(": ok")) \
        == sorted(syntaxes)
    assert lines[-1].startswith(f"sent {len(syntaxes)} of {len(syntaxes)} file(s) to XAI_NODE@127.0.0.1:")
    stored = {str(dcmread(store.path_of(r), stop_before_pixels=True).file_meta.TransferSyntaxUID)
              for r in store.index.instances()}
    assert stored == set(syntaxes.values())  # as sent: nothing was decompressed on the way


def test_send_reports_each_file_and_exits_1_when_one_is_refused(
        tmp_path: Path, node: IngestServer, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    ct_dataset().save_as(folder / "a-ct.dcm", enforce_file_format=True)
    odd = ct_dataset()
    odd.SOPClassUID = odd.file_meta.MediaStorageSOPClassUID = "1.2.826.0.1.3680043.10.1543.99.1"
    odd.save_as(folder / "b-private.dcm", enforce_file_format=True)
    (folder / "c-notes.txt").write_text("not DICOM")
    assert main(["send", str(folder), "--to", f"XAI_NODE@127.0.0.1:{node.port}",
                 "--config", str(_config(tmp_path))]) == 1
    out = capsys.readouterr().out
    assert f"{folder / 'a-ct.dcm'}: ok" in out
    assert f"{folder / 'b-private.dcm'}: failed, the peer accepted no presentation context" in out
    assert f"{folder / 'c-notes.txt'}: skipped, not a DICOM file" in out
    assert "sent 1 of 2 file(s)" in out and "1 failed" in out


def test_send_to_a_destination_by_name_and_its_usage_errors(
        tmp_path: Path, node: IngestServer, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "send.toml"
    config.write_text(f'[node]\nae_title = "SENDER"\n[[destinations]]\nname = "node"\nae_title = "XAI_NODE"\n'
                      f'host = "127.0.0.1"\nport = {node.port}\n')
    ct_dataset().save_as(tmp_path / "ct.dcm", enforce_file_format=True)
    assert main(["send", str(tmp_path / "ct.dcm"), "--to", "node", "--config", str(config)]) == 0
    assert "sent 1 of 1 file(s) to XAI_NODE@127.0.0.1:" in capsys.readouterr().out
    assert main(["send", str(tmp_path / "ct.dcm"), "--to", "nowhere", "--config", str(config)]) == 2
    assert "expected AET@HOST:PORT" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["send", str(empty), "--to", "node", "--config", str(config)]) == 1
    assert "no DICOM files found" in capsys.readouterr().out
    assert main(["send", str(tmp_path / "ct.dcm"), "--to", "WRONG@127.0.0.1:" + str(node.port),
                 "--config", str(config), "--timeout", "5"]) == 1
    assert "failed, association rejected" in capsys.readouterr().out
