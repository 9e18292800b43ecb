"""What every benchmark shares: a shiphook server as a user runs it, the bare-framework server,
wrk, seeding hooks, and reading memory. Loopback only; everything under a temporary directory."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
PLUGINS = ROOT / "tests" / "scripted"  # the scripted test backend records every call
BIN = Path(sys.executable).parent
ADMIN_TOKEN = "bench-admin-token"
HOOK_BODY = '{"imageTag":"1.2.0"}'
POSTGRES_URL = os.environ.get(
    "SHIPHOOK_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


def ensure_wrk() -> str:
    """wrk from Debian's package, installed on first use."""
    found = shutil.which("wrk")
    if found:
        return found
    print("installing wrk (apt-get) ...", flush=True)
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "wrk"],
        check=True,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    return shutil.which("wrk") or "wrk"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer")


@dataclass
class Shiphook:
    """A `shiphook serve` in its own directory, with the scripted backend recording calls."""

    directory: Path
    config: Path
    database_url: str
    process: subprocess.Popen | None = None
    port: int = 0
    source: Path | None = None  # a checkout's `core` directory to run instead of this one's

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(map(str, filter(None, [self.source, PLUGINS]))),
            "SHIPHOOK_PLUGINS": "scripted_backend",
            "SHIPHOOK_ADMIN_TOKEN": ADMIN_TOKEN,
        }

    def cli(self, *args: str) -> str:
        return subprocess.run(
            [str(BIN / "shiphook"), "--config", str(self.config), *args],
            check=True,
            capture_output=True,
            text=True,
            env=self.env,
            cwd=self.directory,
        ).stdout

    def create_hook(self, target: str = "web") -> str:
        return json.loads(self.cli("hooks", "create", target, "--name", "bench", "--json"))["token"]

    def start(self, open_files: int | None = None) -> None:
        """`open_files`: the server's limit of open files, soft and hard (as `LimitNOFILE=`)."""
        self.port = free_port()
        log = open(self.directory / "serve.log", "ab")  # noqa: SIM115 - the child keeps it
        self.process = subprocess.Popen(
            [
                str(BIN / "shiphook"),
                "--config",
                str(self.config),
                "serve",
                "--port",
                str(self.port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.directory,
            start_new_session=True,
            preexec_fn=open_files
            and (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))),
        )
        wait_http(self.url + "/healthz")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):  # nothing of it outlives the run
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process = None

    def pids(self) -> list[int]:
        """The server and its child processes (deployer, resource tracker, extra HTTP workers)."""
        assert self.process is not None
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [self.process.pid, *map(int, children.read_text().split())]

    def database(self) -> Path:
        return self.directory / "shiphook.db"

    def count(self, sql: str) -> int:
        from shiphook.db import create_db_engine

        engine = create_db_engine(self.database_url)
        try:
            with engine.connect() as connection:
                return connection.exec_driver_sql(sql).scalar_one()
        finally:
            engine.dispose()


@contextlib.contextmanager
def postgres_schema() -> Iterator[str]:
    """A fresh schema on the machine's PostgreSQL (as the tests use it), dropped afterwards;
    yields the database URL that puts shiphook's tables there."""
    import psycopg

    schema = f"shiphook_bench_{secrets.token_hex(6)}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
        try:
            yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
        finally:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


@contextlib.contextmanager
def shiphook(
    targets: str = "",
    *,
    rollout_seconds: float = 1.0,
    polls: int = 1,
    database: str = "sqlite",
    server: str = "",
    source: Path | None = None,
    log_level: str = "warning",
) -> Iterator[Shiphook]:
    """A configured (not started) shiphook in a fresh directory: target `web` plus `targets`
    (TOML, where `{directory}` stands for that directory), `server` (more `[server]` keys),
    on SQLite in that directory or (`database="postgresql"`) a fresh PostgreSQL schema; the
    code of `source` (a `core` directory) if given."""
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(
            tempfile.TemporaryDirectory(prefix="shiphook-bench-", ignore_cleanup_errors=True)
        )
        directory = Path(tmp)
        if database == "postgresql":
            url = stack.enter_context(postgres_schema())
        else:
            url = f"sqlite:///{directory}/shiphook.db"
        config = directory / "shiphook.toml"
        config.write_text(
            textwrap.dedent(
                f"""
                [server]
                database_url = "{url}"
                {server}
                log_level = "{log_level}"
                disabled_plugins = ["swarm", "kubernetes", "nomad", "docker"]

                [backends.rec]
                plugin = "scripted"
                state_dir = "{directory}"
                rollout_seconds = {rollout_seconds}
                polls = {polls}

                [targets.web]
                kind = "app"
                backend = "rec"
                name = "web"
                """
            )
            + textwrap.dedent(targets).replace("{directory}", str(directory))
        )
        served = Shiphook(directory, config, url, source=source)
        served.cli("db", "upgrade")
        try:
            yield served
        finally:
            served.stop()


# a job target whose first run never ends: `?wait` callers on it stay waiting, as job runs queue
# and never coalesce (an app's queued deployments are superseded and their callers answered)
HELD_JOB = """
[backends.endless]
plugin = "scripted"
polls = 1_000_000_000

[targets.held]
kind = "job"
backend = "endless"
name = "held"
rollout_timeout = 3600
"""


async def open_waiters(
    port: int, token: str, count: int, wait: float
) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """`count` connections, each a `?wait=<wait>` hook request for `HELD_JOB`'s target (on a
    hook of `token`), sent raw; the first run is under way before the others are sent."""
    streams = []
    for n in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = json.dumps({"instanceEnvironmentVariables": [{"name": "N", "value": str(n)}]})
        writer.write(
            f"POST /api/v1/dh?wait={wait:g} HTTP/1.1\r\nHost: bench\r\n".encode()
            + f"X-Deploy-Hook-Token: {token}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body.encode()
        )
        await writer.drain()
        streams.append((reader, writer))
        if n == 0:
            await asyncio.sleep(0.5)
    return streams


def seed_hooks(server: Shiphook, count: int, target: str = "web") -> None:
    """`count` hooks with random digests, straight into the table (as a million API calls
    would leave it), in batches."""
    from shiphook.db import create_db_engine
    from shiphook.models import Hook
    from sqlalchemy import insert

    engine = create_db_engine(server.database_url)
    now = datetime.now(UTC)
    with engine.begin() as connection:
        for start in range(0, count, 50_000):
            rows = [
                {
                    "name": f"seed-{i}",
                    "target": target,
                    "token_digest": secrets.token_hex(32),
                    "created_at": now,
                }
                for i in range(start, min(count, start + 50_000))
            ]
            connection.execute(insert(Hook.__table__), rows)
    engine.dispose()


@contextlib.contextmanager
def checkout(revision: str) -> Iterator[Path]:
    """The `core` directory of a git revision of this repository, in a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="shiphook-baseline-") as tmp:
        archive = subprocess.run(
            ["git", "archive", revision, "core"], cwd=ROOT, check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        yield Path(tmp) / "core"


@contextlib.contextmanager
def bare_server(workers: int = 1) -> Iterator[str]:
    """The framework's limit: bench/bare_app.py on the same stack (uvicorn, uvloop, httptools)."""
    port = free_port()
    process = subprocess.Popen(
        [
            str(BIN / "uvicorn"),
            "bare_app:app",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        cwd=BENCH,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


@dataclass
class WrkResult:
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    non_2xx: int

    def row(self) -> str:
        return f"{self.requests_per_second:9.0f} req/s  p50 {self.p50_ms:6.2f} ms  p99 {self.p99_ms:6.2f} ms"


def wrk(
    url: str,
    *,
    token: str,
    connections: int,
    seconds: int = 10,
    close: bool = False,
    body: str = "",
) -> WrkResult:
    """POST the hook request with wrk (one thread: the other core is the server's): each with
    a new tag, or all with `body`."""
    env = {**os.environ, "TOKEN": token, "BODY": body, "CLOSE": "1" if close else ""}
    out = subprocess.run(
        [
            ensure_wrk(),
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            str(BENCH / "post.lua"),
            url + "/api/v1/dh",
        ],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout
    return parse_wrk(out)


def parse_wrk(out: str) -> WrkResult:
    def latency(label: str) -> float:
        value, unit = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return WrkResult(
        requests_per_second=float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        p50_ms=latency("50"),
        p99_ms=latency("99"),
        requests=int(re.search(r"(\d+) requests in", out).group(1)),
        errors=sum(map(int, errors.groups())) if errors else 0,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
    )


def process_name(pid: int) -> str:
    """What a process of `shiphook serve` is: the server, an HTTP worker, the deployer, or
    multiprocessing's resource tracker."""
    command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    if "resource_tracker" in command:
        return "resource tracker"
    if "multiprocessing" in command or "spawn_main" in command:
        return "spawned (deployer, or an HTTP worker)"
    return "serve (the HTTP worker when workers = 1)"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def machine() -> dict[str, str]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def save(name: str, data: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **data}, indent=2) + "\n")
    return path
