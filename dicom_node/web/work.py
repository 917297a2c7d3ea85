"""The thread work of DICOMweb and ``/api`` requests, bounded by work rather than by request.

A request holds a slot of :class:`WorkSlots` only while its blocking work (SQLite, files,
pydicom) runs in a thread, never while it waits on the network: a STOW-RS body arriving slowly
or a WADO-RS answer read slowly by a viewer holds no slot between its chunks, so six of them
cannot lock every other client out. A request whose *first* work finds no slot free within
the wait gets 503 (:class:`Busy`) before anything of its answer is sent; once admitted, its
later work (the next chunk of a stream) queues for a slot rather than failing mid-answer.
"""

import asyncio
import contextvars
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

from aiohttp import web

T = TypeVar("T")


class Busy(Exception):
    """No work slot came free in time for a request's first work: answered 503."""


class WorkSlots:
    """At most ``slots`` pieces of work in threads at once, for all requests together."""

    def __init__(self, slots: int, wait: float) -> None:
        """``wait``: how long a request's first work waits for a slot before :class:`Busy`."""
        self.free = asyncio.Semaphore(slots)
        self.wait = wait


class Work:
    """One request's use of the :class:`WorkSlots`."""

    def __init__(self, slots: WorkSlots) -> None:
        self.slots = slots
        self.admitted = False

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` in a worker thread, holding a slot until the thread ends.

        Raises
        ------
        Busy
            The request's first work found no slot within the wait.
        """
        if self.admitted:
            await self.slots.free.acquire()
        else:
            try:
                await asyncio.wait_for(self.slots.free.acquire(), self.slots.wait)
            except TimeoutError:
                raise Busy from None
            self.admitted = True
        call = partial(contextvars.copy_context().run, fn, *args, **kwargs)
        try:
            future = asyncio.get_running_loop().run_in_executor(None, call)
        except BaseException:  # the executor is shut down (a stop): no thread will free the slot
            self.slots.free.release()
            raise
        # the slot is the thread's, not the request's: a cancelled request (its client gone)
        # frees it only once the thread, which cannot be stopped, has ended
        future.add_done_callback(lambda _: self.slots.free.release())
        return await asyncio.shield(future)


#: A DICOMweb or ``/api`` request's :class:`Work` (set by the web server's admission middleware).
WORK = web.RequestKey("work", Work)


async def offload(request: web.Request, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` off the event loop: within the request's :class:`Work` where it
    has one (DICOMweb, ``/api``), else plainly in a thread (the dashboard's pages)."""
    work = request.get(WORK)
    if work is None:
        return await asyncio.to_thread(fn, *args, **kwargs)
    return await work.run(fn, *args, **kwargs)
