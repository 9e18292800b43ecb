"""Benchmark 5: 500 CI jobs waiting on `?wait=600` while the accept path is driven by wrk.

The waiters hold their requests open on a job target whose first run does not end, so that the
others queue behind it (an app target would supersede all but the newest at once); wrk drives
POST /api/v1/dh on another target at 16 connections: without them, with them, and without them
again once they are gone (the machine's speed drifts over minutes: the change is taken against
the mean of the runs before and after). Prints req/s and p99, and the resident memory of the
server (HTTP worker + deployer).

    .venv/bin/python bench/waiters.py [--waiters 500] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time

from common import HELD_JOB, open_waiters, rss_mb, save, shiphook, wrk


async def hold(
    port: int, token: str, count: int, ready: threading.Event, release: threading.Event
) -> list[str]:
    """Open `count` connections, each a `?wait=600` hook request; read answers when released."""
    streams = await open_waiters(port, token, count, 600)
    await asyncio.sleep(1)
    early = [r for r, _ in streams if r.at_eof() or len(r._buffer)]
    ready.set()
    while not release.is_set():
        await asyncio.sleep(0.1)
    for _, writer in streams:
        writer.close()
    return [f"{len(early)} answered before the load started"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--waiters", type=int, default=500)
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    with shiphook(HELD_JOB) as server:
        token, held_token = server.create_hook("web"), server.create_hook("held")
        server.start()
        time.sleep(1)
        idle_mb = rss_mb(server.pids())
        without = wrk(server.url, token=token, connections=16, seconds=args.seconds)
        after_load_mb = rss_mb(server.pids())

        ready, release = threading.Event(), threading.Event()
        notes: list[str] = []
        holder = threading.Thread(
            target=lambda: notes.extend(
                asyncio.run(hold(server.port, held_token, args.waiters, ready, release))
            )
        )
        holder.start()
        ready.wait(120)
        waiting_mb = rss_mb(server.pids())
        with_waiters = wrk(server.url, token=token, connections=16, seconds=args.seconds)
        loaded_mb = rss_mb(server.pids())
        still_waiting = server.count(
            "SELECT count(*) FROM deployment WHERE target = 'held' AND status IN ('queued', 'in_progress')"
        )
        release.set()
        holder.join()
        time.sleep(1)
        without_after = wrk(server.url, token=token, connections=16, seconds=args.seconds)

    baseline = (without.requests_per_second + without_after.requests_per_second) / 2
    change = with_waiters.requests_per_second / baseline - 1
    print(f"without waiters: {without.row()}")
    print(f"with {args.waiters} waiters: {with_waiters.row()}   ({change:+.1%} req/s)")
    print(f"without them again: {without_after.row()}")
    print(
        f"memory (HTTP worker + deployer): idle {idle_mb:.1f} MB, after load {after_load_mb:.1f} MB, "
        f"with waiters {waiting_mb:.1f} MB (+{waiting_mb - after_load_mb:.1f}), "
        f"with waiters and load {loaded_mb:.1f} MB"
    )
    print(
        f"waiting deployments still open at the end of the load: {still_waiting}; {notes[0] if notes else ''}"
    )
    memory = {
        "idle": idle_mb,
        "after_load": after_load_mb,
        "with_waiters": waiting_mb,
        "with_waiters_and_load": loaded_mb,
    }
    result = {
        "waiters": args.waiters,
        "without": vars(without),
        "with": vars(with_waiters),
        "without_after": vars(without_after),
    }
    result |= {"change": change, "memory_mb": memory, "still_waiting": still_waiting}
    print(f"saved {save('waiters', result)}")


if __name__ == "__main__":
    main()
