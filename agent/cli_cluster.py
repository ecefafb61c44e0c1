"""`ferry hosts`: the cluster's hosts as any agent in cluster mode sees them in etcd.

A table (name, state alive/dead, VMs, guest memory used/free, CPU load of the VMs, maintenance,
seconds left on the host's lease) or the rows as JSON (`--json`). An agent not in cluster mode
answers that it is not (exit 1). docs/cli.md is the reference.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from agent.client import ClientError, ControlClient
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


def _size(value: Any) -> str:
    return "-" if value is None else format_size(int(value))


def hosts_table(rows: list[dict[str, Any]]) -> str:
    """The rows of cluster-hosts as an aligned table."""
    cells = [COLUMNS] + [(
        str(r["name"]), str(r["state"]), str(r.get("vms", 0)), _size(r.get("mem-used")), _size(r.get("mem-free")),
        "-" if r.get("cpu") is None else f"{float(r['cpu']):.2f}",
        "-" if r.get("maintenance") is None else ("yes" if r["maintenance"] else "no"),
        "-" if r.get("lease-ttl") is None else f"{r['lease-ttl']}s") for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells)


async def cmd_hosts(client: ControlClient, ns: argparse.Namespace) -> int:
    try:
        result = await client.call("cluster-hosts", {})
    except ClientError as e:
        if e.code == ErrorCode.NOT_FOUND and "unknown operation" in e.message:
            raise ClientError(ErrorCode.BAD_REQUEST, "this agent is not in cluster mode (start it with --etcd)") from e
        raise
    rows = list(result.get("hosts", []))
    if ns.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
    else:
        print(hosts_table(rows))
    return 0
