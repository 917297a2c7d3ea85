"""Hostile and broken clients: every malformed request gets a short 4xx answer, never a 5xx
or a traceback; a handler that fails anyway answers 500 without one and logs the path only."""

import json
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.web import data
from tests.web.inprocess import App, web_app

#: (method, path, expected status): hostile or broken inputs, each with the answer it must get.
HOSTILE = [
    ("GET", "/api/studies?q=" + "1." * 30_000, 400),  # a 60 KB search string
    ("GET", "/studies?q=" + "9" * 65, 400),  # a search longer than any UID
    ("GET", "/api/studies?q=%25%5F%27%22%3B--%00%ff", 200),  # LIKE wildcards, quotes, NUL, bad UTF-8
    ("GET", "/api/jobs/" + "1" + "0" * 22, 400),  # a job id of 10^22
    ("GET", "/api/jobs/9223372036854775808", 400),  # 2^63: one past SQLite's integers
    ("GET", "/api/jobs/0", 400),
    ("GET", "/api/jobs/-1", 400),
    ("GET", "/api/jobs/abc", 400),
    ("GET", "/jobs/1e3", 400),
    ("GET", "/api/jobs/%31", 400),  # percent-encoded digits are not an id
    ("GET", "/api/jobs/9223372036854775807", 404),  # the largest id: well formed, not there
    ("POST", "/api/jobs/" + "9" * 40 + "/requeue", 400),
    ("POST", "/api/outbox/abc/retry", 400),
    ("POST", "/api/outbox/99999/retry", 404),
    ("GET", "/api/studies/1.2.abc", 400),  # malformed UIDs in paths
    ("GET", "/api/studies/1..2", 400),
    ("GET", "/api/studies/" + "1" * 65, 400),
    ("GET", "/studies/%2e%2e%2f%2e%2e%2fetc", 400),
    ("GET", "/api/studies/", 400),
    ("GET", "/api/studies/1.2.3", 404),  # well formed, not there
    ("GET", "/preview/../../etc/passwd.png", 400),
    ("GET", "/preview/1.2/3.4/x.png", 400),
    ("GET", "/preview/1.2/3.4/5.6.png", 404),
    ("GET", "/api/jobs?state=" + "x" * 3000, 400),
    ("GET", "/api/outbox?state=bogus", 400),
    ("GET", "/api/models/" + "m" * 300, 400),
    ("GET", "/api/models/no-such-model", 404),
    ("GET", "/api/overview?" + "&".join(f"k{i}=1" for i in range(50)), 400),  # too many parameters
    ("GET", "/" + "a" * 70_000, 400),  # over the standard library's own 64 KiB limit
    ("GET", "/" + "a" * 5_000, 400),
    ("GET", "/no/such/page", 404),
    ("GET", "//[::1", 404),
    ("DELETE", "/api/jobs/1", 405),
    ("PUT", "/api/overview", 405),
]


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    with web_app(tmp_path_factory.mktemp("hostile") / "data") as served:
        yield served


@pytest.mark.parametrize(("method", "path", "expected"), HOSTILE, ids=[f"{m} {p[:40]}" for m, p, _ in HOSTILE])
def test_hostile_input_gets_a_short_4xx_answer(app: App, method: str, path: str, expected: int) -> None:
    status, headers, body = app.request(method, path)
    assert status == expected, body[:300]
    assert b"Traceback" not in body and b'File "' not in body
    if status >= 400:
        assert len(body) < (4096 if "json" in headers.get("Content-Type", "") else 8192)
        if "json" in headers.get("Content-Type", ""):
            reason = json.loads(body)["error"]
            assert 0 < len(reason) <= 200  # a short reason, not the input echoed back


#: Requests broken below HTTP's surface, refused by aiohttp's parser before any middleware runs
#: and answered by the server's own hook (web/server.py, _Connection) in the same short words.
RAW = [
    (b"FOO / HTTP/1.0\r\n\r\n", 405),  # an unknown method
    (b"GET / HTTP/9.9\r\n\r\n", 400),
    (b"\x00\x01\x02 garbage\r\n\r\n", 405),  # its first word read as an unknown method
    (b"GET / HTTP/1.0\r\n" + b"X-A: b\r\n" * 150 + b"\r\n", 431),  # too many headers
    (b"GET / HTTP/1.0\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n", 431),  # a header line over 64 KiB
    (b"GET /" + b"a" * 70_000 + b" HTTP/1.0\r\n\r\n", 400),  # a request line over the parser's limit
    (b"GET / HTTP/1.0\r\nAuthorization: Bearer " + b"\x7f" * 5000 + b"\r\n\r\n", 400),  # control bytes
]


@pytest.mark.parametrize(("raw", "expected"), RAW, ids=[r[:16].decode("latin-1") for r, _ in RAW])
def test_malformed_http_gets_a_short_4xx_answer(app: App, raw: bytes, expected: int,
                                                caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG), socket.create_connection(("127.0.0.1", app.server.port),
                                                                  timeout=30) as sock:
        sock.sendall(raw)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert int(head.split()[1]) == expected, answer[:300]
    assert len(body) < 512 and json.loads(body)["error"] and b"Traceback" not in answer
    assert b"Server: dicom-node" in head and b"aiohttp" not in head
    assert b"aaaa" not in body and b"\\x7f" not in body  # nothing of the request quoted back
    assert "aaaa" not in caplog.text and "x7f" not in caplog.text  # nor logged


def test_a_handler_that_fails_answers_500_without_a_traceback_and_logs_the_path_only(
    app: App, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(src: data.Sources) -> list[dict[str, object]]:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(data, "models", broken)
    with caplog.at_level(logging.ERROR, logger="dicom_node.web.middleware"):
        status, _, body = app.request("GET", "/api/models?token=QUERYVALUE&q=QUERYVALUE")
    assert status == 500 and b"secret internals" not in body and b"Traceback" not in body
    assert json.loads(body)["error"].startswith("internal error")
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "/api/models" in record.getMessage() and "QUERYVALUE" not in caplog.text


def test_unauthorised_hostile_requests_are_refused_before_any_parsing(app: App) -> None:
    status, _, body = app.request("GET", "/api/jobs/" + "9" * 40, token=False)
    assert status == 401 and b"token" in body
    status, _, _ = app.request("GET", "/api/overview", headers={"Authorization": "Bearer " + "x" * 5000})
    assert status == 401
    status, _, _ = app.request("GET", "/api/overview", headers={"Authorization": "Bearer " + "\u00e9" * 5000})
    assert status == 401  # not ASCII: compared as bytes, refused, never a 500


def test_readiness_is_not_ready_below_min_free_space(tmp_path: Path) -> None:
    with web_app(tmp_path / "data", min_free_space=2**62) as app:  # more than any disk has free
        status, _, body = app.request("GET", "/readyz", token=False)
        assert status == 503 and body.startswith(b"not ready: below min_free_space: ")
        status, _, body = app.request("GET", "/readyz", {"Accept": "application/json"}, token=False)
        answer = json.loads(body)
        assert status == 503 and answer["ready"] is False and answer["min_free_space"] == 2**62
        assert 0 <= answer["free_bytes"] < 2**62 and answer["reasons"][0].startswith("below min_free_space")
        status, _, page = app.request("GET", "/")
        assert status == 200 and b"Not ready:</b> below min_free_space" in page
        assert app.request("GET", "/api/overview")[2].count(b'"ready": false') == 1


def test_readiness_says_ready_and_shows_free_space(tmp_path: Path) -> None:
    with web_app(tmp_path / "data", min_free_space=1) as app:
        status, _, body = app.request("GET", "/readyz", token=False)
        assert (status, body) == (200, b"ready\n")
        assert b"Free space on data_dir" in app.request("GET", "/")[2]


def test_the_audit_error_metric_counts_lost_events(tmp_path: Path) -> None:
    with web_app(tmp_path / "data") as app:
        before = _audit_errors(app)
        app.trail.close()  # the trail's file gone: every event from here on is lost
        for _ in range(3):
            app.trail.record("association_accepted", calling_ae_title="PROBE")
        assert _audit_errors(app) == before + 3


def _audit_errors(app: App) -> int:
    status, _, body = app.request("GET", "/metrics")
    assert status == 200
    [line] = [x for x in body.decode().splitlines() if x.startswith("dicom_node_audit_write_errors_total ")]
    return int(float(line.split()[1]))

