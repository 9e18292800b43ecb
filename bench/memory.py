"""Benchmark 6: resident memory of `shiphook serve` (HTTP worker + deployer process), idle and
with 1 000 000 hooks stored, before and after 10 s of accept-path load.

    .venv/bin/python bench/memory.py [--hooks 1000000]
"""

from __future__ import annotations

import argparse
import time

from common import process_name, rss_mb, save, seed_hooks, shiphook, wrk


def measure(count: int) -> dict[str, float]:
    with shiphook() as server:
        token = server.create_hook()
        if count > 1:
            seed_hooks(server, count - 1)
        server.start()
        time.sleep(2)
        idle = rss_mb(server.pids())
        per_process = {f"{process_name(pid)} {pid}": rss_mb([pid]) for pid in server.pids()}
        wrk(server.url, token=token, connections=16, seconds=10)
        loaded = rss_mb(server.pids())
        size = sum(p.stat().st_size for p in server.directory.glob("shiphook.db*")) / 2**20
    return {
        "hooks": count,
        "idle_mb": idle,
        "after_load_mb": loaded,
        "database_mb": size,
        "processes_mb": per_process,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hooks", type=int, default=1_000_000)
    args = parser.parse_args()
    runs = [measure(1), measure(args.hooks)]
    for r in runs:
        parts = ", ".join(f"{name}: {mb:.1f}" for name, mb in r["processes_mb"].items())
        print(
            f"{r['hooks']:>8} hooks: idle {r['idle_mb']:.1f} MB ({parts}), "
            f"after 10 s of load {r['after_load_mb']:.1f} MB; database {r['database_mb']:.0f} MB"
        )
    print(f"saved {save('memory', {'runs': runs})}")


if __name__ == "__main__":
    main()
