"""The HTTP protocol's own cost per request: uvicorn's httptools protocol against shiphook's
(`shiphook.http.connections.HttpProtocol`, with its limits), in process, without the app.

Each request is a hook call as wrk sends it, fed to the protocol as one read from the socket, on
one keep-alive connection, then on a new connection each (`Connection: close`); the app's task
is not started, and the response is marked sent. The figure is CPU time (the thread's), the best
of several runs of each, alternated: the neighbours of a busy machine show in it as spread, less
as a difference.

    .venv/bin/python bench/protocol.py [--requests 100000] [--runs 7]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import time

import uvloop
from shiphook.config import ServerSettings
from shiphook.http.connections import connection_limits, protocol_factory
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

REQUEST = (
    b"POST /api/v1/dh HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
    b"X-Deploy-Hook-Token: shk_0123456789012345678901234567890123456789012abcdef\r\n"
    b"Content-Type: application/json\r\nContent-Length: 20\r\n\r\n"
    b'{"imageTag":"1.2.0"}'
)


class Transport(asyncio.Transport):
    def get_extra_info(self, name, default=None):
        return {"sockname": ("127.0.0.1", 8080), "peername": ("127.0.0.1", 40000)}.get(name)

    def write(self, data):
        pass

    def is_closing(self):
        return False

    def close(self):
        pass


async def app(scope, receive, send):
    pass


def per_request_us(make_protocol, requests: int, close: bool) -> float:
    """CPU time per request, on one keep-alive connection or on a new connection each."""
    start = time.thread_time()
    protocol = None
    for _ in range(requests):
        if protocol is None:
            protocol = make_protocol()
            protocol.connection_made(Transport())
            protocol._start_asgi_task = lambda cycle, app: None
        protocol.data_received(REQUEST)
        protocol.cycle.response_complete = True
        protocol.on_response_complete()
        if close:
            protocol.connection_lost(None)
            protocol = None
    elapsed = time.thread_time() - start
    if protocol is not None:
        protocol.connection_lost(None)
    return elapsed / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    config = Config(app, http="httptools", log_config=None)
    config.load()
    state = ServerState()
    kinds = {
        "uvicorn": HttpToolsProtocol,
        "shiphook": protocol_factory(connection_limits(ServerSettings())),
    }
    for close in (False, True):
        times: dict[str, list[float]] = {kind: [] for kind in kinds}
        for run in range(args.runs):
            order = list(kinds.items())
            for kind, cls in order if run % 2 == 0 else order[::-1]:
                make = functools.partial(
                    cls, config=config, server_state=state, app_state={}, _loop=loop
                )
                times[kind].append(per_request_us(make, args.requests, close))
        print("a new connection per request" if close else "keep-alive")
        for kind, values in times.items():
            print(
                f"  {kind:9} best {min(values):.2f} µs/request, median {statistics.median(values):.2f} "
                f"({', '.join(f'{v:.2f}' for v in values)})"
            )
        print(
            f"  difference of the best runs: {min(times['shiphook']) - min(times['uvicorn']):+.2f} µs"
        )


if __name__ == "__main__":
    main()
