"""DICOMweb (PS3.18) under ``/dicom-web``: QIDO-RS (:mod:`.qido`), WADO-RS (:mod:`.wado`) and
STOW-RS (:mod:`.stow`), one aiohttp sub-application the web server mounts.

The sub-application holds no authentication, host or CORS rule of its own: the web server's
middlewares apply to it as to every other page. Its handlers read :data:`CONTEXT` from
``request.config_dict``.
"""

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from aiohttp import web

from dicom_node.audit import Audit
from dicom_node.store import InstanceStore

#: Where the web server mounts the sub-application.
PREFIX = "/dicom-web"


class InFlight:
    """The STOW-RS accepts running in worker threads. A thread cannot be cancelled, and an accept
    writes to the store: the web server's stop waits for them (bounded) before the store closes,
    and reports whether they all finished."""

    def __init__(self) -> None:
        self._count = 0
        self._changed = threading.Condition()

    @contextmanager
    def running(self) -> Iterator[None]:
        """Count the block as one accept in flight."""
        with self._changed:
            self._count += 1
        try:
            yield
        finally:
            with self._changed:
                self._count -= 1
                self._changed.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every accept to end; whether they all did."""
        with self._changed:
            return self._changed.wait_for(lambda: self._count == 0, timeout)


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
