"""Plots of the recorded accept-path results: req/s and p99 against the number of hooks stored
and against connections, shiphook beside the bare framework.

    .venv/bin/python bench/plot.py        # reads bench/results/accept.json, writes accept.png
"""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from common import RESULTS

MODES = {False: "keep-alive", True: "new connection per request"}


def main() -> None:
    runs = json.loads((RESULTS / "accept.json").read_text())["runs"]
    figure, ((rate_h, p99_h), (rate_c, p99_c)) = plt.subplots(2, 2, figsize=(12, 8))
    most = max(r["hooks"] for r in runs)
    for close, color in ((False, "tab:blue"), (True, "tab:orange")):
        for connections, style in ((16, "o-"), (64, "s--")):
            mine = sorted(
                (
                    r
                    for r in runs
                    if r["server"] == "shiphook"
                    and r["close"] == close
                    and r["connections"] == connections
                ),
                key=lambda r: r["hooks"],
            )
            label = f"{MODES[close]}, {connections} conns"
            hooks = [r["hooks"] for r in mine]
            rate_h.plot(
                hooks, [r["requests_per_second"] for r in mine], style, color=color, label=label
            )
            p99_h.plot(hooks, [r["p99_ms"] for r in mine], style, color=color, label=label)
            bare = next(
                r
                for r in runs
                if r["server"] == "bare" and r["close"] == close and r["connections"] == connections
            )
            rate_h.axhline(bare["requests_per_second"], linestyle=":", color=color, alpha=0.5)
        for server, style in (("shiphook", "o-"), ("bare", "x:")):
            chosen = sorted(
                (
                    r
                    for r in runs
                    if r["server"] == server and r["close"] == close and r["hooks"] in (0, most)
                ),
                key=lambda r: r["connections"],
            )
            conns = [r["connections"] for r in chosen]
            label = f"{server}, {MODES[close]}"
            rate_c.plot(
                conns, [r["requests_per_second"] for r in chosen], style, color=color, label=label
            )
            p99_c.plot(conns, [r["p99_ms"] for r in chosen], style, color=color, label=label)
    for axis in (rate_h, p99_h):
        axis.set_xscale("log")
        axis.set_xlabel("hooks stored")
    rate_h.set_title("accept path req/s vs hooks stored (dotted: bare Falcon)")
    p99_h.set_title("accept path p99 vs hooks stored")
    rate_c.set_title(f"req/s vs connections ({most:,} hooks)")
    p99_c.set_title(f"p99 vs connections ({most:,} hooks)")
    for axis in (rate_c, p99_c):
        axis.set_xlabel("connections")
    for axis in (rate_h, rate_c):
        axis.set_ylabel("requests/s")
        axis.set_ylim(bottom=0)
    for axis in (p99_h, p99_c):
        axis.set_ylabel("p99 latency, ms")
        axis.set_ylim(bottom=0)
    for axis in (rate_h, p99_h, rate_c, p99_c):
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    out = RESULTS / "accept.png"
    figure.savefig(out, dpi=100)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
