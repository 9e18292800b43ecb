"""Benchmark 3: dispatch latency, from the committed deployment to the backend's deploy call.

Probe requests for a target whose rollouts end at once, 50 ms apart; the recording backend
notes when each deploy call arrives, the database when each deployment was committed (the
201 follows that commit). Measured idle, and while wrk drives the accept path on another
target (16 connections).

    .venv/bin/python bench/dispatch.py [--probes 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import urllib.request
from datetime import datetime

from common import ADMIN_TOKEN, save, shiphook, wrk

PROBE = """
[targets.probe]
kind = "app"
backend = "fast"
name = "probe"

[backends.fast]
plugin = "scripted"
state_dir = "{directory}/fast"
"""


def probe(server, token: str, count: int) -> list[float]:
    sent = []
    for n in range(count):
        request = urllib.request.Request(
            server.url + "/api/v1/dh",
            data=json.dumps({"imageTag": f"p{n}"}).encode(),
            headers={"X-Deploy-Hook-Token": token},
        )
        with urllib.request.urlopen(request) as answer:
            sent.append(json.loads(answer.read())["deployment"]["id"])
        time.sleep(0.05)
    time.sleep(1)
    listing = urllib.request.Request(
        server.url + "/api/v1/deployments?target=probe&limit=1000",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    with urllib.request.urlopen(listing) as answer:
        created = {
            d["id"]: datetime.fromisoformat(d["createdAt"]).timestamp()
            for d in json.loads(answer.read())["deployments"]
        }
    state = json.loads((server.directory / "fast" / "scripted-state.json").read_text())
    called = {c["deployment"]: c["at"] for c in state["calls"] if c["op"] == "deploy"}
    return [(called[i] - created[i]) * 1000 for i in sent if i in called]


def summary(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "count": len(ordered),
        "p50_ms": statistics.median(ordered),
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        "max_ms": ordered[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probes", type=int, default=200)
    args = parser.parse_args()
    with shiphook(PROBE) as server:
        load_token, probe_token = server.create_hook("web"), server.create_hook("probe")
        server.start()
        idle = summary(probe(server, probe_token, args.probes))
        seconds = int(args.probes * 0.06) + 5
        load = threading.Thread(
            target=lambda: results.update(
                load=wrk(server.url, token=load_token, connections=16, seconds=seconds)
            )
        )
        results: dict = {}
        load.start()
        time.sleep(1)
        loaded = summary(probe(server, probe_token, args.probes))
        load.join()
    print(f"{'':28} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7}")
    print(f"{'idle':28} {idle['p50_ms']:>7.2f} {idle['p99_ms']:>7.2f} {idle['max_ms']:>7.2f}")
    print(
        f"{'under accept-path load':28} {loaded['p50_ms']:>7.2f} {loaded['p99_ms']:>7.2f} {loaded['max_ms']:>7.2f}"
    )
    print(f"(the load meanwhile: {results['load'].row()})")
    print(
        f"saved {save('dispatch', {'idle': idle, 'under_load': loaded, 'load': vars(results['load'])})}"
    )


if __name__ == "__main__":
    main()
