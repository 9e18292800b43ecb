"""`?wait=<seconds>`: let request handlers await a deployment's end without holding a thread.

The deployer records each end in the database, from another process (the deployer process of
`shiphook serve`, or another replica sharing the database) or from threads of this one (tests and
embedding, `shiphook.server.build`): either way a single poller per event loop reads the ends of
what its callers wait for. A waiting CI job costs a future and an open connection, never a thread
or a query of its own.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from shiphook.errors import DatabaseUnavailable
from shiphook.models import TERMINAL
from shiphook.storage import Storage

log = logging.getLogger("shiphook.http.waiters")
POLL_INTERVAL = 0.2  # seconds between a poller's reads of the deployments its callers wait for


class Waiters:
    def __init__(self, storage: Storage, *, poll_interval: float = POLL_INTERVAL) -> None:
        self.storage = storage
        self.poll_interval = poll_interval
        self._waiting: dict[str, set[asyncio.Future[None]]] = {}
        self._lock = threading.Lock()
        self._poller: asyncio.Task[None] | None = None

    async def wait(
        self, deployment_id: str, timeout: float, *, until: asyncio.Future[None] | None = None
    ) -> None:
        """Return when the deployment has ended, `timeout` seconds have passed, or `until` is
        done (the server is shutting down)."""
        if until is not None and until.done():
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with self._lock:
            self._waiting.setdefault(deployment_id, set()).add(future)
        self._ensure_poller()
        try:
            # it may have ended before we registered
            statuses = await self.storage.call(
                self.storage.statuses, deployment_ids=[deployment_id]
            )
            if statuses.get(deployment_id) in TERMINAL:
                return
            ends = [future] if until is None else [future, until]
            await asyncio.wait(ends, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            with self._lock:
                futures = self._waiting.get(deployment_id)
                if futures is not None:
                    futures.discard(future)
                    if not futures:
                        del self._waiting[deployment_id]

    def _release(self, deployment_id: str) -> None:
        with self._lock:
            futures = list(self._waiting.get(deployment_id, ()))
        for future in futures:
            future.get_loop().call_soon_threadsafe(_resolve, future)

    def _ensure_poller(self) -> None:
        loop = asyncio.get_running_loop()
        if self._poller is None or self._poller.done() or self._poller.get_loop() is not loop:
            self._poller = loop.create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            with self._lock:
                ids = list(self._waiting)
            if not ids:
                return
            try:  # one indexed query per interval for every waiter of this event loop
                statuses = await self.storage.call(self.storage.statuses, deployment_ids=ids)
            except DatabaseUnavailable:  # logged once by the storage; the waiters wait on
                continue
            except Exception:
                log.exception("waiters: reading deployment states failed; retrying")
                continue
            for deployment_id, status in statuses.items():
                if status in TERMINAL:
                    self._release(deployment_id)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
