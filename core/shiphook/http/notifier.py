"""The HTTP worker's wake-up call to the deployer process, after each committed deployment."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable

NOTIFY_INTERVAL = 0.05


class DeployerNotifier:
    """An HTTP worker's line to the deployer process; never blocks the event loop.

    At most one message per target per NOTIFY_INTERVAL, the rest deferred to its end: in a burst
    the deployer is already busy with the target, and one wake-up is all it needs.
    """

    def __init__(self, address: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._address = address
        self._clock = clock
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)
        self._sent: dict[str, float] = {}
        self._deferred: set[str] = set()

    def __call__(self, target: str) -> None:
        if target in self._deferred:
            return
        wait = self._sent.get(target, -NOTIFY_INTERVAL) + NOTIFY_INTERVAL - self._clock()
        if wait > 0:
            self._deferred.add(target)
            asyncio.get_running_loop().call_later(wait, self._send, target)
        else:
            self._send(target)

    def _send(self, target: str) -> None:
        self._deferred.discard(target)
        self._sent[target] = self._clock()
        with contextlib.suppress(OSError):  # full, or the deployer restarting: its scan finds it
            self._socket.sendto(target.encode(), self._address)
