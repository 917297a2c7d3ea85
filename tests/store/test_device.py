"""The installation's Device UID: made once per data folder, kept, unique, valid."""

import threading
from pathlib import Path

import pytest
from pydicom.uid import UID

from dicom_node.errors import ConfigError
from dicom_node.store.device import DEVICE_UID_FILE, installation_device_uid


def test_made_once_then_kept_and_each_installation_has_its_own(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    first = installation_device_uid(tmp_path / "a")
    assert UID(first).is_valid and len(first) <= 64 and first.startswith("2.25.")
    assert installation_device_uid(tmp_path / "a") == first  # a restart: the same device
    assert (tmp_path / "a" / DEVICE_UID_FILE).read_text().strip() == first
    (tmp_path / "b").mkdir()
    assert installation_device_uid(tmp_path / "b") != first  # another site, same AE title
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [DEVICE_UID_FILE]  # no temporary left


def test_callers_at_the_same_time_all_get_the_one_kept(tmp_path: Path) -> None:
    seen: list[str] = []
    barrier = threading.Barrier(8)

    def call() -> None:
        barrier.wait()
        seen.append(installation_device_uid(tmp_path))

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(seen) == 8 and len(set(seen)) == 1, seen
    assert (tmp_path / DEVICE_UID_FILE).read_text().strip() == seen[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [DEVICE_UID_FILE]


@pytest.mark.parametrize("content", ["", "not a uid\n", "1.2.3\n", "2.25.01\n"])
def test_a_damaged_file_is_a_config_error_naming_it(tmp_path: Path, content: str) -> None:
    (tmp_path / DEVICE_UID_FILE).write_text(content)
    with pytest.raises(ConfigError, match=f"{tmp_path / DEVICE_UID_FILE}: .* is not a Device UID"):
        installation_device_uid(tmp_path)
