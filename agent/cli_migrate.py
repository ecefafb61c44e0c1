"""`ferry migrate` and its companions: migrate-status, migrate-cancel, migrate-resolve, migrate-recover.

This module owns the migration commands' flags, the live display of a migration (a bar with the
share of guest RAM sent, the rate, the round, the expected downtime and ETA on a terminal; one plain
line per round or status change elsewhere), the final summary, and the table of migrations in
flight. The JSON is the agent's MigrationInfo unchanged. docs/cli.md is the reference.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from agent import cli_converge
from agent.cli_args import (
    EXIT_FAILED,
    EXIT_OK,
    add_announce_flags,
    announce_params,
    positive_float,
    print_json,
    size,
    table,
)
from agent.cli_progress import FINAL, NOT_MEASURED, Live, Progress, bar, duration, follow, outcome_lines
from agent.cli_progress import mib as _mib
from agent.client import ControlClient


def add_commands(sub: Any) -> None:
    m = sub.add_parser("migrate", help="live-migrate a VM to another agent")
    m.add_argument("name", metavar="NAME")
    m.add_argument("--to", metavar="HOST:PORT", help="the destination agent's control address (cluster mode: placed)")
    m.add_argument("--max-downtime", type=positive_float, metavar="MS", help="downtime bound in ms (default 300)")
    m.add_argument("--bandwidth", type=size, metavar="BYTES_PER_S", help="cap on the memory stream, e.g. 100M")
    cli_converge.add_flags(m)
    m.add_argument("--max-rounds", type=int, metavar="N", help="most pre-copy rounds (default 30)")
    m.add_argument("--timeout", type=positive_float, metavar="S", help="give up after S seconds")
    m.add_argument("--force", action="store_true",
                   help="when it does not converge, switch over anyway instead of aborting")
    m.add_argument("--hot-blocks", action="store_true",
                   help="send densely written 2 MiB blocks whole instead of write-protecting them every round "
                        "(uffd-wp-async: fewer guest write faults, more bytes)")
    m.add_argument("--commit-ahead", action="store_true",
                   help="send COMMIT right behind the RAM digest, not after the destination's READY: one "
                        "round trip less downtime on long paths; the VM stays paused (in doubt) if the "
                        "destination dies while it checks the digest")
    m.add_argument("--no-code-hint", action="store_true",
                   help="do not tell the destination which guest blocks to translate before the resume "
                        "(to measure what that saves)")
    m.add_argument("--migration-address", metavar="HOST:PORT",
                   help="send the memory stream here instead of the destination's advertised migration address")
    m.add_argument("--in-doubt-timeout", type=positive_float, metavar="S",
                   help="after COMMIT, how long to keep asking a silent destination (default 60)")
    m.add_argument("--stall-timeout", type=positive_float, metavar="S",
                   help="a peer silent this long in a wait counts as dead or frozen: the migration fails "
                        "(both agents, this migration; default: each agent's stall-timeout, 4)")
    m.add_argument("--progress-timeout", type=positive_float, metavar="S",
                   help="fail the migration (before COMMIT, the VM resumes here) when no byte moved for S s "
                        "(default: off)")
    m.add_argument("--nic-map", action="append", metavar="SRC_BR=DST_BR",
                   help="plug the VM's NIC into bridge DST_BR on the destination (repeatable)")
    m.add_argument("--disk-map", action="append", metavar="SRC=DST",
                   help="the VM's disk image (or a directory of images) SRC is DST on the destination's "
                        "shared storage (repeatable)")
    m.add_argument("--copy-storage", action="store_true",
                   help="copy the VM's disk image to the destination while the VM runs (no shared storage); "
                        "the source image is removed once the VM runs there")
    m.add_argument("--disk-dir", metavar="DIR",
                   help="with --copy-storage: the destination directory for the image (default its STATE_DIR/disks)")
    m.add_argument("--storage-mode", choices=("background", "write-blocking"),
                   help="with --copy-storage: write-blocking makes a guest that writes its disk faster than the "
                        "link wait for the copy (default background)")
    m.add_argument("--compress", choices=("auto", "zstd", "none"),
                   help="zstd-compress page and disk batches: auto when the link is slower than compression "
                        "saves (a thin link, compressible memory), zstd always, none never (default auto)")
    m.add_argument("--streams", type=_stream_count, metavar="N",
                   help="spread guest RAM over N data connections (1-8), each sent and received by its own "
                        "thread: more cores copy, or encrypt with TLS (default: the agent's streams setting)")
    add_announce_flags(m)
    m.add_argument("--json", action="store_true", help="print the final MigrationInfo as JSON, no progress")
    m.add_argument("--detach", action="store_true", help="start the migration and return at once")
    m.set_defaults(run=cmd_migrate)
    s = sub.add_parser("migrate-status", help="show the current or last migration of a VM; without NAME, "
                                              "a table of the migrations in flight")
    s.add_argument("name", metavar="NAME", nargs="?")
    s.add_argument("--all", action="store_true", help="without NAME: the finished migrations too")
    s.add_argument("--json", action="store_true", help="the MigrationInfo as JSON (a list without NAME)")
    s.set_defaults(run=cmd_migrate_status)
    c = sub.add_parser("migrate-cancel", help="cancel a VM's migration (it keeps running on the source)")
    c.add_argument("name", metavar="NAME")
    c.set_defaults(run=cmd_migrate_cancel)
    r = sub.add_parser("migrate-resolve", help="settle a migration that ended in doubt (VM paused on the source)")
    r.add_argument("name", metavar="NAME")
    where = r.add_mutually_exclusive_group(required=True)
    where.add_argument("--resume-here", dest="action", action="store_const", const="resume-here",
                       help="the destination does not run it (or is gone for good): resume it here")
    where.add_argument("--resumed-on-destination", dest="action", action="store_const",
                       const="resumed-on-destination", help="the destination runs it: destroy the copy here")
    r.add_argument("--force", action="store_true",
                   help="cluster mode: resume here although etcd names the destination the owner (that host is "
                        "gone for good)")
    r.set_defaults(run=cmd_migrate_resolve)
    v = sub.add_parser("migrate-recover", help="reconnect a post-copy paused by a lost link at once (on the source "
                                              "agent; it also retries by itself)")
    v.add_argument("name", metavar="NAME")
    v.set_defaults(run=cmd_migrate_recover)


def _stream_count(text: str) -> int:
    """--streams: a whole number 1..MAX_STREAMS (argparse reports the ValueError's message)."""
    from proto.limits import MAX_STREAMS

    if not text.isdigit() or not 1 <= int(text) <= MAX_STREAMS:
        raise argparse.ArgumentTypeError(f"must be a whole number 1..{MAX_STREAMS}, got {text!r}")
    return int(text)


def migrate_params(ns: argparse.Namespace) -> dict[str, Any]:
    """The migration parameters under the names MigrationParams.from_dict accepts; unset flags are left out."""
    params: dict[str, Any] = {"max-downtime": ns.max_downtime, "bandwidth": ns.bandwidth,
                              "max-rounds": ns.max_rounds, "timeout": ns.timeout,
                              "stall-timeout": ns.stall_timeout, "progress-timeout": ns.progress_timeout}
    params.update(cli_converge.params(ns))
    if ns.force:
        params["force"] = True
    if ns.hot_blocks:
        params["hot-blocks"] = True
    if ns.commit_ahead:
        params["commit-ahead"] = True
    if ns.no_code_hint:
        params["code-hint"] = False
    if ns.nic_map:
        params["nic-map"] = list(ns.nic_map)
    if ns.disk_map:
        params["disk-map"] = list(ns.disk_map)
    if ns.copy_storage:
        params["copy-storage"] = True
    params["disk-dir"] = ns.disk_dir
    params["storage-mode"] = ns.storage_mode
    params["compress"] = ns.compress
    params["streams"] = ns.streams
    params.update(announce_params(ns))
    return {k: v for k, v in params.items() if v is not None}


def done_fraction(info: dict[str, Any]) -> float:
    """The share of guest RAM sent and not dirtied since, virsh's percentage: (total - remaining) / total.
    It reaches about 1 at the end of the first pass and stays there while later rounds resend."""
    ram = info.get("ram", {})
    total = int(ram.get("total", 0))
    if total <= 0:
        return 1.0
    if not info.get("rounds"):
        if info.get("direction") == "in":  # the destination learns the remainder at each round's end
            return min(1.0, int(ram.get("transferred", 0)) / total)
        if not ram.get("transferred"):
            return 0.0  # nothing sent yet: the first round has not set its remainder
    return max(0.0, (total - int(ram.get("remaining", 0))) / total)


def resent_bytes(info: dict[str, Any]) -> int:
    """Bytes sent after the first pass: pages (and disk blocks) the guest wrote again, sent again.
    Why ``transferred`` grows past the RAM's size."""
    rounds = info.get("rounds", [])
    sent = int(info.get("ram", {}).get("transferred", 0))
    return max(0, sent - int(rounds[0].get("bytes", 0))) if rounds else 0


def progress_line(info: dict[str, Any], live: Live = NOT_MEASURED) -> str:
    """One line of the live display: share done, status, round, bytes sent (and resent) of the RAM,
    remaining, the current rate, dirty rate, ETA of the pass under way and the expected downtime;
    on a terminal it starts with a bar."""
    ram = info.get("ram", {})
    status = str(info.get("status", "?"))
    if info.get("queued") is not None:
        return f"{status:<9} queued behind the agent's other migrations ({info['queued']} more waiting first)"
    rounds = info.get("rounds", [])
    fraction = done_fraction(info)
    # The round under way during pre-copy; the rounds recorded from the switch-over on.
    round_no = len(rounds) + (1 if status in ("setup", "active") else 0)
    rate = live.rate if live.rate is not None else float(ram.get("mbps", 0)) * 1e6 / 8
    resent = resent_bytes(info)
    sent = f"sent {_mib(ram.get('transferred', 0))}" + (f" ({_mib(resent)} resent)" if resent else "")
    # The agent measures the dirty rate at the end of a round: there is none during the first.
    dirty = f"dirty {_mib(int(ram.get('dirty-pages-rate', 0)) * int(ram.get('page-size', 4096)))}/s" if rounds \
        else "dirty -"
    parts = [f"{status:<9}", f"{fraction * 100:3.0f}%", f"round {round_no:>3}",
             f"{sent} of {_mib(ram.get('total', 0))}", f"remaining {_mib(ram.get('remaining', 0))}",
             f"bw {rate / 1e6:.1f} MB/s", dirty, f"expected downtime {info.get('expected-downtime', 0)} ms"]
    remaining = int(ram.get("remaining", 0))
    if status not in FINAL and rate > 0 and remaining > 0:
        parts.append(f"ETA {duration(remaining / rate)}")
    if info.get("cpu-throttle-percentage"):
        parts.append(f"throttle {info['cpu-throttle-percentage']}%")
    if "disk" in info:
        parts.append(f"disk {_mib(info['disk']['transferred'])} remaining {_mib(info['disk']['remaining'])}")
    if info.get("compression", {}).get("active"):
        parts.append(f"zstd {info['compression']['compression-rate']:g}x")
    line = "  ".join(parts) + cli_converge.progress(info)
    return f"{bar(fraction)} {line}" if live.tty else line


def status_table(infos: list[dict[str, Any]]) -> str:
    """The migrations of one agent, one line each (``ferry migrate-status`` without a name)."""
    rows = []
    for info in infos:
        ram = info.get("ram", {})
        rows.append([info.get("vm", "?"), info.get("direction", "?"), info.get("peer", "?"), info.get("status", "?"),
                     len(info.get("rounds", [])), f"{done_fraction(info) * 100:.0f}%", _mib(ram.get("transferred", 0)),
                     f"{float(ram.get('mbps', 0)) / 8:.1f} MB/s", f"{info.get('expected-downtime', 0)} ms",
                     f"{info.get('total-time', 0)} ms"])
    return table(["VM", "DIR", "PEER", "STATUS", "ROUNDS", "DONE", "SENT", "BW", "EXP-DOWNTIME", "TIME"], rows,
                 right="456789")


def summary_text(info: dict[str, Any]) -> str:
    """The final summary of a migration, several lines."""
    ram = info.get("ram", {})
    direction = "from" if info.get("direction") == "in" else "to"
    lines = [
        f"migration of {info.get('vm', '?')} {direction} {info.get('peer', '?')}: {info.get('status')}",
        f"  total time {info.get('total-time')} ms, setup {info.get('setup-time')} ms, "
        f"downtime {info.get('downtime')} ms",
        f"  {len(info.get('rounds', []))} rounds, {_mib(ram.get('transferred', 0))} transferred of "
        f"{_mib(ram.get('total', 0))}, {ram.get('normal', 0)} pages sent, {ram.get('duplicate', 0)} zero pages",
        f"  dirty tracking: {info.get('dirty-tracker', '?')}",
    ]
    if "disk" in info:
        lines.append(f"  disk copied: {_mib(info['disk']['transferred'])} of data, {_mib(info['disk']['zero'])} as holes")
    if info.get("compression", {}).get("pages"):
        c = info["compression"]
        lines.append(f"  compression ({c['mode']}): {c['pages']} pages in {_mib(c['compressed-size'])} "
                     f"({c['compression-rate']:g}x), {c['compress-time']} ms compressing")
    if info.get("rx-dropped-at-switchover") is not None:
        lines.append(f"  frames left unread on the source's TAP at switch-over: {info['rx-dropped-at-switchover']}")
    return "\n".join(lines + cli_converge.summary(info) + outcome_lines(info))


async def cmd_migrate(client: ControlClient, ns: argparse.Namespace) -> int:
    args: dict[str, Any] = {"name": ns.name, "to": ns.to, "params": migrate_params(ns)}
    if ns.migration_address is not None:
        args["migration"] = ns.migration_address
    if ns.in_doubt_timeout is not None:
        args["in-doubt-timeout"] = ns.in_doubt_timeout
    info = await client.call("migrate", args, reply_within=60.0)
    if ns.detach:
        print_json(info) if ns.json else print(f"migration of {ns.name} to {ns.to or info.get('peer')} started")
        return EXIT_OK
    progress = None if ns.json else Progress(sys.stdout, progress_line)
    final = await follow(client, ns.name, status_op="migrate-status", cancel_op="migrate-cancel", what="migration",
                         progress=progress, cancel_within=10.0)
    if ns.json:
        print_json(final)
    else:
        print(summary_text(final))
    return EXIT_OK if final.get("status") == "completed" else EXIT_FAILED


async def cmd_migrate_status(client: ControlClient, ns: argparse.Namespace) -> int:
    if ns.name is None:
        infos = [i for i in (await client.call("migrate-list", {}))["migrations"]
                 if ns.all or i.get("status") not in FINAL]
        if ns.json:
            print_json(infos)
        elif infos:
            print(status_table(infos))
        else:
            print("no migrations in flight" + ("" if ns.all else " (--all: the finished ones too)"))
        return EXIT_OK
    info = await client.call("migrate-status", {"name": ns.name})
    if ns.json:
        print_json(info)
    elif info.get("status") in FINAL:
        print(summary_text(info))
    else:
        print(progress_line(info))
    return EXIT_OK


async def cmd_migrate_resolve(client: ControlClient, ns: argparse.Namespace) -> int:
    args = {"name": ns.name, "action": ns.action, **({"force": True} if ns.force else {})}
    result = await client.call("migrate-resolve", args)
    print(f"{ns.name}: {result['resolved']}")
    return EXIT_OK


async def cmd_migrate_recover(client: ControlClient, ns: argparse.Namespace) -> int:
    result = await client.call("migrate-recover", {"name": ns.name})
    print(f"{ns.name}: {result['recover']}")
    return EXIT_OK


async def cmd_migrate_cancel(client: ControlClient, ns: argparse.Namespace) -> int:
    await client.call("migrate-cancel", {"name": ns.name})
    print(f"migration of {ns.name} cancelled")
    return EXIT_OK
