"""The dashboard's handlers: pages (HTML), the same data under ``/api`` (JSON), the operator's
actions, overlay previews, ``/metrics``, ``/healthz`` and ``/readyz``.

Every handler runs its database and file work in a thread (:func:`~.work.offload`): the event
loop that answers here also answers DICOMweb and the probes.
"""

import asyncio
import re
from collections.abc import Callable
from concurrent.futures import Executor
from enum import StrEnum
from typing import Any, TypeVar

from aiohttp import web
from pydicom import dcmread

from dicom_node.audit import Audit, job_requeued, result_retried
from dicom_node.dicomweb import render
from dicom_node.errors import DicomNodeError
from dicom_node.export import DeliveryState, OutboxError
from dicom_node.jobs.queue import JobError, JobState
from dicom_node.store.db import MAX_RECORD_ID, parse_record_id
from dicom_node.store.files import InvalidInstanceError, check_uid
from dicom_node.web import data, pages
from dicom_node.web.metrics import CONTENT_TYPE, Metrics
from dicom_node.web.middleware import BadRequest, error
from dicom_node.web.work import offload

PREVIEW_WIDTH = 640
MAX_SEARCH = 64  # a search matches part of a UID, and a UID has at most 64 characters
_MODEL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
T = TypeVar("T")
E = TypeVar("E", bound=StrEnum)


class Dashboard:
    """The handlers over one node's :class:`~dicom_node.web.data.Sources`."""

    def __init__(self, src: data.Sources, metrics: Metrics, audit: Audit,
                 probes: Executor | None = None) -> None:
        """``probes``: the threads ``/readyz`` reads the node's state in, apart from the pool
        every other handler shares (a probe must not wait behind slow searches)."""
        self.src, self.metrics, self.audit, self.probes = src, metrics, audit, probes

    def add_routes(self, app: web.Application) -> None:
        """Each page at its path and, as JSON, under ``/api``; GET and POST only (HEAD is 405)."""
        app.router.add_get("/healthz", self.healthz, allow_head=False)
        app.router.add_get("/readyz", self.readyz, allow_head=False)
        app.router.add_get("/metrics", self.prometheus, allow_head=False)
        app.router.add_get("/preview/{study}/{series}/{sop}", self.preview, allow_head=False)
        for api in ("", "/api"):
            for path, handler in (("/", self.overview), ("/overview", self.overview),
                                  ("/studies", self.studies), ("/studies/{uid:[^/]*}", self.study),
                                  ("/jobs", self.jobs), ("/jobs/{id:[^/]*}", self.job),
                                  ("/outbox", self.outbox), ("/models", self.models),
                                  ("/models/{name:[^/]*}", self.model), ("/actors", self.actors)):
                app.router.add_get(api + path, handler, allow_head=False)
            app.router.add_post(api + "/jobs/{id:[^/]*}/requeue", self.requeue)
            app.router.add_post(api + "/outbox/{id:[^/]*}/retry", self.retry)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        state = await asyncio.get_running_loop().run_in_executor(self.probes, data.ready, self.src)
        status = 200 if state.ready else 503
        if "application/json" in request.headers.get("Accept", ""):
            return web.Response(status=status, body=state.as_json(), content_type="application/json")
        return web.Response(status=status, body=state.as_text(), content_type="text/plain")

    async def prometheus(self, request: web.Request) -> web.Response:
        body = await asyncio.to_thread(self.metrics.render)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def overview(self, request: web.Request) -> web.Response:
        return await _out(request, data.overview, (self.src,), pages.overview)

    async def studies(self, request: web.Request) -> web.Response:
        term = _search(request.query.get("q", ""))
        return await _out(request, data.studies, (self.src, term),
                          lambda rows: pages.studies(rows, query=term))

    async def jobs(self, request: web.Request) -> web.Response:
        return await _out(request, data.jobs, (self.src, _state(request, JobState)), pages.jobs)

    async def outbox(self, request: web.Request) -> web.Response:
        return await _out(request, data.outbox, (self.src, _state(request, DeliveryState)), pages.outbox)

    async def models(self, request: web.Request) -> web.Response:
        return await _out(request, data.models, (self.src,), pages.models)

    async def actors(self, request: web.Request) -> web.Response:
        return await _out(request, lambda src: src.actors(), (self.src,), pages.actors)

    async def study(self, request: web.Request) -> web.Response:
        uid = _uid("Study Instance", request.match_info["uid"])
        study = await offload(request, data.study, self.src, uid)
        if study is None:
            return _missing(request, f"no study {uid}")
        if not _api(request) and "requeued" in request.query:
            state = request.query.get("state", "")
            shown = state if state in set(JobState) else ""
            study["notice"] = f"Job {_record_id('job', request.query['requeued'])} requeued: now {shown}."
        return await _out(request, lambda: study, (), pages.study)

    async def job(self, request: web.Request) -> web.Response:
        """One job, as JSON with or without the ``/api`` prefix."""
        job_id = _record_id("job", request.match_info["id"])
        job = await offload(request, self.src.queue.get, job_id)
        if job is None:
            return _missing(request, f"no job {job_id}")
        return _json(data.record_dict(job))

    async def model(self, request: web.Request) -> web.Response:
        name = _model_name(request.match_info["name"])
        named = [x for x in await offload(request, data.models, self.src) if x["name"] == name]
        if not named:
            return _missing(request, f"no model {name}")
        return await _out(request, lambda: named[0], (), pages.model)

    async def requeue(self, request: web.Request) -> web.Response:
        return await self._act(request, "job", self.src.queue.requeue, job_requeued,
                               lambda job: f"/studies/{job.study_instance_uid}?requeued={job.id}"
                                           f"&state={job.state.value}")

    async def retry(self, request: web.Request) -> web.Response:
        return await self._act(request, "outbox record", self.src.outbox.retry, result_retried,
                               lambda _record: "/outbox")

    async def _act(self, request: web.Request, kind: str, act: Callable[[int], Any],
                   event_of: Callable[[Any, str], tuple[str, dict[str, Any]]],
                   back: Callable[[Any], str]) -> web.Response:
        """An operator action on the record named in the path (the same core call as the CLI's),
        audited; JSON for /api, a redirect for a page's form."""
        record_id = _record_id(kind, request.match_info["id"])
        try:
            record = await offload(request, act, record_id)
        except (JobError, OutboxError) as exc:
            return _conflict(exc)
        event, fields = event_of(record, "web")
        await offload(request, self.audit.record, event, **fields)
        if _api(request):
            return _json(data.record_dict(record))
        raise web.HTTPSeeOther(back(record))

    async def preview(self, request: web.Request) -> web.Response:
        """A PNG of an overlay (a Secondary Capture the node made), at most 640 px wide."""
        sop = request.match_info["sop"]
        if not sop.endswith(".png"):
            raise BadRequest("expected /preview/<study UID>/<series UID>/<SOP instance UID>.png")
        uids = (_uid("Study Instance", request.match_info["study"]),
                _uid("Series Instance", request.match_info["series"]), _uid("SOP Instance", sop[:-4]))
        png = await offload(request, self._png, *uids)
        if png is None:
            return web.Response(status=404, text="no such overlay")
        return web.Response(body=png, content_type="image/png")

    def _png(self, study: str, series: str, sop: str) -> bytes | None:
        """The overlay rendered as WADO-RS renders a frame (one implementation, in
        :mod:`dicom_node.dicomweb.render`): at most :data:`PREVIEW_WIDTH` wide, never enlarged."""
        try:
            ds = dcmread(data.result_path(self.src.data_dir, study, series, sop))
            pixels = ds.pixel_array
        except (DicomNodeError, OSError, ValueError, AttributeError):
            return None
        return render.encode(render.to_display(pixels, ds), "image/png", PREVIEW_WIDTH)


def _api(request: web.Request) -> bool:
    return request.path.startswith("/api/")


async def _out(request: web.Request, read: Callable[..., T], args: tuple[Any, ...],
               render: Callable[[T], bytes]) -> web.Response:
    """``read(*args)`` in a thread, answered as JSON under ``/api`` or rendered as a page."""
    value = await offload(request, read, *args)
    if _api(request):
        return _json(value)
    return web.Response(body=await offload(request, render, value), content_type="text/html")


def _json(value: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=data.dumps(value), content_type="application/json")


def _missing(request: web.Request, what: str) -> web.Response:
    if _api(request):
        return error(404, what)
    return web.Response(status=404, body=pages.not_found(what), content_type="text/html")


def _conflict(exc: JobError | OutboxError) -> web.Response:
    missing = "does not exist" in str(exc) or str(exc).startswith("no outbox record")
    return error(404 if missing else 409, str(exc))


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


def _state(request: web.Request, states: type[E]) -> E | None:
    """The ``state`` parameter as one of ``states``, None if absent or empty."""
    text = request.query.get("state") or ""
    if not text:
        return None
    if text not in {s.value for s in states}:
        raise BadRequest(f"unknown state: expected one of {', '.join(s.value for s in states)}")
    return states(text)
