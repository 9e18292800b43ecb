"""The HTTP connections of `shiphook serve`: uvicorn's httptools protocol, with limits.

uvicorn reads a request head without bound, keeps a client that never finishes one (or its body)
for ever, and answers a malformed request in plain text. `HttpProtocol` caps a head's bytes and
header count, closes a client that does not send its head within `header_timeout` or then its
body within `body_timeout`, and answers each of these in JSON, like the app's own errors. At
`max_connections`, the connection that has waited longest for its request head makes room for a
new one, so that slow clients cannot lock others out; the log says when the limit is reached and
when it is left. When the server begins to shut down, or the client goes, the request learns it
through its scope (`SHUTDOWN`), so that the app ends at once what it would otherwise hold for long
(`?wait`); a request whose body the connection cut short learns that too (`BODY_CUT`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import resource
from dataclasses import dataclass
from typing import Any

import falcon
import httptools
import orjson
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from shiphook.config import ServerSettings
from shiphook.http.app import BODY_CUT, SHUTDOWN

log = logging.getLogger("shiphook.server")

# descriptors an HTTP worker keeps for other things: database files and connections, sockets, logs
RESERVED_DESCRIPTORS = 128


@dataclass(frozen=True)
class Limits:
    max_header_bytes: int  # the request line and the header fields
    max_headers: int
    header_timeout: float  # seconds from a request's first byte (or connecting) to its head's end
    body_timeout: float  # seconds from a request head's end to its body's
    max_connections: int  # per HTTP worker


def connection_limits(settings: ServerSettings) -> Limits:
    """The `[server]` limits, with the soft limit of open files raised to the hard one (the
    workers inherit it) and `max_connections` lowered to what that limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            log.info("open files limit raised from %d to %d", soft, hard)
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open files limit from %d to %d: %s", soft, hard, exc)
    max_connections = min(settings.max_connections, soft - RESERVED_DESCRIPTORS)
    if max_connections < settings.max_connections:
        log.warning(
            "the open files limit (%d) allows %d connections per HTTP worker, not %d "
            "([server] max_connections); raise the limit (ulimit -n, LimitNOFILE=) to allow more",
            soft,
            max_connections,
            settings.max_connections,
        )
    return Limits(
        max_header_bytes=settings.max_header_bytes,
        max_headers=settings.max_headers,
        header_timeout=settings.header_timeout,
        body_timeout=settings.body_timeout,
        max_connections=max(max_connections, 1),
    )


def protocol_factory(limits: Limits) -> functools.partial[HttpProtocol]:
    """What uvicorn's `http` takes: the protocol class with this worker's guard (picklable, so
    that each worker process unpickles a guard of its own)."""
    return functools.partial(HttpProtocol, guard=ConnectionGuard(limits))


class ConnectionGuard:
    """One HTTP worker's limits and their state: the connections waiting for a request head, in
    the order they began waiting, and what was done at the connection limit."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.heads: dict[HttpProtocol, None] = {}  # oldest first: a dict keeps insertion order
        self.bodies: dict[HttpProtocol, float] = {}  # those reading a body, since (loop time)
        self.full = False  # the limit was reached, and the count of connections is not below it
        self.closed_early = 0  # since the limit was reached
        self.refused = 0
        self.sweep: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._sweep(loop)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        timeout = self.limits.header_timeout
        deadline = loop.time() - timeout
        expired = []
        for connection in self.heads:
            if connection.head_started >= deadline:
                break
            if connection.idle():
                expired.append(connection)
        for connection in expired:
            connection.close_head(
                f"the request head did not arrive within {timeout:g} s ([server] header_timeout)"
            )
        body_timeout = self.limits.body_timeout
        deadline = loop.time() - body_timeout
        late = []
        for connection, since in self.bodies.items():
            if since >= deadline:
                break
            late.append(connection)
        for connection in late:
            connection.close_body(
                f"the request body did not arrive within {body_timeout:g} s ([server] body_timeout)"
            )
        self.sweep = loop.call_later(min(timeout / 4, body_timeout / 4, 1.0), self._sweep, loop)

    def make_room(self, open_connections: int) -> bool:
        """At the limit: close the connection that has waited longest for a request head (not
        one whose request is being answered); False if there is none."""
        if not self.full:
            self.full = True
            log.warning(
                "connection limit reached: %d connections open ([server] max_connections); "
                "each new one closes the connection waiting longest for a request head, or is "
                "refused with 503 when none is waiting",
                open_connections,
            )
        oldest = next((c for c in self.heads if c.idle()), None)
        if oldest is None:
            self.refused += 1
            return False
        self.closed_early += 1
        oldest.close_head(
            "the request head was not complete when the server needed the connection for another "
            "client ([server] max_connections)"
        )
        return True

    def closed(self, open_connections: int) -> None:
        if open_connections < self.limits.max_connections:
            log.warning(
                "below the connection limit again (%d connections closed early, %d refused)",
                self.closed_early,
                self.refused,
            )
            self.full = False
            self.closed_early = self.refused = 0


class _TooManyHeaders(Exception):
    """Raised in the parser's callback to refuse a head with too many header fields."""


class HttpProtocol(HttpToolsProtocol):
    head_started: float | None = None  # loop time the current head began; None if none
    head_bytes = 0
    url = b""
    # done when the server begins to shut down or the client goes: its requests' `SHUTDOWN`
    ended: asyncio.Future[None] | None = None

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        guard: ConnectionGuard,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.guard = guard
        self.heads = guard.heads
        self.bodies = guard.bodies
        self.max_header_bytes = guard.limits.max_header_bytes
        self.max_headers = guard.limits.max_headers

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.guard.limits.max_connections and not (
            self.guard.make_room(len(self.connections))
        ):
            self.transport = transport
            self._reject(503, "too many connections; try again later", b"retry-after: 1\r\n")
            return
        super().connection_made(transport)
        self.ended = self.loop.create_future()
        self._start_head()
        if self.guard.sweep is None:
            self.guard.start(self.loop)

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.bodies:
            self._cut_body()
        self._end()
        super().connection_lost(exc)
        self._end_head()
        if self.guard.full:
            self.guard.closed(len(self.connections))

    def idle(self) -> bool:
        """No request of this connection is being answered."""
        return self.cycle is None or self.cycle.response_complete

    def _start_head(self) -> None:
        self.head_started = self.loop.time()
        self.head_bytes = 0
        self.heads[self] = None

    def _end_head(self) -> None:
        if self.head_started is not None:
            self.head_started = None
            del self.heads[self]

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        if self.head_started is None and self.idle():
            self._start_head()
        try:
            while True:
                # a head is fed at most up to the limit, so that the parser never holds more
                room = self.max_header_bytes - self.head_bytes
                piece = data if self.head_started is None or len(data) <= room else data[:room]
                self.parser.feed_data(piece)
                if self.head_started is not None:  # a head is still incomplete
                    self.head_bytes += len(piece)
                    if self.head_bytes >= self.max_header_bytes:
                        self._head_too_large()
                        return
                    if len(self.headers or ()) > self.max_headers:
                        self._head_too_large(fields=True)
                        return
                if piece is data:
                    return
                data = data[len(piece) :]
        except httptools.HttpParserUpgrade:
            pass  # no WebSocket routes: the app answers the request as plain HTTP
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _TooManyHeaders):
                self._head_too_large(fields=True)
            elif isinstance(exc.__context__, (httptools.HttpParserInvalidURLError, UnicodeError)):
                self._reject(400, "malformed HTTP request: the request target is not a valid URL")
            else:
                self._reject(400, f"malformed HTTP request: {exc}")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {SHUTDOWN: self.ended}
        if self.head_started is None:  # pipelined behind a request being answered
            self._start_head()
        self.head_bytes = 0

    def on_headers_complete(self) -> None:
        self._end_head()
        if len(self.headers) > self.max_headers:
            raise _TooManyHeaders
        super().on_headers_complete()
        self.bodies[self] = self.loop.time()

    def on_message_complete(self) -> None:
        self.bodies.pop(self, None)
        super().on_message_complete()

    def shutdown(self) -> None:
        """The server begins to shut down (uvicorn calls this on every open connection): tell
        the requests being answered, answer a head that has begun with 503, close an idle
        connection, and close the others once their request is answered."""
        self._end()
        if self.idle() and self.head_started is not None and self.head_bytes:
            self._reject(503, "the server is shutting down; try again", b"retry-after: 1\r\n")
        else:
            super().shutdown()

    def _end(self) -> None:
        if self.ended is not None and not self.ended.done():
            self.ended.set_result(None)

    def close_body(self, description: str) -> None:
        """Close a connection whose request body is late: a 408, unless its answer has begun."""
        self._cut_body()
        if self.cycle is not None and self.cycle.response_started:
            self.transport.close()
        else:
            self._reject(408, description)

    def _cut_body(self) -> None:
        """The request's body will not all arrive: tell the app (`BODY_CUT`)."""
        del self.bodies[self]
        self.scope["extensions"][BODY_CUT] = True

    def close_head(self, description: str) -> None:
        """Close a connection whose head is late: a 408 if it sent part of one, else nothing."""
        if self.head_bytes or self.headers:
            self._reject(408, description)
        else:
            self._end_head()
            self.transport.close()

    def _head_too_large(self, fields: bool = False) -> None:
        limits = self.guard.limits
        if fields:
            description = f"more than {limits.max_headers} header fields ([server] max_headers)"
            self._reject(431, f"the request head is too large: {description}")
            return
        expected = (
            f"the request line and headers may have at most {limits.max_header_bytes} bytes "
            "([server] max_header_bytes)"
        )
        if not self.headers and len(self.url) >= self.head_bytes - 32:  # still in the URL
            self._reject(414, f"the request target is too long: {expected}")
        else:
            self._reject(431, f"the request head is too large: {expected}")

    def _reject(self, status: int, description: str, extra: bytes = b"") -> None:
        """Answer in JSON, like the app, and close the connection."""
        self._end_head()
        title = falcon.code_to_http_status(status)
        body = orjson.dumps({"title": title, "description": description})
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n",
            extra,
            b"\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()
