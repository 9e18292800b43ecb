"""Benchmark 4: a burst of 1 000 hook requests for one app target within one second.

How many deploy calls reach the backend, and that all 1 000 deployments are recorded. Run for
a rollout that takes 2 s (a fast real one) and for one that takes 0.2 s.

    .venv/bin/python bench/burst.py [--requests 1000]
"""

from __future__ import annotations

import argparse
import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor

from common import save, shiphook

CLIENTS = 50


def send_burst(port: int, token: str, count: int) -> tuple[list[int], float]:
    """`count` requests over CLIENTS keep-alive connections, as fast as they go."""

    def client(offset: int) -> list[int]:
        connection = http.client.HTTPConnection("127.0.0.1", port)
        codes = []
        for n in range(offset, count, CLIENTS):
            body = json.dumps({"imageTag": f"1.{n}.{offset}"})
            connection.request("POST", "/api/v1/dh", body, {"X-Deploy-Hook-Token": token})
            answer = connection.getresponse()
            answer.read()
            codes.append(answer.status)
        connection.close()
        return codes

    started = time.monotonic()
    with ThreadPoolExecutor(CLIENTS) as pool:
        codes = [c for batch in pool.map(client, range(CLIENTS)) for c in batch]
    return codes, time.monotonic() - started


def settle(server, count: int) -> dict[str, int]:
    """Wait until `count` deployments are recorded and none is queued or in progress."""
    import sqlite3

    deadline = time.monotonic() + 120
    while True:
        with sqlite3.connect(server.database()) as db:
            statuses = dict(db.execute("SELECT status, count(*) FROM deployment GROUP BY status"))
        if sum(statuses.values()) >= count and not {"queued", "in_progress"} & statuses.keys():
            return statuses
        if time.monotonic() > deadline:
            raise RuntimeError(f"the burst did not settle: {statuses}")
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args()
    runs = []
    for rollout in (2.0, 0.2):
        with shiphook(rollout_seconds=rollout) as server:
            token = server.create_hook()
            server.start()
            send_burst(server.port, token, 1)  # the deployer is up and has rolled out once
            settle(server, 1)
            codes, took = send_burst(server.port, token, args.requests)
            statuses = settle(server, args.requests + 1)
            statuses["succeeded"] -= 1  # the warm-up
            state = json.loads((server.directory / "scripted-state.json").read_text())
            deploys = [c for c in state["calls"] if c["op"] == "deploy"][1:]
            recorded = server.count("SELECT count(*) FROM deployment") - 1
            newest = server.count(
                "SELECT count(*) FROM deployment WHERE status = 'succeeded' "
                "AND id = (SELECT max(id) FROM deployment)"
            )
        runs.append(
            {
                "rollout_seconds": rollout,
                "requests": args.requests,
                "sent_in_seconds": took,
                "answered_201": codes.count(201),
                "recorded": recorded,
                "deploy_calls": len(deploys),
                "statuses": statuses,
                "newest_succeeded": bool(newest),
            }
        )
    for r in runs:
        print(
            f"rollout {r['rollout_seconds']}s: {r['requests']} requests sent in {r['sent_in_seconds']:.2f}s, "
            f"{r['answered_201']} answered 201, {r['recorded']} recorded, "
            f"{r['deploy_calls']} deploy calls; {r['statuses']}; newest deployed: {r['newest_succeeded']}"
        )
    print(f"saved {save('burst', {'runs': runs})}")


if __name__ == "__main__":
    main()
