"""The cluster's commands (cluster mode, docs/CLUSTER.md); any agent of the cluster answers them.

* `ferry hosts`: a table (name, state alive/dead, VMs, guest memory used/free, CPU load of the VMs,
  maintenance, seconds left on the host's lease) or the rows as JSON (`--json`);
* `ferry host maintenance HOST on|off`: take HOST out of placement and empty it by live migration
  (waits until it is empty, with progress, unless `--no-wait`), or return it to service;
* `ferry balance [--dry-run] [--threshold 1..5]`: the balancing plan (moves, load before and after)
  and, without `--dry-run`, its moves.

An agent not in cluster mode answers that it is not (exit 1). docs/cli.md is the reference.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from agent.cli_args import table
from agent.client import CALL_TIMEOUT, ClientError, ControlClient
from agent.config import format_size
from proto.errors import ErrorCode

COLUMNS = ("NAME", "STATE", "VMS", "MEM USED", "MEM FREE", "LOAD", "MAINT", "LEASE TTL")


def add_commands(sub: Any) -> None:
    """The cluster's commands (``sub``: the top-level sub-parsers)."""
    h = sub.add_parser("hosts", help="list the cluster's hosts (cluster mode, --etcd)",
                       description="List every host of the cluster as etcd has it: live hosts (their lease held) "
                                   "and dead ones (lease expired, still named as a VM's owner or seen alive "
                                   "earlier by the agent asked). Any agent of the cluster answers.")
    h.add_argument("--json", action="store_true", help="the rows as a JSON array")
    h.set_defaults(run=cmd_hosts)
    host = sub.add_parser("host", help="one host of the cluster (cluster mode)").add_subparsers(
        dest="host_command", metavar="HOSTCOMMAND", required=True)
    m = host.add_parser("maintenance", help="take a host out of service and empty it, or return it",
                        description="on: no more placements on HOST, and every VM there is live-migrated to "
                                    "the host with most free capacity (2 at once from HOST, 5 in the cluster); "
                                    "a failed migration is tried elsewhere; a VM no host has room for stays and "
                                    "is reported. off: HOST takes placements again.")
    m.add_argument("host", metavar="HOST", help="the agent's --name")
    m.add_argument("state", choices=("on", "off"))
    m.add_argument("--no-wait", action="store_true", help="return once maintenance is set, not when HOST is empty")
    m.add_argument("--json", action="store_true", help="print the final report as JSON")
    m.set_defaults(run=cmd_maintenance)
    b = sub.add_parser("balance", help="even out the hosts' load by live migration (cluster mode)",
                       description="Plan moves that lower the standard deviation of the hosts' load (committed "
                                   "guest memory over capacity), greedily one move at a time, each VM at most "
                                   "once; print them with the load before and after, and carry them out one "
                                   "at a time unless --dry-run.")
    b.add_argument("--dry-run", action="store_true", help="print the plan only")
    b.add_argument("--threshold", type=int, choices=range(1, 6), default=3, metavar="1..5",
                   help="1 moves only for a large imbalance, 5 for a small one (default 3)")
    b.add_argument("--json", action="store_true", help="the plan (and results) as JSON")
    b.set_defaults(run=cmd_balance)


def _size(value: Any) -> str:
    return "-" if value is None else format_size(int(value))


def hosts_table(rows: list[dict[str, Any]]) -> str:
    """The rows of cluster-hosts as an aligned table."""
    return table(COLUMNS, [(
        r["name"], r["state"], r.get("vms", 0), _size(r.get("mem-used")), _size(r.get("mem-free")),
        "-" if r.get("cpu") is None else f"{float(r['cpu']):.2f}",
        "-" if r.get("maintenance") is None else ("yes" if r["maintenance"] else "no"),
        "-" if r.get("lease-ttl") is None else f"{r['lease-ttl']}s") for r in rows])


async def _call(client: ControlClient, op: str, args: dict[str, Any], reply_within: float = CALL_TIMEOUT) -> Any:
    try:
        return await client.call(op, args, reply_within=reply_within)
    except ClientError as e:
        if e.code == ErrorCode.NOT_FOUND and "unknown operation" in e.message:
            raise ClientError(ErrorCode.BAD_REQUEST, "this agent is not in cluster mode (start it with --etcd)") from e
        raise


def maintenance_line(report: dict[str, Any]) -> str:
    ev = report.get("evacuation") or {}
    return (f"{report['host']}: maintenance {'on' if report.get('maintenance') else 'off'}, "
            f"{len(ev.get('moved', []))} moved, {len(ev.get('moving', {}))} moving, "
            f"{len(ev.get('waiting', []))} waiting, {len(ev.get('failed', []))} cannot move")


async def cmd_maintenance(client: ControlClient, ns: argparse.Namespace) -> int:
    on = ns.state == "on"
    report = await _call(client, "host-maintenance", {"host": ns.host, "on": on})
    last = ""
    while on and not ns.no_wait and (report.get("evacuation") or {}).get("state") == "evacuating":
        line = maintenance_line(report)
        if line != last and not ns.json:
            print(line, flush=True)
            last = line
        await asyncio.sleep(0.5)
        report = await _call(client, "host-maintenance-status", {"host": ns.host})
    ev = report.get("evacuation") or {}
    if ns.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(maintenance_line(report))
        for m in ev.get("moved", []):
            print(f"  moved {m['vm']} to {m['to']}")
        for f in ev.get("failed", []):
            print(f"  cannot move {f['vm']} (it stays on {ns.host}): {f['error']}")
    if on and not ns.no_wait and (ev.get("failed") or report.get("vms")):
        print(f"ferry: {ns.host} is not empty: {', '.join(report.get('vms', []))}", file=sys.stderr)
        return 1
    return 0


async def cmd_balance(client: ControlClient, ns: argparse.Namespace) -> int:
    plan = await _call(client, "cluster-balance", {"threshold": ns.threshold, "dry-run": ns.dry_run},
                       reply_within=3600.0)
    if ns.json:
        print(json.dumps(plan, indent=2, sort_keys=True))
    else:
        print(f"load deviation {plan['before']:.3f} -> {plan['after']:.3f} "
              f"({len(plan['moves'])} move{'s' if len(plan['moves']) != 1 else ''}, threshold {plan['threshold']})")
        for m in plan["moves"]:
            done = f"  {m['result']}" if "result" in m else ""
            print(f"  {m['vm']} ({format_size(int(m['mem']))}): {m['from']} -> {m['to']}{done}")
        for name in sorted(plan["load-before"]):
            print(f"  {name}: load {plan['load-before'][name]:.2f} -> {plan['load-after'][name]:.2f}")
    failed = [m for m in plan["moves"] if "result" in m and not str(m["result"]).startswith("completed")]
    return 1 if failed else 0


async def cmd_hosts(client: ControlClient, ns: argparse.Namespace) -> int:
    result = await _call(client, "cluster-hosts", {})
    rows = list(result.get("hosts", []))
    if ns.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
    else:
        print(hosts_table(rows))
    return 0
