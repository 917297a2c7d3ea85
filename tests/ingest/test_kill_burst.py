"""``kill -9`` of the node during a burst on four associations: every instance acknowledged with
success is on disk, indexed after the restart, and reads back as sent."""

import signal
import threading
import time
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from dicom_node.store import InstanceStore
from tests.nodeproc import NodeProcess

STREAMS = 4
PER_STREAM = 400  # far more than get through before the kill
KILL_AFTER = 60  # acknowledged instances, all streams together


def _instance(rng: np.random.Generator, study: str, series: str, stream: int, number: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.10.1100.{stream}.{number}"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientID, ds.Modality, ds.InstanceNumber = "KILL", "CT", number
    ds.Rows = ds.Columns = 128
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = rng.integers(0, 4096, (128, 128), dtype=np.uint16).tobytes()
    return ds


def _send(port: int, stream: int, acked: dict[str, bytes], lock: threading.Lock,
          stop: threading.Event) -> None:
    """One association sending until the node dies; records what got success (0x0000)."""
    rng = np.random.default_rng(stream)
    ae = AE(ae_title=f"BURST{stream}")
    ae.add_requested_context(CTImageStorage)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="XAI_NODE")
    if not assoc.is_established:
        return
    try:
        for number in range(1, PER_STREAM + 1):
            if stop.is_set() or not assoc.is_established:
                break
            ds = _instance(rng, "1.2.826.0.1.3680043.10.1100.1", f"1.2.826.0.1.3680043.10.1100.2.{stream}",
                           stream, number)
            try:
                status = assoc.send_c_store(ds)
            except RuntimeError:  # the association ended (the kill) between check and send
                break
            if getattr(status, "Status", None) == 0x0000:
                with lock:
                    acked[ds.SOPInstanceUID] = ds.PixelData
    finally:
        if assoc.is_established:
            assoc.abort()


def test_every_acknowledged_instance_survives_a_kill_during_a_four_association_burst(tmp_path: Path) -> None:
    acked: dict[str, bytes] = {}
    lock, stop = threading.Lock(), threading.Event()
    node = NodeProcess(tmp_path / "node")
    with node:
        senders = [threading.Thread(target=_send, args=(node.port, k, acked, lock, stop), daemon=True)
                   for k in range(STREAMS)]
        for sender in senders:
            sender.start()
        deadline = time.monotonic() + 30
        while len(acked) < KILL_AFTER and time.monotonic() < deadline:
            time.sleep(0.005)
        node.stop(signal.SIGKILL)  # mid-burst
        stop.set()
        for sender in senders:
            sender.join(timeout=20)
    assert len(acked) >= KILL_AFTER, "the burst did not get going before the deadline"
    assert not any(s.is_alive() for s in senders)
    with lock:
        acknowledged = dict(acked)
    with NodeProcess(tmp_path / "node") as restarted:  # recovers: indexes what it lacks
        restarted.stop(signal.SIGTERM)
    store = InstanceStore(node.data_dir)
    try:
        missing = [uid for uid in acknowledged if store.index.get(uid) is None]
        assert not missing, f"{len(missing)} of {len(acknowledged)} acknowledged instances not indexed"
        for uid, pixels in acknowledged.items():
            record = store.index.get(uid)
            assert record is not None
            assert dcmread(store.path_of(record)).PixelData == pixels, uid
    finally:
        store.close()
