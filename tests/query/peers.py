"""A running node with inputs and its own pipeline's results, for the Q/R tests with real peers:
two CR studies of two patients (analysed: SC overlays and a TID 1500 SR each) and a CT study
(not analysable by the demo model: a "not analysed" SR), each with its own Study Date and
Accession Number; and a DCMTK ``storescp`` as the move destination ARCHIVE."""

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from dicom_node.phantoms import write_study
from dicom_node.phantoms.cross_section import cross_section
from tests.conftest import require_tool
from tests.nodeproc import CONFIG, REPO, NodeProcess, free_port
from tests.peers.test_dcmtk import DCMTK_ENV, run_storescu

#: The peers' AE titles: DCMTK's defaults, and Orthanc.
QUERY_PEERS = ("FINDSCU", "GETSCU", "MOVESCU", "ORTHANC", "PROBE")


def node_config(archive_port: int, extra: str = "") -> str:
    return f"""
[models]
dir = "{REPO / 'models'}"
[study]
stable_seconds = 0.5
[workers]
count = 1
poll_seconds = 0.1
[[destinations]]
name = "archive"
ae_title = "ARCHIVE"
host = "127.0.0.1"
port = {archive_port}
{extra}
[[pipelines]]
name = "chest"
model = "demo-cxr"
match = {{ modality = ["CR", "DX"] }}
explain = ["gradcam"]
outputs = ["sc", "sr"]
[[pipelines]]
name = "ct-to-chest"
model = "demo-cxr"
match = {{ modality = ["CT"] }}
outputs = ["sr"]
"""


@dataclass
class Studies:
    """What was sent: per study its UID, patient ID, date, accession and input SOP Instance UIDs."""

    uid: dict[str, str] = field(default_factory=dict)
    patient: dict[str, str] = field(default_factory=dict)
    inputs: dict[str, list[str]] = field(default_factory=dict)


DATES = {"alpha": "20240105", "beta": "20240220", "ct": "20231230"}


def write_inputs(folder: Path) -> tuple[list[Path], Studies]:
    studies = Studies()
    paths: list[Path] = []
    made = {"alpha": write_study(folder / "alpha", 2, seed=4_100_001, size=256, modality="CR",
                                 findings={"nodule": True}),
            "beta": write_study(folder / "beta", 1, seed=4_200_001, size=256, modality="DX")}
    (folder / "ct").mkdir()
    made["ct"] = []
    for i in range(2):
        piece = cross_section(9, "CT", size=64, position=i)
        path = folder / "ct" / f"ct{i}.dcm"
        piece.dataset.save_as(path, enforce_file_format=True)
        made["ct"].append(path)
    for name, files in made.items():
        for path in files:
            ds = pydicom.dcmread(path)
            ds.StudyDate, ds.AccessionNumber = DATES[name], f"ACC-{name.upper()}"
            ds.save_as(path, enforce_file_format=True)
            studies.uid[name], studies.patient[name] = str(ds.StudyInstanceUID), str(ds.PatientID)
            studies.inputs.setdefault(name, []).append(str(ds.SOPInstanceUID))
        paths += files
    return paths, studies


def c_find(port: int, identifier: Dataset, calling: str = "PROBE") -> list[Dataset]:
    """C-FIND (Study Root) with pynetdicom; the matches, or [] if the node failed the request."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="XAI_NODE")
    assert assoc.is_established
    try:
        return [ds for status, ds in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind)
                if status and status.Status in (0xFF00, 0xFF01) and ds is not None]
    finally:
        assoc.release()


def results_of(port: int, study_uid: str) -> list[Dataset]:
    """The node's SR results in a study (IMAGE level)."""
    query = Dataset()
    query.QueryRetrieveLevel, query.StudyInstanceUID, query.Modality = "IMAGE", study_uid, "SR"
    query.SOPInstanceUID = query.SeriesInstanceUID = query.SOPClassUID = ""
    return c_find(port, query)


@dataclass
class QRNode:
    node: NodeProcess
    studies: Studies
    archive_dir: Path
    folder: Path


def start_archive(folder: Path, port: int) -> subprocess.Popen[bytes]:
    program = require_tool("storescp", "dcmtk")
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([program, "-aet", "ARCHIVE", "-od", str(folder), "+xa", str(port)],
                            env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def running_node(folder: Path, extra: str = "", port: int | None = None) -> Iterator[QRNode]:
    """Start the archive and the node (on ``port``, default a free one; ``extra`` adds to its
    config's destinations), send the inputs, wait for every study's results."""
    archive_port = free_port()
    archive = start_archive(folder / "archive", archive_port)
    try:
        (folder / "node").mkdir(parents=True)
        base = CONFIG.format(grace=5.0, web_port=free_port()).replace(
            'data_dir = "data"', f'data_dir = "data"\nquery_peers = {list(QUERY_PEERS)!r}')
        (folder / "node" / "node.toml").write_text(base + node_config(archive_port, extra))
        node = NodeProcess(folder / "node")
        node.port = port or node.port
        with node:
            paths, studies = write_inputs(folder / "inputs")
            run_storescu(node.port, [], paths)
            deadline = time.monotonic() + 240
            while not all(results_of(node.port, uid) for uid in studies.uid.values()):
                assert time.monotonic() < deadline, (node.log.read_text()[-3000:])
                time.sleep(0.5)
            yield QRNode(node, studies, folder / "archive", folder)
    finally:
        archive.terminate()
        archive.wait(timeout=10)
