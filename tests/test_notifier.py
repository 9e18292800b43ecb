"""The HTTP worker's wake-up call to the deployer process (`shiphook.http.notifier`), received on a
real datagram socket that the test binds where the deployer process would."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from shiphook.deployer.process import _relay
from shiphook.http.notifier import NOTIFY_INTERVAL, DeployerNotifier
from shiphook.testing import eventually
from shiphook.wakeup import deployer_address, release_deployer_address, sockaddr


class Clock:
    """The notifier's clock, moved by the test: which calls fall within one interval does not
    depend on how fast the machine runs them."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def address() -> Iterator[str]:
    address = deployer_address()
    yield address
    release_deployer_address(address)


def bind(address: str) -> socket.socket:
    """The deployer process's end of the wake-up socket."""
    inbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    inbox.bind(sockaddr(address))
    inbox.setblocking(False)
    return inbox


def received(inbox: socket.socket) -> list[str]:
    """The target names waiting in the socket now."""
    names = []
    with contextlib.suppress(BlockingIOError):
        while True:
            names.append(inbox.recv(256).decode())
    return names


async def next_message(inbox: socket.socket) -> str:
    loop = asyncio.get_running_loop()
    return (await asyncio.wait_for(loop.sock_recv(inbox, 256), timeout=30)).decode()


def test_a_burst_for_one_target_sends_one_message_at_once_and_one_at_the_intervals_end(address):
    clock = Clock()
    inbox = bind(address)

    async def burst() -> None:
        notify = DeployerNotifier(address, clock=clock)
        notify("web")
        for _ in range(50):  # the rest of the burst, within the same interval
            notify("web")
        notify("api")  # another target has an interval of its own
        assert received(inbox) == ["web", "api"]
        # one message for the 50, when the interval that began with the first one ends
        assert await next_message(inbox) == "web"
        await asyncio.sleep(0)  # anything else due then has been sent
        assert received(inbox) == []

        clock.now += NOTIFY_INTERVAL / 2  # within the interval of the deferred one: deferred
        notify("web")
        assert received(inbox) == []
        assert await next_message(inbox) == "web"
        clock.now += NOTIFY_INTERVAL  # a later call, past the interval: sent at once
        notify("web")
        assert received(inbox) == ["web"]

    try:
        asyncio.run(burst())
    finally:
        inbox.close()


def test_a_deployer_process_that_is_not_listening_gets_the_next_message_once_it_is(address):
    clock = Clock()

    async def restart() -> None:
        notify = DeployerNotifier(address, clock=clock)
        notify("web")  # nobody bound: dropped without an error (the deployer's scan finds it)
        inbox = bind(address)
        try:
            clock.now += NOTIFY_INTERVAL
            notify("web")
            assert received(inbox) == ["web"]
        finally:
            inbox.close()

    asyncio.run(restart())


def test_the_deployer_takes_wake_ups_from_its_own_user_only_and_survives_garbage(address):
    """An abstract socket has no permissions: any local user may send to it. What another user
    sends is dropped, and bytes that are no target's name neither wake nor stop the relay."""
    woken: list[str] = []
    inbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    inbox.bind(sockaddr(address))
    relay = threading.Thread(
        target=_relay, args=(inbox, SimpleNamespace(notify=woken.append)), daemon=True
    )
    relay.start()

    def send(message: bytes, uid: int | None = None) -> None:
        child = os.fork()
        if child == 0:  # a process of another user, as root can make one
            try:
                if uid is not None:
                    os.setuid(uid)
                with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as out:
                    out.sendto(message, sockaddr(address))
            finally:
                os._exit(0)
        os.waitpid(child, 0)

    if os.getuid() == 0:
        send(b"other", uid=65534)
    send(b"\xff\xfe")
    send(b"web")
    eventually(lambda: woken, "a wake-up")
    assert woken == ["web"]
    assert relay.is_alive()
    inbox.shutdown(socket.SHUT_RDWR)
    inbox.close()
