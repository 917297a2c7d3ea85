"""DICOMweb (PS3.18) under ``/dicom-web``: QIDO-RS (:mod:`.qido`), WADO-RS (:mod:`.wado`) and
STOW-RS (:mod:`.stow`), one aiohttp sub-application the web server mounts.

The sub-application holds no authentication, host or CORS rule of its own: the web server's
middlewares apply to it as to every other page. Its handlers read :data:`CONTEXT` from
``request.config_dict``.
"""

from dataclasses import dataclass

from aiohttp import web

from dicom_node.audit import Audit
from dicom_node.store import InstanceStore

#: Where the web server mounts the sub-application.
PREFIX = "/dicom-web"


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
    """

    store: InstanceStore
    audit: Audit
    max_instance_size: int
    stow_ae_title: str = "STOW-RS"


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
