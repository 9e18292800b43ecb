"""The datagram socket on which HTTP workers wake the deployer process: its address.

`shiphook serve` chooses the address, the deployer process binds it, and each HTTP worker's
`DeployerNotifier` (shiphook.http.notifier) sends a target's name to it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import tempfile
from pathlib import Path

DEPLOYER_SOCKET = "SHIPHOOK_DEPLOYER_SOCKET"  # the environment variable that hands it to workers


# what a `serve` holds an exclusive lock on, beside its deployer's socket, for as long as it runs
SERVE_LOCK = "serve.lock"
_held: dict[str, int] = {}  # address -> the descriptor holding its directory's lock


def deployer_address() -> str:
    """Where the deployer listens: a socket file in a temporary directory only this user may
    enter, so that no other user can send to it, nor take the address while a restarted
    deployer is binding it again (an abstract socket, which has no permissions, allowed both).
    This process holds a lock in that directory until `release_deployer_address`; the
    directories that a `serve` killed with SIGKILL left behind are removed first."""
    _remove_left_behind()
    directory = Path(tempfile.mkdtemp(prefix="shiphook-"))
    # locked before it has the name another serve looks for, which could otherwise find it
    # unlocked in between and remove the directory
    held = os.open(directory / "locking", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(held, fcntl.LOCK_EX)
    os.rename(directory / "locking", directory / SERVE_LOCK)
    address = str(directory / "deployer.sock")
    _held[address] = held
    return address


def bind_deployer_address(inbox: socket.socket, address: str) -> None:
    """Bind the deployer's socket, replacing the file a deployer before it left."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(address)
    inbox.bind(address)


def release_deployer_address(address: str) -> None:
    shutil.rmtree(Path(address).parent, ignore_errors=True)
    held = _held.pop(address, None)
    if held is not None:
        os.close(held)


def _remove_left_behind() -> None:
    """Remove this user's deployer directories whose lock no process holds: the `serve` that
    made each is gone (the kernel let go of its lock when it died)."""
    for directory in Path(tempfile.gettempdir()).glob("shiphook-*"):
        try:
            if directory.lstat().st_uid != os.getuid():
                continue
            lock = os.open(directory / SERVE_LOCK, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:  # another user's, not a directory, or without a lock file
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # its serve still runs
            continue
        else:
            shutil.rmtree(directory, ignore_errors=True)
        finally:
            os.close(lock)
