"""Slow searches must not starve the probes: ``/readyz`` reads the node's state in a thread of
its own, and DICOMweb and ``/api`` requests beyond :data:`server.MAX_BUSY` at work get 503 with
``Retry-After`` instead of queueing for the shared threads without end."""

import socket
import threading
import time
from pathlib import Path

import pytest

from dicom_node.audit import read_events
from dicom_node.dicomweb import stow
from dicom_node.store.index import Index
from dicom_node.web import server
from tests.web.inprocess import TOKEN, App, web_app


def test_readyz_answers_while_slow_searches_hold_every_slot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "BUSY_WAIT_SECONDS", 0.5)
    release, entered, lock = threading.Event(), [0], threading.Lock()
    real_find = Index.find

    def slow_find(self: Index, sql: str, params: object) -> object:
        with lock:
            entered[0] += 1
        release.wait(30)  # stands for a search over a big index
        return real_find(self, sql, params)  # type: ignore[arg-type]

    monkeypatch.setattr(Index, "find", slow_find)
    with web_app(tmp_path / "data", dicomweb=True) as app:
        statuses: list[int] = []
        searches = [threading.Thread(target=lambda: statuses.append(
            app.request("GET", "/dicom-web/studies?PatientName=*x*")[0]), daemon=True)
            for _ in range(server.WORKER_THREADS + 2)]
        try:
            for thread in searches:
                thread.start()
            deadline = time.monotonic() + 10
            while entered[0] < server.MAX_BUSY:
                assert time.monotonic() < deadline, f"only {entered[0]} searches started"
                time.sleep(0.01)
            for path in ("/readyz", "/healthz", "/"):  # probes and the dashboard's pages still answer
                started = time.monotonic()
                assert app.request("GET", path)[0] == 200, path
                assert time.monotonic() - started < 1.0, path
            started = time.monotonic()
            status, headers, _ = app.request("GET", "/dicom-web/studies")
            assert status == 503 and headers["Retry-After"] == str(server.RETRY_AFTER_SECONDS)
            assert time.monotonic() - started < server.BUSY_WAIT_SECONDS + 1.0
            assert app.request("GET", "/api/overview")[0] == 503
            assert entered[0] == server.MAX_BUSY  # the refused ones never reached the database
        finally:
            release.set()
            for thread in searches:
                thread.join(30)
        assert sorted(set(statuses)) == [200, 503] and statuses.count(200) == server.MAX_BUSY
        assert app.request("GET", "/dicom-web/studies")[0] == 200  # the slots are free again


def _stalled_upload(port: int, token: str) -> socket.socket:
    """A STOW-RS POST that sends its headers and the start of a part, then nothing."""
    conn = socket.create_connection(("127.0.0.1", port))
    conn.sendall((f"POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                  f"Authorization: Bearer {token}\r\n"
                  'Content-Type: multipart/related; type="application/dicom"; boundary=XX\r\n'
                  "Content-Length: 100000000\r\n\r\n--XX\r\nContent-Type: application/dicom\r\n\r\n").encode()
                 + b"\0" * 1000)
    return conn


def _answer_at_once(app: App, *paths: str) -> None:
    """Each of ``paths`` answers 200 within a second."""
    for path in paths:
        started = time.monotonic()
        assert app.request("GET", path)[0] == 200, path
        assert time.monotonic() - started < 1.0, path


def test_stalled_uploads_hold_no_slot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """More stalled STOW-RS uploads than slots: searches and ``/api`` still answer at once."""
    monkeypatch.setattr(server, "BUSY_WAIT_SECONDS", 0.5)
    with web_app(tmp_path / "data", dicomweb=True) as app:
        uploads = [_stalled_upload(app.server.port, TOKEN) for _ in range(server.MAX_BUSY + 2)]
        try:
            tmp = app.store.files.tmp
            deadline = time.monotonic() + 10
            while len(list(tmp.glob("*.stow.part"))) < len(uploads):  # every upload is mid-part
                assert time.monotonic() < deadline, "the uploads did not start"
                time.sleep(0.02)
            _answer_at_once(app, "/dicom-web/studies", "/api/jobs", "/dicom-web/studies?limit=1")
        finally:
            for conn in uploads:
                conn.close()


def test_a_stalled_upload_is_cut_and_its_file_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stow, "IDLE_SECONDS", 0.5)
    with web_app(tmp_path / "data", dicomweb=True) as app:
        conn = _stalled_upload(app.server.port, TOKEN)
        conn.settimeout(10)
        try:
            answer = b""
            while chunk := conn.recv(4096):  # the server answers, then closes the connection
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 408 "), answer[:60]
        finally:
            conn.close()
        assert not list(app.store.files.tmp.glob("*.stow.part"))
        events = [e for e in read_events(tmp_path / "data" / "audit") if e["event"] == "stow_received"]
        assert events and events[-1]["complete"] is False


def test_streams_read_slowly_hold_no_slot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """More WADO-RS answers than slots, each to a viewer that reads nothing: searches and
    ``/api`` still answer at once (a stream holds a slot only while a chunk is read from disk)."""
    from tests.factories import ct_dataset
    from tests.store.test_store import put

    monkeypatch.setattr(server, "BUSY_WAIT_SECONDS", 0.5)
    with web_app(tmp_path / "data", dicomweb=True) as app:
        ds = ct_dataset(size=3072, seed=3)  # 18 MB: more than the sockets' buffers hold
        put(app.store, ds)
        streams = []
        try:
            for _ in range(server.MAX_BUSY + 2):
                conn = socket.socket()
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
                conn.connect(("127.0.0.1", app.server.port))
                conn.sendall((f"GET /dicom-web/studies/{ds.StudyInstanceUID} HTTP/1.1\r\n"
                              f"Host: 127.0.0.1:{app.server.port}\r\nAuthorization: Bearer {TOKEN}\r\n"
                              "Accept: multipart/related; type=\"application/dicom\"; transfer-syntax=*\r\n\r\n"
                              ).encode())
                streams.append(conn)
            deadline = time.monotonic() + 10
            while sum(e["event"] == "retrieve" for e in read_events(tmp_path / "data" / "audit")) < len(streams):
                assert time.monotonic() < deadline, "the answers did not all start"
                time.sleep(0.05)
            _answer_at_once(app, "/dicom-web/studies", "/api/jobs")
        finally:
            for conn in streams:
                conn.close()
