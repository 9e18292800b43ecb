"""The datagram socket on which HTTP workers wake the deployer process: its address.

`shiphook serve` chooses the address, the deployer process binds it, and each HTTP worker's
`DeployerNotifier` (shiphook.http.notifier) sends a target's name to it.
"""

from __future__ import annotations

import secrets
import shutil
import sys
import tempfile
from pathlib import Path

DEPLOYER_SOCKET = "SHIPHOOK_DEPLOYER_SOCKET"  # the environment variable that hands it to workers


def deployer_address() -> str:
    """Where the deployer listens: an abstract socket on Linux (nothing on disk to clean up, even
    after a SIGKILL), else a socket file in a private temporary directory."""
    if sys.platform == "linux":
        return f"@shiphook-deployer-{secrets.token_hex(8)}"
    return str(Path(tempfile.mkdtemp(prefix="shiphook-")) / "deployer.sock")


def release_deployer_address(address: str) -> None:
    if not address.startswith("@"):
        shutil.rmtree(Path(address).parent, ignore_errors=True)


def sockaddr(address: str) -> str:
    return "\0" + address[1:] if address.startswith("@") else address
