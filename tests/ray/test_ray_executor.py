"""The Ray executor against a real local Ray cluster (a head and two worker nodes, each its own
raylet) and a real Orthanc: a study sent by storescu comes back with the same results as the
local executor gives; a Ray worker killed mid-job costs one attempt and no duplicate; a cluster
that is down at start holds the jobs (not failed, nothing reported) until it is up.

One cluster for the module (it takes about 15 s to start here). The first test starts it late,
on a port chosen in advance, to see the node wait for it."""

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom import Dataset

from tests.conftest import require_tool
from tests.jobs.test_crash import wait_for
from tests.nodeproc import NodeProcess, free_port, pacs_config
from tests.orthanc import Orthanc
from tests.peers.test_dcmtk import run_storescu
from tests.peers.test_orthanc_e2e import EXPORT, cr_study, delivered, expected_outputs, node_rows, results_in
from tests.ray.cluster import LocalCluster, kill, require_ray

pytestmark = pytest.mark.peers
DATE_TIME_VRS = ("DA", "TM", "DT")
#: Ray swaps a loopback address for the host's own IP, which the loopback-only cluster does not
#: listen on; with this (meant for one-machine clusters) it keeps 127.0.0.1
LOOPBACK_RAY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def node_config(pacs_port: int, executor: str, address: str = "") -> str:
    """The e2e config (Grad-CAM and LIME, SC and SR to the PACS) with one torch thread wherever
    the model runs (the quality figures differ in the 14th digit between 1 and 2 threads)."""
    workers = ("[workers]\ncount = 2\npoll_seconds = 0.1\n" + (
        f'executor = "ray"\nray_address = "{address}"\nray_actors_per_model = 2\nray_cpus_per_actor = 1\n'
        "ray_connect_seconds = 0.5\nray_call_timeout_seconds = 120\n" if executor == "ray" else ""))
    text = pacs_config(pacs_port, '["gradcam", "lime"]', export=EXPORT)
    text = text.replace("[workers]\ncount = 1\npoll_seconds = 0.1\n", workers).replace(
        "lime_samples = 1000", "lime_samples = 300")
    assert workers in text
    return text + "[inference]\nthreads = 1\n[jobs]\nbackoff_seconds = 0.5\nlease_seconds = 30\n"


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    require_ray()
    local = LocalCluster(free_port())
    try:
        yield local
    finally:
        local.shutdown()


@pytest.fixture
def orthanc_program() -> str:
    return require_tool("Orthanc", "orthanc")


def ray_node(folder: Path, program: str, address: str) -> tuple[Orthanc, NodeProcess]:
    node = NodeProcess(folder / "node", env=LOOPBACK_RAY)
    pacs = Orthanc(folder / "orthanc", program, {"node": ("XAI_NODE", node.port)})
    node.config.write_text(node.config.read_text() + node_config(pacs.dicom_port, "ray", address))
    return pacs, node


def web(node: NodeProcess, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.web_port}{path}", timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def actors(node: NodeProcess) -> list[dict[str, Any]]:
    status, body = web(node, "/api/actors")
    return json.loads(body) if status == 200 else []


def jobs(node: NodeProcess) -> list[tuple]:
    return node_rows(node, "SELECT state, attempts, reason FROM jobs")


def study_uid(paths: list[Path]) -> str:
    return str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)


def all_delivered(node: NodeProcess) -> bool:
    records = delivered(node)
    return bool(records) and {s for _, s, _ in records} == {"delivered"}


def without_dates(ds: Dataset) -> dict[str, Any]:
    """Every element but dates and times, nested sequences too, as comparable values."""
    out: dict[str, Any] = {}
    for element in ds:
        if element.VR in DATE_TIME_VRS:
            continue
        if element.VR == "SQ":
            out[str(element.tag)] = [without_dates(item) for item in element.value]
        else:
            out[str(element.tag)] = element.value
    return out


def test_jobs_wait_while_the_cluster_is_down_and_complete_once_it_is_up(
        tmp_path: Path, cluster: LocalCluster, orthanc_program: str) -> None:
    if cluster.running:  # run after the others (-k, reordering): bring it down first
        cluster.shutdown()
    pacs, node = ray_node(tmp_path, orthanc_program, cluster.address)
    cr = cr_study(tmp_path / "cr")
    with pacs, node:
        run_storescu(node.port, [], cr)  # ingest goes on while the cluster is down
        wait_for(lambda: jobs(node) == [("queued", 0, "")], timeout=30, what="the job, queued")
        status, body = web(node, "/readyz")
        assert status == 503 and b"Ray cluster" in body, body
        time.sleep(3)  # a while with nothing to run it: nothing may be claimed, failed or reported
        assert jobs(node) == [("queued", 0, "")] and delivered(node) == []
        cluster.start()
        wait_for(lambda: all_delivered(node), timeout=120, what="results once the cluster is up")
        assert web(node, "/readyz")[0] == 200
        arrived = [i["MainDicomTags"]["SOPInstanceUID"] for i in results_in(pacs, study_uid(cr))]
        [(state, attempts, reason)] = jobs(node)
    assert (state, attempts, reason) == ("done", 1, "")
    assert sorted(arrived) == sorted(expected_outputs(node))  # findings, no "not analysed" report
    descriptions = [o["series_description"] for (r,) in node_rows(node, "SELECT results FROM jobs")
                    for o in json.loads(r)["outputs"]]
    assert descriptions and not [d for d in descriptions if "not analysed" in d.lower()]


def test_a_study_comes_back_with_the_results_of_the_local_executor(
        tmp_path: Path, cluster: LocalCluster, orthanc_program: str) -> None:
    if not cluster.running:
        cluster.start()
    pacs, node = ray_node(tmp_path / "ray", orthanc_program, cluster.address)
    cr = cr_study(tmp_path / "cr")
    with pacs, node:
        run_storescu(node.port, [], cr)
        wait_for(lambda: all_delivered(node), timeout=120, what="the results in Orthanc")
        back = {i["MainDicomTags"]["SOPInstanceUID"]: pacs.get(f"/instances/{i['ID']}/file", raw=True)
                for i in results_in(pacs, study_uid(cr))}
        shown = actors(node)
        metrics = web(node, "/metrics")[1].decode()
        page = web(node, "/actors")[1].decode()
    assert sorted(back) == sorted(expected_outputs(node))
    assert len(shown) == 2 and all(a["alive"] and a["device"] == "cpu" for a in shown)
    assert sum(a["jobs"] for a in shown) == 1 and max(a["utilisation"] for a in shown) > 0
    up = [line for line in metrics.splitlines() if line.startswith("dicom_node_ray_actor_up{")]
    assert len(up) == 2 and all('model="demo-cxr"' in line and 'device="cpu"' in line and line.endswith(" 1.0")
                                for line in up), up
    assert "dicom_node_ray_actor_utilisation{" in metrics and "dicom_node_ray_actor_queue_depth{" in metrics
    assert "demo-cxr" in page and "utilisation" in page
    # the same study through the local executor, as the same installation (same Device UID)
    local = NodeProcess(tmp_path / "local")
    local.config.write_text(local.config.read_text() + node_config(free_port(), "local"))
    local.data_dir.mkdir(parents=True)
    (local.data_dir / "device-uid").write_bytes((node.data_dir / "device-uid").read_bytes())
    with local:
        run_storescu(local.port, [], cr)
        wait_for(lambda: [s for s, _, _ in jobs(local)] == ["done"], timeout=120, what="the local job")
    [(ray_results,)] = node_rows(node, "SELECT results FROM jobs")
    [(local_results,)] = node_rows(local, "SELECT results FROM jobs")
    assert json.loads(ray_results) == json.loads(local_results)  # UIDs, probabilities, figures
    files = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in (local.data_dir / "results").rglob("*.dcm")}
    assert sorted(files) == sorted(back)
    for uid, data in back.items():
        ours = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
        theirs = pydicom.dcmread(files[uid])
        assert ("PixelData" in ours) == (ours.Modality != "SR")
        assert without_dates(ours) == without_dates(theirs), uid  # PixelData among the rest


def test_a_ray_worker_killed_mid_job_costs_an_attempt_and_no_duplicate(
        tmp_path: Path, cluster: LocalCluster, orthanc_program: str) -> None:
    if not cluster.running:
        cluster.start()
    pacs, node = ray_node(tmp_path, orthanc_program, cluster.address)
    cr = cr_study(tmp_path / "cr")
    with pacs, node:
        wait_for(lambda: len([a for a in actors(node) if a["alive"]]) == 2, timeout=120, what="two actors")
        run_storescu(node.port, [], cr)
        wait_for(lambda: any(a["busy"] for a in actors(node)), timeout=60, what="an actor at work")
        [victim] = [a for a in actors(node) if a["busy"]]
        kill(victim["pid"])
        wait_for(lambda: all_delivered(node), timeout=120, what="the results after the kill")
        arrived = [i["MainDicomTags"]["SOPInstanceUID"] for i in results_in(pacs, study_uid(cr))]
        records = delivered(node)
        wait_for(lambda: len([a for a in actors(node) if a["alive"]]) == 2, timeout=120,
                 what="a new actor in place of the killed one")
        after = actors(node)
    [(state, attempts, _)] = jobs(node)
    assert state == "done" and attempts == 2  # the killed attempt and the one that finished
    assert sorted(arrived) == sorted(expected_outputs(node)) and len(arrived) == len(set(arrived))
    assert sorted(uid for uid, _, _ in records) == sorted(arrived)
    assert all(a == 1 for _, _, a in records)  # each result sent once
    assert victim["pid"] not in {a["pid"] for a in after}
    assert sum(a["failures"] for a in after) == 1
