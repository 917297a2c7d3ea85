"""DCMTK's echoscu and storescu as real peers of the node running as a subprocess."""

import os
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from dicom_node.store import InstanceStore
from tests.conftest import require_tool
from tests.factories import ct_dataset, new_uid, save
from tests.nodeproc import NodeProcess

pytestmark = pytest.mark.peers

UNCOMPRESSED = ["CT_small.dcm", "MR_small.dcm", "test-SR.dcm", "liver_1frame.dcm", "waveform_ecg.dcm"]
# storescu sends a file in its own transfer syntax only with -R and the option proposing it;
# otherwise it converts to explicit little endian (or fails for compressed data).
AS_IS = {
    "MR_small_implicit.dcm": "-xi",
    "MR_small_bigendian.dcm": "-xb",
    "MR_small_jp2klossless.dcm": "-xv",
    "JPEG2000.dcm": "-xw",
    "MR_small_RLE.dcm": "-xr",
    "SC_rgb_jpeg_dcmtk.dcm": "-xy",
    "JPGExtended.dcm": "-xx",
    "SC_rgb_jpeg_gdcm.dcm": "-xs",
    "MR_small_jpeg_ls_lossless.dcm": "-xt",
    "JPEGLSNearLossless_16.dcm": "-xu",
    "image_dfl.dcm": "-xd",
}
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}  # Debian's DCMTK disables Nagle only with this


def _copy(name: str, folder: Path) -> Path:
    """A copy of a bundled sample under new UIDs (several samples share a SOP Instance UID)."""
    ds = dcmread(get_testdata_file(name))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = new_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = new_uid(), new_uid()
    return save(ds, folder)


def run_storescu(port: int, options: list[str], paths: list[Path]) -> None:
    program = require_tool("storescu", "dcmtk")
    result = subprocess.run(
        [program, "-aet", "MODALITY", "-aec", "XAI_NODE", *options, "127.0.0.1", str(port),
         *map(str, paths)],
        capture_output=True, text=True, timeout=120, env=DCMTK_ENV,
    )
    assert result.returncode == 0, result.stderr


def test_echoscu(tmp_path: Path) -> None:
    program = require_tool("echoscu", "dcmtk")
    with NodeProcess(tmp_path) as node:
        ok = subprocess.run([program, "-aec", "XAI_NODE", "127.0.0.1", str(node.port)],
                            capture_output=True, text=True, timeout=60, env=DCMTK_ENV)
        wrong = subprocess.run([program, "-aec", "NOT_ME", "127.0.0.1", str(node.port)],
                               capture_output=True, text=True, timeout=60, env=DCMTK_ENV)
    assert ok.returncode == 0, ok.stderr
    assert wrong.returncode != 0 and "Called AE Title Not Recognized" in wrong.stderr


def test_storescu_sends_a_folder_of_mixed_files(tmp_path: Path) -> None:
    require_tool("storescu", "dcmtk")
    folder = tmp_path / "mixed"
    plain = [_copy(name, folder / "plain") for name in UNCOMPRESSED]
    plain += [save(ct_dataset(size=64), folder / "plain") for _ in range(20)]
    compressed = {_copy(name, folder / "as-is"): option for name, option in AS_IS.items()}

    with NodeProcess(tmp_path / "node") as node:
        run_storescu(node.port, ["-R", "+sd"], [folder / "plain"])  # one association; -R: SEG too
        for path, option in compressed.items():
            run_storescu(node.port, ["-R", option], [path])
        node.stop()

    store = InstanceStore(node.data_dir)
    try:
        assert store.index.counts()[2] == len(plain) + len(compressed)
        for path in [*plain, *compressed]:
            sent = dcmread(path)
            record = store.index.get(sent.SOPInstanceUID)
            assert record is not None, path.name
            assert record.calling_ae_title == "MODALITY"
            stored = dcmread(store.path_of(record))
            assert stored.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID, path.name
            if "PixelData" in sent:
                assert stored.PixelData == sent.PixelData, path.name
    finally:
        store.close()
