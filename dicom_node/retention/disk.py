"""The disk's marks: above the purge (high-water) mark the oldest settled data goes; above the stop
mark the store refuses C-STOREs (0xA700) before the file system is really full.

The stop mark is not a second guard: it raises the floor the store already keeps
(``store.min_free_space``, checked by :meth:`dicom_node.store.InstanceStore.stage` before every
write), computed once from the file system's size (:func:`store_floor`).
"""

import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from dicom_node.config import RetentionSettings
from dicom_node.errors import ConfigError


class DiskUsage(NamedTuple):
    """What :func:`shutil.disk_usage` answers: bytes in all, used, and free to an unprivileged user."""

    total: int
    used: int
    free: int


#: Reads a folder's file system figures (:func:`shutil.disk_usage`; tests inject their own).
UsageReader = Callable[[Path], DiskUsage]


def read_usage(folder: Path) -> DiskUsage:
    total, used, free = shutil.disk_usage(folder)
    return DiskUsage(total, used, free)


def used_percent(usage: DiskUsage) -> float:
    """The share of the file system the node cannot write to (blocks reserved for root count as
    used: the node does not run as root)."""
    return 100.0 * (usage.total - usage.free) / usage.total if usage.total else 100.0


@dataclass(frozen=True)
class DiskMarks:
    """The purge marks of ``[retention]``; each 0 is off."""

    purge_above_percent: float = 0.0
    purge_below_free: int = 0

    @classmethod
    def from_settings(cls, settings: RetentionSettings) -> "DiskMarks":
        return cls(settings.purge_above_percent, int(settings.purge_below_free))

    @property
    def enabled(self) -> bool:
        return bool(self.purge_above_percent or self.purge_below_free)

    def excess(self, usage: DiskUsage) -> int:
        """Bytes to free to get back under every purge mark (0: under them already)."""
        need = 0
        if self.purge_below_free:
            need = max(need, self.purge_below_free - usage.free)
        if self.purge_above_percent:
            allowed = math.floor(usage.total * self.purge_above_percent / 100)
            need = max(need, (usage.total - usage.free) - allowed)
        return max(0, need)

    def describe(self, usage: DiskUsage) -> str:
        """Why the disk is above a mark, in the words of the purge's reasons."""
        parts = []
        if self.purge_above_percent and used_percent(usage) > self.purge_above_percent:
            parts.append(f"{used_percent(usage):.1f}% used > purge_above_percent "
                         f"{self.purge_above_percent:g}")
        if self.purge_below_free and usage.free < self.purge_below_free:
            parts.append(f"{usage.free // 2**20} MiB free < purge_below_free "
                         f"{self.purge_below_free // 2**20} MiB")
        return "high-water: " + ", ".join(parts) if parts else "high-water"


def store_floor(usage: DiskUsage, min_free_space: int, stop_above_percent: float) -> int:
    """The free space the store keeps: ``store.min_free_space``, raised to what
    ``retention.stop_above_percent`` leaves free on a file system of ``usage.total`` bytes."""
    if not stop_above_percent:
        return min_free_space
    return max(min_free_space, math.ceil(usage.total * (100 - stop_above_percent) / 100))


def check_marks(marks: DiskMarks, usage: DiskUsage, floor: int, source: str) -> None:
    """Refuse purge marks the disk can never reach: C-STOREs are refused at ``floor`` bytes free
    (:func:`store_floor`), so a mark that leaves that much free or less would never be passed and
    nothing would ever be purged (``source``: the config file, for the message)."""
    at_mark = []
    if marks.purge_below_free:
        at_mark.append(("purge_below_free", f"{marks.purge_below_free}", marks.purge_below_free))
    if marks.purge_above_percent:
        allowed = math.floor(usage.total * marks.purge_above_percent / 100)
        at_mark.append(("purge_above_percent", f"{marks.purge_above_percent:g}", usage.total - allowed))
    for key, value, free in at_mark:
        if free <= floor:
            raise ConfigError(
                f"{source}: key 'retention.{key}' = {value} is invalid on data_dir's file system of "
                f"{usage.total} bytes: it leaves {free} bytes free, at or below the {floor} bytes free "
                "at which C-STOREs are refused (store.min_free_space, raised by "
                "retention.stop_above_percent); nothing would ever be purged. Expected a mark that "
                "leaves more free space")
