"""Benchmark 1: the accept path against the framework's limit.

`shiphook serve` as a user runs it (SQLite, deployer process, a recording backend whose rollouts
take a second), with N hooks stored, driven by wrk on POST /api/v1/dh, each request with a new
tag; in the same run the same wrk against a bare Falcon app on the same stack. (`--same-tag`
sends one tag throughout, as the runs before 2026-12-01 did: each batch's newest then already
runs, and the deployer makes a no-op rollout per batch, dozens a second, beside the accept
path.) With keep-alive, and with a new connection per request (`Connection: close`), which is
what CI jobs calling once each do.

All servers run side by side and each setting is measured on all of them back to back, so that
the ratios compare figures taken within a minute of each other: this machine's speed drifts by
tens of percent over minutes. With `--rounds 3` (the default) every setting is measured three
times, every other time with the servers in reverse order; req/s and p50 are the means, p99 the
worst round.

Each of `--databases` gets its servers: SQLite in the server's directory, PostgreSQL in a fresh
schema of the machine's PostgreSQL (`SHIPHOOK_TEST_POSTGRES_URL`, as the tests use it).
`--synchronous full,normal` runs a SQLite server with each `[server] sqlite_synchronous`.

    .venv/bin/python bench/accept.py [--seconds 10] [--rounds 3] [--hooks 10,100000,1000000]
        [--databases sqlite,postgresql] [--synchronous full,normal] [--connections 16,64]
        [--modes keep-alive,close] [--baseline REV[,REV]] [--log-level warning] [--same-tag]

`--baseline REV` adds, for each server, the shiphook of another git revision (its `core` on this
venv), so that a change is measured against the code before it, in the same rounds; several
revisions, comma-separated, compare alternatives with each other and with the code before.
`--log-level info` (the servers' default) writes an access log line per request to the
server's log file. Each shiphook run also reports the CPU time its HTTP worker and its
deployer process spent per answered request, which a busy machine changes much less than req/s.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics

from common import HOOK_BODY, bare_server, checkout, cpu_seconds, save, seed_hooks, shiphook, wrk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hooks", default="10,100000,1000000")
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--synchronous", default="", help="SQLite: full, normal or both")
    parser.add_argument("--connections", default="16,64")
    parser.add_argument("--modes", default="keep-alive,close")
    parser.add_argument("--baseline", default="", help="git revisions to measure alongside")
    parser.add_argument("--log-level", default="warning")
    parser.add_argument(
        "--same-tag", action="store_true", help="every request the same tag (as before 2026-12-01)"
    )
    args = parser.parse_args()
    counts = [int(n) for n in args.hooks.split(",")]
    connections = [int(n) for n in args.connections.split(",")]
    modes = args.modes.split(",")
    settings = [(c, mode == "close") for mode in modes for c in connections]
    variants = []  # (label, database, extra [server] keys, the `core` to run or None)
    for database in args.databases.split(","):
        if database != "sqlite":
            variants.append((f"shiphook {database}", database, "", None))
        elif args.synchronous:
            for sync in args.synchronous.split(","):
                variants.append(
                    (f"shiphook {sync}", "sqlite", f'sqlite_synchronous = "{sync}"', None)
                )
        else:
            variants.append(("shiphook", "sqlite", "", None))
    measured: dict[tuple, list] = {}
    cpu: dict[tuple, list[tuple[float, float]]] = {}  # (worker, deployer) µs per request

    with contextlib.ExitStack() as stack:
        servers = {("bare", 0): (stack.enter_context(bare_server()), "-")}
        shiphooks = {}
        ours = list(variants)
        for revision in filter(None, args.baseline.split(",")):
            source = stack.enter_context(checkout(revision))
            variants += [(f"{label} {revision}", *rest, source) for label, *rest, _ in ours]
        for label, database, extra, source in variants:
            for count in counts:
                server = stack.enter_context(
                    shiphook(
                        database=database, server=extra, source=source, log_level=args.log_level
                    )
                )
                shiphooks[(label, count)] = server
                token = server.create_hook()
                seed_hooks(server, count - 1)
                server.start()
                servers[(label, count)] = (server.url, token)
                print(f"shiphook on {label} with {count} hooks started", flush=True)
        for url, token in servers.values():  # warm up: first connections, caches, the deployer
            wrk(url, token=token, connections=16, seconds=2)
        for round_ in range(args.rounds):
            for c, close in settings:
                order = list(servers.items())
                for (kind, count), (url, token) in order if round_ % 2 == 0 else order[::-1]:
                    pids = shiphooks[(kind, count)].pids() if kind != "bare" else []
                    before = [cpu_seconds(pid) for pid in pids]
                    result = wrk(
                        url,
                        token=token,
                        connections=c,
                        seconds=args.seconds,
                        close=close,
                        body=HOOK_BODY if args.same_tag else "",
                    )
                    measured.setdefault((kind, count, c, close), []).append(result)
                    mode = "close" if close else "keep-alive"
                    used = ""
                    if pids:
                        spent = [cpu_seconds(pid) - b for pid, b in zip(pids, before, strict=True)]
                        per = (
                            spent[0] * 1e6 / result.requests,
                            sum(spent[1:]) * 1e6 / result.requests,
                        )
                        cpu.setdefault((kind, count, c, close), []).append(per)
                        used = f"  cpu/req worker {per[0]:5.1f} us deployer {per[1]:5.1f} us"
                    print(
                        f"round {round_ + 1}: {kind:28} {count:>8} hooks {c:>3} conns {mode:10} {result.row()}{used}",
                        flush=True,
                    )
        for (label, count), server in shiphooks.items():  # every answered request is recorded
            answered = sum(
                r.requests
                for (kind, n, *_), rs in measured.items()
                if (kind, n) == (label, count)
                for r in rs
            )
            recorded = server.count("SELECT count(*) FROM deployment")
            print(
                f"{label}, {count} hooks: {answered} requests answered, "
                f"{recorded} deployments recorded"
            )

    runs = []
    for (kind, count, c, close), results in measured.items():
        bare = measured[("bare", 0, c, close)]
        run = {
            "server": kind,
            "hooks": count,
            "connections": c,
            "close": close,
            "requests_per_second": statistics.mean(r.requests_per_second for r in results),
            "p50_ms": statistics.mean(r.p50_ms for r in results),
            "p99_ms": max(r.p99_ms for r in results),
            "requests": sum(r.requests for r in results),
            "errors": sum(r.errors for r in results),
            "non_2xx": sum(r.non_2xx for r in results),
            "rounds": [vars(r) for r in results],
        }
        if kind != "bare":
            run["cpu_us_per_request"] = {
                "worker": statistics.median(w for w, _ in cpu[(kind, count, c, close)]),
                "deployer": statistics.median(e for _, e in cpu[(kind, count, c, close)]),
            }
            # each round's ratio against the bare run of the same round, then their mean
            run["ratio"] = statistics.mean(
                mine.requests_per_second / theirs.requests_per_second
                for mine, theirs in zip(results, bare, strict=True)
            )
        runs.append(run)

    print(
        f"\n{'server':28} {'hooks':>8} {'conns':>5} {'conn':10} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'ratio':>6} {'cpu us worker/deployer':>20} errors"
    )
    for r in runs:
        mode = "close" if r["close"] else "keep-alive"
        ratio = f"{r['ratio']:.0%}" if "ratio" in r else "-"
        used = r.get("cpu_us_per_request")
        used = f"{used['worker']:.1f} / {used['deployer']:.1f}" if used else "-"
        print(
            f"{r['server']:28} {r['hooks']:>8} {r['connections']:>5} {mode:10} "
            f"{r['requests_per_second']:>9.0f} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} {ratio:>6} {used:>20} "
            f"{r['errors'] + r['non_2xx']}"
        )
    print(
        f"\nsaved {save('accept', {'runs': runs, 'seconds': args.seconds, 'rounds': args.rounds})}"
    )


if __name__ == "__main__":
    main()
