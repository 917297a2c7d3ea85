"""``dicom-node send``: DICOM files to a peer as they are, each in its own transfer syntax.

storescu proposes uncompressed transfer syntaxes unless told otherwise, and fails with "unable to
convert dataset" on every JPEG, JPEG 2000, JPEG-LS or RLE file (still exiting 0). This proposes,
on one association, a presentation context per SOP class and transfer syntax present in the
files (at most 128 per association: more pairs take more associations), sends each file
unchanged, and reports each file's status.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom.association import Association

from dicom_node import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicom_node.config import Destination, Settings
from dicom_node.errors import ConfigError
from dicom_node.export.sender import Outcome, _association_failure, _printable, classify
from dicom_node.store.files import input_files
from dicom_node.tls import ClientContext, tls_args

PEER = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>[^:@]+):(?P<port>\d{1,5})$")
MAX_CONTEXTS = 128  # what one association can propose (PS3.8: odd context IDs 1..255)
_DICOMDIR = "1.2.840.10008.1.3.10"


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str
    port: int
    destination: Destination | None = None  # a [[destinations]] entry: its TLS settings apply

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class FileToSend:
    path: Path
    sop_class_uid: str
    transfer_syntax_uid: str

    @property
    def context(self) -> tuple[str, str]:
        return self.sop_class_uid, self.transfer_syntax_uid


def parse_peer(text: str) -> Peer | None:
    """``AET@HOST:PORT`` as a :class:`Peer`, or None if ``text`` is not of that form."""
    match = PEER.match(text)
    if not match or not 0 < int(match["port"]) < 65536:
        return None
    return Peer(match["aet"], match["host"], int(match["port"]))


def resolve_peer(settings: Settings, text: str) -> Peer:
    """``--to``: ``AET@HOST:PORT`` or the name of a ``[[destinations]]`` entry."""
    peer = parse_peer(text)
    if peer is not None:
        return peer
    for destination in settings.destinations:
        if destination.name == text:
            return Peer(destination.ae_title, destination.host, destination.port, destination)
    names = [d.name for d in settings.destinations]
    raise ConfigError(f"--to {text!r}: expected AET@HOST:PORT (e.g. ORTHANC@127.0.0.1:4242) "
                      f"or a destination name{f' from {names}' if names else ''}")


def peer_tls(settings: Settings, peer: Peer) -> tuple[ClientContext, str] | None:
    """TLS for ``peer`` when it is a destination configured with ``tls = true``, else None."""
    return None if peer.destination is None else tls_args(settings.tls, peer.destination, settings.source)


def _read(path: Path) -> FileToSend | str:
    """The file's SOP class and transfer syntax, or why it is skipped."""
    try:
        ds = dcmread(path, stop_before_pixels=True)
        meta = ds.file_meta
        sop_class = str(ds.get("SOPClassUID", "") or meta.get("MediaStorageSOPClassUID", ""))
        syntax = str(meta.get("TransferSyntaxUID", ""))
    except (InvalidDicomError, ValueError, EOFError, AttributeError):
        return "not a DICOM file"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or type(exc).__name__})"
    if sop_class == _DICOMDIR:
        return "a DICOMDIR (an index of files, not an instance)"
    if not sop_class or not syntax:
        return "no SOP Class UID or transfer syntax in its header"
    return FileToSend(path, sop_class, syntax)


def _batches(files: Sequence[FileToSend]) -> list[list[FileToSend]]:
    """Files grouped so that each group needs at most MAX_CONTEXTS contexts."""
    batches: list[list[FileToSend]] = []
    contexts: list[set[tuple[str, str]]] = []
    for item in files:
        for batch, needed in zip(batches, contexts, strict=True):
            if item.context in needed or len(needed) < MAX_CONTEXTS:
                batch.append(item)
                needed.add(item.context)
                break
        else:
            batches.append([item])
            contexts.append({item.context})
    return batches


def _syntax_name(uid: str) -> str:
    name = UID(uid).name
    return name if name and name != uid else uid


def send_files(settings: Settings, inputs: Sequence[Path], target: str, timeout: float, out: TextIO) -> int:
    """Send every DICOM file of ``inputs`` to ``target`` as it is; 1 if any failed or none was sent."""
    peer = resolve_peer(settings, target)
    files: list[FileToSend] = []
    for path in input_files(inputs):
        read = _read(path)
        if isinstance(read, str):
            print(f"{path}: skipped, {read}", file=out)
        else:
            files.append(read)
    if not files:
        print(f"no DICOM files found in {' '.join(map(str, inputs))}", file=out)
        return 1
    sent = sum(_send_batch(settings, peer, batch, timeout, out) for batch in _batches(files))
    failed = len(files) - sent
    print(f"sent {sent} of {len(files)} file(s) to {peer}" + (f"; {failed} failed" if failed else ""),
          file=out)
    return 1 if failed else 0


def _ae(settings: Settings, files: Sequence[FileToSend], timeout: float) -> AE:
    ae = AE(ae_title=settings.node.ae_title)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.acse_timeout = ae.connection_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop_class, syntax in sorted({f.context for f in files}):
        ae.add_requested_context(sop_class, [syntax])  # its own context: the peer decides on each alone
    return ae


def _send_batch(settings: Settings, peer: Peer, files: Sequence[FileToSend], timeout: float,
                out: TextIO) -> int:
    """One association for ``files``; prints a line per file; returns how many the peer took."""
    secure = peer_tls(settings, peer)
    assoc = _ae(settings, files, timeout).associate(peer.host, peer.port, ae_title=peer.ae_title,
                                                    max_pdu=131072, tls_args=secure)
    if not assoc.is_established:
        _, reason = _association_failure(assoc)
        if secure is not None and secure[0].failure:
            reason = f"TLS handshake failed: {secure[0].failure}"
        for item in files:
            print(f"{item.path}: failed, {reason}", file=out)
        return 0
    taken = 0
    try:
        for item in files:
            result = _store(assoc, item) if assoc.is_established else "failed, association lost"
            taken += not result.startswith("failed")
            print(f"{item.path}: {result}", file=out)
    finally:
        if assoc.is_established:
            assoc.release()
    return taken


def _store(assoc: Association, item: FileToSend) -> str:
    """C-STORE one file unchanged: "ok", "warning 0xB000" or "failed, why"."""
    try:
        response = assoc.send_c_store(item.path)
    except ValueError:  # the peer refused the context of this SOP class in this transfer syntax
        return (f"failed, the peer accepted no presentation context for {_syntax_name(item.sop_class_uid)} "
                f"in {_syntax_name(item.transfer_syntax_uid)}")
    except (OSError, InvalidDicomError) as exc:
        return f"failed, the file cannot be read ({type(exc).__name__})"
    status = int(response.Status) if "Status" in response else None
    if status is None:
        return "failed, no response (timeout or abort)"
    if classify(status) is Outcome.DELIVERED:
        return "ok" if status == 0 else f"warning 0x{status:04X}"
    comment = f": {_printable(str(response.ErrorComment))}" if "ErrorComment" in response else ""
    return f"failed, status 0x{status:04X}{comment}"
