"""A web server in this process over a small database (one failed job, one outbox record):
for tests of what the server answers, without running a node or a model."""

import http.client
import ssl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dicom_node.audit import AuditTrail
from dicom_node.config import WebSettings
from dicom_node.dicomweb import DicomWebContext
from dicom_node.errors import PermanentError
from dicom_node.export import Outbox, Result
from dicom_node.inference import ModelRegistry
from dicom_node.jobs.queue import JobQueue, JobSpec
from dicom_node.jobs.sqlite import SQLiteJobBackend
from dicom_node.store import InstanceStore
from dicom_node.store.db import DATABASE_NAME
from dicom_node.web import Metrics, Sources, WebServer
from tests.nodeproc import REPO

TOKEN = "test-token-0123456789"
STUDY, SERIES = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.1.1"


def make_database(data_dir: Path) -> None:
    """The node's tables with one failed job and one pending outbox record."""
    InstanceStore(data_dir).close()
    backend = SQLiteJobBackend(data_dir / DATABASE_NAME)
    queue = JobQueue(backend)
    queue.enqueue(JobSpec(STUDY, SERIES, (SERIES + ".1",), pipeline="chest", model="demo"))
    job = queue.claim("w")
    assert job is not None
    queue.fail(job.id, "w", PermanentError("not a chest radiograph"), {"collect": 0.01})
    backend.close()
    outbox = Outbox(data_dir / DATABASE_NAME)
    outbox.enqueue(job.id, [Result(SERIES + ".9", "1.2.840.10008.5.1.4.1.1.7", STUDY,
                                   data_dir / "results" / "x.dcm")], ["pacs"])
    outbox.close()


@dataclass
class App:
    server: WebServer
    trail: AuditTrail
    src: Sources
    store: InstanceStore

    def request(self, method: str, path: str, headers: dict[str, str] | None = None,
                token: bool = True) -> tuple[int, dict[str, str], bytes]:
        """One raw request (``path`` sent as is, not normalised as urllib would)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=30)
        try:
            conn.putrequest(method, path, skip_host="Host" in (headers or {}), skip_accept_encoding=True)
            for key, value in {**({"Authorization": f"Bearer {TOKEN}"} if token else {}),
                               **(headers or {})}.items():
                conn.putheader(key, value)
            conn.endheaders()
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()


@contextmanager
def web_app(data_dir: Path, min_free_space: int = 0, ready: Callable[[], str | None] = lambda: None,
            settings: WebSettings | None = None, dicomweb: bool = False,
            ssl_context: ssl.SSLContext | None = None) -> Iterator[App]:
    """The web server over :func:`make_database`; ``dicomweb``: with the DICOMweb sub-application
    mounted over the same folder's store; ``ssl_context``: over HTTPS."""
    make_database(data_dir)
    backend = SQLiteJobBackend(data_dir / DATABASE_NAME)
    outbox = Outbox(data_dir / DATABASE_NAME)
    trail = AuditTrail(data_dir / "audit")
    store = InstanceStore(data_dir, audit=trail)
    src = Sources(data_dir, JobQueue(backend), outbox, ModelRegistry(REPO / "models"), ["cpu"], ready,
                  min_free_space)
    context = DicomWebContext(store, trail, 2**31) if dicomweb else None
    server = WebServer(settings or WebSettings(port=0, token=TOKEN), src, Metrics(), trail, context,
                       ssl_context).start()
    try:
        yield App(server, trail, src, store)
    finally:
        server.stop()
        store.close()
        trail.close()
        outbox.close()
        backend.close()
