"""Deployment: ``web.public_url`` (behind a reverse proxy, Retrieve URLs and bulk data URIs start
with it) and ``web.tls`` (HTTPS on the web port with the ``[tls]`` certificate and key)."""

import http.client
import io
import json
import ssl
from dataclasses import replace
from pathlib import Path

import pytest
from aiohttp import web
from pydicom import dcmwrite

from dicom_node.audit import NO_AUDIT
from dicom_node.config import WebSettings, load_settings
from dicom_node.dicomweb import PREFIX, DicomWebContext, make_app
from dicom_node.errors import ConfigError
from dicom_node.store import InstanceStore
from dicom_node.tls import check_files, web_context
from tests.conftest import make_settings
from tests.dicomweb.serve import serve_app
from tests.factories import ct_dataset
from tests.tls.pki import make_pki
from tests.web.inprocess import TOKEN, web_app

PUBLIC = "https://pacs.example.org/node"
BOUNDARY = "deploy"


def stow_body() -> tuple[bytes, str]:
    buffer = io.BytesIO()
    ds = ct_dataset(seed=51)
    dcmwrite(buffer, ds, enforce_file_format=True)
    body = (f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + buffer.getvalue()
            + f"\r\n--{BOUNDARY}--\r\n".encode())
    return body, ds.StudyInstanceUID


def test_public_url_makes_every_retrieve_url_and_bulk_data_uri(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path / "data")
    root = web.Application()
    root.add_subapp(PREFIX, make_app(DicomWebContext(store, NO_AUDIT, 2**31, public_url=PUBLIC)))
    body, study = stow_body()
    try:
        with serve_app(root) as base:
            conn = http.client.HTTPConnection(*base.removeprefix("http://").split(":"), timeout=30)
            conn.request("POST", PREFIX + "/studies", body=body, headers={
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'})
            stowed = json.loads(conn.getresponse().read())
            conn.request("GET", PREFIX + "/studies")
            [found] = json.loads(conn.getresponse().read())
            conn.request("GET", f"{PREFIX}/studies/{study}/metadata")
            [metadata] = json.loads(conn.getresponse().read())
            conn.close()
    finally:
        store.close()
    assert stowed["00081199"]["Value"][0]["00081190"]["Value"][0].startswith(f"{PUBLIC}/dicom-web/studies/{study}/")
    assert found["00081190"]["Value"] == [f"{PUBLIC}/dicom-web/studies/{study}"]
    assert metadata["7FE00010"]["BulkDataURI"].startswith(f"{PUBLIC}/dicom-web/studies/{study}/series/")


@pytest.mark.parametrize("value", ["ftp://x.example", "https://x.example/a?b=1", "pacs.example.org"])
def test_a_malformed_public_url_is_a_config_error(tmp_path: Path, value: str) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f'[web]\npublic_url = "{value}"\n')
    with pytest.raises(ConfigError, match="public_url"):
        load_settings(config, environ={})


def test_web_tls_serves_https_with_the_node_certificate(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    base = make_settings(tmp_path / "data")
    settings = replace(base, tls=replace(base.tls, certificate=pki.node.certificate,
                                         private_key=pki.node.private_key),
                       web=WebSettings(port=0, token=TOKEN, tls=True))
    with web_app(tmp_path / "data", settings=settings.web, dicomweb=True, ssl_context=web_context(settings)) as app:
        client = ssl.create_default_context(cafile=str(pki.ca))
        conn = http.client.HTTPSConnection("127.0.0.1", app.server.port, context=client, timeout=30)
        conn.request("GET", "/dicom-web/studies", headers={"Authorization": f"Bearer {TOKEN}"})
        response = conn.getresponse()
        assert response.status == 200 and response.read() == b"[]"
        assert conn.sock is not None and conn.sock.version() in ("TLSv1.2", "TLSv1.3")
        conn.close()
        plain = http.client.HTTPConnection("127.0.0.1", app.server.port, timeout=30)
        with pytest.raises((http.client.HTTPException, OSError)):  # plain HTTP is not answered
            plain.request("GET", "/healthz")
            plain.getresponse().read()
        plain.close()
    without = replace(settings, tls=replace(settings.tls, certificate=None, private_key=None))
    with pytest.raises(ConfigError, match=r"web\.tls"):
        web_context(without)
    with pytest.raises(ConfigError, match=r"web\.tls"):  # at the node's start, before anything listens
        check_files(without)


@pytest.mark.parametrize(("settings", "location", "secure"), [
    (WebSettings(port=0, token=TOKEN), "/dicom-web/studies?limit=1", False),
    (WebSettings(port=0, token=TOKEN, tls=True), "/dicom-web/studies?limit=1", True),
    (WebSettings(port=0, token=TOKEN, public_url=PUBLIC), f"{PUBLIC}/dicom-web/studies?limit=1", True),
    (WebSettings(port=0, token=TOKEN, public_url="http://node.example.org"),
     "http://node.example.org/dicom-web/studies?limit=1", False),
])
def test_the_login_redirect_and_cookie_follow_the_deployment(tmp_path: Path, settings: WebSettings,
                                                             location: str, secure: bool) -> None:
    """``?token=``: the cookie is ``Secure`` wherever browsers come over HTTPS, and the redirect
    stays under ``web.public_url`` (a proxy at ``/node`` must not send them to ``/dicom-web``)."""
    with web_app(tmp_path / "data", settings=settings, dicomweb=True) as app:
        status, headers, _ = app.request("GET", f"/dicom-web/studies?token={TOKEN}&limit=1", token=False)
    assert status == 303 and headers["Location"] == location
    attributes = [part.strip().lower() for part in headers["Set-Cookie"].split(";")]
    assert ("secure" in attributes) == secure and "httponly" in attributes
