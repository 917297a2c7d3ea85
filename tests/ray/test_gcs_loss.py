"""The Ray cluster's head (its GCS) killed while the node is connected and a job is running: the
node process stays up (the Ray driver lives in a child process), ingest still answers, /readyz
says why it is not ready, and once a new head is up at the same address the job completes and
its results reach the PACS exactly once, no attempt spent on the outage."""

from pathlib import Path

import pydicom
import pytest

from dicom_node.phantoms import write_study
from tests.conftest import require_tool
from tests.jobs.test_crash import wait_for
from tests.nodeproc import NodeProcess, echo_ok, free_port
from tests.orthanc import Orthanc
from tests.peers.test_dcmtk import run_storescu
from tests.peers.test_orthanc_e2e import cr_study, delivered, expected_outputs, results_in
from tests.ray.cluster import LocalCluster, require_ray
from tests.ray.test_ray_executor import LOOPBACK_RAY, actors, jobs, node_config, web

pytestmark = pytest.mark.peers


@pytest.fixture
def orthanc_program() -> str:
    return require_tool("Orthanc", "orthanc")


def one_actor_node(folder: Path, program: str, address: str) -> tuple[Orthanc, NodeProcess]:
    """One actor and one worker: the least CPU for the two cold starts this test pays. LIME-1000:
    a job of several seconds, so the head is surely lost while it runs."""
    node = NodeProcess(folder / "node", env=LOOPBACK_RAY)
    pacs = Orthanc(folder / "orthanc", program, {"node": ("XAI_NODE", node.port)})
    config = node_config(pacs.dicom_port, "ray", address)
    config = config.replace("ray_actors_per_model = 2", "ray_actors_per_model = 1").replace(
        "[workers]\ncount = 2", "[workers]\ncount = 1").replace("lime_samples = 300", "lime_samples = 1000")
    assert "ray_actors_per_model = 1" in config and "count = 1" in config and "lime_samples = 1000" in config
    node.config.write_text(node.config.read_text() + config)
    return pacs, node


def maps_ray(pid: int) -> bool:
    """Whether Ray's core worker library is loaded in process ``pid``."""
    return "_raylet" in Path(f"/proc/{pid}/maps").read_text()


def test_a_lost_gcs_leaves_the_node_up_and_the_job_completes_once_a_new_head_is_up(
        tmp_path: Path, orthanc_program: str) -> None:
    require_ray()
    cluster = LocalCluster(free_port())
    try:
        cluster.start()
        pacs, node = one_actor_node(tmp_path, orthanc_program, cluster.address)
        first = cr_study(tmp_path / "first")
        second = write_study(tmp_path / "second", 1, seed=3_000_003, size=512, modality="CR",
                             findings={"nodule": True})
        with pacs, node:
            assert node.proc is not None
            wait_for(lambda: any(a["alive"] for a in actors(node)), timeout=90, what="the actor")
            run_storescu(node.port, [], first)
            wait_for(lambda: any(a["busy"] for a in actors(node)), timeout=60, what="the actor at work")
            cluster.kill_head()  # mid-job
            wait_for(lambda: web(node, "/readyz")[0] == 503, timeout=30, what="/readyz not ready")
            status, body = web(node, "/readyz")
            assert status == 503 and b"Ray" in body, body
            assert node.proc.poll() is None and echo_ok(node.port)  # the DICOM endpoint is up
            run_storescu(node.port, [], second)  # and stores
            wait_for(lambda: len(jobs(node)) == 2 and {(s, a) for s, a, _ in jobs(node)} == {("queued", 0)},
                     timeout=30, what="both jobs queued, no attempt spent")
            assert delivered(node) == [] and node.proc.poll() is None
            cluster.shutdown()  # the worker nodes went with their head
            cluster.start()  # a new head at the same address
            wait_for(lambda: len(delivered(node)) == len(expected_outputs(node)) > 0 and all(
                s == "delivered" for _, s, _ in delivered(node)) and all(s == "done" for s, _, _ in jobs(node)),
                timeout=120, what="the results once the new head is up")
            assert web(node, "/readyz")[0] == 200
            arrived = [i["MainDicomTags"]["SOPInstanceUID"] for paths in (first, second)
                       for i in results_in(pacs, str(pydicom.dcmread(paths[0]).StudyInstanceUID))]
            records = delivered(node)
            loaded_ray = maps_ray(node.proc.pid)
            log = node.log.read_text()
    finally:
        cluster.shutdown()
    assert sorted(a for _, a, _ in jobs(node)) == [1, 1]  # the outage cost no attempt
    assert sorted(arrived) == sorted(expected_outputs(node)) and len(arrived) == len(set(arrived))
    assert sorted(uid for uid, _, _ in records) == sorted(arrived) and all(a == 1 for _, _, a in records)
    assert not loaded_ray  # the node never loaded Ray: its driver lives in a child process
    assert "driver process" in log
