"""Per-worker balance: `shiphook serve` with `[server] workers = N` (default 2) under wrk, beside
the bare app with as many uvicorn workers; the CPU each HTTP worker used shows how the kernel
spread the connections (keep-alive connections stay with the worker that accepted them).

    .venv/bin/python bench/workers.py [--workers 2] [--seconds 10]
"""

from __future__ import annotations

import argparse

from common import bare_server, cpu_seconds, process_name, save, shiphook, wrk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    with bare_server(args.workers) as url:
        base = wrk(url, token="-", connections=16, seconds=args.seconds)
    with shiphook() as server:
        server.config.write_text(
            server.config.read_text().replace("[server]", f"[server]\nworkers = {args.workers}", 1)
        )
        token = server.create_hook()
        server.start()
        pids = server.pids()
        names = {pid: process_name(pid) for pid in pids}
        before = {pid: cpu_seconds(pid) for pid in pids}
        mine = wrk(server.url, token=token, connections=16, seconds=args.seconds)
        used = {pid: cpu_seconds(pid) - before[pid] for pid in pids}
    print(f"bare, {args.workers} workers:     {base.row()}")
    print(
        f"shiphook, {args.workers} workers: {mine.row()}   ({mine.requests_per_second / base.requests_per_second:.0%})"
    )
    for pid, seconds in used.items():
        print(f"  {names[pid]:24} pid {pid}: {seconds / args.seconds:.0%} of a core")
    print(
        f"saved {save('workers', {'workers': args.workers, 'bare': vars(base), 'shiphook': vars(mine), 'cpu_share': {str(k): v / args.seconds for k, v in used.items()}})}"
    )


if __name__ == "__main__":
    main()
