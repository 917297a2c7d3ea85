"""``[workers] executor``: validated with clear errors; the local default never imports Ray."""

import importlib.util
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from dicom_node.config import ConfigError, load_settings
from dicom_node.node import Node, check_ray
from dicom_node.scaleout.wire import reachable
from tests.nodeproc import REPO, free_port


def settings_of(tmp_path: Path, workers: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(f"[workers]\n{workers}\n")
    return path


def test_the_default_is_local_and_the_ray_keys_have_defaults(tmp_path: Path) -> None:
    w = load_settings(settings_of(tmp_path, ""), environ={}).workers
    assert (w.executor, w.ray_address, w.ray_actors_per_model, w.ray_cpus_per_actor, w.ray_gpus_per_actor) == (
        "local", "", 1, 1.0, 0.0)


def test_ray_with_its_address_and_sizes(tmp_path: Path) -> None:
    w = load_settings(settings_of(tmp_path, 'executor = "ray"\nray_address = "10.0.0.5:6379"\n'
                                            "ray_actors_per_model = 3\nray_gpus_per_actor = 0.5"), environ={}).workers
    assert (w.executor, w.ray_address, w.ray_actors_per_model, w.ray_gpus_per_actor) == (
        "ray", "10.0.0.5:6379", 3, 0.5)


@pytest.mark.parametrize(("workers", "message"), [
    ('executor = "dask"', "key 'workers.executor' = 'dask' is invalid; expected \"local\""),
    ('executor = "ray"', "key 'workers.ray_address' = '' is invalid with workers.executor = \"ray\""),
    ('executor = "ray"\nray_address = "h:1"\nray_actors_per_model = 0', "'workers.ray_actors_per_model' = 0"),
    ("ray_cpus_per_actor = -1", "'workers.ray_cpus_per_actor' = -1"),
    ("ray_gpus_per_actor = -0.5", "'workers.ray_gpus_per_actor' = -0.5"),
])
def test_mistakes_are_one_line_naming_the_key(tmp_path: Path, workers: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(settings_of(tmp_path, workers), environ={})
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("address", ["auto", "10.0.0.5", "10.0.0.5:", "10.0.0.5:0", "10.0.0.5:65536",
                                     "http://10.0.0.5:6379", "ray://", "ray://h", " h:6379", "h:6379/x",
                                     "h :6379"])
def test_a_malformed_ray_address_is_a_one_line_error_at_load(tmp_path: Path, address: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(settings_of(tmp_path, f'executor = "ray"\nray_address = "{address}"'), environ={})
    assert f"key 'workers.ray_address' = {address!r} is invalid" in str(caught.value)
    assert "HOST:PORT" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("address", ["10.0.0.5:6379", "ray://head.example.org:10001", "localhost:1",
                                     "[::1]:6379", "ray://[fd00::5]:65535"])
def test_well_formed_ray_addresses_load(tmp_path: Path, address: str) -> None:
    w = load_settings(settings_of(tmp_path, f'executor = "ray"\nray_address = "{address}"'), environ={}).workers
    assert w.ray_address == address


def test_the_node_process_never_imports_ray() -> None:
    """Whatever the executor: with Ray, only the driver process (scaleout/driver.py) imports it."""
    code = ("import sys, dicom_node.cli, dicom_node.node, dicom_node.scaleout, dicom_node.scaleout.executor; "
            "assert 'ray' not in sys.modules, 'ray imported'; "
            "assert 'dicom_node.scaleout.driver' not in sys.modules, 'the driver imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


def test_an_address_nobody_answers_is_not_reachable() -> None:
    assert not reachable(f"127.0.0.1:{free_port()}")
    assert not reachable(f"ray://127.0.0.1:{free_port()}")
    assert not reachable("no-port")


def test_ray_chosen_but_not_installed_is_a_config_error_naming_the_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The executor imports Ray only in its background thread, so the node must ask first: else
    it would loop "not ready" forever instead of exiting 2 with the fix."""
    settings = load_settings(settings_of(tmp_path, 'executor = "ray"\nray_address = "127.0.0.1:1"'), environ={})
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(ConfigError) as caught:
        check_ray(settings)
    message = str(caught.value)
    assert "'workers.executor'" in message and "pip install 'dicom-node[ray]'" in message
    assert "\n" not in message


def test_a_start_that_fails_after_the_executor_started_stops_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its driver process (and the actors) must not outlive a node that failed to start."""
    settings = load_settings(settings_of(tmp_path, 'executor = "ray"\nray_address = "127.0.0.1:1"'), environ={})
    stopped: list[bool] = []
    executor = SimpleNamespace(stop=lambda: stopped.append(True))
    node = SimpleNamespace(settings=settings, _executor=lambda: executor, clock=time.time)

    def fail(device: str, runners: list[object]) -> None:
        raise OSError("disk gone")
    node._start_rest = fail
    for step in ("check_exposure", "check_files", "check_models", "check_ray", "lock_data_dir",
                 "installation_device_uid", "AuditTrail", "Metrics", "Fanout", "ModelRegistry"):
        monkeypatch.setattr(f"dicom_node.node.{step}", lambda *a, **k: None)
    node._runners, node._store_floor = lambda: [], lambda: 0
    with pytest.raises(OSError, match="disk gone"):
        Node.start(node)  # type: ignore[arg-type]
    assert stopped == [True]
