"""A real Kubernetes control plane for the tests, started from the binaries tests/k8s/build.sh made.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok run as host processes on
free loopback ports, with a PKI, a token file and a kubeconfig of their own in one temporary
directory. The controllers are Kubernetes' own; kwok plays the kubelet of one fake node, with the
module's default stages and the project's (stages.yaml): a test declares a failure by image tag.
Each process runs in its own session and is stopped by its pid; nothing reads the ambient
KUBECONFIG or writes outside the temporary directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import kubernetes.client
from conftest import free_port
from kubernetes.client.exceptions import ApiException

HERE = Path(__file__).parent
BUILD = HERE / "build.sh"
NODE = "kwok-node-0"
# The module's stages that kwokctl runs with: nodes become Ready and keep their lease, pods run,
# Job pods complete, deleted pods go.
KWOK_STAGES = [
    "node/fast/node-initialize.yaml",
    "node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
    "pod/fast/pod-ready.yaml",
    "pod/fast/pod-complete.yaml",
    "pod/fast/pod-delete.yaml",
]


class StartError(RuntimeError):
    """The control plane did not come up; the message carries each process's last log lines."""


def built() -> tuple[Path, bool]:
    """The cache directory of the binaries, and whether they are built there."""
    result = subprocess.run(
        ["bash", str(BUILD), "--check"], capture_output=True, text=True, check=False
    )
    return Path(result.stdout.strip()), result.returncode == 0


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log: Path

    def tail(self, lines: int = 25) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM to its process group, then SIGKILL; nothing of it may outlive the session."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()


class ControlPlane:
    """`start()`, use (`kubeconfig`, `server`, `ca`, `client()`, `token_for()`), `stop()`."""

    def __init__(self, home: Path) -> None:
        self.bin = home / "bin"
        self.kwok_stages = home / "kwok-stages"
        self.root = Path(tempfile.mkdtemp(prefix="shiphook-k8s-"))
        self.processes: list[Process] = []
        self.admin_token = secrets.token_urlsafe(32)
        self.api_port = free_port()

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def ca(self) -> Path:
        return self.root / "ca.pem"

    @property
    def serving_cert(self) -> tuple[Path, Path]:
        """The API server's certificate (for 127.0.0.1, signed by `ca`) and its key."""
        return self.root / "apiserver.pem", self.root / "apiserver-key.pem"

    @property
    def kubeconfig(self) -> Path:
        """The admin's kubeconfig (group system:masters)."""
        return self.root / "admin.kubeconfig"

    # -- start and stop -------------------------------------------------------------------

    def start(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        try:
            self._write_files()
            etcd = self._start_etcd()
            self._wait("etcd /health", deadline, lambda: self._get(f"{etcd}/health", tls=False))
            self._start_apiserver(etcd)
            self._wait("kube-apiserver /readyz", deadline, lambda: self._get("/readyz"))
            self._start_components()
            self._create_node()
            self._wait(f"node {NODE} Ready and untainted", deadline, self._node_ready)
            self._wait(
                "the default ServiceAccount", deadline, lambda: self._service_account("default")
            )
        except Exception as exc:
            logs = self.logs()
            self.stop()
            raise StartError(f"the control plane did not start: {exc}\n{logs}") from exc

    def stop(self) -> None:
        """Every process by its pid, in reverse order of start; then the temporary directory."""
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    def _write_files(self) -> None:
        def openssl(*args: str) -> None:
            subprocess.run(["openssl", *args], cwd=self.root, check=True, capture_output=True)

        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
        openssl("req", "-x509", *ec, "-keyout", "ca-key.pem", "-out", "ca.pem", "-days", "2",
                "-subj", "/CN=shiphook test cluster CA")  # fmt: skip
        (self.root / "serving.ext").write_text(
            "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
            "DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\n"
        )
        openssl("req", *ec, "-keyout", "apiserver-key.pem", "-out", "apiserver.csr",
                "-subj", "/CN=kube-apiserver")  # fmt: skip
        openssl("x509", "-req", "-in", "apiserver.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem",
                "-CAcreateserial", "-out", "apiserver.pem", "-days", "2",
                "-extfile", "serving.ext")  # fmt: skip
        # the key pair that signs and verifies ServiceAccount tokens
        openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
                "-out", "sa-key.pem")  # fmt: skip
        openssl("pkey", "-in", "sa-key.pem", "-pubout", "-out", "sa.pem")
        (self.root / "tokens.csv").write_text(f'{self.admin_token},admin,admin,"system:masters"\n')
        self.write_kubeconfig(self.kubeconfig, self.admin_token)
        stages = [(self.kwok_stages / name).read_text() for name in KWOK_STAGES]
        stages.append((HERE / "stages.yaml").read_text())
        # stages only: with a KwokConfiguration document of its own, kwok v0.8.0 skips its
        # defaults ("playStageParallelism must be greater than 0"); the options go as flags
        (self.root / "kwok.yaml").write_text("".join(f"---\n{t.strip()}\n" for t in stages))

    def write_kubeconfig(
        self, path: Path, token: str, namespace: str = "default", server: str | None = None
    ) -> Path:
        """A kubeconfig for this cluster that authenticates with `token`; at `server` (a proxy
        in front of the API server, with its serving certificate) instead of the API server."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "test",
                    "cluster": {
                        "server": server or self.server,
                        "certificate-authority": str(self.ca),
                    },
                }
            ],
            "users": [{"name": "user", "user": {"token": token}}],
            "contexts": [
                {
                    "name": "test",
                    "context": {"cluster": "test", "user": "user", "namespace": namespace},
                }
            ],
            "current-context": "test",
        }
        path.write_text(
            json.dumps(config, indent=2)
        )  # JSON is YAML: any kubeconfig reader takes it
        path.chmod(0o600)
        return path

    def _run(self, name: str, *args: str) -> None:
        log = self.root / f"{name}.log"
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                [str(self.bin / name), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.root,
                # no ambient KUBECONFIG, and a HOME that is ours (kwok and etcd look there)
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.root)},
                start_new_session=True,  # its own process group, stopped by pid
            )
        self.processes.append(Process(name, popen, log))

    def _start_etcd(self) -> str:
        client, peer = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
        self._run(
            "etcd",
            "--name=test",
            f"--data-dir={self.root / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=test={peer}",
            "--unsafe-no-fsync=true",  # throwaway data: no fsync on a shared test machine
            "--log-level=warn",
        )
        return client

    def _start_apiserver(self, etcd: str) -> None:
        d = self.root
        self._run(
            "kube-apiserver",
            f"--etcd-servers={etcd}",
            "--bind-address=127.0.0.1",
            f"--secure-port={self.api_port}",
            # loopback everywhere: no default route needed, no endpoint pointing at 127.0.0.1
            "--advertise-address=127.0.0.1",
            "--endpoint-reconciler-type=none",
            f"--cert-dir={d / 'apiserver-certs'}",
            f"--tls-cert-file={d / 'apiserver.pem'}",
            f"--tls-private-key-file={d / 'apiserver-key.pem'}",
            f"--client-ca-file={d / 'ca.pem'}",
            f"--token-auth-file={d / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={d / 'sa.pem'}",
            f"--service-account-signing-key-file={d / 'sa-key.pem'}",
            "--service-cluster-ip-range=10.96.0.0/16",
            "--allow-privileged=true",
            "--enable-priority-and-fairness=false",
            "--profiling=false",
            "--v=1",
        )

    def _start_components(self) -> None:
        kubeconfig = str(self.kubeconfig)
        # no --authentication/authorization-kubeconfig: nothing calls their ports but /healthz,
        # and with them they look for a front-proxy CA this cluster has no use for
        common = [
            f"--kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            "--leader-elect=false",
            "--v=1",
        ]
        self._run(
            "kube-controller-manager",
            *common,
            f"--secure-port={free_port()}",
            f"--cert-dir={self.root / 'kcm-certs'}",
            "--controllers=*",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={self.root / 'sa-key.pem'}",
            f"--root-ca-file={self.ca}",
        )
        self._run(
            "kube-scheduler",
            *common,
            f"--secure-port={free_port()}",
            f"--cert-dir={self.root / 'scheduler-certs'}",
        )
        self._run(
            "kwok",
            f"--kubeconfig={kubeconfig}",
            f"--config={self.root / 'kwok.yaml'}",
            "--manage-all-nodes=true",
            "--node-lease-duration-seconds=40",
            "--cidr=10.244.0.0/16",
        )

    def _create_node(self) -> None:
        labels = {
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "kubernetes.io/hostname": NODE,
            "type": "kwok",
        }
        node = kubernetes.client.V1Node(
            metadata=kubernetes.client.V1ObjectMeta(
                name=NODE, labels=labels, annotations={"kwok.x-k8s.io/node": "fake"}
            )
        )
        with self.client() as api:
            kubernetes.client.CoreV1Api(api).create_node(node)

    # -- waiting ------------------------------------------------------------------------

    def _wait(self, what: str, deadline: float, ready: Callable[[], bool]) -> None:
        last = ""
        while time.monotonic() < deadline:
            for process in self.processes:
                if process.popen.poll() is not None:
                    raise StartError(f"{process.name} exited with {process.popen.returncode}")
            try:
                if ready():
                    return
            except (OSError, ApiException) as exc:
                last = f": {exc}"
            time.sleep(0.2)
        raise StartError(f"timed out waiting for {what}{last}")

    def _get(self, url: str, tls: bool = True) -> bool:
        request = urllib.request.Request(url if not tls else self.server + url)
        context = None
        if tls:
            request.add_header("Authorization", f"Bearer {self.admin_token}")
            context = ssl.create_default_context(cafile=str(self.ca))
        try:
            with urllib.request.urlopen(request, timeout=5, context=context) as response:
                return response.status == 200
        except urllib.error.HTTPError:
            return False

    def _node_ready(self) -> bool:
        with self.client() as api:
            node = kubernetes.client.CoreV1Api(api).read_node(NODE)
        ready = any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])
        return ready and not node.spec.taints

    def _service_account(self, namespace: str) -> bool:
        with self.client() as api:
            try:
                kubernetes.client.CoreV1Api(api).read_namespaced_service_account(
                    "default", namespace
                )
            except ApiException as exc:
                if exc.status == 404:
                    return False
                raise
        return True

    # -- for the tests ------------------------------------------------------------------

    def client(self, token: str | None = None) -> kubernetes.client.ApiClient:
        """An API client as the admin, or with a bearer token (a ServiceAccount's)."""
        config = kubernetes.client.Configuration()
        config.host = self.server
        config.ssl_ca_cert = str(self.ca)
        config.api_key = {"authorization": token or self.admin_token}
        config.api_key_prefix = {"authorization": "Bearer"}
        return kubernetes.client.ApiClient(config)

    def token_for(self, namespace: str, service_account: str, seconds: int = 3600) -> str:
        """A token of the ServiceAccount, through the TokenRequest API (as a pod would get)."""
        request = kubernetes.client.AuthenticationV1TokenRequest(
            spec=kubernetes.client.V1TokenRequestSpec(audiences=[], expiration_seconds=seconds)
        )
        with self.client() as api:
            response = kubernetes.client.CoreV1Api(api).create_namespaced_service_account_token(
                service_account, namespace, request
            )
        return response.status.token

    def new_namespace(self, prefix: str = "test", timeout: float = 60) -> str:
        """A fresh namespace, once its `default` ServiceAccount exists (pods need it)."""
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        with self.client() as api:
            kubernetes.client.CoreV1Api(api).create_namespace(
                kubernetes.client.V1Namespace(metadata=kubernetes.client.V1ObjectMeta(name=name))
            )
        self._wait(
            f"namespace {name}", time.monotonic() + timeout, lambda: self._service_account(name)
        )
        return name

    def logs(self) -> str:
        """The last lines of each process's log."""
        return "\n".join(f"--- {p.name}:\n{p.tail()}" for p in self.processes)
