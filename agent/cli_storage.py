"""`ferry vm move-storage` and its status and cancel: a storage move's command line and its display.

`ferry vm move-storage NAME --to PATH` asks the agent to move the VM's disk image (agent/storage_moves.py),
then follows it as `ferry migrate` follows a migration: a progress line per round (one line rewritten on a
terminal), a summary at the end, or the final report as JSON (`--json`); Ctrl-C cancels the move. Exit 0
when the move completed, 1 otherwise (the VM then runs on its old image). docs/cli.md is the reference.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from agent.cli_args import EXIT_FAILED, EXIT_OK, print_json
from agent.cli_progress import FINAL, NOT_MEASURED, Live, Progress, bar, follow, outcome_lines
from agent.cli_progress import mib as _mib
from agent.client import ControlClient


def add_commands(vm: Any) -> None:
    """The storage move's commands under `ferry vm` (``vm``: its sub-parsers)."""
    m = vm.add_parser("move-storage", help="move a running VM's disk image to another path on this host",
                      description="Mirror the VM's disk image to PATH while the VM runs, switch the disk to the "
                                  "copy at a short pause, then remove the old image (Storage vMotion). A cancel "
                                  "or a failure keeps the old image and removes the copy.")
    m.add_argument("name", metavar="NAME")
    m.add_argument("--to", required=True, metavar="PATH",
                   help="a directory (the image keeps its file name there) or a new file path, in the agent's "
                        "allowed disk directories (a relative PATH is taken in STATE_DIR/disks)")
    m.add_argument("--json", action="store_true", help="print the final report as JSON, no progress")
    m.add_argument("--detach", action="store_true", help="start the move and return at once "
                                                         "(follow with move-storage-status)")
    m.set_defaults(run=cmd_move_storage)
    s = vm.add_parser("move-storage-status", help="show the current or last storage move of a VM")
    s.add_argument("name", metavar="NAME")
    s.add_argument("--json", action="store_true", help="the report as JSON")
    s.set_defaults(run=cmd_move_storage_status)
    c = vm.add_parser("move-storage-cancel", help="cancel a VM's storage move (it keeps its old image)")
    c.add_argument("name", metavar="NAME")
    c.set_defaults(run=cmd_move_storage_cancel)


def _disk_copied(info: dict[str, Any]) -> int:
    disk = info.get("disk", {})
    return int(disk.get("transferred", 0)) + int(disk.get("zero", 0))


def progress_line(info: dict[str, Any], live: Live = NOT_MEASURED) -> str:
    """One line of the live display: status, round, copied of what was found to copy, remaining, bandwidth
    (the display's own measure when it has one, else the agent's per-round figure); a bar on a terminal."""
    disk = info.get("disk", {})
    total = int(disk.get("total", 0))
    fraction = _disk_copied(info) / total if total else 1.0
    rate = live.rate if live.rate is not None else float(disk.get("mbps", 0)) * 1e6 / 8
    line = (f"{info.get('status', '?'):<9} round {len(info.get('rounds', [])):>3}  "
            f"{_mib(_disk_copied(info))} copied of {_mib(total)}  "
            f"remaining {_mib(disk.get('remaining', 0))}  bw {rate / 1e6:.1f} MB/s")
    return f"{bar(fraction)} {line}" if live.tty else line


def summary_text(info: dict[str, Any]) -> str:
    """The final summary of a storage move, several lines."""
    disk = info.get("disk", {})
    lines = [
        f"storage move of {info.get('vm', '?')} to {info.get('to', '?')}: {info.get('status')}",
        f"  total time {info.get('total-time')} ms, downtime {info.get('downtime')} ms",
        f"  {len(info.get('rounds', []))} rounds, {_mib(disk.get('transferred', 0))} copied, "
        f"{_mib(disk.get('zero', 0))} zeros kept as holes, disk {_mib(disk.get('size', 0))}",
    ]
    lines += outcome_lines(info)
    if info.get("status") in ("failed", "cancelled"):
        lines.append(f"  the VM runs on its old image {info.get('from', '?')}")
    return "\n".join(lines)


async def cmd_move_storage(client: ControlClient, ns: argparse.Namespace) -> int:
    info = await client.call("vm-move-storage", {"name": ns.name, "to": ns.to}, reply_within=60.0)
    if ns.detach:
        print_json(info) if ns.json else print(f"storage move of {ns.name} to {info.get('to')} started")
        return 0
    progress = None if ns.json else Progress(sys.stdout, progress_line, counter=_disk_copied)
    final = await follow(client, ns.name, status_op="vm-move-storage-status", cancel_op="vm-move-storage-cancel",
                         what="storage move", progress=progress, cancel_within=40.0)
    print_json(final) if ns.json else print(summary_text(final))
    return EXIT_OK if final.get("status") == "completed" else EXIT_FAILED


async def cmd_move_storage_status(client: ControlClient, ns: argparse.Namespace) -> int:
    info = await client.call("vm-move-storage-status", {"name": ns.name})
    if ns.json:
        print_json(info)
    else:
        print(summary_text(info) if info.get("status") in FINAL else progress_line(info))
    return EXIT_OK


async def cmd_move_storage_cancel(client: ControlClient, ns: argparse.Namespace) -> int:
    info = await client.call("vm-move-storage-cancel", {"name": ns.name}, reply_within=40.0)
    status = info.get("status")
    if status == "completed":
        print(f"storage move of {ns.name} had already switched to {info.get('to')}: completed")
    else:
        print(f"storage move of {ns.name} {status}; the VM runs on {info.get('from')}")
    return 0
