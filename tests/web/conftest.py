"""A node that has processed a phantom CR study (results waiting for a PACS that is down) and
failed a CT series (a chest X-ray model cannot analyse it), for the dashboard's tests."""

import json
import sqlite3
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from pydicom import dcmread

from dicom_node.phantoms import write_study
from dicom_node.phantoms.cross_section import cross_section
from tests.jobs.test_crash import wait_for
from tests.nodeproc import NodeProcess, free_port, pacs_config
from tests.peers.test_dcmtk import run_storescu

TOKEN = "test-token-0123456789"


@dataclass
class Served:
    node: NodeProcess
    base: str
    cr_study: str
    ct_study: str

    def get(self, path: str, token: str | None = TOKEN) -> tuple[int, str, bytes]:
        request = urllib.request.Request(self.base + path)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.headers.get("Content-Type", ""), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers.get("Content-Type", ""), exc.read()

    def api(self, path: str) -> object:
        status, _, body = self.get("/api" + path)
        assert status == 200, body
        return json.loads(body)


@pytest.fixture(scope="package")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("web")
    node = NodeProcess(folder / "node")
    config = pacs_config(free_port(), export="backoff_seconds = 30")  # no PACS listens there
    node.config.write_text(node.config.read_text().replace("[web]\n", f'[web]\ntoken = "{TOKEN}"\n') + config)
    cr = write_study(
        folder / "cr", 1, seed=3_000_002, size=512, modality="CR", findings={"nodule": True, "effusion": True}
    )
    ct = cross_section(9, "CT", size=64)
    ct.dataset.save_as(folder / "ct.dcm", enforce_file_format=True)
    with node:
        run_storescu(node.port, [], [*cr, folder / "ct.dcm"])

        def settled() -> bool:
            with sqlite3.connect(node.data_dir / "index.sqlite") as conn:
                states = sorted(r[0] for r in conn.execute("SELECT state FROM jobs"))
            return states == ["done", "failed"]

        wait_for(settled, timeout=120, what="the CR job done and the CT job failed")
        yield Served(
            node,
            f"http://127.0.0.1:{node.web_port}",
            str(dcmread(cr[0], stop_before_pixels=True).StudyInstanceUID),
            str(ct.dataset.StudyInstanceUID),
        )
