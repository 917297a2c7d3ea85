"""The brain MR path against real peers: DCMTK's storescu sends a phantom brain MR series to the
node; the node segments it with the shipped attention U-Net and sends a SEG, SC overlays and a
TID 1500 SR back into the same study on Orthanc. What comes back is judged against the phantom's
exact lesion: the SEG's overlap (Dice), read with highdicom on the source instances, and the SR's
volume against the true volume."""

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicom_node.phantoms.brain import render_brain
from dicom_node.phantoms.mr import write_brain
from tests.conftest import require_tool
from tests.encode.conftest import dciodvfy_errors
from tests.jobs.test_crash import wait_for
from tests.nodeproc import REPO, NodeProcess
from tests.orthanc import Orthanc
from tests.peers.test_dcmtk import run_storescu

pytestmark = pytest.mark.peers
MODEL = "brain-lesion"
SEED = 1_000_103  # held out: not among the training (0-63) or threshold (900000-900011) seeds; a 7 cm3 lesion


def brain_config(pacs_port: int) -> str:
    return f"""
[models]
dir = "{REPO / 'models'}"
[study]
stable_seconds = 0.5
[workers]
count = 1
poll_seconds = 0.1
[[destinations]]
name = "pacs"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {pacs_port}
[[pipelines]]
name = "brain"
model = "{MODEL}"
match = {{ modality = ["MR"] }}
explain = ["attention", "seggradcam"]
outputs = ["seg", "sc", "sr"]
send_to = ["pacs"]
"""


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[tuple[Orthanc, NodeProcess]]:
    program = require_tool("Orthanc", "orthanc")
    node = NodeProcess(tmp_path / "node", extra_config="")
    pacs = Orthanc(tmp_path / "orthanc", program, {"node": ("XAI_NODE", node.port)})
    node.config.write_text(node.config.read_text() + brain_config(pacs.dicom_port))
    with pacs, node:
        yield pacs, node


def _outputs(node: NodeProcess) -> tuple[str, set[str]]:
    with sqlite3.connect(node.data_dir / "index.sqlite") as conn:
        rows = conn.execute("SELECT state, results FROM jobs").fetchall()
    if len(rows) != 1:
        return "", set()
    state, results = rows[0]
    return state, {o["sop_instance_uid"] for o in json.loads(results or "{}").get("outputs", [])}


def test_a_brain_series_sent_by_storescu_comes_back_as_seg_sc_and_sr(
    tmp_path: Path, peers: tuple[Orthanc, NodeProcess]
) -> None:
    pacs, node = peers
    dciodvfy = require_tool("dciodvfy", "dicom3tools")
    phantom = render_brain(SEED, spacing=2.0, lesion=True)
    assert phantom.lesion_volume_mm3 >= 1000  # the accuracy claim is for lesions of 1 cm3 or more
    paths = write_brain(tmp_path / "mr", phantom)
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]  # slice order
    study_uid = str(sources[0].StudyInstanceUID)
    run_storescu(node.port, [], paths)

    def back() -> list[dict]:
        return [i for i in pacs.instances_of_study(study_uid)
                if pacs.get(f"/instances/{i['ID']}/simplified-tags").get("Manufacturer") == "dicom-node"]

    def arrived() -> bool:
        state, expected = _outputs(node)
        got = {i["MainDicomTags"].get("SOPInstanceUID") for i in back()}
        return state == "done" and bool(expected) and expected <= got
    wait_for(arrived, timeout=240, what="the node's SEG, SC and SR in Orthanc")

    files = {}
    for instance in back():
        path = tmp_path / "back" / f"{instance['ID']}.dcm"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(pacs.get(f"/instances/{instance['ID']}/file", raw=True))
        errors, output = dciodvfy_errors(dciodvfy, path)
        assert not errors, output
        files[path] = pydicom.dcmread(path)
    kinds = sorted(ds.Modality for ds in files.values())
    assert kinds.count("SEG") == 1 and kinds.count("SR") == 1 and kinds.count("OT") >= 1, kinds

    [seg_path] = [p for p, ds in files.items() if ds.Modality == "SEG"]
    seg = hd.seg.segread(seg_path)
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    uids = [str(ds.SOPInstanceUID) for ds in sources]
    mask = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[1], ignore_spatial_locations=False,
        assert_missing_frames_are_empty=True)[..., 0].astype(bool)
    assert mask.shape == phantom.lesion.shape
    truth = phantom.lesion.astype(bool)
    dice = 2 * np.logical_and(mask, truth).sum() / (mask.sum() + truth.sum())
    assert dice >= 0.8, f"Dice {dice:.3f} against the phantom's lesion"
    for frame in seg.PerFrameFunctionalGroupsSequence:  # each frame lies where its source slice does
        source = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose([float(v) for v in position],
                                   [float(v) for v in sources[uids.index(source)].ImagePositionPatient], atol=1e-3)

    [sr_path] = [p for p, ds in files.items() if ds.Modality == "SR"]
    report = hd.sr.srread(sr_path)
    [group] = report.content.get_volumetric_roi_measurement_groups()
    volumes = {m.derivation.value if m.derivation is not None else "": m
               for m in group.get_measurements(name=hd.sr.CodedConcept("118565006", "SCT", "Volume"))}
    volume = volumes["255619001"]  # Total: every piece of the mask (the phantom's lesion is one piece)
    assert volume.unit.value == "mm3"
    assert volume.value == pytest.approx(phantom.lesion_volume_mm3, rel=0.10)
    assert str(seg.SOPInstanceUID) in str(files[sr_path])  # the SEG is the measurement's region
