"""The balancing plan at cluster sizes: how long `balance.plan` takes and what it finds.

A synthetic cluster per size: H hosts of equal capacity, 10 VMs a host on average (64, 128 or
256 MiB each), placed at random with a tenth of the hosts three times as likely to get each; every
host has room for one more large VM. Each size is planned ``--runs`` times at threshold 3; reported:
median and worst time, the moves, the load's deviation before and after.

``--baseline DIR`` runs the same clusters through another checkout's `agent.cluster.balance`
(``git archive <commit> | tar -x -C DIR``) in a child process, interleaved with this tree's, for
sizes up to ``--baseline-max-hosts`` (a plan that scores each candidate over every host grows as
hosts squared times VMs).

    .venv/bin/python -m bench.bench_balance [--sizes 10,30,100,1000] [--runs 3] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import format_load, load_average, markdown_table, median

MiB = 1 << 20
SIZES_MIB = (64, 128, 256)


def cluster(hosts: int, seed: int = 1) -> dict[str, Any]:
    """Hosts and VMs as plain data (both trees build their own records from it)."""
    rng = random.Random(seed)
    used = [0] * hosts
    vms = []
    heavy = max(1, hosts // 10)
    weights = [3 if i < heavy else 1 for i in range(hosts)]
    for j in range(hosts * 10):
        h = rng.choices(range(hosts), weights)[0]
        mem = rng.choice(SIZES_MIB) * MiB
        vms.append([f"v{j}", mem, f"h{h}"])
        used[h] += mem
    cap = max(used) + max(SIZES_MIB) * MiB
    counts = [sum(1 for v in vms if v[2] == f"h{i}") for i in range(hosts)]
    return {"hosts": [[f"h{i}", cap, used[i], counts[i]] for i in range(hosts)], "vms": vms}


def time_plan(data: dict[str, Any]) -> dict[str, Any]:
    """Plan ``data`` with the `agent.cluster.balance` on sys.path (this tree or a baseline)."""
    from agent.cluster.balance import PlacedVM, plan
    from agent.cluster.model import HostRecord

    hosts = [HostRecord(n, "c:1", "m:1", cap, used, 10_000, count, 0.0) for n, cap, used, count in data["hosts"]]
    vms = [PlacedVM(n, mem, h) for n, mem, h in data["vms"]]
    t = time.perf_counter()
    got = plan(hosts, vms, 3)
    return {"s": time.perf_counter() - t, "moves": len(got.moves), "before": got.before, "after": got.after}


def in_tree(tree: Path, data: dict[str, Any], timeout: float) -> dict[str, Any] | None:
    """time_plan in a child process importing ``tree``'s code (run from it, so its packages come
    first); None past ``timeout`` seconds."""
    code = ("import json, runpy, sys; time_plan = runpy.run_path(sys.argv[1])['time_plan']; "
            "print(json.dumps(time_plan(json.load(sys.stdin))))")
    try:
        out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve())], input=json.dumps(data),
                             capture_output=True, text=True, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
                             timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        return None
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_balance", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10,30,100,1000", help="host counts, comma-separated")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--baseline", type=Path, help="another checkout of ferry to compare with")
    ap.add_argument("--baseline-max-hosts", type=int, default=100)
    ap.add_argument("--baseline-timeout", type=float, default=300.0, help="seconds per baseline plan")
    ns = ap.parse_args(argv)
    sizes = [int(x) for x in ns.sizes.split(",") if x.strip()]
    rows = []
    for hosts in sizes:
        data = cluster(hosts)
        ours: list[dict[str, Any]] = []
        base: list[dict[str, Any] | None] = []
        for _ in range(ns.runs):
            if ns.baseline is not None and hosts <= ns.baseline_max_hosts:
                base.append(in_tree(ns.baseline, data, ns.baseline_timeout))
            ours.append(time_plan(data))
        times = [r["s"] for r in ours]
        row: list[object] = [hosts, len(data["vms"]), f"{median(times) * 1000:.1f} / {max(times) * 1000:.1f}",
                             ours[0]["moves"], f"{ours[0]['before']:.3f} -> {ours[0]['after']:.3f}"]
        if ns.baseline is not None:
            done = [r for r in base if r is not None]
            row += [f"{median([r['s'] for r in done]) * 1000:.0f} / {max(r['s'] for r in done) * 1000:.0f}"
                    f" ({done[0]['moves']} moves, {done[0]['before']:.3f} -> {done[0]['after']:.3f})"
                    if done else ("not run" if not base else f"over {ns.baseline_timeout:.0f} s")]
        rows.append(row)
        print(f"{hosts} hosts done", file=sys.stderr, flush=True)
    headers = ["hosts", "VMs", "plan ms (median / worst)", "moves", "deviation"]
    if ns.baseline is not None:
        headers.append("baseline ms (median / worst)")
    print(markdown_table(headers, rows))
    print(f"\nload average {format_load(load_average())}; {ns.runs} runs each, threshold 3", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
