"""The web server of ``dicom-node serve``: dashboard pages, ``/api`` (JSON), ``/metrics``,
``/healthz`` and ``/readyz``, in a thread of the node's process (standard library HTTP server)."""

import hmac
import ipaddress
import logging
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TypeVar
from urllib.parse import parse_qs, urlsplit

import cv2
from pydicom import dcmread

from dicom_node.audit import Audit, job_requeued, result_retried
from dicom_node.config import WebSettings
from dicom_node.errors import ConfigError, DicomNodeError
from dicom_node.export import OutboxError
from dicom_node.jobs.queue import JobError
from dicom_node.web import data, pages
from dicom_node.web.metrics import Metrics

logger = logging.getLogger(__name__)
COOKIE = "dicom_node_token"
PREVIEW_WIDTH = 640
Reply = tuple[int, str, bytes]
T = TypeVar("T")


def check_exposure(settings: WebSettings) -> None:
    """A dashboard on anything but loopback must have a token: it can re-drive work."""
    try:
        loopback = ipaddress.ip_address(settings.bind).is_loopback
    except ValueError:
        loopback = settings.bind == "localhost"
    if not loopback and not settings.token:
        raise ConfigError(
            f"web.bind = {settings.bind!r} is not loopback: set web.token "
            "(or DICOM_NODE_WEB_TOKEN), or bind to 127.0.0.1"
        )


class WebServer:
    """Routes requests to :mod:`.data` and renders them as HTML or JSON."""

    def __init__(self, settings: WebSettings, src: data.Sources, metrics: Metrics, audit: Audit) -> None:
        check_exposure(settings)
        self.settings, self.src, self.metrics, self.audit = settings, src, metrics, audit
        handler = type("Handler", (_Handler,), {"app": self})
        self.httpd = ThreadingHTTPServer((settings.bind, settings.port), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="web", daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> "WebServer":
        self.thread.start()
        logger.info("dashboard on http://%s:%d/", self.settings.bind, self.port)
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)

    def audit_errors(self) -> int:
        sinks = getattr(self.audit, "sinks", (self.audit,))
        return sum(int(getattr(sink, "errors", 0)) for sink in sinks)

    def host_allowed(self, host: str) -> bool:
        """DNS rebinding: a page of another site must not reach the dashboard by a name that
        resolves to it. On loopback only loopback names are answered."""
        name = host.rsplit(":", 1)[0].strip("[]").lower() if host else ""
        if self.settings.bind in ("0.0.0.0", "::"):
            return True  # every address: the token guards it
        return name in {"127.0.0.1", "localhost", "::1", self.settings.bind.lower()}

    def authorised(self, header: str, cookie: str) -> bool:
        token = self.settings.token
        if not token:
            return True
        scheme, _, value = header.partition(" ")
        offered = value.strip() if scheme.lower() == "bearer" else cookie
        return bool(offered) and hmac.compare_digest(offered.encode(), token.encode())

    def get(self, path: str, query: dict[str, list[str]]) -> Reply:
        q = {k: v[0] for k, v in query.items()}
        api = path.startswith("/api/")
        route = path.removeprefix("/api") if api else path
        if route in ("/", "/overview"):
            return _out(api, data.overview(self.src), pages.overview)
        if route == "/studies":
            rows = data.studies(self.src, q.get("q", ""))
            return (
                (200, "application/json", data.dumps(rows))
                if api
                else (200, "text/html", pages.studies(rows, q.get("q", "")))
            )
        if m := re.fullmatch(r"/studies/([0-9.]{1,64})", route):
            study = data.study(self.src, m[1])
            if study is None:
                return _missing(api, f"no study {m[1]}")
            if not api and "requeued" in q:
                study["notice"] = f"Job {q['requeued']} requeued: now {q.get('state', '')}."
            return _out(api, study, pages.study)
        if route == "/jobs":
            return _out(api, data.jobs(self.src, q.get("state") or None), pages.jobs)
        if m := re.fullmatch(r"/jobs/(\d+)", route):
            job = self.src.queue.get(int(m[1]))
            return (
                _missing(api, f"no job {m[1]}")
                if job is None
                else (200, "application/json", data.dumps(data.record_dict(job)))
            )
        if route == "/outbox":
            return _out(api, data.outbox(self.src, q.get("state") or None), pages.outbox)
        if route == "/models":
            return _out(api, data.models(self.src), pages.models)
        if m := re.fullmatch(r"/models/([A-Za-z0-9_.-]+)", route):
            named = [x for x in data.models(self.src) if x["name"] == m[1]]
            return _missing(api, f"no model {m[1]}") if not named else _out(api, named[0], pages.model)
        if m := re.fullmatch(r"/preview/([0-9.]+)/([0-9.]+)/([0-9.]+)\.png", path):
            return self.preview(m[1], m[2], m[3])
        return _missing(api, f"no page {path}")

    def post(self, path: str) -> Reply:
        api = path.startswith("/api/")
        route = path.removeprefix("/api") if api else path
        try:
            if m := re.fullmatch(r"/jobs/(\d+)/requeue", route):
                job = self.src.queue.requeue(int(m[1]))
                event, fields = job_requeued(job, "web")
                self.audit.record(event, **fields)
                if api:
                    return 200, "application/json", data.dumps(data.record_dict(job))
                return _back(f"/studies/{job.study_instance_uid}?requeued={job.id}&state={job.state.value}")
            if m := re.fullmatch(r"/outbox/(\d+)/retry", route):
                record = self.src.outbox.retry(int(m[1]))
                event, fields = result_retried(record, "web")
                self.audit.record(event, **fields)
                return (
                    (200, "application/json", data.dumps(data.record_dict(record)))
                    if api
                    else _back("/outbox")
                )
        except (JobError, OutboxError) as exc:
            missing = "does not exist" in str(exc) or str(exc).startswith("no outbox record")
            return (404 if missing else 409), "application/json", data.dumps({"error": str(exc)})
        return _missing(api, f"no action {path}")

    def preview(self, study: str, series: str, sop: str) -> Reply:
        """A PNG of an overlay (a Secondary Capture the node made), scaled to 640 px wide."""
        try:
            path = data.result_path(self.src.data_dir, study, series, sop)
            pixels = dcmread(path).pixel_array
        except (DicomNodeError, OSError, ValueError, AttributeError):
            return 404, "text/plain", b"no such overlay"
        height = max(1, round(pixels.shape[0] * PREVIEW_WIDTH / pixels.shape[1]))
        small = cv2.resize(pixels, (PREVIEW_WIDTH, height), interpolation=cv2.INTER_AREA)
        ok, png = cv2.imencode(".png", cv2.cvtColor(small, cv2.COLOR_RGB2BGR) if small.ndim == 3 else small)
        return (200, "image/png", png.tobytes()) if ok else (500, "text/plain", b"encoding failed")


def _cookie(header: str, name: str) -> str:
    """One cookie's value, read by hand: a malformed cookie of another application on this host
    must not hide ours (``http.cookies`` gives up on the whole header)."""
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value.strip('"')
    return ""


def _out(api: bool, value: T, render: Callable[[T], bytes]) -> Reply:
    return (200, "application/json", data.dumps(value)) if api else (200, "text/html", render(value))


def _missing(api: bool, what: str) -> Reply:
    return (
        (404, "application/json", data.dumps({"error": what}))
        if api
        else (404, "text/html", pages.not_found(what))
    )


def _back(location: str) -> Reply:
    return 303, location, b""


class _Handler(BaseHTTPRequestHandler):
    app: WebServer
    server_version = "dicom-node"

    timeout = 30  # a client that never finishes its request does not hold a thread for ever

    def log_message(self, format: str, *args: object) -> None:
        logger.debug("web: %s", (format % args).split("?", 1)[0])  # never the query: it may hold a token

    def _send(self, status: int, content_type: str, body: bytes, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        if status == 303:
            self.send_header("Location", content_type)
        else:
            self.send_header(
                "Content-Type",
                content_type
                + ("; charset=utf-8" if "text" in content_type or "json" in content_type else ""),
            )
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _gate(self, query: dict[str, list[str]]) -> dict[str, str] | None:
        """None if allowed (with headers to set), else the request was answered 401."""
        if not self.app.host_allowed(self.headers.get("Host", "")):
            self._send(421, "text/plain", b"unknown host name\n")
            return None
        token = query.get("token", [""])[0]
        cookie = _cookie(self.headers.get("Cookie", ""), COOKIE)
        if token and self.app.authorised(f"Bearer {token}", ""):
            # set the cookie, then take the token out of the address bar and history
            self._send(
                303,
                urlsplit(self.path).path,
                b"",
                {"Set-Cookie": f"{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/"},
            )
            return None
        if self.app.authorised(self.headers.get("Authorization", ""), cookie):
            return {}
        self._send(
            401,
            "application/json",
            b'{"error": "a bearer token is required"}',
            {"WWW-Authenticate": "Bearer"},
        )
        return None

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/healthz":
            return self._send(200, "text/plain", b"ok\n")
        if url.path == "/readyz":
            reason = self.app.src.ready()
            return self._send(200 if reason is None else 503, "text/plain", f"{reason or 'ready'}\n".encode())
        query = parse_qs(url.query)
        extra = self._gate(query)
        if extra is None:
            return None
        try:
            if url.path == "/metrics":
                reply: Reply = (
                    200,
                    "text/plain; version=0.0.4",
                    self.app.metrics.render(self.app.src).encode(),
                )
            else:
                reply = self.app.get(url.path, query)
        except ValueError as exc:  # e.g. an unknown ?state=
            reply = (400, "application/json", data.dumps({"error": str(exc)}))
        except Exception:
            logger.exception("web: GET %s failed", url.path)
            reply = (500, "text/plain", b"internal error (see the node's log)")
        self._send(*reply, extra)
        return None

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        if self._gate({}) is None:
            return
        origin = self.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != self.headers.get("Host", ""):
            # cross-site request forgery: another page's form or script posting to the dashboard
            self._send(403, "application/json", b'{"error": "cross-origin request refused"}')
            return
        if origin is None and self.headers.get("Sec-Fetch-Site", "same-origin") not in (
            "same-origin",
            "none",
        ):
            self._send(403, "application/json", b'{"error": "cross-site request refused"}')
            return
        try:
            reply = self.app.post(url.path)
        except Exception:
            logger.exception("web: POST %s failed", url.path)
            reply = (500, "text/plain", b"internal error (see the node's log)")
        self._send(*reply)
