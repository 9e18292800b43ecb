"""The datagram socket on which HTTP workers wake the deployer process: its address.

`shiphook serve` chooses the address, the deployer process binds it, and each HTTP worker's
`DeployerNotifier` (shiphook.http.notifier) sends a target's name to it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from pathlib import Path

DEPLOYER_SOCKET = "SHIPHOOK_DEPLOYER_SOCKET"  # the environment variable that hands it to workers


def deployer_address() -> str:
    """Where the deployer listens: a socket file in a temporary directory only this user may
    enter, so that no other user can send to it, nor take the address while a restarted
    deployer is binding it again (an abstract socket, which has no permissions, allowed both)."""
    return str(Path(tempfile.mkdtemp(prefix="shiphook-")) / "deployer.sock")


def bind_deployer_address(inbox: socket.socket, address: str) -> None:
    """Bind the deployer's socket, replacing the file a deployer before it left."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(address)
    inbox.bind(address)


def release_deployer_address(address: str) -> None:
    shutil.rmtree(Path(address).parent, ignore_errors=True)
