"""Benchmark 2: the reject path, as a brute-force attempt sees it.

Unknown (well-formed) tokens and malformed ones, driven by wrk at 16 connections; the accept path
in the same run for comparison; and proof that rejects write nothing (row counts, and the
database and write-ahead-log files byte for byte).

    .venv/bin/python bench/reject.py [--seconds 10]
"""

from __future__ import annotations

import argparse
import hashlib

from common import save, shiphook, wrk
from shiphook import tokens


def fingerprint(server) -> dict[str, object]:
    files = {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(server.directory.glob("shiphook.db*"))
        if not path.name.endswith("-shm")  # readers' shared memory, not data
    }
    return {
        "deployments": server.count("SELECT count(*) FROM deployment"),
        "hooks": server.count("SELECT count(*) FROM hook"),
        "stamped": server.count("SELECT count(*) FROM hook WHERE last_used_at IS NOT NULL"),
        "files": files,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    with shiphook() as server:
        token = server.create_hook()
        server.start()
        before = fingerprint(server)
        unknown = wrk(server.url, token=tokens.new_token(), connections=16, seconds=args.seconds)
        malformed = wrk(server.url, token="shk_not-a-token", connections=16, seconds=args.seconds)
        missing = wrk(server.url, token="", connections=16, seconds=args.seconds)
        after = fingerprint(server)
        accept = wrk(server.url, token=token, connections=16, seconds=args.seconds)

    writes_nothing = before == after
    rows = {
        "unknown token (404)": unknown,
        "malformed token (404)": malformed,
        "empty token header (404)": missing,
        "valid token (201)": accept,
    }
    print(f"{'request':26} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7}")
    for label, r in rows.items():
        print(f"{label:26} {r.requests_per_second:>9.0f} {r.p50_ms:>7.2f} {r.p99_ms:>7.2f}")
    print(
        f"\nrejects answered: {unknown.requests + malformed.requests + missing.requests}, "
        f"database unchanged by them: {writes_nothing} "
        f"({before['deployments']} deployments, {before['stamped']} hooks stamped, before and after)"
    )
    result = {label: vars(r) for label, r in rows.items()}
    result |= {"writes_nothing": writes_nothing, "before": before, "after": after}
    print(f"saved {save('reject', result)}")


if __name__ == "__main__":
    main()
