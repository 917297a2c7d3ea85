"""A STOW-RS accept running in a worker thread when the web server stops: the stop waits for it
(bounded) and says whether it ended, so that the node marks its stop clean only when no accept
can still write to the store."""

import asyncio
import http.client
import io
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmwrite

from dicom_node.dicomweb import stow
from dicom_node.web import server
from tests.factories import ct_dataset
from tests.web.inprocess import TOKEN, App, web_app

BOUNDARY = "stop-test"


def post_one(app: App, answers: list[object]) -> None:
    buffer = io.BytesIO()
    dcmwrite(buffer, ct_dataset(seed=7), enforce_file_format=True)
    body = (f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + buffer.getvalue()
            + f"\r\n--{BOUNDARY}--\r\n".encode())
    conn = http.client.HTTPConnection("127.0.0.1", app.server.port, timeout=60)
    try:
        conn.request("POST", "/dicom-web/studies", body=body, headers={
            "Authorization": f"Bearer {TOKEN}",
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'})
        answers.append(conn.getresponse().status)
    except OSError as exc:
        answers.append(exc)
    finally:
        conn.close()


def blocked_accept(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Make STOW-RS's accept wait for ``release`` once it has ``entered``."""
    entered, release = threading.Event(), threading.Event()
    real: Callable[..., object] = stow.accept

    def slow(*args: object, **kwargs: object) -> object:
        entered.set()
        release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(stow, "accept", slow)
    return entered, release


def stop_during_accept(app: App, entered: threading.Event, release_after: float | None,
                       release: threading.Event) -> bool:
    answers: list[object] = []
    client = threading.Thread(target=post_one, args=(app, answers), daemon=True)
    client.start()
    assert entered.wait(30), "the accept never started"
    if release_after is not None:
        threading.Timer(release_after, release.set).start()
    started = time.monotonic()
    clean = app.server.stop()
    assert time.monotonic() - started < server.STOP_GRACE_SECONDS + server.ACCEPT_GRACE_SECONDS + 5
    release.set()
    client.join(30)
    return clean


def test_a_stop_waits_for_an_accept_in_flight_which_is_indexed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "STOP_GRACE_SECONDS", 1.0)
    entered, release = blocked_accept(monkeypatch)
    with web_app(tmp_path / "data", dicomweb=True) as app:
        # released after the handlers' grace: the handler is cancelled, the accept is waited for
        assert stop_during_accept(app, entered, 2.0, release) is True
        assert app.store.index.counts()[2] == 1
        assert not list(app.store.files.tmp.iterdir())


def test_a_stop_says_unclean_when_an_accept_outlives_its_grace(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "STOP_GRACE_SECONDS", 1.0)
    monkeypatch.setattr(server, "ACCEPT_GRACE_SECONDS", 0.5)
    entered, release = blocked_accept(monkeypatch)
    with web_app(tmp_path / "data", dicomweb=True) as app:
        assert stop_during_accept(app, entered, None, release) is False
        assert app.server.stop() is True  # a second stop does nothing


def test_the_node_marks_its_stop_clean_only_when_the_web_stop_was(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import replace

    from dicom_node.config import InferenceSettings, ModelsSettings, WebSettings
    from dicom_node.node import Node
    from tests.conftest import make_settings

    (tmp_path / "models").mkdir()
    base = replace(make_settings(tmp_path / "data"), models=ModelsSettings(dir=tmp_path / "models"),
                   inference=InferenceSettings(device="cpu"), web=WebSettings(port=0, token=TOKEN))
    real_stop = server.WebServer.stop
    for web_clean in (True, False):
        monkeypatch.setattr(server.WebServer, "stop", lambda self, c=web_clean: real_stop(self) and c)
        node = Node(base)
        node.start()
        node.stop()
        assert (tmp_path / "data" / "clean-shutdown").exists() is web_clean


def held_submission(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Hold each accept between its submission and its thread: ``submitted`` is set there, and
    it goes on once ``go`` is set."""
    submitted, go = threading.Event(), threading.Event()
    real = stow.offload

    async def late(request: object, fn: Callable[..., object], *args: object, **kwargs: object) -> object:
        if fn is stow._accept_file:
            submitted.set()
            while not go.is_set():
                await asyncio.sleep(0.01)
        return await real(request, fn, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(stow, "offload", late)
    return submitted, go


def test_an_accept_is_counted_from_its_submission(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop between an accept's submission and its thread's start must wait for it."""
    submitted, go = held_submission(monkeypatch)
    with web_app(tmp_path / "data", dicomweb=True) as app:
        assert app.server.dicomweb is not None
        accepts = app.server.dicomweb.accepts
        answers: list[object] = []
        client = threading.Thread(target=post_one, args=(app, answers), daemon=True)
        client.start()
        try:
            assert submitted.wait(30), "no accept was submitted"
            assert accepts.wait_idle(0) is False  # counted though no thread has started it
        finally:
            go.set()
            client.join(30)
        assert answers == [200] and accepts.wait_idle(5) is True
        assert app.store.index.counts()[2] == 1


def test_an_accept_dropped_before_its_thread_is_uncounted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "STOP_GRACE_SECONDS", 1.0)
    submitted, go = held_submission(monkeypatch)
    with web_app(tmp_path / "data", dicomweb=True) as app:
        answers: list[object] = []
        client = threading.Thread(target=post_one, args=(app, answers), daemon=True)
        client.start()
        assert submitted.wait(30), "no accept was submitted"
        started = time.monotonic()
        assert app.server.stop() is True  # the request was cancelled before its accept ran
        assert time.monotonic() - started < server.STOP_GRACE_SECONDS + 5
        go.set()
        client.join(30)
        assert app.store.index.counts()[2] == 0
