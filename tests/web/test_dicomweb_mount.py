"""The DICOMweb sub-application mounted in the web server: reached under /dicom-web, behind the
same token, host and cross-site rules as the dashboard, with CORS for listed origins only.

A probe route added to the real sub-application (its QIDO/WADO/STOW routes are tested in
tests/dicomweb) answers what it sees of the node's context, so a 200 proves the request reached
the sub-application and a 401/403/421 that a root middleware stopped it first."""

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from dicom_node.config import WebSettings
from dicom_node.dicomweb import CONTEXT, PREFIX, DicomWebContext, make_app
from dicom_node.web import server
from tests.factories import ct_dataset
from tests.web.inprocess import TOKEN, App, web_app

OHIF = "http://ohif.example:3000"
PROBE = PREFIX + "/probe"


async def probe(request: web.Request) -> web.Response:
    ctx = request.config_dict[CONTEXT]
    return web.json_response({"method": request.method, "max_instance_size": ctx.max_instance_size,
                              "data_dir": str(ctx.store.data_dir)})


def make_probed_app(ctx: DicomWebContext) -> web.Application:
    app = make_app(ctx)
    app.router.add_get("/probe", probe, allow_head=False)
    app.router.add_post("/probe", probe)
    return app


@pytest.fixture
def probed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "make_app", make_probed_app)


@pytest.fixture
def app(tmp_path: Path, probed: None) -> Iterator[App]:
    settings = WebSettings(port=0, token=TOKEN, cors_origins=(OHIF,))
    with web_app(tmp_path / "data", settings=settings, dicomweb=True) as served:
        yield served


def test_a_get_under_dicom_web_reaches_the_sub_application_with_the_nodes_store(app: App) -> None:
    status, headers, body = app.request("GET", PROBE)
    assert status == 200, body
    answer = json.loads(body)
    assert answer["data_dir"] == str(app.src.data_dir) and answer["max_instance_size"] == 2**31
    assert headers["Cache-Control"] == "no-store" and headers["Server"] == "dicom-node"
    status, _, body = app.request("GET", PREFIX + "/no/such/resource")  # the sub-app's own 404
    assert status == 404 and json.loads(body)["error"] == "not found"


def test_the_token_and_host_rules_hold_under_dicom_web(app: App) -> None:
    for path in (PROBE, PREFIX + "/no/such/resource", PREFIX + "/studies"):
        status, headers, _ = app.request("GET", path, token=False)
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer", path
        assert app.request("GET", path, {"Authorization": "Bearer wrong-token-0123456789"}, token=False)[0] == 401
    assert app.request("GET", PROBE, {"Host": "rebound.example"})[0] == 421
    assert app.request("GET", PROBE + "?" + "&".join(f"k{i}=1" for i in range(40)))[0] == 200  # QIDO keys
    assert app.request("GET", PROBE + "?x=" + "1" * 5000)[0] == 400  # the URL limit holds


def test_the_cookie_login_reaches_dicom_web_too(app: App) -> None:
    status, headers, _ = app.request("GET", f"/?token={TOKEN}", token=False)
    assert status == 303 and headers["Location"] == "/"
    cookie = headers["Set-Cookie"].split(";")[0]
    assert "HttpOnly" in headers["Set-Cookie"] and "SameSite=Strict" in headers["Set-Cookie"]
    assert app.request("GET", PROBE, {"Cookie": cookie}, token=False)[0] == 200
    # a malformed cookie of another application on this host does not hide ours
    assert app.request("GET", PROBE, {"Cookie": f'other="un;closed; {cookie}'}, token=False)[0] == 200


def test_the_cookie_is_refused_to_another_site_page_without_an_origin(app: App) -> None:
    login = app.request("GET", f"/?token={TOKEN}", token=False)[1]["Set-Cookie"].split(";")[0]
    for site, mode, expected in (("same-site", "cors", 403), ("cross-site", "no-cors", 403),
                                 ("same-site", "navigate", 200), ("same-origin", "cors", 200), ("none", "navigate", 200)):
        headers = {"Cookie": login, "Sec-Fetch-Site": site, "Sec-Fetch-Mode": mode}
        for path in (PROBE, "/api/jobs"):
            assert app.request("GET", path, headers, token=False)[0] == expected, (site, mode, path)


def test_the_cookie_login_keeps_the_rest_of_the_query(app: App) -> None:
    from urllib.parse import parse_qsl, urlsplit

    path = f"{PREFIX}/studies?PatientName=DOE%5EJ*&token={TOKEN}&includefield=00080020&includefield=StudyID"
    status, headers, _ = app.request("GET", path, token=False)
    assert status == 303
    location = urlsplit(headers["Location"])
    assert location.path == f"{PREFIX}/studies" and TOKEN not in headers["Location"]
    assert parse_qsl(location.query) == [("PatientName", "DOE^J*"), ("includefield", "00080020"),
                                         ("includefield", "StudyID")]
    assert app.request("GET", f"/jobs?token={TOKEN}", token=False)[1]["Location"] == "/jobs"


def test_posts_from_dicomweb_clients_and_the_cross_site_rules(app: App) -> None:
    login = app.request("GET", f"/?token={TOKEN}", token=False)[1]["Set-Cookie"].split(";")[0]
    host = f"127.0.0.1:{app.server.port}"
    cases = [
        ({}, True, 200),  # Orthanc's DICOMweb plugin, dicomweb-client: a bearer token, no Origin
        ({"Origin": f"http://{host}"}, True, 200),  # the dashboard's own page
        ({"Origin": OHIF}, True, 200),  # a listed origin with a bearer token (OHIF's STOW)
        ({"Origin": "http://evil.example"}, True, 403),  # an origin not listed
        ({"Sec-Fetch-Site": "cross-site"}, True, 403),
        ({"Origin": OHIF, "Cookie": login}, False, 403),  # the cookie never authorises a cross-origin POST
        ({"Origin": "http://evil.example", "Cookie": login}, False, 403),
        ({"Cookie": login}, False, 200),
    ]
    for headers, bearer, expected in cases:
        status, _, body = app.request("POST", PROBE, headers, token=bearer)
        assert status == expected, (headers, body)


def test_cors_for_a_listed_origin_only(app: App) -> None:
    preflight = {"Origin": OHIF, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    status, headers, _ = app.request("OPTIONS", PROBE, preflight, token=False)  # browsers send no token
    assert status == 204 and headers["Access-Control-Allow-Origin"] == OHIF
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert "Authorization" in headers["Access-Control-Allow-Headers"]
    status, headers, _ = app.request("GET", PROBE, {"Origin": OHIF})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == OHIF and "Origin" in headers["Vary"]
    assert "Content-Location" in headers["Access-Control-Expose-Headers"]
    status, headers, _ = app.request("GET", PROBE, {"Origin": OHIF}, token=False)  # readable refusal
    assert status == 401 and headers["Access-Control-Allow-Origin"] == OHIF
    for origin in ("http://evil.example", "null"):
        status, headers, _ = app.request("OPTIONS", PROBE, {**preflight, "Origin": origin}, token=False)
        assert status == 401 and not any(k.startswith("Access-Control") for k in headers), origin
        status, headers, _ = app.request("GET", PROBE, {"Origin": origin})
        assert status == 200 and not any(k.startswith("Access-Control") for k in headers), origin


def test_cors_is_off_by_default_and_star_allows_any_origin(tmp_path: Path, probed: None) -> None:
    with web_app(tmp_path / "off", dicomweb=True) as app:
        status, headers, _ = app.request("GET", PROBE, {"Origin": OHIF})
        assert status == 200 and not any(k.startswith("Access-Control") for k in headers)
        preflight = {"Origin": OHIF, "Access-Control-Request-Method": "GET"}
        assert app.request("OPTIONS", PROBE, preflight, token=False)[0] == 401
    settings = WebSettings(port=0, token=TOKEN, cors_origins=("*",))
    with web_app(tmp_path / "star", settings=settings, dicomweb=True) as app:
        status, headers, _ = app.request("OPTIONS", PROBE, preflight, token=False)
        assert status == 204 and headers["Access-Control-Allow-Origin"] == "*"
        status, headers, _ = app.request("GET", PROBE, {"Origin": "http://any.example"})
        assert status == 200 and headers["Access-Control-Allow-Origin"] == "*"


def test_cors_needs_a_token(tmp_path: Path) -> None:
    """Without a token a listed origin (or "*") would let any page read patient names from QIDO."""
    from dicom_node.errors import ConfigError
    from dicom_node.web.middleware import check_exposure

    for origins in (("*",), (OHIF,)):
        with pytest.raises(ConfigError, match=r"web\.cors_origins.*web\.token"):
            check_exposure(WebSettings(port=0, cors_origins=origins))
        data, settings = tmp_path / str(len(origins[0])), WebSettings(port=0, cors_origins=origins)
        with pytest.raises(ConfigError, match=r"web\.cors_origins"), web_app(data, settings=settings):
            pass
    check_exposure(WebSettings(port=0, token=TOKEN, cors_origins=("*",)))
    check_exposure(WebSettings(port=0))  # loopback, same origin: no token needed, as before


def test_cors_never_reaches_the_dashboard_or_the_api(tmp_path: Path, probed: None) -> None:
    settings = WebSettings(port=0, token=TOKEN, cors_origins=("*",))
    with web_app(tmp_path / "data", settings=settings, dicomweb=True) as app:
        for path in ("/api/overview", "/", "/metrics"):
            status, headers, _ = app.request("GET", path, {"Origin": OHIF})
            assert status == 200 and not any(k.startswith("Access-Control") for k in headers), path
        preflight = {"Origin": OHIF, "Access-Control-Request-Method": "POST"}
        status, headers, _ = app.request("OPTIONS", "/api/jobs/1/requeue", preflight, token=False)
        assert status == 401 and not any(k.startswith("Access-Control") for k in headers)
        for bearer in (True, False):  # actions refuse every cross-origin POST, token or not
            status, _, body = app.request("POST", "/api/jobs/1/requeue", {"Origin": OHIF}, token=bearer)
            assert status in (401, 403) and status == (403 if bearer else 401), body
        status, headers, _ = app.request("GET", PREFIX + "/studies", {"Origin": OHIF})
        assert status == 200 and headers["Access-Control-Allow-Origin"] == "*"
        assert "Access-Control-Allow-Credentials" not in headers


def test_the_cookie_never_authorises_a_cross_origin_request(app: App) -> None:
    login = app.request("GET", f"/?token={TOKEN}", token=False)[1]["Set-Cookie"].split(";")[0]
    for origin in (OHIF, "http://evil.example", "null"):
        for method in ("GET", "POST"):
            status, headers, _ = app.request(method, PROBE, {"Origin": origin, "Cookie": login}, token=False)
            assert status == 403, (origin, method)
            assert "Access-Control-Allow-Credentials" not in headers
    host = f"127.0.0.1:{app.server.port}"
    assert app.request("GET", PROBE, {"Origin": f"http://{host}", "Cookie": login}, token=False)[0] == 200


def test_without_dicomweb_nothing_is_mounted(tmp_path: Path, probed: None) -> None:
    with web_app(tmp_path / "data") as app:
        status, _, body = app.request("GET", PROBE)
        assert status == 404 and json.loads(body)["error"] == "not found"


def test_on_loopback_without_a_token_dicomweb_is_open_but_cross_site_posts_are_not(
        tmp_path: Path, probed: None) -> None:
    with web_app(tmp_path / "data", settings=WebSettings(port=0), dicomweb=True) as app:
        assert app.request("GET", PROBE, token=False)[0] == 200
        assert app.request("POST", PROBE, token=False)[0] == 200
        assert app.request("POST", PROBE, {"Origin": "http://evil.example"}, token=False)[0] == 403


def test_the_node_mounts_dicomweb_over_its_store_and_audit(tmp_path: Path, probed: None) -> None:
    import urllib.request
    from dataclasses import replace

    from dicom_node.config import InferenceSettings, ModelsSettings
    from dicom_node.node import Node
    from tests.conftest import make_settings

    (tmp_path / "models").mkdir()
    base = replace(make_settings(tmp_path / "data"), models=ModelsSettings(dir=tmp_path / "models"),
                   inference=InferenceSettings(device="cpu"))
    for enabled, expected in ((True, 200), (False, 404)):
        node = Node(replace(base, web=WebSettings(port=0, token=TOKEN, dicomweb=enabled)))
        node.start()
        try:
            assert node.web is not None
            request = urllib.request.Request(f"http://127.0.0.1:{node.web.port}{PROBE}",
                                             headers={"Authorization": f"Bearer {TOKEN}"})
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    status, answer = response.status, json.loads(response.read())
            except urllib.error.HTTPError as exc:
                status, answer = exc.code, {}
            assert status == expected
            if enabled:
                assert answer["data_dir"] == str(node.store.data_dir)
                assert answer["max_instance_size"] == base.ingest.max_instance_size
        finally:
            node.stop()


def test_a_stop_with_a_request_in_flight_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    import threading
    import time

    def with_slow_route(ctx: DicomWebContext) -> web.Application:
        async def slow(request: web.Request) -> web.Response:
            await asyncio.sleep(120)  # a client holding a response for longer than any stop may wait
            return web.Response()

        app = make_app(ctx)
        app.router.add_get("/slow", slow)
        return app

    monkeypatch.setattr(server, "make_app", with_slow_route)
    with web_app(tmp_path / "data", dicomweb=True) as app:
        answers: list[object] = []
        client = threading.Thread(target=lambda: answers.append(_try(app, PREFIX + "/slow")), daemon=True)
        client.start()
        deadline = time.monotonic() + 10
        while not app.server.runner.server or not app.server.runner.server.connections:
            assert time.monotonic() < deadline, "the slow request never arrived"
            time.sleep(0.01)
        started = time.monotonic()
        app.server.stop()
        took = time.monotonic() - started
        client.join(timeout=10)
    assert took < server.STOP_GRACE_SECONDS + 3, f"the stop took {took:.1f} s"
    assert answers and not client.is_alive()  # the client got an answer or a closed connection


def _try(app: App, path: str) -> object:
    try:
        return app.request("GET", path)[0]
    except OSError as exc:
        return exc


def test_dicomweb_client_with_a_bearer_token_passes_the_gate(app: App) -> None:
    """dicomweb-client (the Python library) sends the token as a header and no Origin: its GETs
    and its STOW-RS POST pass every rule; without the token they are refused before the
    sub-application. (Whatever QIDO-RS and STOW-RS answer is theirs: tests/dicomweb.)"""
    import requests
    from dicomweb_client.api import DICOMwebClient

    url = f"http://127.0.0.1:{app.server.port}{PREFIX}"

    def status(call: Callable[[], object]) -> int:
        try:
            call()
        except requests.HTTPError as exc:
            return int(exc.response.status_code)
        return 200

    client = DICOMwebClient(url, headers={"Authorization": f"Bearer {TOKEN}"})
    anonymous = DICOMwebClient(url)
    instance = ct_dataset(seed=11)
    assert status(client.search_for_studies) not in (401, 403, 421)
    assert status(lambda: client.store_instances([instance])) not in (401, 403, 421)
    assert status(anonymous.search_for_studies) == 401
    assert status(lambda: anonymous.store_instances([instance])) == 401
