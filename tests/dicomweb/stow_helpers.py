"""Helpers for the STOW-RS tests: a recording audit, raw multipart bodies, Part 10 bytes."""

import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests
from pydicom import Dataset
from pydicom.filereader import _read_file_meta_info, read_preamble

from dicom_node.dicomweb import DicomWebContext
from tests.dicomweb.serve import serve_dicomweb

BOUNDARY = "stow-test-boundary-7d1c"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


class RecordingAudit:
    """Every audit event, in order (thread-safe: STOW-RS accepts in worker threads)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()

    def record(self, event: str, **fields: Any) -> None:
        with self._lock:
            self.events.append((event, fields))

    def named(self, event: str) -> list[dict[str, Any]]:
        return [fields for name, fields in self.events if name == event]


@contextmanager
def stow_server(data_dir: Path, max_instance_size: int = 2**31
                ) -> Iterator[tuple[str, DicomWebContext, RecordingAudit]]:
    audit = RecordingAudit()
    with serve_dicomweb(data_dir, audit=audit, max_instance_size=max_instance_size) as (url, ctx):
        yield url, ctx, audit


def part10(ds: Dataset) -> bytes:
    """``ds`` as a Part 10 file (its own file meta)."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def part10_as_is(ds: Dataset) -> bytes:
    """``ds`` as a Part 10 file with its file meta exactly as set (even where it is wrong)."""
    buffer = io.BytesIO()
    ds.preamble = b"\x00" * 128
    ds.save_as(buffer, enforce_file_format=False)
    return buffer.getvalue()


def data_set_only(ds: Dataset) -> bytes:
    """The data set of ``ds`` alone: no preamble, no File Meta Information."""
    buffer = io.BytesIO(part10(ds))
    read_preamble(buffer, force=False)
    _read_file_meta_info(buffer)
    return buffer.read()


def multipart(parts: list[bytes], part_type: str = "application/dicom") -> bytes:
    """A multipart/related body of ``parts`` with :data:`BOUNDARY`."""
    out = io.BytesIO()
    for data in parts:
        out.write(f"--{BOUNDARY}\r\nContent-Type: {part_type}\r\n\r\n".encode())
        out.write(data)
        out.write(b"\r\n")
    out.write(f"--{BOUNDARY}--\r\n".encode())
    return out.getvalue()


def post(url: str, body: bytes, content_type: str = CONTENT_TYPE) -> requests.Response:
    return requests.post(url, data=body, headers={"Content-Type": content_type,
                                                  "Accept": "application/dicom+json"}, timeout=60)


def failures(response_json: dict[str, Any]) -> list[tuple[str, int, str]]:
    """(SOP Instance UID, Failure Reason, Error Comment) of each item of the Failed SOP Sequence."""
    items = response_json.get("00081198", {}).get("Value", [])
    return [(item["00081155"].get("Value", [""])[0], item["00081197"]["Value"][0],
             item["00000902"]["Value"][0]) for item in items]


def stored(response_json: dict[str, Any]) -> dict[str, str]:
    """SOP Instance UID -> Retrieve URL of each item of the Referenced SOP Sequence."""
    items = response_json["00081199"].get("Value", [])
    return {item["00081155"]["Value"][0]: item["00081190"]["Value"][0] for item in items}


def leftovers(data_dir: Path) -> list[Path]:
    """Temporary files left under the store's tmp/ (nothing may stay half-written)."""
    return list((data_dir / "tmp").iterdir())
