"""The ``dicom-node`` command line: thin commands over the same core functions the node uses.

Exit codes: 0 success, 1 the operation failed (a peer refused, say), 2 bad usage or bad config
(one line on stderr naming the file, the key, the value and what was expected).
"""

import argparse
import fcntl
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from dicom_node import __version__
from dicom_node.config import DEFAULT_CONFIG, ENV_CONFIG, Settings, load_settings, parse_assignment
from dicom_node.errors import ConfigError, DicomNodeError
from dicom_node.logs import setup_logging

logger = logging.getLogger(__name__)

_PEER_RE = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>[^:@]+):(?P<port>\d{1,5})$")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", type=Path, default=None,
        help=f"settings file (default ${ENV_CONFIG} or {DEFAULT_CONFIG})",
    )
    common.add_argument(
        "--set", dest="assignments", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one setting (repeatable); wins over the file and DICOM_NODE_* variables",
    )
    parser = argparse.ArgumentParser(prog="dicom-node", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dicom-node {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", parents=[common], help="run the node until SIGINT/SIGTERM")
    serve.add_argument("--port", type=int, help="DICOM port (node.port); 0 picks a free one")
    serve.add_argument("--ae-title", help="called AE title (node.ae_title)")
    serve.add_argument("--data-dir", help="data folder (node.data_dir)")

    echo = commands.add_parser("echo", parents=[common], help="C-ECHO a DICOM peer")
    echo.add_argument("peer", metavar="AET@HOST:PORT", help="the peer to verify")
    echo.add_argument("--timeout", type=float, default=10.0, help="seconds to wait (default 10)")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = dict(parse_assignment(a) for a in args.assignments)
    for flag, key in (("port", "node.port"), ("ae_title", "node.ae_title"),
                      ("data_dir", "node.data_dir")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = value
    return load_settings(args.config, overrides=overrides)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dicom-node`` console script."""
    args = _parser().parse_args(argv)
    try:
        settings = _settings(args)
        setup_logging(settings.logging.level)
        if args.command == "serve":
            return serve(settings)
        return echo(settings, args.peer, args.timeout, sys.stdout)
    except ConfigError as exc:
        print(f"dicom-node: error: {exc}", file=sys.stderr)
        return 2
    except DicomNodeError as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 1


def _lock_data_dir(data_dir: Path) -> int:
    """Hold an exclusive lock on the data folder so two nodes never share it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / "node.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"{data_dir}: data_dir is in use by another dicom-node process") from None
    return fd


def serve(settings: Settings) -> int:
    """Run the node until SIGINT or SIGTERM, then stop without leaving anything half-written."""
    from dicom_node.ingest.scp import start_ingest
    from dicom_node.store import InstanceStore

    lock = _lock_data_dir(settings.node.data_dir)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    store = InstanceStore(settings.node.data_dir, settings.store.min_free_space)
    clean = False
    try:
        store.recover()
        server = start_ingest(settings, store)
        logger.info("dicom-node %s ready (config %s, data_dir %s)", __version__,
                    settings.source, settings.node.data_dir)
        stop.wait()
        logger.info("stopping")
        server.stop(settings.ingest.shutdown_grace_seconds)
        clean = True
    finally:
        store.close(clean_shutdown=clean)
        os.close(lock)
    logger.info("stopped")
    return 0


def echo(settings: Settings, peer: str, timeout: float, out: TextIO) -> int:
    """C-ECHO ``AET@HOST:PORT`` as the node's AE title; 0 if the peer answered success."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    match = _PEER_RE.match(peer)
    if not match or not 0 < int(match["port"]) < 65536:
        raise ConfigError(f"peer {peer!r}: expected AET@HOST:PORT, e.g. ORTHANC@127.0.0.1:4242")
    ae = AE(ae_title=settings.node.ae_title)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    assoc = ae.associate(match["host"], int(match["port"]), ae_title=match["aet"])
    if not assoc.is_established:
        reason = "rejected" if assoc.is_rejected else "no association (refused, aborted or timed out)"
        print(f"C-ECHO {peer}: {reason}", file=out)
        return 1
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    print(f"C-ECHO {peer}: " + ("success" if code == 0 else f"failed (status {code})"), file=out)
    return 0 if code == 0 else 1
