"""Benchmark 1: the accept path against the framework's limit.

`shiphook serve` as a user runs it (SQLite, engine process, a recording backend whose rollouts
take a second), with N hooks stored, driven by wrk on POST /api/v1/dh; in the same run the same
wrk against a bare Falcon app on the same stack. With keep-alive, and with a new connection per
request (`Connection: close`), which is what CI jobs calling once each do.

    .venv/bin/python bench/accept.py [--seconds 10] [--hooks 10,100000,1000000]
"""

from __future__ import annotations

import argparse

from common import bare_server, save, seed_hooks, shiphook, wrk

CONNECTIONS = (16, 64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--hooks", default="10,100000,1000000")
    args = parser.parse_args()
    counts = [int(n) for n in args.hooks.split(",")]
    runs = []

    with bare_server() as url:
        bare = {
            (c, close): wrk(url, token="-", connections=c, seconds=args.seconds, close=close)
            for close in (False, True)
            for c in CONNECTIONS
        }
    for (c, close), result in bare.items():
        runs.append(
            {"server": "bare", "hooks": 0, "connections": c, "close": close, **vars(result)}
        )

    for count in counts:
        with shiphook() as server:
            token = server.create_hook()
            seed_hooks(server, count - 1)
            server.start()
            for close in (False, True):
                for c in CONNECTIONS:
                    result = wrk(
                        server.url, token=token, connections=c, seconds=args.seconds, close=close
                    )
                    ratio = result.requests_per_second / bare[(c, close)].requests_per_second
                    runs.append(
                        {
                            "server": "shiphook",
                            "hooks": count,
                            "connections": c,
                            "close": close,
                            "ratio": ratio,
                            **vars(result),
                        }
                    )
            recorded = server.count("SELECT count(*) FROM deployment")
            answered = sum(
                r["requests"] for r in runs if r["server"] == "shiphook" and r["hooks"] == count
            )
            runs[-1]["recorded_total"] = recorded
            print(f"{count} hooks: {answered} requests answered, {recorded} deployments recorded")

    print(
        f"\n{'server':9} {'hooks':>8} {'conns':>5} {'conn':10} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'ratio':>6} errors"
    )
    for r in runs:
        mode = "close" if r["close"] else "keep-alive"
        ratio = f"{r['ratio']:.0%}" if "ratio" in r else "-"
        print(
            f"{r['server']:9} {r['hooks']:>8} {r['connections']:>5} {mode:10} "
            f"{r['requests_per_second']:>9.0f} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} {ratio:>6} "
            f"{r['errors'] + r['non_2xx']}"
        )
    print(f"\nsaved {save('accept', {'runs': runs})}")


if __name__ == "__main__":
    main()
