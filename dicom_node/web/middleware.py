"""The rules every request passes, as aiohttp middlewares of the root application; they hold
for the mounted DICOMweb sub-application too (a root middleware runs before any sub-application's
handler).

In order, outermost first (:meth:`Gate.middlewares`):

1. ``answer_errors``: whatever an inner layer raises, the client gets a short answer and never a
   traceback (400 for :class:`BadRequest`, the router's 404/405 as JSON or the dashboard's page,
   503 when SQLite does not answer, 500 otherwise); the log gets the path, the exception's type
   and its stack, never its message (it may quote a data set's value). An error after a
   streamed answer has started (its status line is sent) closes the connection instead: a
   second answer would land inside the first one's body.
2. ``check_limits``: the whole URL at most :data:`MAX_URL` characters and no ``.``/``..`` path
   segment (the router would see them resolved); on the dashboard, at most
   :data:`MAX_QUERY_FIELDS` query parameters and no percent-encoding in the path (ids, UIDs and
   model names never need it, so an encoded one is an attempt to slip past a check).
3. ``check_host``: on a loopback bind only loopback names are answered (421; DNS rebinding).
4. ``preflight``: a CORS preflight from a listed origin to a DICOMweb path is answered here,
   before authentication (browsers send no credentials with it).
5. ``authenticate``: the bearer token (header) or the cookie ``/?token=`` sets (``Secure`` under
   ``web.tls`` or an ``https`` ``web.public_url``; the redirect that follows goes under
   ``web.public_url`` when it is set); 401 otherwise.
   A request from another origin authenticated by the cookie alone is refused (403): the cookie
   is the dashboard's, never a credential of a page elsewhere. So is one a browser marks
   ``Sec-Fetch-Site: same-site`` or ``cross-site`` without an ``Origin`` (a ``fetch`` GET, an
   ``<img>``), except a top-level GET navigation (a link followed to the dashboard).
6. ``refuse_cross_site``: a POST (any unsafe method) from another origin is refused (403) unless
   it goes to DICOMweb, the origin is listed in ``web.cors_origins`` and the request carries the
   bearer token (a header another site's form cannot forge). The dashboard and ``/api`` refuse
   every cross-origin POST.

``/healthz`` and ``/readyz`` pass 3 to 6 untouched: probes reach them by any name, without a token.
CORS applies under :data:`~dicom_node.dicomweb.PREFIX` only: its headers are added to those
answers, streamed ones included, by :meth:`Gate.on_prepare`, and never to the dashboard's or
``/api``'s. No ``Access-Control-Allow-Credentials`` is ever sent, and a listed origin needs
``web.token`` (:func:`check_exposure`): QIDO-RS and WADO-RS answers carry patient names.
"""

import asyncio
import hmac
import ipaddress
import logging
import sqlite3
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from dicom_node.config import WebSettings
from dicom_node.dicomweb import PREFIX
from dicom_node.errors import ConfigError
from dicom_node.logs import bare_traceback
from dicom_node.store.db import DatabaseError
from dicom_node.web import pages
from dicom_node.web.data import dumps

logger = logging.getLogger(__name__)

COOKIE = "dicom_node_token"
#: The longest address answered: the longest page's is about 230 characters (three UIDs), a
#: token adds at most a few hundred. Longer ones (a 60 KB search term) get 400, not a database query.
MAX_URL = 4096
MAX_QUERY_FIELDS = 16
#: Paths answered by any host name and without a token (probes).
OPEN = frozenset({"/healthz", "/readyz"})
UNSAFE = frozenset({"POST", "PUT", "DELETE", "PATCH"})
#: How a request was authenticated: "bearer", "cookie" or "none".
CREDENTIAL = web.RequestKey("credential", str)
CORS_METHODS = "GET, POST, OPTIONS"
CORS_REQUEST_HEADERS = "Authorization, Accept, Content-Type"
CORS_EXPOSED = "Content-Type, Content-Length, Content-Location, Location, Warning, WWW-Authenticate"
CORS_MAX_AGE = "600"
#: Set on a request once its response's status line and headers are on their way.
PREPARED = web.RequestKey("prepared", bool)


class BadRequest(ValueError):
    """A request the server will not run: answered 400 with this short reason (which never
    quotes more than a few characters of what the client sent)."""


def check_exposure(settings: WebSettings) -> None:
    """A dashboard on anything but loopback must have a token: it can re-drive work. So must
    CORS: without a token any page on the web could read the patient data DICOMweb answers."""
    if not _loopback(settings.bind) and not settings.token:
        raise ConfigError(
            f"web.bind = {settings.bind!r} is not loopback: set web.token "
            "(or DICOM_NODE_WEB_TOKEN), or bind to 127.0.0.1"
        )
    if settings.cors_origins and not settings.token:
        raise ConfigError(
            f"web.cors_origins = {list(settings.cors_origins)!r} needs web.token "
            "(or DICOM_NODE_WEB_TOKEN): without it any page of a listed origin reads patient data; "
            "set a token or empty web.cors_origins"
        )


def error(status: int, reason: str, headers: dict[str, str] | None = None) -> web.Response:
    """A short JSON refusal: ``{"error": reason}``."""
    return web.Response(status=status, body=dumps({"error": reason}), content_type="application/json",
                        headers=headers)


def loggable(request: web.BaseRequest) -> str:
    """A request path fit for the log: no query (it may hold a token), bounded, no control
    characters (a forged line)."""
    return ascii(request.rel_url.raw_path[:200])


class Gate:
    """The middlewares and the response hook of one web server, over its settings."""

    def __init__(self, settings: WebSettings) -> None:
        self.settings = settings
        self.origins = frozenset(settings.cors_origins)
        #: Whether browsers reach the node over HTTPS (directly or through a proxy): the login
        #: cookie is then ``Secure``, never sent over plain HTTP.
        self.https = settings.tls or settings.public_url.startswith("https://")

    def middlewares(self) -> list[Middleware]:
        return [self.answer_errors, self.check_limits, self.check_host, self.preflight,
                self.authenticate, self.refuse_cross_site]

    @web.middleware
    async def answer_errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except BadRequest as exc:
            return error(400, str(exc))
        except web.HTTPException as exc:
            if exc.status < 400 or exc.text != f"{exc.status}: {exc.reason}":
                raise  # a redirect, or an answer with a body of its own (DICOMweb's)
            return _refusal(request, exc)
        except (asyncio.CancelledError, ConnectionResetError):
            raise  # the client went away: nothing to answer
        except Exception as exc:
            return _failed(request, exc)

    @web.middleware
    async def check_limits(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if len(request.raw_path) > MAX_URL:
            raise BadRequest(f"URL too long: at most {MAX_URL} characters")
        if {".", ".."} & set(request.raw_path.split("?", 1)[0].split("/")):
            # the router sees the path with these segments resolved: refused, not silently followed
            raise BadRequest("malformed path: '.' and '..' segments are not allowed")
        if not under(request.path, PREFIX):
            if len(request.query) > MAX_QUERY_FIELDS:
                raise BadRequest(f"too many query parameters: at most {MAX_QUERY_FIELDS}")
            if "%" in request.rel_url.raw_path:
                raise BadRequest("malformed path: ids, UIDs and names need no percent-encoding")
        return await handler(request)

    @web.middleware
    async def check_host(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in OPEN and not self.host_allowed(request.headers.get("Host", "")):
            return web.Response(status=421, text="unknown host name\n")
        return await handler(request)

    @web.middleware
    async def preflight(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin", "")
        if (request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers
                and self.cors_allows(request, origin)):
            return web.Response(status=204, headers={
                "Access-Control-Allow-Methods": CORS_METHODS,
                "Access-Control-Allow-Headers": CORS_REQUEST_HEADERS,
                "Access-Control-Max-Age": CORS_MAX_AGE,
            })
        return await handler(request)

    @web.middleware
    async def authenticate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN:
            return await handler(request)
        token = self.settings.token
        if not token:
            request[CREDENTIAL] = "none"
            return await handler(request)
        offered = request.query.get("token", "")
        if request.method == "GET" and offered and _same(offered, token):
            # set the cookie, then take the token out of the address bar and history; the rest
            # of the query stays (a QIDO-RS search's keys)
            kept = [(key, value) for key, value in request.rel_url.query.items() if key != "token"]
            # behind a proxy the address is under web.public_url's path (https://host/node/...)
            back = web.HTTPSeeOther(self.settings.public_url + (str(request.rel_url.with_query(kept)) or "/"))
            back.set_cookie(COOKIE, token, httponly=True, samesite="Strict", path="/", secure=self.https)
            raise back
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            request[CREDENTIAL] = "bearer"
            if _same(value.strip(), token):
                return await handler(request)
        elif _same(request.cookies.get(COOKIE, ""), token):
            if _cross_origin(request) or _from_another_site_page(request):
                # the cookie is the dashboard's own: a page of another origin never uses it
                return error(403, "cross-origin request refused: send the bearer token")
            request[CREDENTIAL] = "cookie"
            return await handler(request)
        return error(401, "a bearer token is required", {"WWW-Authenticate": "Bearer"})

    @web.middleware
    async def refuse_cross_site(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method in UNSAFE and request.path not in OPEN:
            origin = request.headers.get("Origin")
            if origin is not None and _cross_origin(request):
                # cross-site request forgery: another page's form or script posting to the node
                if not (self.cors_allows(request, origin) and request.get(CREDENTIAL) == "bearer"):
                    return error(403, "cross-origin request refused")
            elif origin is None and request.headers.get("Sec-Fetch-Site", "same-origin") not in (
                    "same-origin", "none"):
                return error(403, "cross-site request refused")
        return await handler(request)

    async def on_prepare(self, request: web.BaseRequest, response: web.StreamResponse) -> None:
        """Every answer: never cached, no library version in ``Server``; with the CORS headers
        when it goes to a listed origin. Marks the request :data:`PREPARED`."""
        if isinstance(request, web.Request):
            request[PREPARED] = True
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers["Server"] = "dicom-node"
        if not self.origins or not under(request.path, PREFIX):
            return
        response.headers.add("Vary", "Origin")
        origin = request.headers.get("Origin", "")
        if self.cors_allows(request, origin):
            response.headers["Access-Control-Allow-Origin"] = "*" if "*" in self.origins else origin
            response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSED
            response.headers.setdefault("Access-Control-Allow-Methods", CORS_METHODS)
            response.headers.setdefault("Access-Control-Allow-Headers", CORS_REQUEST_HEADERS)

    def cors_allows(self, request: web.BaseRequest, origin: str) -> bool:
        """Whether ``origin`` may call ``request``'s path: a listed origin, DICOMweb only."""
        return (bool(origin) and under(request.path, PREFIX)
                and ("*" in self.origins or origin in self.origins))

    def host_allowed(self, host: str) -> bool:
        """DNS rebinding: a page of another site must not reach the node by a name that
        resolves to it. On loopback only loopback names are answered."""
        name = host.rsplit(":", 1)[0].strip("[]").lower() if host else ""
        if self.settings.bind in ("0.0.0.0", "::"):
            return True  # every address: the token guards it
        return name in {"127.0.0.1", "localhost", "::1", self.settings.bind.lower()}


def log_failure(request: web.BaseRequest, exc: BaseException, what: str = "failed") -> None:
    """An unexpected error of a request at ERROR: path, type and stack, not the message."""
    logger.error("web: %s %s %s: %s\n%s", request.method, loggable(request), what,
                 type(exc).__name__, bare_traceback(exc))


def _failed(request: web.Request, exc: Exception) -> web.Response:
    """The answer to an unexpected error; the connection closed if an answer has started."""
    if request.get(PREPARED):
        log_failure(request, exc, "failed after its answer had started (connection closed)")
        if request.transport is not None:
            request.transport.close()  # what is buffered goes out; the client sees a short body
        return error(500, "internal error")  # unsendable now: aiohttp drops it on the closed transport
    if isinstance(exc, sqlite3.OperationalError | DatabaseError):
        log_failure(request, exc, "the database did not answer")
        return error(503, "the database did not answer; try again")
    log_failure(request, exc)
    return error(500, "internal error (see the node's log)")


def _refusal(request: web.Request, exc: web.HTTPException) -> web.Response:
    """The router's own refusals (no such page, method not allowed) in our words."""
    headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
    if exc.status == 404 and not (under(request.path, "/api") or under(request.path, PREFIX)):
        return web.Response(status=404, body=pages.not_found("no such page"), content_type="text/html")
    return error(exc.status, (exc.reason or "refused").lower(), headers)


def _cross_origin(request: web.BaseRequest) -> bool:
    """Whether the request names an ``Origin`` other than the host it was sent to."""
    origin = request.headers.get("Origin")
    return origin is not None and urlsplit(origin).netloc != request.headers.get("Host", "")


def _from_another_site_page(request: web.BaseRequest) -> bool:
    """Whether a browser says another site's page made the request (``Sec-Fetch-Site``), which
    it says even where it sends no ``Origin`` (a GET by ``fetch``, an ``<img>``, a ``<script>``).
    A top-level navigation (following a link) is let through: its page is the node's own,
    no other page reads it, and a POST is refused anyway (``refuse_cross_site``)."""
    if request.headers.get("Sec-Fetch-Site", "") not in ("same-site", "cross-site"):
        return False
    return not (request.method == "GET" and request.headers.get("Sec-Fetch-Mode") == "navigate")


def under(path: str, prefix: str) -> bool:
    """Whether ``path`` is ``prefix`` or below it."""
    return path == prefix or path.startswith(prefix + "/")


def _same(offered: str, token: str) -> bool:
    return bool(offered) and hmac.compare_digest(offered.encode("utf-8", "surrogateescape"), token.encode())


def _loopback(bind: str) -> bool:
    try:
        return ipaddress.ip_address(bind).is_loopback
    except ValueError:
        return bind == "localhost"
