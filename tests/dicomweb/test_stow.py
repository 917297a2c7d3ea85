"""STOW-RS with dicomweb-client: stored as C-STORE stores (same files, index, audit), in every
transfer syntax the node accepts, and a STOW'd series becomes a job like a C-STORE'd one."""

import time
from pathlib import Path
from urllib.parse import urlsplit

from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.data import get_testdata_file

from dicom_node import IMPLEMENTATION_CLASS_UID
from dicom_node.config import Pipeline
from dicom_node.jobs.memory import MemoryJobBackend
from dicom_node.jobs.queue import JobQueue, QueuePolicy
from dicom_node.jobs.scheduler import Scheduler
from tests.dicomweb.stow_helpers import leftovers, multipart, post, stow_server
from tests.factories import ct_dataset, new_uid
from tests.ingest.test_scp import SAMPLES, _data_set_bytes, _with_study_and_series

LABEL = "STOW-RS"


def test_store_instances_stores_indexes_and_audits_like_c_store(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    study, series = new_uid(), new_uid()
    sent = [ct_dataset(study=study, series=series, seed=i) for i in range(3)]
    with stow_server(data_dir) as (url, ctx, audit):
        answer = DICOMwebClient(url).store_instances(sent)
        records = {r.sop_instance_uid: r for r in ctx.store.index.instances()}
    referenced = {item.ReferencedSOPInstanceUID: item.RetrieveURL for item in answer.ReferencedSOPSequence}
    assert "FailedSOPSequence" not in answer
    assert set(referenced) == set(records) == {ds.SOPInstanceUID for ds in sent}
    for ds in sent:
        uid = ds.SOPInstanceUID
        # the URL is built on the Host header, which dicomweb-client sends without the port
        assert urlsplit(referenced[uid]).path == f"/dicom-web/studies/{study}/series/{series}/instances/{uid}"
        record = records[uid]
        assert (record.study_instance_uid, record.series_instance_uid) == (study, series)
        assert record.calling_ae_title == LABEL
        on_disk = dcmread(data_dir / "instances" / record.path)
        assert on_disk.file_meta.SourceApplicationEntityTitle == LABEL
        assert on_disk.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
        assert on_disk.PixelData == ds.PixelData  # stored as received
    stored_events = audit.named("instance_stored")
    assert [e["sop_instance_uid"] for e in stored_events] == [ds.SOPInstanceUID for ds in sent]
    assert all(e["calling_ae_title"] == LABEL and e["study_instance_uid"] == study
               and e["series_instance_uid"] == series and e["size_bytes"] > 0 for e in stored_events)
    [request] = audit.named("stow_received")
    assert (request["stored"], request["failed"], request["address"]) == (3, 0, "127.0.0.1")
    # POST /studies names no study: the one its instances belong to is the request's
    assert (request["study_instance_uid"], request["study_instance_uids"]) == (study, [study])
    assert leftovers(data_dir) == []


def test_every_transfer_syntax_and_sop_class_c_store_accepts_is_stored_as_sent(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    files = [_with_study_and_series(Path(str(get_testdata_file(name))), tmp_path / "in") for name in SAMPLES]
    with stow_server(data_dir) as (url, ctx, _):
        for path in files:  # one request each: some samples share a SOP Instance UID
            response = post(url + "/studies", multipart([path.read_bytes()]))
            assert response.status_code == 200, response.text
            assert response.headers["Content-Type"] == "application/dicom+json"
            ds = dcmread(path, stop_before_pixels=True)
            record = ctx.store.index.get(ds.SOPInstanceUID)
            assert record is not None and record.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID
            # no transcoding: the data set is what was sent, byte for byte, as C-STORE keeps it
            assert _data_set_bytes(data_dir / "instances" / record.path) == _data_set_bytes(path), path.name


def test_a_stowed_series_becomes_a_job_routed_by_the_stow_label(tmp_path: Path) -> None:
    """Same completeness timer and routing as C-STORE: the scheduler watches the index."""
    study, series = new_uid(), new_uid()
    pipelines = (
        Pipeline(name="from-stow", model="demo", match={"modality": ("CT",), "calling_ae_title": (LABEL,)}),
        Pipeline(name="from-modality", model="demo", match={"calling_ae_title": ("CT_SCANNER",)}),
    )
    queue = JobQueue(MemoryJobBackend(), QueuePolicy(max_attempts=3, backoff_seconds=1,
                                                     max_backoff_seconds=1, lease_seconds=60))
    with stow_server(tmp_path / "data") as (url, ctx, _):
        client = DICOMwebClient(url)
        client.store_instances([ct_dataset(study=study, series=series, seed=0)])
        client.store_instances([ct_dataset(study=study, series=series, seed=1)], study_instance_uid=study)
        now = time.time()
        early = Scheduler(ctx.store, queue, pipelines, 10.0, lambda name: "v1", clock=lambda: now)
        assert early.tick() == []  # not stable yet
        later = Scheduler(ctx.store, queue, pipelines, 10.0, lambda name: "v1", clock=lambda: now + 11)
        [job] = later.tick()
        uids = {r.sop_instance_uid for r in ctx.store.index.instances()}
    assert (job.pipeline, job.series_instance_uid, job.study_instance_uid) == ("from-stow", series, study)
    assert set(job.instance_uids) == uids and len(uids) == 2


def test_retrieve_urls_keep_the_port_when_the_host_header_has_none(tmp_path: Path) -> None:
    """dicomweb-client sends ``Host: 127.0.0.1`` alone: a Retrieve URL without the port would
    point at another server (QIDO-RS and WADO-RS build theirs the same way: http.base_url)."""
    import http.client
    import json

    from tests.dicomweb.stow_helpers import CONTENT_TYPE, part10

    ds = ct_dataset(seed=21)
    with stow_server(tmp_path / "data") as (url, _, _):
        port = urlsplit(url).port
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", f"/dicom-web/studies/{ds.StudyInstanceUID}", body=multipart([part10(ds)]),
                     headers={"Host": "127.0.0.1", "Content-Type": CONTENT_TYPE})
        answer = json.loads(conn.getresponse().read())
        conn.close()
    instance = answer["00081199"]["Value"][0]["00081190"]["Value"][0]
    assert instance.startswith(f"http://127.0.0.1:{port}/dicom-web/studies/{ds.StudyInstanceUID}/series/")
    assert answer["00081190"]["Value"] == [f"http://127.0.0.1:{port}/dicom-web/studies/{ds.StudyInstanceUID}"]
