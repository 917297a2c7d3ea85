"""The link to the Ray driver process: messages with their arrays out of band, and a driver that
dies mid-call fails the call at once instead of leaving a worker waiting."""

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np

from dicom_node.config import Settings, WorkersSettings
from dicom_node.scaleout.wire import DriverLink, LinkClosed, receive, send, signal_name
from tests.nodeproc import REPO


def test_a_message_and_its_arrays_arrive_whole() -> None:
    a, b = socket.socketpair()
    heatmap = np.random.default_rng(7).random((512, 512), dtype=np.float32)
    message = ("answer", 3, ("done", {"heatmaps": [heatmap, heatmap[::2]], "text": "x" * 10}))
    sender = threading.Thread(target=send, args=(a, message, threading.Lock()))
    sender.start()  # 1 MB: more than a socket buffer, so send and receive must overlap
    (frames,) = struct.unpack("!I", b.recv(4, socket.MSG_PEEK))
    got = receive(b)
    sender.join(timeout=10)
    assert got[:2] == ("answer", 3) and got[2][1]["text"] == "x" * 10
    first, strided = got[2][1]["heatmaps"]
    assert np.array_equal(first, heatmap) and np.array_equal(strided, heatmap[::2])
    # the pickle and the contiguous array out of band (a strided one is copied into the pickle)
    assert frames == 2
    assert first.flags.writeable  # received into its own memory, not a read-only view
    a.close()
    b.close()


def test_pixel_data_travels_out_of_band_and_arrives_as_bytes(tmp_path: Any) -> None:
    """A job's data sets, parsed and read from a file (raw, deferred elements): their Pixel Data
    each a frame of its own, not copied into the pickle stream."""
    from pydicom import Dataset, dcmread
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    pixels = np.random.default_rng(3).integers(0, 4096, (512, 512), dtype=np.uint16).tobytes()
    parsed = Dataset()
    parsed.SOPInstanceUID, parsed.Rows, parsed.Columns = generate_uid(), 512, 512
    parsed.PixelData = pixels
    parsed["PixelData"].VR = "OW"
    parsed.file_meta = FileMetaDataset()
    parsed.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    parsed.save_as(tmp_path / "a.dcm", implicit_vr=False, little_endian=True)
    raw = dcmread(tmp_path / "a.dcm", force=True)
    assert type(raw._dict[0x7FE00010]).__name__ == "RawDataElement"
    a, b = socket.socketpair()
    message = ("compute", 1, "demo", 0, None, [parsed, raw])
    sender = threading.Thread(target=send, args=(a, message, threading.Lock()))
    sender.start()
    (frames,) = struct.unpack("!I", b.recv(4, socket.MSG_PEEK))
    got = receive(b)
    sender.join(timeout=10)
    a.close()
    b.close()
    assert frames == 3  # the pickle, and each data set's Pixel Data
    for ds in got[5]:
        assert type(ds.PixelData) is bytes and ds.PixelData == pixels
    assert got[5][0].SOPInstanceUID == parsed.SOPInstanceUID and parsed.PixelData is pixels  # not changed


def test_a_driver_killed_by_a_signal_without_a_name_still_fails_the_call() -> None:
    """A real-time signal has no ``signal.Signals`` member: the reader must not die on its name
    and leave the call waiting for the answer's timeout (630 s)."""
    assert signal_name(9) == "SIGKILL" and signal_name(signal.SIGRTMIN + 6) == f"signal {signal.SIGRTMIN + 6}"
    ended: list[str] = []
    settings = Settings(workers=WorkersSettings(executor="ray", ray_address="127.0.0.1:1"))
    link = DriverLink(("hello", settings, {}, 30), lambda link, message: None,
                      lambda link, why: ended.append(why))
    call = link.call("compute", "demo", 0, None, [])
    os.kill(link.pid, signal.SIGRTMIN + 6)
    try:
        error: Any = call.exception(timeout=15)
    finally:
        link.close()
    assert isinstance(error, LinkClosed) and f"killed by signal {signal.SIGRTMIN + 6}" in str(error)


PARENT = """
import sys, time
from dicom_node.config import Settings, WorkersSettings
from dicom_node.scaleout.wire import DriverLink
settings = Settings(workers=WorkersSettings(executor="ray", ray_address=sys.argv[1]))
link = DriverLink(("hello", settings, {}, 30), lambda link, message: None, lambda link, why: None)
print(link.pid, flush=True)
time.sleep(120)
"""


def test_a_driver_ends_with_its_node_even_while_ray_init_blocks() -> None:
    """The node SIGKILLed while its driver is in ``ray.init`` on an address that accepts a
    connection and never answers (it never reads the end of its stream): the driver is gone
    within seconds, not orphaned."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    address = f"127.0.0.1:{silent.getsockname()[1]}"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, address], cwd=REPO, stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        time.sleep(3)  # into ray.init (importing Ray takes about 2 s here)
        assert alive(child)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 5
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child), "the driver outlived its node"
    finally:
        if parent.poll() is None:
            os.kill(parent.pid, signal.SIGKILL)
            parent.wait(timeout=10)
        silent.close()


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (not a zombie: an orphan's zombie is reaped by init, not by us)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_driver_killed_mid_call_fails_the_call_and_says_how_it_ended() -> None:
    ended: list[str] = []
    settings = Settings(workers=WorkersSettings(executor="ray", ray_address="127.0.0.1:1"))
    link = DriverLink(("hello", settings, {}, 30), lambda link, message: None,
                      lambda link, why: ended.append(why))
    call = link.call("compute", "demo", 0, None, [])
    os.kill(link.pid, signal.SIGKILL)
    try:
        error: Any = call.exception(timeout=15)
    finally:
        link.close()
    assert isinstance(error, LinkClosed) and "killed by SIGKILL" in str(error)
    deadline = time.monotonic() + 5
    while not ended and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ended == ["ended (exit status killed by SIGKILL)"]
    assert link.process.poll() is not None
    try:
        link.call("compute", "demo", 0, None, [])
    except LinkClosed:
        pass
    else:
        raise AssertionError("a call on a dead driver must fail")
