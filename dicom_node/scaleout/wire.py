"""The node's link to its Ray driver process: framed pickle-5 messages over a socket pair.

The Ray driver (``ray.init``, the actor handles) lives in a child process
(:mod:`dicom_node.scaleout.driver`), never in the node: Ray's core worker ends the process it
lives in when the cluster's GCS is lost, and the node must outlive that (ingest, the dashboard
and DICOMweb go on). The child's death closes its end of the socket; the node's reader thread
sees the end of the stream, fails every call in flight and tells the executor.

Messages are tuples whose first item names them. They are pickled with protocol 5: buffers that
support it (numpy arrays: the heatmaps and their quality maps) travel out of band, each as its
own frame, without the copy into the pickle stream, and are received straight into their own
memory (one copy from the kernel; multiprocessing's ``Connection`` made three, 4.5 MB a job).
The job's data sets' Pixel Data go out of band too (:class:`_Pickler`), and are unpickled as
``bytes`` (one copy of each frame, as pydicom wants ``bytes``).
"""

import contextlib
import io
import itertools
import logging
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

_COUNT = struct.Struct("!I")
_SIZE = struct.Struct("!Q")


def reachable(address: str, timeout: float = 2.0) -> bool:
    """Whether ``HOST:PORT`` (or ``ray://HOST:PORT``) accepts a TCP connection: ``ray.init`` on an
    address nobody answers blocks for minutes, so a driver is only started after this says yes."""
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if not parts.hostname or not parts.port:
        return False
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=timeout):
            return True
    except OSError:
        return False


def signal_name(number: int) -> str:
    """``SIGKILL`` for 9; ``signal 40`` for a number with no name (a real-time signal)."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class LinkClosed(ConnectionError):
    """The driver process ended (or its link was closed) before it answered."""


#: Pixel Data, (7FE0,0010): the bulk of a job's data sets, sent out of band
_PIXEL_DATA = 0x7FE00010
#: below this, a value is not worth a frame of its own
_OUT_OF_BAND_BYTES = 64 * 1024


class _Bytes:
    """A ``bytes`` value to pickle out of band (``bytes`` itself is always pickled in band):
    unpickled as ``bytes`` again."""

    __slots__ = ("value",)

    def __init__(self, value: bytes) -> None:
        self.value = value

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return bytes, (pickle.PickleBuffer(self.value),)


class _Pickler(pickle.Pickler):
    """Pickles the Pixel Data of pydicom's data elements (parsed or raw) out of band: without
    it, each series' pixels are copied into the pickle stream, twice the memory while sent."""

    def reducer_override(self, obj: Any) -> Any:
        value = getattr(obj, "value", None) if getattr(obj, "tag", None) == _PIXEL_DATA else None
        if not isinstance(value, bytes) or len(value) < _OUT_OF_BAND_BYTES:
            return NotImplemented
        wrapped = _Bytes(value)
        if isinstance(obj, tuple):  # pydicom's RawDataElement, a named tuple
            return type(obj), tuple(wrapped if v is value else v for v in obj)
        reduced = obj.__reduce_ex__(5)
        if len(reduced) < 3 or not isinstance(reduced[2], dict) or reduced[2].get("_value") is not value:
            return NotImplemented
        return (*reduced[:2], {**reduced[2], "_value": wrapped}, *reduced[3:])


def send(sock: socket.socket, message: tuple[Any, ...], lock: threading.Lock) -> None:
    """Write one message: the count of frames, their sizes, the pickle, then each buffer."""
    buffers: list[pickle.PickleBuffer] = []
    stream = io.BytesIO()
    _Pickler(stream, protocol=5, buffer_callback=buffers.append).dump(message)
    data = stream.getbuffer()
    frames = [memoryview(data), *(buffer.raw() for buffer in buffers)]
    head = _COUNT.pack(len(frames)) + b"".join(_SIZE.pack(frame.nbytes) for frame in frames)
    with lock:
        sock.sendall(head)
        for frame in frames:
            sock.sendall(frame)


def receive(sock: socket.socket) -> tuple[Any, ...]:
    """Read one message written by :func:`send`; ``EOFError`` once the other end is gone."""
    (count,) = _COUNT.unpack(_exactly(sock, _COUNT.size))
    sizes = [_SIZE.unpack(_exactly(sock, _SIZE.size))[0] for _ in range(count)]
    frames = [_exactly(sock, size) for size in sizes]
    message: tuple[Any, ...] = pickle.loads(frames[0], buffers=frames[1:])
    return message


def _exactly(sock: socket.socket, size: int) -> bytearray:
    """``size`` bytes, read into their own (writable) memory."""
    frame = bytearray(size)
    view = memoryview(frame)
    done = 0
    while done < size:
        got = sock.recv_into(view[done:])
        if not got:
            raise EOFError("the other end closed the link")
        done += got
    return frame


class DriverLink:
    """The node's side of one driver process: start it, call it, notice its end.

    Parameters
    ----------
    hello
        The first message (the settings and the models' identities).
    on_event
        Called from the reader thread with every message that is not a call's answer.
    on_end
        Called once from the reader thread when the process is gone, with why.
    """

    def __init__(self, hello: tuple[Any, ...], on_event: Callable[["DriverLink", tuple[Any, ...]], None],
                 on_end: Callable[["DriverLink", str], None]) -> None:
        ours, theirs = socket.socketpair()
        # its own session: closing it may kill its process group and nothing of the node's
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dicom_node.scaleout.driver", str(theirs.fileno()), str(os.getpid())],
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, start_new_session=True)
        theirs.close()
        self.sock = ours
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._calls: dict[int, Future[Any]] = {}
        self._ids = itertools.count(1)
        self._closed = False  # no more calls: the node closed it, or the process ended
        self._shut = False  # the socket was shut down
        self._on_event, self._on_end = on_event, on_end
        self._reader = threading.Thread(target=self._read, name=f"ray-driver-{self.pid}", daemon=True)
        self._reader.start()
        self.post(hello)

    @property
    def pid(self) -> int:
        return self.process.pid

    def post(self, message: tuple[Any, ...]) -> None:
        """Send a message that gets no answer; a link already gone raises :class:`LinkClosed`."""
        try:
            send(self.sock, message, self._send_lock)
        except (OSError, ValueError) as exc:
            raise LinkClosed(f"the Ray driver process {self.pid} is gone ({type(exc).__name__})") from None

    def call(self, name: str, *args: Any) -> "Future[Any]":
        """Send ``(name, call id, *args)``; the future gets the answer's payload, or
        :class:`LinkClosed` when the process ends first."""
        future: Future[Any] = Future()
        with self._lock:
            if self._closed:
                raise LinkClosed(f"the Ray driver process {self.pid} is gone")
            number = next(self._ids)
            self._calls[number] = future
        try:
            self.post((name, number, *args))
        except LinkClosed:
            with self._lock:
                self._calls.pop(number, None)
            raise
        return future

    def _read(self) -> None:
        why = "its link closed"
        try:
            why = self._serve()
        except Exception:  # a bug in a handler: the link cannot be trusted any more
            logger.exception("Ray driver link: unexpected error")
            why = "failed its link"
        finally:  # whatever happened, no call may be left waiting for a reader that is gone
            self._end(why)

    def _serve(self) -> str:
        """Hand each answer to its call and each other message to ``on_event`` until the
        stream ends; why it ended."""
        try:
            while True:
                message = receive(self.sock)
                if message[0] == "answer":
                    with self._lock:
                        future = self._calls.pop(message[1], None)
                    if future is not None:
                        future.set_result(message[2])
                else:
                    self._on_event(self, message)
        except (EOFError, OSError, pickle.UnpicklingError, struct.error) as exc:
            if self._closed:
                return "was stopped by the node"
            if isinstance(exc, (EOFError, ConnectionError)):  # a reset when it died with bytes unread
                return f"ended (exit status {self._exit_status()})"
            return f"broke its link ({type(exc).__name__})"

    def _end(self, why: str) -> None:
        with self._lock:
            self._closed = True
            calls, self._calls = list(self._calls.values()), {}
        # the calls first: a worker must not wait for a process that may take seconds to go
        for future in calls:
            future.set_exception(LinkClosed(f"the Ray driver process {self.pid} {why}"))
        try:
            self._on_end(self, why)
        except Exception:
            logger.exception("Ray driver link: handling the end of process %d failed", self.pid)
        finally:
            self.close()

    def _exit_status(self) -> str:
        with contextlib.suppress(subprocess.TimeoutExpired):
            code = self.process.wait(timeout=0.5)  # its end of the socket closes as it exits
            return f"killed by {signal_name(-code)}" if code < 0 else str(code)
        return "unknown: it still runs"

    def close(self, grace: float = 5.0) -> None:
        """Stop the process (its actors die with it) and wait for it; idempotent."""
        with self._lock:
            self._closed = True
            first, self._shut = not self._shut, True
        if first:
            with contextlib.suppress(OSError):
                # wakes the reader (closing the fd alone would not); the driver exits at the end
                # of its stream
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()
        if self.process.poll() is None:
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)  # its own session: nothing else
                self.process.wait(timeout=grace)
