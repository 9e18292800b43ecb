"""A private Docker Engine for the Swarm tests, and the test images it runs.

`PrivateDockerd` runs Debian's `dockerd` as root with everything of its own under one short
temporary directory (data root, exec root, pidfile, unix socket, an empty daemon.json), with no
bridge and no iptables rules, so it never touches a Docker engine, socket or swarm the machine
already has. It is stopped by its pid, and whatever it left (processes, mounts, files) is removed.
The ambient DOCKER_HOST is never read: every client here is given the private socket.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import docker
import docker.errors
import requests

DOCKERD = "/usr/sbin/dockerd"
BUSYBOX = "/bin/busybox"

# Test images: one repository per kind, distinct tags where a test needs "a new tag".
APP = "shiphook-test/app"
JOB = "shiphook-test/job"
IMAGES = {
    f"{APP}:v1": ["/bin/busybox", "sleep", "86400"],
    f"{APP}:v2": ["/bin/busybox", "sleep", "86401"],
    f"{APP}:broken": ["/bin/busybox", "sh", "-c", "echo cannot start >&2; exit 1"],
    f"{APP}:also-broken": ["/bin/busybox", "sh", "-c", "echo cannot start >&2; exit 1"],
    # runs a moment, as a process that fails on its first request does: a check has to wait
    f"{APP}:broken-later": ["/bin/busybox", "sh", "-c", "sleep 0.5; echo gave up >&2; exit 1"],
    # never turns healthy nor fails: its health check (below) fails within an hour's start period
    f"{APP}:stalled": ["/bin/busybox", "sleep", "86400"],
    f"{JOB}:ok": ["/bin/busybox", "sh", "-c", "echo GREETING=$GREETING NAME=$NAME"],
    f"{JOB}:fail": ["/bin/busybox", "sh", "-c", "echo migration failed >&2; exit 1"],
    # the conformance suite's jobs: print the environment, exit with $EXIT
    f"{JOB}:env": ["/bin/busybox", "sh", "-c", "/bin/busybox env; exit ${EXIT:-0}"],
    f"{JOB}:env2": ["/bin/busybox", "sh", "-c", "/bin/busybox env; exit ${EXIT:-0}"],
    f"{JOB}:stalled": ["/bin/busybox", "sleep", "86400"],  # a run that never ends
}
HEALTH_CHECKS = {
    f"{APP}:stalled": 'HEALTHCHECK --interval=5s --start-period=1h CMD ["/bin/busybox", "false"]',
}


def unavailable_reason() -> str | None:
    """Why a private dockerd cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "a private dockerd needs root"
    if not os.access(DOCKERD, os.X_OK):
        return f"{DOCKERD} is not installed (Debian package docker.io)"
    if not os.path.exists(BUSYBOX):
        return f"{BUSYBOX} is not installed (Debian package busybox-static)"
    return None


@dataclass
class PrivateDockerd:
    """One dockerd with its own directories; `start` again after `kill` keeps its state."""

    root: Path
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None
    _log: Path = field(init=False)

    def __post_init__(self) -> None:
        self._log = self.root / "dockerd.log"

    @classmethod
    def create(cls, extra_args: list[str] | None = None) -> PrivateDockerd:
        # short: the socket path must stay under the unix socket limit (108 bytes)
        root = Path(tempfile.mkdtemp(prefix="shd-", dir="/tmp"))
        for sub in ("data", "exec"):
            (root / sub).mkdir()
        (root / "daemon.json").write_text("{}")  # not the machine's /etc/docker/daemon.json
        return cls(root, extra_args or [])

    @property
    def socket(self) -> Path:
        return self.root / "docker.sock"

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def client(self) -> docker.APIClient:
        return docker.APIClient(base_url=self.host, version="auto", timeout=30)

    def log(self) -> str:
        return self._log.read_text(errors="replace") if self._log.exists() else ""

    def start(self, timeout: float = 60) -> None:
        """Start dockerd and wait until it answers on its socket."""
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            # swarm tasks use the local image instead of asking a registry for the tag first
            "DOCKER_SERVICE_PREFER_OFFLINE_IMAGE": "1",
        }
        self._forget_dead_containerd()
        with open(self._log, "ab") as log:
            self.process = subprocess.Popen(
                [
                    DOCKERD,
                    f"--config-file={self.root / 'daemon.json'}",
                    f"--data-root={self.root / 'data'}",
                    f"--exec-root={self.root / 'exec'}",
                    f"--pidfile={self.root / 'docker.pid'}",
                    f"--host={self.host}",
                    "--bridge=none",
                    "--iptables=false",
                    "--ip6tables=false",
                    *self.extra_args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"dockerd exited with status {self.process.returncode}:\n{self.log()[-3000:]}"
                )
            if self.socket.exists():
                try:
                    if self.client().ping():
                        return
                except (requests.exceptions.RequestException, docker.errors.DockerException):
                    pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"dockerd did not answer within {timeout:g}s:\n{self.log()[-3000:]}")

    def _forget_dead_containerd(self) -> None:
        """After a crash, containerd (killed with its dockerd) can linger as a zombie that the
        machine's init has not reaped; dockerd takes its pidfile for a live containerd and
        waits for it forever. Remove the pidfile of a containerd that is gone or a zombie."""
        pidfile = self.root / "exec" / "containerd" / "containerd.pid"
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            state = "gone"
        if state in ("gone", "Z", "X"):
            pidfile.unlink(missing_ok=True)

    def wait_for_swarm(self, timeout: float = 60) -> None:
        """After a restart: wait until this node manages its swarm again."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                client = self.client()
                client.inspect_swarm()
                client.services()
                return
            except (requests.exceptions.RequestException, docker.errors.DockerException) as exc:
                last = str(exc)
            time.sleep(0.2)
        raise RuntimeError(f"the swarm did not come back within {timeout:g}s: {last}")

    def init_swarm(self) -> None:
        # the swarm listens on loopback only, on a port of its own (not 2377, which may be taken)
        port = free_port()
        self.client().init_swarm(
            advertise_addr=f"127.0.0.1:{port}", listen_addr=f"127.0.0.1:{port}"
        )

    def kill(self) -> None:
        """Crash the engine: SIGKILL by pid, as a power cut or OOM kill would."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM by pid, wait, then SIGKILL."""
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def remove(self) -> None:
        """Stop, end what the daemon left running (its containerd and shims), unmount, delete."""
        self.stop()
        for pid in _pids_mentioning(str(self.root)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for mountpoint in _mounts_under(str(self.root)):
            subprocess.run(["umount", "-l", mountpoint], capture_output=True, check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def build_test_images(client: docker.APIClient) -> None:
    """Build each test image FROM scratch with the static busybox: no registry involved."""
    for tag, command in IMAGES.items():
        context = io.BytesIO()
        with tarfile.open(fileobj=context, mode="w") as tar:
            tar.add(BUSYBOX, arcname="busybox")
            dockerfile = (
                "FROM scratch\n"
                "COPY busybox /bin/busybox\n"
                f"LABEL io.shiphook.test-image={json.dumps(tag)}\n"
                f"CMD {json.dumps(command)}\n"
                f"{HEALTH_CHECKS.get(tag, '')}\n"
            ).encode()
            info = tarfile.TarInfo("Dockerfile")
            info.size = len(dockerfile)
            tar.addfile(info, io.BytesIO(dockerfile))
        context.seek(0)
        output = list(
            client.build(fileobj=context, custom_context=True, tag=tag, rm=True, decode=True)
        )
        errors = [line["error"] for line in output if "error" in line]
        if errors:
            raise RuntimeError(f"building {tag} failed: {errors}")


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def dockerd_args(self, address: str) -> list[str]:
        """What `dockerd --tlsverify` needs to take clients with certificates on `address`."""
        return [
            "--tlsverify",
            f"--tlscacert={self.ca}",
            f"--tlscert={self.server_cert}",
            f"--tlskey={self.server_key}",
            f"--host=tcp://{address}",
        ]


def make_tls_files(directory: Path) -> TlsFiles:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate (openssl)."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl("req", "-x509", *key, "-keyout", "ca-key.pem", "-out", "ca.pem", "-days", "1",
            "-subj", "/CN=shiphook test CA")  # fmt: skip
    for name, usage in (("server", "serverAuth"), ("client", "clientAuth")):
        (directory / f"{name}.ext").write_text(
            f"subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n"
        )
        openssl("req", *key, "-keyout", f"{name}-key.pem", "-out", f"{name}.csr",
                "-subj", f"/CN={name}")  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem",
                "-CAcreateserial", "-out", f"{name}-cert.pem", "-days", "1",
                "-extfile", f"{name}.ext")  # fmt: skip
    return TlsFiles(
        ca=directory / "ca.pem",
        server_cert=directory / "server-cert.pem",
        server_key=directory / "server-key.pem",
        client_cert=directory / "client-cert.pem",
        client_key=directory / "client-key.pem",
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_mentioning(text: str) -> list[int]:
    """Processes whose command line names `text` (the daemon's own directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found


def _mounts_under(root: str) -> list[str]:
    """Mount points below `root`, deepest first."""
    points = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            point = line.split()[4].replace("\\040", " ")
            if point == root or point.startswith(root + "/"):
                points.append(point)
    return sorted(points, key=len, reverse=True)
