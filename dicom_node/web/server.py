"""The web server of ``dicom-node serve``: dashboard pages, ``/api`` (JSON), ``/metrics``,
``/healthz`` and ``/readyz``, in a thread of the node's process (standard library HTTP server)."""

import hmac
import ipaddress
import logging
import re
import sqlite3
import threading
from collections.abc import Callable
from enum import StrEnum
from functools import partial
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TypeVar
from urllib.parse import SplitResult, parse_qs, urlsplit

import cv2
from pydicom import dcmread

from dicom_node.audit import Audit, job_requeued, result_retried
from dicom_node.config import WebSettings
from dicom_node.errors import ConfigError, DicomNodeError
from dicom_node.export import DeliveryState, OutboxError
from dicom_node.jobs.queue import JobError, JobState
from dicom_node.store.db import MAX_RECORD_ID, DatabaseError, parse_record_id
from dicom_node.store.files import InvalidInstanceError, check_uid
from dicom_node.web import data, pages
from dicom_node.web.metrics import Metrics

logger = logging.getLogger(__name__)
COOKIE = "dicom_node_token"
PREVIEW_WIDTH = 640
#: The longest address answered: the longest page's is about 230 characters (three UIDs), a
#: token adds at most a few hundred. Longer ones (a 60 KB search term) get 400, not a database query.
MAX_URL = 4096
MAX_QUERY_FIELDS = 16
MAX_SEARCH = 64  # a search matches part of a UID, and a UID has at most 64 characters
_MODEL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
Reply = tuple[int, str, bytes]
T = TypeVar("T")
E = TypeVar("E", bound=StrEnum)


class BadRequest(ValueError):
    """A request the server will not run: answered 400 with this short reason (which never
    quotes more than a few characters of what the client sent)."""


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
        self.httpd = _Server((settings.bind, settings.port), handler)
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

    def get(self, path: str, q: dict[str, str]) -> Reply:
        """Answer a GET of ``path`` (``/api`` pages answer JSON).

        Raises
        ------
        BadRequest
            A malformed UID, id, name or parameter (400 with a short reason).
        """
        api = path.startswith("/api/")
        route = path.removeprefix("/api") if api else path
        if route in ("/", "/overview"):
            return _out(api, data.overview(self.src), pages.overview)
        if route == "/studies":
            term = _search(q.get("q", ""))
            return _out(api, data.studies(self.src, term), partial(pages.studies, query=term))
        if route == "/jobs":
            return _out(api, data.jobs(self.src, _state(q, JobState)), pages.jobs)
        if route == "/outbox":
            return _out(api, data.outbox(self.src, _state(q, DeliveryState)), pages.outbox)
        if route == "/models":
            return _out(api, data.models(self.src), pages.models)
        if m := re.fullmatch(r"/studies/([^/]*)", route):
            return self.get_study(api, _uid("Study Instance", m[1]), q)
        if m := re.fullmatch(r"/jobs/([^/]*)", route):
            job = self.src.queue.get(_record_id("job", m[1]))
            if job is None:
                return _missing(api, f"no job {m[1]}")
            return 200, "application/json", data.dumps(data.record_dict(job))
        if m := re.fullmatch(r"/models/([^/]*)", route):
            name = _model_name(m[1])
            named = [x for x in data.models(self.src) if x["name"] == name]
            return _missing(api, f"no model {name}") if not named else _out(api, named[0], pages.model)
        if path.startswith("/preview/"):
            parts = path.removeprefix("/preview/").split("/")
            if len(parts) != 3 or not parts[2].endswith(".png"):
                raise BadRequest("expected /preview/<study UID>/<series UID>/<SOP instance UID>.png")
            kinds = ("Study Instance", "Series Instance", "SOP Instance")
            uids = [_uid(kind, part) for kind, part in zip(kinds, [*parts[:2], parts[2][:-4]], strict=True)]
            return self.preview(*uids)
        return _missing(api, "no such page")

    def get_study(self, api: bool, uid: str, q: dict[str, str]) -> Reply:
        study = data.study(self.src, uid)
        if study is None:
            return _missing(api, f"no study {uid}")
        if not api and "requeued" in q:
            state = q.get("state", "")
            shown = state if state in set(JobState) else ""
            study["notice"] = f"Job {_record_id('job', q['requeued'])} requeued: now {shown}."
        return _out(api, study, pages.study)

    def post(self, path: str) -> Reply:
        """Run an operator action (requeue a job, retry an outbox record).

        Raises
        ------
        BadRequest
            A malformed id (400 with a short reason).
        """
        api = path.startswith("/api/")
        route = path.removeprefix("/api") if api else path
        try:
            if m := re.fullmatch(r"/jobs/([^/]*)/requeue", route):
                job = self.src.queue.requeue(_record_id("job", m[1]))
                event, fields = job_requeued(job, "web")
                self.audit.record(event, **fields)
                if api:
                    return 200, "application/json", data.dumps(data.record_dict(job))
                return _back(f"/studies/{job.study_instance_uid}?requeued={job.id}&state={job.state.value}")
            if m := re.fullmatch(r"/outbox/([^/]*)/retry", route):
                record = self.src.outbox.retry(_record_id("outbox record", m[1]))
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
        return _missing(api, "no such action")

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


def _uid(kind: str, text: str) -> str:
    try:
        return check_uid(kind, text)
    except InvalidInstanceError:  # its message quotes the value; this answer never echoes input
        raise BadRequest(f"malformed {kind} UID: expected digits and dots, at most 64 characters") from None


def _record_id(kind: str, text: str) -> int:
    try:
        return parse_record_id(text)
    except ValueError:
        raise BadRequest(f"malformed {kind} id: expected a number from 1 to {MAX_RECORD_ID}") from None


def _model_name(text: str) -> str:
    if not _MODEL_NAME.fullmatch(text):
        raise BadRequest("malformed model name: expected at most 64 letters, digits, '_', '.', '-'")
    return text


def _search(term: str) -> str:
    if len(term) > MAX_SEARCH:
        raise BadRequest(f"search term too long: at most {MAX_SEARCH} characters (part of a UID)")
    return term


def _state(q: dict[str, str], states: type[E]) -> E | None:
    """The ``state`` parameter as one of ``states``, None if absent or empty."""
    text = q.get("state") or ""
    if not text:
        return None
    if text not in {s.value for s in states}:
        raise BadRequest(f"unknown state: expected one of {', '.join(s.value for s in states)}")
    return states(text)


def _query(url: SplitResult) -> dict[str, str]:
    """The query parameters (the first of each name), bounded in number."""
    try:
        parsed = parse_qs(url.query, max_num_fields=MAX_QUERY_FIELDS)
    except ValueError:
        raise BadRequest(f"too many query parameters: at most {MAX_QUERY_FIELDS}") from None
    return {k: v[0] for k, v in parsed.items()}


def _loggable(path: str) -> str:
    """A request path fit for the log: no query (it may hold a token), bounded, no control
    characters (a forged line)."""
    return ascii(path.split("?", 1)[0][:200])


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


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """An error outside a request's answer (a client gone mid-reply): the log, not stderr."""
        logger.debug("web: connection from %s ended with an error", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    app: WebServer
    server_version = "dicom-node"

    timeout = 30  # a client that never finishes its request does not hold a thread for ever

    def log_message(self, format: str, *args: object) -> None:
        logger.debug("web: %s", (format % args).split("?", 1)[0])  # never the query: it may hold a token

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's own refusals (request line or headers too long, bad syntax):
        a short JSON reason like ours, not its HTML page; an over-long address is a 400 as
        every other malformed request, and nothing a client sends is answered 5xx."""
        if code == HTTPStatus.REQUEST_URI_TOO_LONG:
            code, message = HTTPStatus.BAD_REQUEST, f"URL too long: at most {MAX_URL} characters"
        elif code == HTTPStatus.NOT_IMPLEMENTED:  # a method nobody knows: refused like PUT
            code, message = HTTPStatus.METHOD_NOT_ALLOWED, "method not allowed"
        elif code >= 500:  # e.g. "HTTP/9.9": the client's fault, not the server's
            code = HTTPStatus.BAD_REQUEST
        self.close_connection = True
        # a request line that did not parse leaves HTTP/0.9, which has no status line to say why
        self.request_version = "HTTP/1.0" if self.request_version == "HTTP/0.9" else self.request_version
        reason = message or HTTPStatus(code).phrase
        self._send(code, "application/json", data.dumps({"error": reason}), {"Connection": "close"})

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
        if self.command != "HEAD":
            self.wfile.write(body)

    def _gate(self, query: dict[str, str]) -> tuple[Reply, dict[str, str]] | None:
        """None if allowed, else the answer (421, 401, or the redirect that sets the cookie)."""
        if not self.app.host_allowed(self.headers.get("Host", "")):
            return (421, "text/plain", b"unknown host name\n"), {}
        token = query.get("token", "")
        cookie = _cookie(self.headers.get("Cookie", ""), COOKIE)
        if token and self.app.authorised(f"Bearer {token}", ""):
            # set the cookie, then take the token out of the address bar and history
            cookie_header = f"{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/"
            return (303, urlsplit(self.path).path, b""), {"Set-Cookie": cookie_header}
        if self.app.authorised(self.headers.get("Authorization", ""), cookie):
            return None
        unauthorised = b'{"error": "a bearer token is required"}'
        return (401, "application/json", unauthorised), {"WWW-Authenticate": "Bearer"}

    def _answer(self, route: Callable[[SplitResult], tuple[Reply, dict[str, str]]]) -> None:
        """Run ``route`` and send its answer. Whatever it raises, the client gets a short
        answer, never a traceback: 400 for a bad request, 503 if the database does not answer,
        500 otherwise; the log gets the error with the path only (no query values)."""
        extra: dict[str, str] = {}
        try:
            if len(self.path) > MAX_URL:
                raise BadRequest(f"URL too long: at most {MAX_URL} characters")
            reply, extra = route(urlsplit(self.path))
        except BadRequest as exc:
            reply = (400, "application/json", data.dumps({"error": str(exc)}))
        except (sqlite3.OperationalError, DatabaseError):
            logger.error("web: %s %s: the database did not answer", self.command, _loggable(self.path),
                         exc_info=True)
            reply = (503, "application/json", b'{"error": "the database did not answer; try again"}')
        except Exception:
            logger.error("web: %s %s failed", self.command, _loggable(self.path), exc_info=True)
            reply = (500, "application/json", b'{"error": "internal error (see the node\'s log)"}')
        self._send(*reply, extra)

    def _get(self, url: SplitResult) -> tuple[Reply, dict[str, str]]:
        if url.path == "/healthz":
            return (200, "text/plain", b"ok\n"), {}
        if url.path == "/readyz":
            state = data.ready(self.app.src)
            status = 200 if state.ready else 503
            if "application/json" in self.headers.get("Accept", ""):
                return (status, "application/json", state.as_json()), {}
            return (status, "text/plain", state.as_text()), {}
        query = _query(url)
        refused = self._gate(query)
        if refused is not None:
            return refused
        if url.path == "/metrics":
            text = self.app.metrics.render(self.app.src, self.app.audit_errors())
            return (200, "text/plain; version=0.0.4", text.encode()), {}
        return self.app.get(url.path, query), {}

    def _post(self, url: SplitResult) -> tuple[Reply, dict[str, str]]:
        refused = self._gate({})
        if refused is not None:
            return refused
        origin = self.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != self.headers.get("Host", ""):
            # cross-site request forgery: another page's form or script posting to the dashboard
            return (403, "application/json", b'{"error": "cross-origin request refused"}'), {}
        if origin is None and self.headers.get("Sec-Fetch-Site", "same-origin") not in (
            "same-origin",
            "none",
        ):
            return (403, "application/json", b'{"error": "cross-site request refused"}'), {}
        return self.app.post(url.path), {}

    def _not_allowed(self, url: SplitResult) -> tuple[Reply, dict[str, str]]:
        return (405, "application/json", b'{"error": "method not allowed"}'), {"Allow": "GET, POST"}

    def do_GET(self) -> None:
        self._answer(self._get)

    def do_POST(self) -> None:
        self._answer(self._post)

    def do_HEAD(self) -> None:
        self._answer(self._not_allowed)

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD
