"""How long `shiphook serve` takes to stop while CI jobs wait on `?wait`.

`--waiters` requests `?wait=<--wait>` are held open on a job target whose first run does not end; then
SIGTERM goes to serve, or to every process of it (as systemd sends it), with one HTTP worker and
with two. Prints how long after the signal the last waiting request was answered and serve
exited, the answers' statuses, deployer restarts and ERROR lines in its log. `--baseline REV`
runs the same against a git revision.

    .venv/bin/python bench/stop.py [--waiters 500] [--wait 600] [--baseline REV]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import signal
import time
from collections import Counter
from pathlib import Path

from common import HELD_JOB, checkout, open_waiters, save, shiphook


async def stop_while_waiting(
    server, token: str, count: int, wait: float, group: bool
) -> tuple[float, float, Counter]:
    """Seconds from the signal to the last answer and to serve's exit, and the statuses."""
    streams = await open_waiters(server.port, token, count, wait)
    await asyncio.sleep(2)  # every request committed and waiting
    signalled = time.monotonic()
    if group:
        os.killpg(server.process.pid, signal.SIGTERM)
    else:
        server.process.send_signal(signal.SIGTERM)

    async def answer(reader: asyncio.StreamReader) -> tuple[int, float]:
        data = await reader.read()  # the server closes the connection after its answer
        return int(data.split(b" ", 2)[1]) if data else 0, time.monotonic()

    answers = await asyncio.gather(*(answer(reader) for reader, _ in streams))
    while server.process.poll() is None:
        await asyncio.sleep(0.01)
    exited = time.monotonic()
    for _, writer in streams:
        writer.close()
    last = max(at for _, at in answers)
    return last - signalled, exited - signalled, Counter(status for status, _ in answers)


def run(source: Path | None, waiters: int, wait: float, workers: int, group: bool) -> dict:
    with shiphook(HELD_JOB, server=f"workers = {workers}\nmax_wait = 900", source=source) as server:
        token = server.create_hook("held")
        server.start()
        time.sleep(2)  # the deployer is up
        answered, exited, statuses = asyncio.run(
            stop_while_waiting(server, token, waiters, wait, group)
        )
        log = (server.directory / "serve.log").read_text()
    return {
        "last_answer_s": answered,
        "exit_s": exited,
        "statuses": dict(statuses),
        "deployer_restarts": log.count("starting a new one"),
        "errors_logged": log.count(" ERROR "),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--waiters", type=int, default=500)
    parser.add_argument("--wait", type=float, default=600)
    parser.add_argument("--baseline", help="a git revision to stop the same way")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the clients' sockets
    results = []
    with contextlib.ExitStack() as stack:
        sources = {"shiphook": None}
        if args.baseline:
            sources[args.baseline] = stack.enter_context(checkout(args.baseline))
        for name, source in sources.items():
            for workers, group in ((1, False), (1, True), (2, True)):
                result = run(source, args.waiters, args.wait, workers, group)
                results.append({"code": name, "workers": workers, "group": group, **result})
                print(
                    f"{name}, {workers} worker(s), SIGTERM to {'the group' if group else 'serve'}: "
                    f"last answer {result['last_answer_s']:.2f} s, exit {result['exit_s']:.2f} s "
                    f"after the signal; answers {result['statuses']}; deployer restarts "
                    f"{result['deployer_restarts']}; ERROR lines {result['errors_logged']}",
                    flush=True,
                )
    print(f"saved {save('stop', vars(args) | {'results': results})}")


if __name__ == "__main__":
    main()
