"""The accept path's own CPU time per request, in process: no HTTP, no deployer, no wrk.

Each run opens a fresh instance (SQLite in a temporary directory, or a fresh PostgreSQL schema)
in a process of its own and accepts hook requests through the services the HTTP resource calls
(`Hooks.authenticate_deploy`, `Deployments.accept`), 16 at a time so that the group commit
batches them as under load; it reports the process's CPU time per request (every thread's: the
event loop's and the database threads'). A busy machine disturbs CPU time much less than req/s,
so this compares two revisions of the accept path where `bench/accept.py` cannot tell them apart.

    .venv/bin/python bench/inprocess.py [--requests 20000] [--runs 6]
        [--databases sqlite,postgresql] [--baseline REV[,REV]]

`--baseline` runs the `core` of each git revision too, alternating with this one run by run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from common import BIN, PLUGINS, checkout, postgres_schema, save

CONFIG = """
[server]
database_url = "{url}"

[backends.rec]
plugin = "scripted"
state_dir = "{directory}"

[targets.web]
kind = "app"
backend = "rec"
name = "web"
"""
BODY = b'{"imageTag":"1.2.0"}'
AT_ONCE = 16


def measure(config: Path, requests: int) -> dict[str, float]:
    """In the child: accept `requests` hook requests; CPU µs per request and req/s."""
    from shiphook.instance import open_instance

    instance = open_instance(config)
    instance.migrate()
    token = instance.hooks.create(target="web", name="bench").token
    hooks, deployments = instance.hooks, instance.deployments

    async def one() -> None:
        await deployments.accept(await hooks.authenticate_deploy(token), BODY)

    async def run() -> dict[str, float]:
        for _ in range(200):  # warm up: connections, the token cache, the threads
            await asyncio.gather(*(one() for _ in range(AT_ONCE)))
        batches = requests // AT_ONCE
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(batches):
            await asyncio.gather(*(one() for _ in range(AT_ONCE)))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        done = batches * AT_ONCE
        return {"cpu_us_per_request": cpu * 1e6 / done, "requests_per_second": done / wall}

    result = asyncio.run(run())
    instance.close()
    return result


def child_run(source: Path | None, database: str, requests: int) -> dict[str, float]:
    with contextlib.ExitStack() as stack:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="shiphook-")))
        if database == "postgresql":
            url = stack.enter_context(postgres_schema())
        else:
            url = f"sqlite:///{directory}/shiphook.db"
        config = directory / "shiphook.toml"
        config.write_text(textwrap.dedent(CONFIG.format(url=url, directory=directory)))
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(map(str, filter(None, [source, PLUGINS]))),
            "SHIPHOOK_PLUGINS": "scripted_backend",
        }
        out = subprocess.run(
            [str(BIN / "python"), __file__, "--child", str(config), str(requests)],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        ).stdout
        return json.loads(out.splitlines()[-1])


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(measure(Path(sys.argv[2]), int(sys.argv[3]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--databases", default="sqlite")
    parser.add_argument("--baseline", default="", help="git revisions to measure alongside")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        sources: dict[str, Path | None] = {"shiphook": None}
        for revision in filter(None, args.baseline.split(",")):
            sources[revision] = stack.enter_context(checkout(revision))
        found: dict[tuple[str, str], list[dict[str, float]]] = {}
        for database in args.databases.split(","):
            for run in range(args.runs):
                order = list(sources.items())
                for label, source in order if run % 2 == 0 else order[::-1]:
                    result = child_run(source, database, args.requests)
                    found.setdefault((label, database), []).append(result)
                    print(
                        f"run {run + 1}: {label:20} {database:10} "
                        f"{result['cpu_us_per_request']:6.1f} µs CPU/request "
                        f"{result['requests_per_second']:8.0f} req/s",
                        flush=True,
                    )
    print(f"\n{'server':20} {'database':10} {'CPU µs/request: median':>24} {'min':>6} {'req/s':>8}")
    summary = []
    for (label, database), results in found.items():
        cpu = [r["cpu_us_per_request"] for r in results]
        rate = statistics.median(r["requests_per_second"] for r in results)
        print(
            f"{label:20} {database:10} {statistics.median(cpu):>24.1f} {min(cpu):>6.1f} {rate:>8.0f}"
        )
        summary.append({"server": label, "database": database, "runs": results})
    print(f"\nsaved {save('inprocess', {'requests': args.requests, 'results': summary})}")


if __name__ == "__main__":
    main()
