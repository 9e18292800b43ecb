"""The HTTP worker's wake-up call to the deployer process (`shiphook.http.notifier`), received on a
real datagram socket that the test binds where the deployer process would."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from shiphook import wakeup
from shiphook.deployer.process import _relay
from shiphook.http.notifier import NOTIFY_INTERVAL, DeployerNotifier
from shiphook.testing import eventually
from shiphook.wakeup import bind_deployer_address, deployer_address, release_deployer_address


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
    bind_deployer_address(inbox, address)
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


def as_another_user(action) -> int:
    """The exit status of `action()` run in a child process of uid 65534 (0: it returned)."""
    child = os.fork()
    if child == 0:
        try:
            os.setuid(65534)
            action()
            os._exit(0)
        except BaseException:
            os._exit(1)
    return os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])


def test_the_deployer_takes_wake_ups_from_its_own_user_only_and_survives_garbage(address):
    """No other user may send to the deployer's socket, nor take its address while a deployer
    restarts (an abstract socket allowed both, and it is no longer used); bytes that are no
    target's name neither wake nor stop the relay."""
    woken: list[str] = []
    inbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    bind_deployer_address(inbox, address)
    relay = threading.Thread(
        target=_relay, args=(inbox, SimpleNamespace(notify=woken.append)), daemon=True
    )
    relay.start()

    def send(message: bytes) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as out:
            out.sendto(message, address)

    if os.getuid() == 0:
        assert as_another_user(lambda: send(b"other")) == 1
    send(b"\xff\xfe")
    send(b"web")
    eventually(lambda: woken, "a wake-up")
    assert woken == ["web"]
    assert relay.is_alive()
    inbox.shutdown(socket.SHUT_RDWR)
    inbox.close()

    os.unlink(address)  # between a deployer's death and the next one's bind

    def squat() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as squatter:
            squatter.bind(address)

    if os.getuid() == 0:
        assert as_another_user(squat) == 1
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as again:
        bind_deployer_address(again, address)  # the next deployer's


def test_the_directory_a_killed_serve_left_is_removed_at_the_next_start(address):
    """A `serve` killed with SIGKILL cannot remove its socket's directory; the next one removes
    it, and leaves alone the directory of a `serve` that still runs (this process's)."""
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, signal\n"
            "from shiphook.wakeup import deployer_address\n"
            "print(deployer_address(), flush=True)\n"
            "os.kill(os.getpid(), signal.SIGKILL)",
        ],
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = Path(killed.stdout.strip()).parent
    assert left.is_dir()
    started = deployer_address()
    try:
        assert not left.exists()
        assert Path(address).parent.is_dir()  # its serve runs
        assert Path(started).parent.is_dir()
    finally:
        release_deployer_address(started)


def test_a_serve_starting_beside_another_never_removes_the_others_new_directory(monkeypatch):
    """Another serve looks for directories to remove at the very moment this one has made its
    directory and not yet locked it: the directory is not found unlocked under the lock's name."""
    real_flock = wakeup.fcntl.flock

    def another_serve_starts_first(fd: int, operation: int) -> None:
        if operation == wakeup.fcntl.LOCK_EX:  # this serve, about to lock its directory
            wakeup._remove_left_behind()
        real_flock(fd, operation)

    monkeypatch.setattr(wakeup.fcntl, "flock", another_serve_starts_first)
    address = deployer_address()
    try:
        assert Path(address).parent.is_dir()
        assert (Path(address).parent / wakeup.SERVE_LOCK).exists()
    finally:
        release_deployer_address(address)
