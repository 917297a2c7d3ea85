"""The node's Device UID: generated once per installation and kept in ``data_dir/device-uid``.

Every output names the node by this UID (the SR's device observer, the Contributing Equipment
item). Derived from the AE title alone it would not be unique: two sites that keep the default
``XAI_NODE`` would share it. A UID made at the first start and kept with the data is unique
per installation, and stable across restarts, upgrades and AE title changes; a new data folder
is a new installation.
"""

import contextlib
import os
import re
import uuid
from pathlib import Path

from pydicom.uid import UID

from dicom_node.errors import ConfigError
from dicom_node.store.files import fsync_dir

DEVICE_UID_FILE = "device-uid"
_UID = re.compile(r"2\.25\.(0|[1-9][0-9]{0,38})")  # a UUID-derived UID (PS3.5 B.2)


def installation_device_uid(data_dir: Path) -> UID:
    """The installation's Device UID, made (``2.25.<random UUID>``) and kept on the first call.

    Safe when several processes or threads call it at once: the file appears complete or not at
    all (linked into place from a flushed temporary file), and the first one linked wins.

    Raises
    ------
    ConfigError
        When the file holds something other than a UID this function wrote, naming the file.
    """
    path = data_dir / DEVICE_UID_FILE
    if not path.exists():
        _create(path)
    text = path.read_text(encoding="ascii", errors="replace").strip()
    if not _UID.fullmatch(text):
        raise ConfigError(f"{path}: {text[:70]!r} is not a Device UID; expected 2.25.<digits> (remove "
                          "the file to make a new one: the node's outputs will then name a new device)")
    return UID(text)


def _create(path: Path) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with temporary.open("x", encoding="ascii") as fh:
        fh.write(f"2.25.{uuid.uuid4().int}\n")
        fh.flush()
        os.fsync(fh.fileno())
    try:
        os.link(temporary, path)  # fails if another caller linked first: theirs is kept
        fsync_dir(path.parent)
    except FileExistsError:
        pass
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink()
