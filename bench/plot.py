#!/usr/bin/env python3
"""plot.py: the scaling curves of a bench run as one PNG.

    python plot.py results.json scaling.png

Run by bench.py with an interpreter that has matplotlib (the bench installs it
into its scratch virtualenv); never imported by respawn.py.
"""

import json
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# key(s), title, unit, the target at the largest size (None: none)
PANELS = [
    (("start_s", "floor_start_s"), "start-up to all running; the bench's own spawn loop", "s",
     ("at 5000", 3.0)),
    (("exec_p50_ms", "exec_p99_ms", "announce_p50_ms", "announce_p99_ms"),
     "restart latency of one service while N run", "ms", None),
    (("handoff_ms", "reexec_seen_ms"), "re-exec: supervisor handoff, client-seen", "ms",
     ("handoff at 5000", 300.0)),
    (("status_json_ms", "status_json_socket_ms"), "status --json: command, socket", "ms",
     ("at 5000", 200.0)),
    (("pss_mib",), "memory PSS", "MiB", ("at 5000", 30.0)),
    (("fds", "idle_wakeups_per_30s"), "open descriptors; idle wakeups /30 s", "count", None),
]


def main(argv):
    with open(argv[1]) as f:
        report = json.load(f)
    points = [p for p in report["peers"]["respawn"]["results"]["scale"] if "error" not in p]
    ns = [p["n"] for p in points]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for ax, (keys, title, unit, target) in zip(axes.flat, PANELS):
        for key in keys:
            xs = [p["n"] for p in points if p.get(key) is not None]
            ys = [p[key] for p in points if p.get(key) is not None]
            if xs:
                ax.plot(xs, ys, marker="o", label=key)
        if target:
            ax.axhline(target[1], color="red", linestyle="--", linewidth=1,
                       label="target %s: %g %s" % (target[0], target[1], unit))
        ax.set_xscale("log")
        if unit != "count" or any(p.get("fds") for p in points):
            ax.set_yscale("symlog" if unit == "count" else "log")
            if unit == "count":
                ax.set_ylim(bottom=0)
        ax.set_xticks(ns)
        ax.set_xticklabels([str(n) for n in ns])
        ax.set_xlabel("services")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    m = report.get("machine", {})
    fig.suptitle("respawn.py %s at scale: %s, %s CPUs, %s, Python %s (mode %s)"
                 % (report["peers"]["respawn"].get("version"), m.get("cpu"), m.get("cpus"),
                    m.get("kernel"), m.get("python"), report.get("mode")), fontsize=10)
    fig.tight_layout()
    fig.savefig(argv[2], dpi=80)


if __name__ == "__main__":
    main(sys.argv)
