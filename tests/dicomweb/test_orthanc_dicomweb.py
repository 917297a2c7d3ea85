"""A real Orthanc with its DICOMweb plugin, configured with the node as a DICOMweb server (with a
bearer token), sends a study to the node's STOW-RS through its REST API; the instances land in
the store as Orthanc holds them. This is the DICOMweb sub-application alone; STOW-RS, QIDO-RS and
WADO-RS through Orthanc against the whole running node (results back by C-STORE) are in
test_node_e2e.py."""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from dicom_node.dicomweb import PREFIX, DicomWebContext, make_app
from dicom_node.store import InstanceStore
from tests.conftest import require_tool
from tests.dicomweb.serve import serve_app
from tests.dicomweb.stow_helpers import RecordingAudit
from tests.factories import ct_dataset, new_uid, save
from tests.ingest.test_scp import _data_set_bytes
from tests.orthanc import Orthanc, dicomweb_extra, require_dicomweb_plugin

TOKEN = "orthanc-test-token"


@dataclass
class NodeBehindOrthanc:
    """The DICOMweb sub-application (``url``, ``ctx``) and an Orthanc that knows it as DICOMweb
    server "node"."""

    url: str
    ctx: DicomWebContext
    audit: RecordingAudit
    orthanc: Orthanc
    #: Authorization headers the node received (the plugin must send the configured token).
    authorizations: list[str]

    def upload_study(self, folder: Path, count: int) -> tuple[str, list[Path]]:
        """``count`` CT instances of one new study uploaded to Orthanc; (Orthanc study ID, files)."""
        study, series = new_uid(), new_uid()
        files = [save(ct_dataset(study=study, series=series, seed=i), folder) for i in range(count)]
        answers = [self.orthanc.upload(path) for path in files]
        return answers[0]["ParentStudy"], files


@contextmanager
def bearer_only(token: str, seen: list[str]) -> Iterator[web.Application]:
    """A root app that lets through only requests with ``token``, as the node's web server does."""

    @web.middleware
    async def check(request: web.Request, handler):  # type: ignore[no-untyped-def]
        seen.append(request.headers.get("Authorization", ""))
        if request.headers.get("Authorization") != f"Bearer {token}":
            return web.Response(status=401, text="bearer token required\n")
        return await handler(request)

    yield web.Application(middlewares=[check])


@pytest.fixture
def node_behind_orthanc(tmp_path: Path) -> Iterator[NodeBehindOrthanc]:
    program = require_tool("Orthanc", "orthanc")
    require_dicomweb_plugin()
    audit = RecordingAudit()
    store = InstanceStore(tmp_path / "node", audit=audit)
    ctx = DicomWebContext(store=store, audit=audit, max_instance_size=2**30)
    seen: list[str] = []
    try:
        with bearer_only(TOKEN, seen) as root:
            root.add_subapp(PREFIX, make_app(ctx))
            with serve_app(root) as base:
                url = base + PREFIX
                extra = dicomweb_extra({"node": (url, TOKEN)})
                with Orthanc(tmp_path / "orthanc", program, {}, extra=extra) as orthanc:
                    yield NodeBehindOrthanc(url, ctx, audit, orthanc, seen)
    finally:
        store.close()


def test_orthanc_sends_a_study_to_the_node_with_stow_rs(node_behind_orthanc: NodeBehindOrthanc,
                                                        tmp_path: Path) -> None:
    node = node_behind_orthanc
    orthanc_study, files = node.upload_study(tmp_path / "study", count=3)
    node.orthanc.stow("node", [orthanc_study])
    records = {r.sop_instance_uid: r for r in node.ctx.store.index.instances()}
    assert len(records) == len(files) == 3
    for path in files:
        uid = path.stem
        assert records[uid].calling_ae_title == "STOW-RS"
        stored = node.ctx.store.data_dir / "instances" / records[uid].path
        assert _data_set_bytes(stored) == _data_set_bytes(path)  # as Orthanc held it
    assert len(node.audit.named("instance_stored")) == 3
    assert node.authorizations and set(node.authorizations) == {f"Bearer {TOKEN}"}
