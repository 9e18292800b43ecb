"""Benchmark 3: dispatch latency, from the committed deployment to the backend's deploy call.

Probe requests for a target whose rollouts end at once, 50 ms apart; the recording backend
notes when each deploy call arrives, the database when each deployment was committed (the
201 follows that commit). Measured idle, and while wrk drives the accept path on another
target (16 connections).

    .venv/bin/python bench/dispatch.py [--probes 200] [--rounds 1] [--baseline REV[,REV]]

`--baseline` adds a server running the shiphook of each git revision (its `core` on this venv);
every round measures each server in turn, every other round in reverse order, and the
latencies of all rounds are pooled per server.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import threading
import time
import urllib.request
from datetime import datetime

from common import ADMIN_TOKEN, checkout, save, shiphook, wrk

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


def measure(server, load_token: str, probe_token: str, probes: int) -> tuple[list, list, dict]:
    """Idle latencies, latencies under load, and the load's wrk figures."""
    idle = probe(server, probe_token, probes)
    seconds = int(probes * 0.06) + 5
    results: dict = {}
    load = threading.Thread(
        target=lambda: results.update(
            load=wrk(server.url, token=load_token, connections=16, seconds=seconds)
        )
    )
    load.start()
    time.sleep(1)
    loaded = probe(server, probe_token, probes)
    load.join()
    return idle, loaded, vars(results["load"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--baseline", default="", help="git revisions to measure alongside")
    args = parser.parse_args()
    revisions = [r for r in args.baseline.split(",") if r]
    measured: dict[str, dict[str, list]] = {}
    with contextlib.ExitStack() as stack:
        servers = {}
        for label in ["shiphook", *revisions]:
            source = None if label == "shiphook" else stack.enter_context(checkout(label))
            server = stack.enter_context(shiphook(PROBE, source=source))
            tokens = server.create_hook("web"), server.create_hook("probe")
            server.start()
            servers[label] = (server, tokens)
            measured[label] = {"idle": [], "under_load": [], "load": []}
        for round_ in range(args.rounds):
            order = list(servers.items())
            for label, (server, (load_token, probe_token)) in (
                order if round_ % 2 == 0 else order[::-1]
            ):
                idle, loaded, load = measure(server, load_token, probe_token, args.probes)
                measured[label]["idle"] += idle
                measured[label]["under_load"] += loaded
                measured[label]["load"].append(load)
                print(
                    f"round {round_ + 1}: {label:20} idle p50 {summary(idle)['p50_ms']:6.2f} ms, "
                    f"under load p50 {summary(loaded)['p50_ms']:6.2f} ms "
                    f"({load['requests_per_second']:.0f} req/s)",
                    flush=True,
                )
    runs = {
        label: {
            "idle": summary(found["idle"]),
            "under_load": summary(found["under_load"]),
            "load": found["load"],
        }
        for label, found in measured.items()
    }
    print(f"\n{'':36} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'probes':>6}")
    for label, run in runs.items():
        for kind in ("idle", "under_load"):
            s = run[kind]
            name = f"{label}, {'idle' if kind == 'idle' else 'under accept-path load'}"
            print(
                f"{name:36} {s['p50_ms']:>7.2f} {s['p99_ms']:>7.2f} {s['max_ms']:>7.2f} {s['count']:>6}"
            )
        rates = ", ".join(f"{load['requests_per_second']:.0f}" for load in run["load"])
        print(f"{'':36} (the load meanwhile: {rates} req/s)")
    saved = runs["shiphook"] | {"baselines": {k: v for k, v in runs.items() if k != "shiphook"}}
    print(f"saved {save('dispatch', saved)}")


if __name__ == "__main__":
    main()
