"""Run ``dicom-node serve`` as a subprocess on free loopback ports, as a user would."""

import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from types import TracebackType

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

CONFIG = """\
[node]
ae_title = "XAI_NODE"
bind = "127.0.0.1"
data_dir = "data"
[ingest]
shutdown_grace_seconds = {grace}
[store]
min_free_space = 0
[web]
port = {web_port}
[logging]
level = "INFO"
"""


REPO = Path(__file__).resolve().parents[1]


def pacs_config(pacs_port: int, explain: str = '["gradcam"]', pacs_aet: str = "ORTHANC",
                stable_seconds: float = 0.5, export: str = "") -> str:
    """Config for a node with the demo model that sends SC and SR of CR/DX series to a PACS, and
    routes CT series to the same model (which cannot analyse them: a "not analysed" SR)."""
    return f"""
[models]
dir = "{REPO / 'models'}"
[study]
stable_seconds = {stable_seconds}
[workers]
count = 1
poll_seconds = 0.1
[export]
{export}
[[destinations]]
name = "pacs"
ae_title = "{pacs_aet}"
host = "127.0.0.1"
port = {pacs_port}
[[pipelines]]
name = "chest"
model = "demo-cxr"
match = {{ modality = ["CR", "DX"] }}
explain = {explain}
lime_samples = 1000
outputs = ["sc", "sr"]
send_to = ["pacs"]
[[pipelines]]
name = "ct-to-chest"
model = "demo-cxr"
match = {{ modality = ["CT"] }}
outputs = ["sc", "sr"]
send_to = ["pacs"]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def echo_ok(port: int, timeout: float = 2.0) -> bool:
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    assoc = ae.associate("127.0.0.1", port, ae_title="XAI_NODE")
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return getattr(status, "Status", None) == 0


class NodeProcess:
    """``dicom-node serve`` in a child process; a context manager that always stops it."""

    def __init__(
        self, folder: Path, grace: float = 5.0, extra_args: tuple[str, ...] = (),
        extra_config: str = "", module: str = "dicom_node", env: dict[str, str] | None = None,
    ) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.config = folder / "node.toml"
        if not self.config.exists():
            self.config.write_text(CONFIG.format(grace=grace, web_port=free_port()) + extra_config)
        self.web_port = int(tomllib.loads(self.config.read_text()).get("web", {}).get("port", 0))
        self.module = module
        self.env = env or {}
        self.data_dir = folder / "data"
        self.port = free_port()
        self.log = folder / "node.log"
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> "NodeProcess":
        args = [sys.executable, "-m", self.module, "serve", "--config", str(self.config),
                "--port", str(self.port), *self.extra_args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                         env={**env, **self.env}, cwd=REPO)
        deadline = time.monotonic() + timeout
        while not echo_ok(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log.read_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"node did not answer C-ECHO in {timeout} s:\n{self.log.read_text()}")
            time.sleep(0.1)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` and wait; return the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def __enter__(self) -> "NodeProcess":
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
