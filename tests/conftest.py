"""Shared fixtures: settings on a temporary data folder and an in-process SCP on a free port."""

import os
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

import pytest

from dicom_node.config import IngestSettings, NodeSettings, Settings, StoreSettings
from dicom_node.ingest.scp import IngestServer, start_ingest
from dicom_node.store import InstanceStore

IN_CI = os.environ.get("CI", "").lower() == "true"


def unavailable(message: str) -> NoReturn:
    """Skip a test whose peer or extra is missing, saying how to get it; fail instead in CI,
    where .ci/run installs every one."""
    if IN_CI:
        pytest.fail(message + " (CI=true: peers are required)")
    pytest.skip(message)


def require_tool(program: str, package: str, also_in: Path | None = None, how: str = "") -> str:
    """Path of a peer program (on PATH, or in ``also_in``); skip saying how to install it, or fail
    in CI."""
    path = shutil.which(program) or (shutil.which(program, path=str(also_in)) if also_in else None)
    if path is None:
        unavailable(f"{program} not found: {how or f'install the Debian package {package!r}'}")
    return path


def make_settings(data_dir: Path, **ingest: object) -> Settings:
    return Settings(
        node=NodeSettings(ae_title="XAI_NODE", bind="127.0.0.1", port=0, data_dir=data_dir),
        ingest=replace(IngestSettings(shutdown_grace_seconds=2.0), **ingest),  # type: ignore[arg-type]
        store=StoreSettings(min_free_space=0),  # type: ignore[arg-type]
    )


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path / "data")


@pytest.fixture
def store(settings: Settings) -> Iterator[InstanceStore]:
    s = InstanceStore(settings.node.data_dir, settings.store.min_free_space)
    yield s
    s.close()


@pytest.fixture
def node(settings: Settings, store: InstanceStore) -> Iterator[IngestServer]:
    server = start_ingest(settings, store)
    yield server
    server.stop(grace_seconds=2.0)
