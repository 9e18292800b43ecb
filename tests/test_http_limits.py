"""What `shiphook serve` does with hostile HTTP clients: malformed requests, oversized and endless
heads, clients that never finish their head, more connections than it takes. Driven with raw
sockets against a real `shiphook serve`."""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import ADMIN_TOKEN, Server, run_cli, scripted_config
from shiphook.testing import eventually

HOOK_BODY = b'{"imageTag": "1.2.0"}'


def limited_config(tmp_path: Path, **server: object) -> Path:
    return scripted_config(
        tmp_path, server="\n".join(f"{key} = {value}" for key, value in server.items())
    )


def create_hook(config: Path) -> str:
    created = run_cli("hooks", "create", "web", "--name", "ci", "--json", config=config)
    return json.loads(created.stdout)["token"]


def connect(server: Server) -> socket.socket:
    address = urlsplit(server.url)
    return socket.create_connection((address.hostname, address.port), timeout=30)


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Everything the server sends until it closes the connection, as (status, headers, body)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return int(status_line.split()[1]), {k.lower(): v for k, v in headers.items()}, body


def unread_requests(server: Server, socks: list[socket.socket]) -> int:
    """How many of the requests sent on `socks` the server has not read yet: data of theirs not
    yet delivered, or waiting in the server's end of the connection (Linux's /proc/net/tcp)."""
    port = urlsplit(server.url).port
    clients = {sock.getsockname()[1] for sock in socks}
    sent, read = set(), set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        _, local, remote, _state, queues, *_ = line.split()
        local_port, remote_port = (int(end.rsplit(":", 1)[1], 16) for end in (local, remote))
        outgoing, incoming = (int(queue, 16) for queue in queues.split(":"))
        if local_port in clients and not outgoing:
            sent.add(local_port)
        elif local_port == port and remote_port in clients and not incoming:
            read.add(remote_port)
    return len(clients - (sent & read))


def exchange(server: Server, request: bytes) -> tuple[int, dict[str, str], dict]:
    """Send a raw request; the JSON answer (the server closes the connection after it)."""
    with connect(server) as sock:
        # the server may answer and close before it has read all of it
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)
        status, headers, body = read_answer(sock)
    assert headers["content-type"] == "application/json", (status, headers, body)
    return status, headers, json.loads(body)


def post_hook(server: Server, token: str) -> int:
    return server.request("POST", "/api/v1/dh", HOOK_BODY, {"X-Deploy-Hook-Token": token})[0]


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


MALFORMED = {
    "a control character in a header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n",
    "a Content-Length that is not a number": (
        b"POST /api/v1/dh HTTP/1.1\r\nHost: x\r\nContent-Length: 1x\r\n\r\n"
    ),
    "two Content-Lengths": (
        b"POST /api/v1/dh HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"
    ),
    "Content-Length with Transfer-Encoding": (
        b"POST /api/v1/dh HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "a raw space in the path": b"GET /api/v1/deployments/a b HTTP/1.1\r\nHost: x\r\n\r\n",
    "a non-ASCII byte in the path": b"GET /api/v1/deployments/\xff HTTP/1.1\r\nHost: x\r\n\r\n",
    "a header line without a colon": b"GET /healthz HTTP/1.1\r\nHost x\r\n\r\n",
    "not HTTP at all (a TLS handshake)": b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
}


def test_malformed_requests_get_a_json_400_naming_the_problem(tmp_path, serve):
    server = serve(scripted_config(tmp_path))
    for case, request in MALFORMED.items():
        status, headers, body = exchange(server, request)
        assert status == 400, case
        assert body["title"] == "400 Bad Request", case
        assert body["description"].startswith("malformed HTTP request: "), case
        assert headers["connection"] == "close", case
    assert "Traceback" not in server.log()
    assert server.request("GET", "/healthz")[0] == 200


def test_a_url_over_the_head_limit_gets_a_json_414(tmp_path, serve):
    server = serve(scripted_config(tmp_path))
    status, _, body = exchange(server, b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 414
    assert "65536 bytes" in body["description"]


def test_an_oversized_header_gets_a_json_431_and_the_connection_is_closed(tmp_path, serve):
    server = serve(limited_config(tmp_path, max_header_bytes=8192))
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: "
    for size in (8192, 8 * 1024 * 1024):  # just over the limit, and the 8 MiB of the report
        status, _, body = exchange(server, head + b"a" * size + b"\r\n\r\n")
        assert status == 431
        assert "8192 bytes ([server] max_header_bytes)" in body["description"]
    # just under the limit is a request like any other
    status, _, _ = exchange(server, head + b"a" * 4096 + b"\r\n\r\n")
    assert status == 200


def test_too_many_header_fields_get_a_json_431(tmp_path, serve):
    server = serve(limited_config(tmp_path, max_headers=20))
    fields = b"".join(b"X-%d: 1\r\n" % n for n in range(25))
    status, _, body = exchange(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
    assert status == 431
    assert "20 header fields ([server] max_headers)" in body["description"]
    fields = b"".join(b"X-%d: 1\r\n" % n for n in range(15))
    assert exchange(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")[0] == 200


def test_a_body_that_never_finishes_gets_a_json_408_and_the_connection_is_closed(tmp_path, serve):
    config = limited_config(tmp_path, body_timeout=1)
    token = create_hook(config)
    server = serve(config)
    for path in ("/api/v1/dh", "/api/v1/targets/web/hooks"):
        with connect(server) as sock:
            sock.sendall(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nX-Deploy-Hook-Token: {token}\r\n"
                f"Authorization: Bearer {ADMIN_TOKEN}\r\nContent-Length: 100\r\n\r\n".encode()
                + b'{"imageTag":"1.'
            )
            status, headers, body = read_answer(sock)  # returns once the server has closed it
        assert status == 408, body
        assert headers["content-type"] == "application/json"
        assert headers["connection"] == "close"
        assert json.loads(body)["description"] == (
            "the request body did not arrive within 1 s ([server] body_timeout)"
        )
    # a token that opens nothing is answered before the body; the connection is closed later
    with connect(server) as sock:
        sock.sendall(
            b"POST /api/v1/dh HTTP/1.1\r\nHost: x\r\nX-Deploy-Hook-Token: shk_nothing\r\n"
            b"Content-Length: 100\r\n\r\n{"
        )
        status, _, body = read_answer(sock)
    assert status == 404, body
    assert post_hook(server, token) == 201
    assert "Traceback" not in server.log()


def test_a_body_that_does_not_all_arrive_deploys_nothing(tmp_path, serve):
    """The ASGI server ends a body cut short as if it were whole: a complete JSON object in
    fewer bytes than its Content-Length, late or from a client that went, is not acted on (the
    client was answered 408, or not at all, and retries)."""
    config = limited_config(tmp_path, body_timeout=1)
    token = create_hook(config)
    server = serve(config)
    head = (
        f"POST /api/v1/dh HTTP/1.1\r\nHost: x\r\nX-Deploy-Hook-Token: {token}\r\n"
        "Content-Length: 40\r\n\r\n"
    ).encode()
    with connect(server) as late:
        late.sendall(head + b'{"imageTag":"late"}')
        status, _, body = read_answer(late)
    assert status == 408, body
    with connect(server) as gone:
        gone.sendall(head + b'{"imageTag":"gone"}')
        time.sleep(0.1)
    time.sleep(1.5)  # past body_timeout: had either been taken, it would be committed by now
    assert post_hook(server, token) == 201
    listed = json.loads(run_cli("deployments", "list", "--json", config=config).stdout)
    assert [d["imageTag"] for d in listed] == ["1.2.0"]
    assert "POST /api/v1/dh 408 the request body did not all arrive" in server.log()


def test_a_client_that_never_finishes_its_head_is_disconnected(tmp_path, serve):
    server = serve(limited_config(tmp_path, header_timeout=1))
    with connect(server) as partial, connect(server) as silent, connect(server) as trickling:
        partial.sendall(b"POST /api/v1/dh HTTP/1.1\r\nHost: x\r\n")
        status, headers, body = read_answer(partial)  # returns once the server has closed it
        assert status == 408
        assert headers["content-type"] == "application/json"
        assert "header_timeout" in json.loads(body)["description"]
        assert silent.recv(1) == b""  # a connection that never sent anything: closed, no answer
        # a byte at a time, each well within the timeout: the whole head still has to arrive in time
        trickling.sendall(b"GET /healthz HTTP/1.1\r\n")
        deadline = time.monotonic() + 20
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            while time.monotonic() < deadline:
                for byte in b"X-Slow: 1\r\n":
                    trickling.sendall(bytes([byte]))
                    time.sleep(0.05)
    assert time.monotonic() < deadline


def test_hook_requests_are_answered_while_slow_and_oversized_clients_are_connected(tmp_path, serve):
    config = limited_config(tmp_path, header_timeout=60)
    token = create_hook(config)
    server = serve(config)
    stop = threading.Event()
    cut_off = [0] * 4  # per stream

    def endless_header(stream: int) -> None:
        """Stream a header for ever; connect again each time the server cuts it off."""
        while not stop.is_set():
            with connect(server) as sock:
                sock.sendall(b"POST /api/v1/dh HTTP/1.1\r\nHost: x\r\nX-Endless: ")
                try:
                    while not stop.is_set():
                        sock.sendall(b"a" * 65536)
                except (BrokenPipeError, ConnectionResetError):
                    cut_off[stream] += 1

    slow = [connect(server) for _ in range(200)]
    for sock in slow:
        sock.sendall(b"POST /api/v1/dh HTTP/1.1\r\nHost: x\r\n")
    streams = [threading.Thread(target=endless_header, args=(n,)) for n in range(4)]
    rss_before = rss_kb(server.process.pid)
    for thread in streams:
        thread.start()
    try:
        statuses = [post_hook(server, token) for _ in range(20)]
        # each stream cut off and back, many times over
        eventually(lambda: min(cut_off) > 8, "the streams' cut-offs", timeout=30)
        statuses += [post_hook(server, token) for _ in range(20)]
    finally:
        stop.set()
        for thread in streams:
            thread.join()
        rss_after = rss_kb(server.process.pid)
        for sock in slow:
            sock.close()
    assert statuses == [201] * 40
    assert rss_after - rss_before < 50 * 1024, (rss_before, rss_after)


def test_the_soft_open_files_limit_is_raised_to_the_hard_one(tmp_path, serve):
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    server = serve(
        scripted_config(tmp_path),
        preexec=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)),
    )
    limits = Path(f"/proc/{server.process.pid}/limits").read_text()
    line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
    assert line.split()[3:5] == [str(hard), str(hard)]
    assert f"open files limit raised from 256 to {hard}" in server.log()


def test_at_the_connection_limit_the_longest_waiting_head_makes_room(tmp_path, serve):
    server = serve(limited_config(tmp_path, max_connections=10, header_timeout=60))
    slow = [connect(server) for _ in range(10)]
    for sock in slow:  # read by the server in this order
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        eventually(lambda: not unread_requests(server, [sock]), "the head's reading")  # noqa: B023
    assert exchange(server, b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")[0] == 200
    status, _, body = read_answer(slow[0])
    assert status == 408
    assert "max_connections" in json.loads(body)["description"]
    assert "connection limit reached: 10 connections open" in server.log()
    for sock in slow:
        sock.close()


def test_connections_over_the_limit_are_refused_with_503_while_all_are_answered(tmp_path, serve):
    config = limited_config(tmp_path, max_connections=10, header_timeout=60)
    token = create_hook(config)
    server = serve(config)
    busy = [connect(server) for _ in range(10)]
    for sock in busy:  # a complete head, a body that does not come: being answered
        sock.sendall(
            b"POST /api/v1/dh HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n"
            b"X-Deploy-Hook-Token: " + token.encode() + b"\r\n\r\n"
        )
    eventually(lambda: not unread_requests(server, busy), "the busy requests' reading")
    with connect(server) as refused:
        status, headers, body = read_answer(refused)
    assert status == 503
    assert headers["retry-after"] == "1"
    assert json.loads(body)["title"] == "503 Service Unavailable"
    for sock in busy:
        sock.close()
    eventually(lambda: server.request("GET", "/healthz")[0] == 200, "/healthz", timeout=20)
    assert "connection limit reached: 10 connections open" in server.log()
    assert "below the connection limit again (0 connections closed early, 1 refused)" in (
        server.log()
    )
    assert "Traceback" not in server.log()


def test_slow_clients_cannot_exhaust_the_open_files_of_the_server(tmp_path, serve):
    """The report's case: more slow clients than the server has file descriptors."""
    config = limited_config(tmp_path, header_timeout=1)
    token = create_hook(config)
    server = serve(config, preexec=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)))
    assert "the open files limit (256) allows 128 connections per HTTP worker" in server.log()
    slow = []
    for _ in range(300):
        sock = connect(server)
        slow.append(sock)
        with contextlib.suppress(OSError):  # refused already
            sock.sendall(b"POST /api/v1/dh HTTP/1.1\r\nHost: x\r\n")

    def accepted() -> bool:
        try:
            return post_hook(server, token) == 201
        except OSError:
            return False

    try:
        eventually(accepted, "a hook request answered", timeout=30)
        assert "connection limit reached: 128 connections open" in server.log()
    finally:
        for sock in slow:
            sock.close()


def test_the_spaces_around_a_token_or_key_are_no_part_of_it(tmp_path, serve):
    """Spaces and tabs around a field's value are no part of it (RFC 9110): a proxy that drops
    them must not turn a retry with the same Idempotency-Key into a second deployment."""
    config = limited_config(tmp_path)
    token = create_hook(config)
    server = serve(config)
    answered = []
    for sent_token, key in [(token, "k2"), (token + " ", "k2 "), ("\t" + token, "\tk2\t")]:
        head = (
            f"POST /api/v1/dh HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"X-Deploy-Hook-Token: {sent_token}\r\nIdempotency-Key: {key}\r\n"
            f"Content-Length: {len(HOOK_BODY)}\r\n\r\n"
        )
        status, _, body = exchange(server, head.encode() + HOOK_BODY)
        assert status == 201, body
        answered.append(body["deployment"]["id"])
    assert len(set(answered)) == 1, answered
