"""``/readyz``: whether the node can take work now, and why not.

Not ready when the node says so (stopping, DICOM server not listening, database not answering)
or when free space on ``data_dir`` is below ``store.min_free_space``: then every C-STORE is
refused (0xA700), so a load balancer or an operator must see it before a modality does.
"""

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: The reason a full data folder gives; monitoring may match on it.
BELOW_FLOOR = "below min_free_space"


@dataclass(frozen=True)
class Readiness:
    """What ``/readyz`` answers: ready or not, every reason, and the disk figures behind them."""

    reasons: tuple[str, ...]
    free_bytes: int | None
    min_free_space: int

    @property
    def ready(self) -> bool:
        return not self.reasons

    def as_dict(self) -> dict[str, Any]:
        return {"ready": self.ready, **asdict(self)}

    def as_json(self) -> bytes:
        return json.dumps(self.as_dict()).encode()

    def as_text(self) -> bytes:
        return ("ready\n" if self.ready else "not ready: " + "; ".join(self.reasons) + "\n").encode()


def free_space(data_dir: Path) -> int | None:
    """Bytes free for the node on ``data_dir``'s file system (as the store counts them), or None
    if it cannot be read."""
    try:
        return shutil.disk_usage(data_dir).free
    except OSError:
        return None


def disk_reason(free: int | None, floor: int) -> str | None:
    """Why the disk keeps the node from storing, or None."""
    if free is None:
        return "free space on data_dir cannot be read"
    if free < floor:
        return f"{BELOW_FLOOR}: {free} bytes free on data_dir, floor {floor} bytes"
    return None


def readiness(ready: Callable[[], str | None], data_dir: Path, min_free_space: int) -> Readiness:
    """The node's own answer (``ready``: None or why not) and the disk check, together."""
    free = free_space(data_dir)
    try:
        own = ready()
    except Exception as exc:  # a probe must get an answer, whatever broke
        own = f"readiness check failed: {type(exc).__name__}"
    reasons = [r for r in (own, disk_reason(free, min_free_space)) if r]
    return Readiness(tuple(reasons), free, min_free_space)
