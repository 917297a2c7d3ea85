"""The DICOMweb sub-application served alone, in a thread of this process, over a fresh store:
for tests of what QIDO-RS, WADO-RS and STOW-RS answer without running a node."""

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from aiohttp import web

from dicom_node.audit import NO_AUDIT, Audit
from dicom_node.dicomweb import PREFIX, DicomWebContext, make_app
from dicom_node.store import InstanceStore


@contextmanager
def serve_app(root: web.Application) -> Iterator[str]:
    """Serve ``root`` on a free loopback port until the block ends; yields its base URL."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(root)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, name="dicomweb-test", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


@contextmanager
def serve_dicomweb(data_dir: Path, audit: Audit = NO_AUDIT,
                   max_instance_size: int = 2**31) -> Iterator[tuple[str, DicomWebContext]]:
    """A store in ``data_dir`` and its DICOMweb at ``<base>/dicom-web``; yields (DICOMweb URL, context)."""
    store = InstanceStore(data_dir, audit=audit)
    ctx = DicomWebContext(store=store, audit=audit, max_instance_size=max_instance_size)
    root = web.Application()
    root.add_subapp(PREFIX, make_app(ctx))
    try:
        with serve_app(root) as base:
            yield base + PREFIX, ctx
    finally:
        store.close()
