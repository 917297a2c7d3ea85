"""The web server of ``dicom-node serve``: one aiohttp application serving the dashboard pages,
``/api`` (JSON), ``/metrics``, ``/healthz``, ``/readyz`` and, mounted at
:data:`dicom_node.dicomweb.PREFIX`, the DICOMweb sub-application; its event loop runs in a
thread of the node's process."""

import asyncio
import logging
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong
from aiohttp.typedefs import Handler
from aiohttp.web_protocol import RequestHandler

from dicom_node.audit import Audit
from dicom_node.config import WebSettings
from dicom_node.dicomweb import PREFIX, DicomWebContext, make_app
from dicom_node.web import data
from dicom_node.web.metrics import Metrics
from dicom_node.web.middleware import Gate, check_exposure, error, log_failure, loggable, under
from dicom_node.web.routes import Dashboard
from dicom_node.web.work import WORK, Busy, Work, WorkSlots

logger = logging.getLogger(__name__)
#: Threads for the handlers' blocking work (SQLite, files, pydicom): the loop itself never blocks.
WORKER_THREADS = 8
#: Threads DICOMweb and ``/api`` work may hold at once (:class:`Admission`): fewer than
#: :data:`WORKER_THREADS`, so slow searches never take every thread from the dashboard's pages.
#: A request's first work waits up to :data:`BUSY_WAIT_SECONDS` for a slot, then gets 503
#: with ``Retry-After``; network waits (a slow upload or download) hold no slot.
MAX_BUSY = WORKER_THREADS - 2
BUSY_WAIT_SECONDS = 2.0
RETRY_AFTER_SECONDS = 5
#: How long a stop waits for requests in flight before it cancels them (aiohttp waits this long
#: twice at most: for the handlers to finish, then for them to end once their input is cut).
STOP_GRACE_SECONDS = 5.0
#: How long a stop then waits for STOW-RS accepts already running in worker threads (a thread
#: cannot be cancelled; an accept writes to the store, which closes after the stop).
ACCEPT_GRACE_SECONDS = 10.0
#: A request line (method, URL, version) longer than this is refused by aiohttp's parser (400).
MAX_LINE = 8190
#: A header line longer than this is refused by aiohttp's parser (431); it differs from
#: MAX_LINE so that the parser's one exception for both tells which line it was.
MAX_FIELD = 8192
#: More headers than this are refused by aiohttp's parser (431), as the standard library did.
MAX_HEADERS = 100


def make_root_app(settings: WebSettings, dashboard: Dashboard,
                  dicomweb: DicomWebContext | None = None) -> web.Application:
    """The application: the middlewares of :class:`~.middleware.Gate` and :class:`Admission`,
    the dashboard's routes, and the DICOMweb sub-application at :data:`PREFIX` when
    ``dicomweb`` is given."""
    gate = Gate(settings)
    app = web.Application(middlewares=[*gate.middlewares(), Admission(MAX_BUSY).admit])
    app.on_response_prepare.append(gate.on_prepare)
    dashboard.add_routes(app)
    if dicomweb is not None:
        app.add_subapp(PREFIX, make_app(dicomweb))
    return app


class WebServer:
    """The node's web server: listens from construction (so a busy port fails the start at
    once), answers from :meth:`start` until :meth:`stop`."""

    def __init__(self, settings: WebSettings, src: data.Sources, metrics: Metrics, audit: Audit,
                 dicomweb: DicomWebContext | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        """``ssl_context``: HTTPS (``web.tls``, :func:`dicom_node.tls.web_context`); None: HTTP."""
        check_exposure(settings)
        self.settings, self.src, self.metrics, self.audit = settings, src, metrics, audit
        self.dicomweb = dicomweb
        metrics.watch(src, audit)
        # /readyz reads the node's state in a thread of its own, never behind the shared pool
        self.probes = ThreadPoolExecutor(1, thread_name_prefix="web-probe")
        app = make_root_app(settings, Dashboard(src, metrics, audit, self.probes), dicomweb)
        self.loop = asyncio.new_event_loop()
        self.executor = ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="web")
        self.loop.set_default_executor(self.executor)
        self.runner = _Runner(app, access_log_class=PathOnlyAccessLogger, handle_signals=False,
                              shutdown_timeout=STOP_GRACE_SECONDS / 2, max_line_size=MAX_LINE,
                              max_field_size=MAX_FIELD, max_headers=MAX_HEADERS)
        self.loop.run_until_complete(self.runner.setup())
        try:
            site = web.TCPSite(self.runner, settings.bind, settings.port, ssl_context=ssl_context)
            self.loop.run_until_complete(site.start())
        except OSError:
            self._close()
            raise
        self.scheme = "https" if ssl_context is not None else "http"
        self.thread = threading.Thread(target=self.loop.run_forever, name="web", daemon=True)

    @property
    def port(self) -> int:
        return int(self.runner.addresses[0][1])

    def start(self) -> "WebServer":
        self.thread.start()
        logger.info("dashboard on %s://%s:%d/", self.scheme, self.settings.bind, self.port)
        return self

    def stop(self) -> bool:
        """Stop listening, let requests in flight finish within :data:`STOP_GRACE_SECONDS`, then
        cancel what is left and close; wait up to :data:`ACCEPT_GRACE_SECONDS` for STOW-RS
        accepts already running. Returns whether they all ended: if not, one may still write
        to the store, and its stop is not clean (the next start must check the files). A
        second call does nothing and returns True."""
        if self.loop.is_closed():
            return True
        if self.thread.is_alive():
            done = asyncio.run_coroutine_threadsafe(_shut(self.runner), self.loop)
            try:
                done.result(timeout=STOP_GRACE_SECONDS + 5)
            except Exception:  # a stop must end: what did not close in time is dropped
                logger.warning("web: the server did not stop cleanly", exc_info=True)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
        else:
            self.loop.run_until_complete(_shut(self.runner))
        self.executor.shutdown(wait=False, cancel_futures=True)  # accepts not yet started never start
        self.probes.shutdown(wait=False, cancel_futures=True)
        if not self.thread.is_alive():
            self.loop.close()
        if self.dicomweb is None or self.dicomweb.accepts.wait_idle(ACCEPT_GRACE_SECONDS):
            return True
        logger.warning("web: a STOW-RS accept was still running %.0f s after the stop: the store's "
                       "files will be checked at the next start", ACCEPT_GRACE_SECONDS)
        return False

    def _close(self) -> None:
        """Undo a construction that failed (the port was taken)."""
        self.loop.run_until_complete(self.runner.cleanup())
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.probes.shutdown(wait=False, cancel_futures=True)
        self.loop.close()


class Admission:
    """DICOMweb and ``/api`` requests do their thread work within ``slots`` (the innermost
    middleware: only authenticated requests get a :class:`~.work.Work`). A slot is held while
    a thread works, never while the request waits on the network (:mod:`.work`); a request
    whose first work finds none free within :data:`BUSY_WAIT_SECONDS` gets 503 with
    ``Retry-After`` rather than queueing for threads without end. The dashboard's pages and
    the probes are not counted."""

    def __init__(self, slots: int) -> None:
        self.slots = WorkSlots(slots, BUSY_WAIT_SECONDS)

    @web.middleware
    async def admit(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not (under(request.path, PREFIX) or under(request.path, "/api")):
            return await handler(request)
        request[WORK] = Work(self.slots)
        try:
            return await handler(request)
        except Busy:
            return error(503, "the node is busy with other requests; try again",
                         {"Retry-After": str(RETRY_AFTER_SECONDS)})


async def _shut(runner: web.AppRunner) -> None:
    """The runner's graceful stop, then the cancellation of any handler still running: aiohttp
    cancels a request's input at the deadline, not a handler that is waiting on something else."""
    await runner.cleanup()
    rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in rest:
        task.cancel()
    if rest:
        await asyncio.wait(rest, timeout=2)


class PathOnlyAccessLogger(AbstractAccessLogger):
    """Request logs at debug level with the path only: the query may hold a token."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.debug("web: %s %s %d %.3f s", request.method, loggable(request), response.status, time)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.DEBUG)


class _Runner(web.AppRunner):
    """aiohttp's runner whose connections answer the requests its HTTP parser refuses in our
    words (:class:`_Connection`). aiohttp has no public hook for those answers, which quote the
    offending line back (a header line with a token, up to 32 KB) and log it at ERROR; this is
    the one place that reaches past its public API, and tests/web/test_hostile.py's raw
    requests fail if an upgrade changes it."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server
        return server


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return _Connection(self, loop=self._loop, **self._kwargs)


class _Connection(RequestHandler):
    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """A short JSON reason that quotes nothing of the request; the log gets its kind only.

        Called for what the parser refuses and for an error escaping the middlewares (which
        catch every other one)."""
        if isinstance(exc, HttpProcessingError):
            logger.debug("web: a request from %s refused by the HTTP parser: %s", request.remote,
                         type(exc).__name__)
            status, reason = _parser_refusal(exc)
        else:
            log_failure(request, exc or RuntimeError("no exception"))
            status, reason = 500, "internal error (see the node's log)"
        answer = error(status, reason, {"Connection": "close", "Server": "dicom-node"})
        answer.force_close()
        return answer


def _parser_refusal(exc: HttpProcessingError) -> tuple[int, str]:
    """The status and reason of a request HTTP cannot parse (as the standard library's server answered)."""
    if isinstance(exc, BadHttpMethod):
        return 405, "method not allowed"
    if isinstance(exc, LineTooLong):
        if exc.args[1] == MAX_FIELD:
            return 431, f"a header line is too long: at most {MAX_FIELD} bytes"
        return 400, f"URL too long: at most {MAX_LINE} bytes in the request line"
    if "too many headers" in str(exc).lower():
        return 431, "too many headers"
    return 400, "malformed HTTP request"
