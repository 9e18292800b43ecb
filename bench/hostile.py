"""Hostile HTTP clients against `shiphook serve`: endless headers, and slow clients.

1. **Endless headers**: 4 connections each stream one header without end (connecting again
   whenever the server cuts them off) for 10 s, while one client calls the hook every 0.2 s.
   The server's resident memory before, at its peak and after; the hook calls answered.
2. **Slow clients**: the server runs with a limit of 1 024 open files, soft and hard (as under
   `LimitNOFILE=1024`, where raising the soft limit cannot help); 1 100 clients each open a
   connection, send half a request head and hold it. One client then calls the hook every 0.5 s,
   61 times: how many are answered 201, and from which call on.

With `--baseline REV`, the same runs against the shiphook of another git revision too.

    .venv/bin/python bench/hostile.py [--baseline REV]
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import socket
import threading
import time
import urllib.request
from pathlib import Path

from common import HOOK_BODY, Shiphook, checkout, save, shiphook

HEAD = b"POST /api/v1/dh HTTP/1.1\r\nHost: x\r\n"


def connect(server: Shiphook) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def call_hook(server: Shiphook, token: str) -> bool:
    request = urllib.request.Request(
        server.url + "/api/v1/dh", data=HOOK_BODY.encode(), headers={"X-Deploy-Hook-Token": token}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return answer.status == 201
    except OSError:  # refused, reset, timed out, or an HTTP error
        return False


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


def endless_headers(server: Shiphook, token: str, seconds: float = 10) -> dict:
    stop = threading.Event()

    def stream() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError), connect(server) as sock:
                sock.sendall(HEAD + b"X-Endless: ")
                while not stop.is_set():
                    sock.sendall(b"a" * 65536)

    pid = server.process.pid
    before = peak = rss_mb(pid)
    streams = [threading.Thread(target=stream) for _ in range(4)]
    for thread in streams:
        thread.start()
    answered = calls = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        calls += 1
        answered += call_hook(server, token)
        peak = max(peak, rss_mb(pid))
        time.sleep(0.2)
    stop.set()
    for thread in streams:
        thread.join()
    return {
        "rss_before_mb": before,
        "rss_peak_mb": peak,
        "rss_after_mb": rss_mb(pid),
        "hook_calls": calls,
        "answered": answered,
    }


def slow_clients(server: Shiphook, token: str, clients: int = 1100, calls: int = 61) -> dict:
    held = []
    for _ in range(clients):
        with contextlib.suppress(OSError):
            sock = connect(server)
            held.append(sock)
            sock.sendall(HEAD)
    answers = []
    for _ in range(calls):
        answers.append(call_hook(server, token))
        time.sleep(0.5)
    for sock in held:
        sock.close()
    first = answers.index(True) + 1 if any(answers) else None
    return {
        "clients": clients,
        "hook_calls": calls,
        "answered": sum(answers),
        "first_answered": first,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", help="a git revision to run the same clients against")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the 1 100 clients' sockets
    results = {}
    with contextlib.ExitStack() as stack:
        sources = {"shiphook": None}
        if args.baseline:
            sources["baseline"] = stack.enter_context(checkout(args.baseline))
        for kind, source in sources.items():
            for name, run, open_files in (
                ("endless headers", endless_headers, None),
                ("slow clients", slow_clients, 1024),
            ):
                with shiphook(source=source) as server:
                    token = server.create_hook()
                    server.start(open_files=open_files)
                    result = results[f"{kind}: {name}"] = run(server, token)
                print(f"{kind:9} {name:16} {result}", flush=True)
    print(f"\nsaved {save('hostile', {'runs': results})}")


if __name__ == "__main__":
    main()
