"""A real Orthanc PACS for tests: its own config, storage and free loopback ports; always stopped."""

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.conftest import unavailable
from tests.nodeproc import free_port

#: The Debian package orthanc-dicomweb's plugin (DICOMweb server and client for Orthanc).
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def require_dicomweb_plugin() -> Path:
    """The DICOMweb plugin's path; skip saying how to install it, or fail in CI."""
    if not DICOMWEB_PLUGIN.is_file():
        unavailable(f"{DICOMWEB_PLUGIN} not found: install the Debian package 'orthanc-dicomweb'")
    return DICOMWEB_PLUGIN


def dicomweb_extra(servers: dict[str, tuple[str, str | None]]) -> dict[str, Any]:
    """Orthanc configuration that loads the DICOMweb plugin with ``servers``: name -> (DICOMweb
    root URL, bearer token or None). The plugin's client sends the token on every request."""
    return {
        "Plugins": [str(require_dicomweb_plugin())],
        "DicomWeb": {
            "Enable": True, "Root": "/dicom-web/", "EnableWado": False,
            "Servers": {
                name: {"Url": url.rstrip("/") + "/",  # the plugin appends "studies", "studies/..."
                       **({"HttpHeaders": {"Authorization": f"Bearer {token}"}} if token else {})}
                for name, (url, token) in servers.items()
            },
        },
    }


class Orthanc:
    """``Orthanc config.json`` in a child process, with a small REST client."""

    def __init__(self, folder: Path, executable: str, modalities: dict[str, tuple[str, int]],
                 ae_title: str = "ORTHANC", extra: dict[str, Any] | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.executable, self.ae_title = folder, executable, ae_title
        self.dicom_port, self.http_port = free_port(), free_port()
        self.config = folder / "orthanc.json"
        self.config.write_text(json.dumps({
            "Name": "test-pacs", "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "index"), "DicomAet": ae_title, "DicomPort": self.dicom_port,
            "HttpPort": self.http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "HttpServerEnabled": True, "DicomServerEnabled": True, "Plugins": [],
            "DicomModalities": {name: [aet, "127.0.0.1", port] for name, (aet, port) in modalities.items()},
            "DicomAlwaysAllowStore": True, "DicomAlwaysAllowEcho": True, "DicomCheckCalledAet": True,
            "StableAge": 1, "DicomScuTimeout": 30, "ConcurrentJobs": 2, **(extra or {}),
        }, indent=2))
        self.log = folder / "orthanc.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> "Orthanc":
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([self.executable, str(self.config)], stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "TCP_NODELAY": "1"})
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.get("/system")
                return self
            except (urllib.error.URLError, ConnectionError):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"Orthanc exited with {self.proc.returncode}:\n{self.log.read_text()}") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"Orthanc did not answer in {timeout} s:\n{self.log.read_text()}") from None
                time.sleep(0.2)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM and wait for the PID (Orthanc takes a few seconds to exit)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def _request(self, method: str, path: str, body: bytes | None = None, raw: bool = False) -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method)
        with urllib.request.urlopen(request, timeout=120) as response:
            data = response.read()
        return data if raw else json.loads(data or b"null")

    def get(self, path: str, raw: bool = False) -> Any:
        return self._request("GET", path, raw=raw)

    def post(self, path: str, body: bytes | dict | list | str) -> Any:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self._request("POST", path, data)

    def delete(self, path: str) -> Any:
        return self._request("DELETE", path)

    def upload(self, path: Path) -> dict:
        return self.post("/instances", path.read_bytes())

    def instances_of_study(self, study_uid: str) -> list[dict]:
        """Every instance of the study (with its tags), [] when Orthanc has no such study."""
        found = self.post("/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}})
        if not found:
            return []
        return list(self.get(f"/studies/{found[0]}/instances?expand"))

    def stow(self, server: str, resources: list[str]) -> Any:
        """Send Orthanc resources (patients, studies, series or instances, by Orthanc ID) to the
        DICOMweb ``server`` with STOW-RS; waits for the plugin's job (an HTTP error if it fails)."""
        return self.post(f"/dicom-web/servers/{server}/stow", {"Resources": resources, "Synchronous": True})

    def dicomweb_get(self, server: str, uri: str, arguments: dict[str, str] | None = None) -> Any:
        """GET ``uri`` (e.g. "/studies" for QIDO-RS) on the DICOMweb ``server``, through Orthanc."""
        return self.post(f"/dicom-web/servers/{server}/get", {"Uri": uri, "Arguments": arguments or {}})

    def dicomweb_retrieve(self, server: str, resources: list[dict[str, str]]) -> Any:
        """WADO-RS retrieve into Orthanc: ``resources`` like ``[{"Study": uid, "Series": uid}]``."""
        return self.post(f"/dicom-web/servers/{server}/retrieve",
                         {"Resources": resources, "Synchronous": True})

    def __enter__(self) -> "Orthanc":
        return self.start() if self.proc is None else self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
