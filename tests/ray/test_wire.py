"""The link to the Ray driver process: messages with their arrays out of band, and a driver that
dies mid-call fails the call at once instead of leaving a worker waiting."""

import os
import signal
import socket
import threading
import time
from typing import Any

import numpy as np

from dicom_node.config import Settings, WorkersSettings
from dicom_node.scaleout.wire import DriverLink, LinkClosed, receive, send


def test_a_message_and_its_arrays_arrive_whole() -> None:
    a, b = socket.socketpair()
    heatmap = np.random.default_rng(7).random((512, 512), dtype=np.float32)
    message = ("answer", 3, ("done", {"heatmaps": [heatmap, heatmap[::2]], "text": "x" * 10}))
    sender = threading.Thread(target=send, args=(a, message, threading.Lock()))
    sender.start()  # 1 MB: more than a socket buffer, so send and receive must overlap
    got = receive(b)
    sender.join(timeout=10)
    assert got[:2] == ("answer", 3) and got[2][1]["text"] == "x" * 10
    first, strided = got[2][1]["heatmaps"]
    assert np.array_equal(first, heatmap) and np.array_equal(strided, heatmap[::2])
    assert first.flags.writeable  # received into its own memory, not a read-only view
    a.close()
    b.close()


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
