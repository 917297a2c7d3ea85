"""DICOMweb answers through the web server's whole middleware stack (tests/web/inprocess.py), where
an error after a streamed answer has started must close the connection, not write a second
answer into the first one's body, and no log line may quote a data set's value."""

import io
import json
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset, dcmwrite

from dicom_node.dicomweb import wado
from dicom_node.store import InstanceStore
from tests.dicomweb.syntaxes import ingest
from tests.factories import ct_dataset
from tests.web.inprocess import TOKEN, App, web_app

SECRET = "SECRET-VAL"


def part10(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def with_bad_ds(good: Dataset) -> bytes:
    """An instance of ``good``'s series whose Slice Thickness (DS) holds letters."""
    bad = ct_dataset(study=good.StudyInstanceUID, series=good.SeriesInstanceUID, seed=3)
    bad.add_new(0x00180050, "LO", SECRET)
    return part10(bad).replace(b"\x18\x00\x50\x00LO", b"\x18\x00\x50\x00DS")


def store_files(store: InstanceStore, *files: bytes) -> None:
    for n, raw in enumerate(files):
        path = store.data_dir / f"in-{n}.dcm"
        path.write_bytes(raw)
        ingest(store, path)


def raw_get(app: App, path: str) -> bytes:
    """Everything the server sends for one GET, until it closes the connection."""
    with socket.create_connection(("127.0.0.1", app.server.port), timeout=30) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                     "Connection: close\r\n\r\n".encode())
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    return out


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    with web_app(tmp_path / "data", dicomweb=True) as served:
        yield served


def test_metadata_with_a_malformed_value_is_answered_whole_and_logs_no_value(
        app: App, caplog: pytest.LogCaptureFixture) -> None:
    good = ct_dataset(seed=2)
    store_files(app.store, part10(good), with_bad_ds(good))
    caplog.set_level(logging.DEBUG)
    status, _, body = app.request("GET", f"/dicom-web/studies/{good.StudyInstanceUID}/metadata")
    assert status == 200, body
    items = json.loads(body)
    assert len(items) == 2
    thickness = [item["00180050"] for item in items if "00180050" in item]
    assert {"vr": "DS", "Value": [SECRET]} in thickness  # tolerant: the text it holds
    assert SECRET not in caplog.text and "00180050" in caplog.text


def test_an_error_after_the_answer_started_closes_the_connection(
        app: App, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    study = ct_dataset(seed=4)
    store_files(app.store, part10(study),
                part10(ct_dataset(study=study.StudyInstanceUID, series=study.SeriesInstanceUID, seed=5)))
    real, calls = wado._metadata, []

    def failing_second(*args: object) -> object:
        calls.append(1)
        if len(calls) == 2:
            raise ValueError(f"could not convert string to float: '{SECRET}'")
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(wado, "_metadata", failing_second)
    caplog.set_level(logging.DEBUG)
    out = raw_get(app, f"/dicom-web/studies/{study.StudyInstanceUID}/metadata")
    assert out.startswith(b"HTTP/1.1 200 ")
    assert out.count(b"HTTP/1.1") == 1, out[-300:]  # no second answer inside the body
    assert not out.endswith(b"0\r\n\r\n")  # the chunked body is cut short: the client sees the failure
    assert "ValueError" in caplog.text and "connection closed" in caplog.text
    assert SECRET not in caplog.text
    # the server still answers on new connections
    assert app.request("GET", "/dicom-web/studies")[0] == 200


@pytest.mark.parametrize("query", [
    "/studies?limit=%C2%B2", "/studies?offset=%C2%B2", "/studies?limit=%D9%A3",
    "{inst}/frames/%C2%B2", "{inst}/frames/1,%C2%B2", "{inst}/rendered?quality=%C2%B2",
    "{inst}/rendered?viewport=%C2%B2,10", "/studies?limit=1234567890",
])
def test_numbers_in_the_url_are_ascii_digits_or_400(app: App, query: str) -> None:
    """"²".isdigit() is True and int("²") fails: that was a 500 with a traceback."""
    ds = ct_dataset(seed=6)
    store_files(app.store, part10(ds))
    inst = f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    status, _, body = app.request("GET", "/dicom-web" + query.format(inst=inst))
    assert status == 400, body


def test_pixels_that_cannot_be_rendered_are_422(app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = ct_dataset(seed=8)
    store_files(app.store, part10(ds))

    def undecodable(*args: object, **kwargs: object) -> bytes:
        raise ValueError(f"corrupt JPEG data near '{SECRET}'")

    monkeypatch.setattr(wado, "render", undecodable)
    path = (f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/"
            f"{ds.SOPInstanceUID}/rendered")
    status, _, body = app.request("GET", path, {"Accept": "image/png"})
    assert status == 422 and b"ValueError" in body and SECRET.encode() not in body
