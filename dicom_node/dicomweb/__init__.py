"""DICOMweb (PS3.18) under ``/dicom-web``: QIDO-RS (:mod:`.qido`), WADO-RS (:mod:`.wado`) and
STOW-RS (:mod:`.stow`), one aiohttp sub-application the web server mounts.

The sub-application holds no authentication, host or CORS rule of its own: the web server's
middlewares apply to it as to every other page. Its handlers read :data:`CONTEXT` from
``request.config_dict``.
"""

import threading
from dataclasses import dataclass, field

from aiohttp import web

from dicom_node.audit import Audit
from dicom_node.store import InstanceStore

#: Where the web server mounts the sub-application.
PREFIX = "/dicom-web"


class InFlight:
    """The STOW-RS accepts submitted to worker threads and not yet ended. A thread cannot be
    cancelled, and an accept writes to the store: the web server's stop waits for them (bounded)
    before the store closes, and reports whether they all finished. An accept is counted from
    its submission on the event loop (:meth:`submitted`), not from when its thread starts, so a
    stop cannot miss one submitted just before it."""

    def __init__(self) -> None:
        self._count = 0
        self._changed = threading.Condition()

    def submitted(self) -> "Accept":
        """Count one accept from now until it ends or is dropped unstarted (:class:`Accept`)."""
        with self._changed:
            self._count += 1
        return Accept(self)

    def _end(self) -> None:
        with self._changed:
            self._count -= 1
            self._changed.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every accept to end; whether they all did."""
        with self._changed:
            return self._changed.wait_for(lambda: self._count == 0, timeout)


class Accept:
    """One counted accept: its thread calls :meth:`start` (False: it was dropped, do nothing)
    and, if started, :meth:`finish`; the loop calls :meth:`drop` once the request stops
    waiting for it, which uncounts it only if its thread never started (the request was
    cancelled, or the executor shut down, before the work ran)."""

    def __init__(self, flight: InFlight) -> None:
        self._flight = flight
        self._lock = threading.Lock()
        self._state = "queued"

    def start(self) -> bool:
        with self._lock:
            if self._state == "dropped":
                return False
            self._state = "running"
            return True

    def finish(self) -> None:
        self._flight._end()

    def drop(self) -> None:
        with self._lock:
            if self._state != "queued":
                return
            self._state = "dropped"
        self._flight._end()


@dataclass(frozen=True)
class DicomWebContext:
    """What a running node hands to DICOMweb.

    Attributes
    ----------
    store
        The node's store: QIDO-RS and WADO-RS read it, STOW-RS commits to it as C-STORE does.
    audit
        The audit trail (STOW-RS records ``instance_stored`` as C-STORE does).
    max_instance_size
        ``ingest.max_instance_size``: the largest instance STOW-RS accepts.
    stow_ae_title
        The calling AE title (and Source AE Title) recorded for instances received by STOW-RS:
        an HTTP peer has none, and routing and the metrics key on it.
    public_url
        ``web.public_url``: the node's web root as clients reach it (a reverse proxy); when set,
        Retrieve URLs and bulk data URIs start with it instead of what the request says.
    accepts
        The STOW-RS accepts in flight (:class:`InFlight`), which a stop waits for.
    """

    store: InstanceStore
    audit: Audit
    max_instance_size: int
    stow_ae_title: str = "STOW-RS"
    public_url: str = ""
    accepts: InFlight = field(default_factory=InFlight)


CONTEXT = web.AppKey("dicomweb", DicomWebContext)


def make_app(ctx: DicomWebContext) -> web.Application:
    """The DICOMweb sub-application, to mount at :data:`PREFIX`."""
    from dicom_node.dicomweb import qido, stow, wado

    app = web.Application()
    app[CONTEXT] = ctx
    qido.add_routes(app)
    wado.add_routes(app)
    stow.add_routes(app)
    return app
