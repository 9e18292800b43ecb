"""An HTTP/1.1 proxy for tests, between shiphook and a real server: it answers the requests a
test picks itself (an error the server could give, or a connection closed without an answer)
and relays the rest to the server, so that the real client meets the fault and the real server
does the rest.

A subclass says which requests fail and how (`fault`); the listener (a unix socket, TCP with
TLS) and the connection to the server are given to the constructor.
"""

from __future__ import annotations

import enum
import http.client
import http.server
import socket
import socketserver
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

HOP_BY_HOP = ("connection", "keep-alive", "transfer-encoding", "content-length")


@dataclass(frozen=True)
class Answer:
    """What the proxy answers instead of the server."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


class Cut(enum.Enum):
    """The connection closed without an answer: before the request reaches the server, or
    after (the server did it; its answer is lost)."""

    BEFORE = "before"
    AFTER = "after"


Fault = Answer | Cut


class FaultProxy:
    """Relays each request to a fresh connection from `connect`, but those `fault` answers."""

    def __init__(
        self,
        listen: Callable[[type[http.server.BaseHTTPRequestHandler]], socketserver.BaseServer],
        connect: Callable[[], http.client.HTTPConnection],
    ) -> None:
        self._connect = connect
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the servers' own APIs

            def handle_one_request(self) -> None:
                self.raw_requestline = self.rfile.readline(65537)
                if not self.raw_requestline or not self.parse_request():
                    self.close_connection = True
                    return
                proxy._handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = listen(Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def fault(self, method: str, path: str) -> Fault | None:
        """How the request fails, or None to relay it; `path` with its query."""
        return None

    def _handle(self, request: http.server.BaseHTTPRequestHandler) -> None:
        body = request.rfile.read(int(request.headers.get("Content-Length") or 0))
        fault = self.fault(request.command, request.path)
        if fault is Cut.BEFORE:
            request.close_connection = True
            return
        if isinstance(fault, Answer):
            status, headers, answer = fault.status, list(fault.headers), fault.body
        else:
            status, headers, answer = self._relay(request, body)
            if fault is Cut.AFTER:
                request.close_connection = True
                return
        request.send_response(status)
        for key, value in headers:
            request.send_header(key, value)
        request.send_header("Content-Length", str(len(answer)))
        request.end_headers()
        request.wfile.write(answer)
        request.wfile.flush()

    def _relay(
        self, request: http.server.BaseHTTPRequestHandler, body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        connection = self._connect()
        try:
            sent = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
            connection.request(request.command, request.path, body=body or None, headers=sent)
            answer = connection.getresponse()
            data = answer.read()  # de-chunked: sent back with a Content-Length
            kept = [(k, v) for k, v in answer.getheaders() if k.lower() not in HOP_BY_HOP]
            return answer.status, kept, data
        finally:
            connection.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class UnixServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    block_on_close = False


class UnixConnection(http.client.HTTPConnection):
    """HTTP over the unix socket at `path`."""

    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=30)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


class TlsServer(socketserver.ThreadingTCPServer):
    """HTTPS on a loopback port; the handshake happens on the connection's own thread."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, handler: type, context: ssl.SSLContext) -> None:
        self.context = context
        super().__init__(("127.0.0.1", 0), handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = self.socket.accept()
        return self.context.wrap_socket(
            sock, server_side=True, do_handshake_on_connect=False
        ), address

    @property
    def port(self) -> int:
        return self.server_address[1]
