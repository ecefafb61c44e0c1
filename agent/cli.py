"""The `ferry` command line: a client of an agent's control API, plus `ferry run` (no agent).

This module owns the user-facing commands, their flags, their output (tables, JSON, the live
migration progress display) and their exit statuses. Every command talks to one agent through
agent.client; errors go to stderr as `ferry: error: MESSAGE (CODE)` with exit status 1 (2 for
usage errors, as argparse does). docs/cli.md is the reference.

Defaults: --agent from $FERRY_AGENT, else the unix socket of the default state dir
(/var/lib/ferry/control.sock); --key-file from $FERRY_KEY_FILE, else /etc/ferry/cluster.key;
--tls-dir from $FERRY_TLS_DIR, else none (plaintext TCP). `ferry certs` (agent/certs.py) is local too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

from agent import certs, cli_cluster, cli_storage, tls
from agent.cli_devices import NIC_METAVAR, OnlyOnce, add_disk_flag, device_lines, nic_arg
from agent.cli_progress import FINAL, Progress, outcome_lines, watch
from agent.cli_progress import mib as _mib
from agent.client import ClientError, ControlClient, connect
from agent.config import (
    CONTROL_SOCKET_NAME,
    DEFAULT_KEY_FILE,
    DEFAULT_STATE_DIR,
    ConfigError,
    format_size,
    load_key,
    parse_size,
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
DEFAULT_AGENT = f"{DEFAULT_STATE_DIR}/{CONTROL_SOCKET_NAME}"
VM_STATES = ("running", "paused", "halted", "faulted", "migrating")
POLL_INTERVAL = 0.1  # seconds between two polls of a console follow


Command = Callable[[ControlClient, argparse.Namespace], Awaitable[int]]


# -- argument parsing ---------------------------------------------------------------------------------
def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _keyvalue(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ferry", description="Run toy VMs on ferry agents and live-migrate them.")
    p.add_argument("--agent", metavar="ADDR", default=os.environ.get("FERRY_AGENT", DEFAULT_AGENT),
                   help="agent control address HOST:PORT or a unix socket path "
                        f"(default: $FERRY_AGENT, else {DEFAULT_AGENT})")
    p.add_argument("--key-file", metavar="FILE", default=os.environ.get("FERRY_KEY_FILE", DEFAULT_KEY_FILE),
                   help=f"cluster key file (default: $FERRY_KEY_FILE, else {DEFAULT_KEY_FILE})")
    p.add_argument("--tls-dir", metavar="DIR", default=os.environ.get("FERRY_TLS_DIR") or None,
                   help="mutual TLS to an agent's TCP control address: a directory with ca.pem, cert.pem, "
                        "key.pem (default: $FERRY_TLS_DIR, else plaintext)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_vm_commands(sub)
    _add_migrate_commands(sub)
    _add_agent_commands(sub)
    _add_run_command(sub)
    certs.add_commands(sub)
    cli_cluster.add_commands(sub)
    return p


def _add_vm_commands(sub: Any) -> None:
    vm = sub.add_parser("vm", help="create, inspect and control VMs").add_subparsers(
        dest="vm_command", metavar="VMCOMMAND", required=True)
    c = vm.add_parser("create", help="create and boot a VM")
    c.add_argument("name", metavar="NAME")
    c.add_argument("--program", required=True, help="shipped program name (idle, counter, memstress, verify, netd, "
                                                    "diskstress, dbverify) "
                                                    "or an assembly file")
    c.add_argument("--mem", type=_size, default=64 << 20, metavar="SIZE", help="guest RAM, e.g. 256M (default 64M)")
    c.add_argument("--arg", type=_keyvalue, action="append", default=[], metavar="KEY=VALUE",
                   help="boot argument for the program (repeatable)")
    c.add_argument("--dirty-tracker", metavar="BACKEND", help="auto, uffd-wp-async, uffd-wp-sync or hash")
    c.add_argument("--paused", action="store_true", help="create the VM paused")
    c.add_argument("--nic", type=nic_arg, action=OnlyOnce, metavar=NIC_METAVAR,
                   help="give the VM a NIC, its TAP plugged into the host bridge BR (at most one); the MAC "
                        "is generated when not given; ip and prefix reach the guest as boot arguments")
    add_disk_flag(c)
    c.add_argument("--json", action="store_true", help="print the new VM's info as JSON")
    c.set_defaults(run=cmd_vm_create)
    ls = vm.add_parser("list", help="list the agent's VMs")
    ls.add_argument("--json", action="store_true", help="a JSON array of VM info objects")
    ls.set_defaults(run=cmd_vm_list)
    info = vm.add_parser("info", help="show one VM")
    info.add_argument("name", metavar="NAME")
    info.add_argument("--json", action="store_true", help="one JSON object")
    info.set_defaults(run=cmd_vm_info)
    con = vm.add_parser("console", help="print the VM's console output")
    con.add_argument("name", metavar="NAME")
    con.add_argument("-f", "--follow", action="store_true", help="keep printing new output until the VM stops")
    con.set_defaults(run=cmd_vm_console)
    for verb, run, text in (("pause", cmd_vm_pause, "pause the vCPU"), ("resume", cmd_vm_resume, "resume the vCPU"),
                            ("destroy", cmd_vm_destroy, "stop the VM and free its memory")):
        v = vm.add_parser(verb, help=text)
        v.add_argument("name", metavar="NAME")
        v.set_defaults(run=run)
    w = vm.add_parser("wait", help="wait until the VM reaches a state")
    w.add_argument("name", metavar="NAME")
    w.add_argument("--state", required=True, choices=VM_STATES)
    w.add_argument("--timeout", type=_positive_float, default=30.0, metavar="S", help="seconds (default 30)")
    w.set_defaults(run=cmd_vm_wait)
    a = vm.add_parser("announce", help="re-send the VM's RARP and gratuitous ARP rounds on its TAP")
    a.add_argument("name", metavar="NAME")
    _add_announce_flags(a)
    a.set_defaults(run=cmd_vm_announce)
    cli_storage.add_commands(vm)


def _add_announce_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--announce-rounds", type=_nonnegative_int, metavar="N",
                   help="RARP/gratuitous ARP rounds after the switch-over (default 5; 0: none)")
    for flag, default, text in (("initial", 50, "the wait after the first round, sent at once"),
                                ("max", 550, "the longest wait between rounds"),
                                ("step", 100, "how much each wait grows")):
        p.add_argument(f"--announce-{flag}", type=_nonnegative_float, metavar="MS", help=f"{text} (default {default})")


def _announce_params(ns: argparse.Namespace) -> dict[str, Any]:
    params = {"announce-rounds": ns.announce_rounds, "announce-initial": ns.announce_initial,
              "announce-max": ns.announce_max, "announce-step": ns.announce_step}
    return {k: v for k, v in params.items() if v is not None}


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _nonnegative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _add_migrate_commands(sub: Any) -> None:
    m = sub.add_parser("migrate", help="live-migrate a VM to another agent")
    m.add_argument("name", metavar="NAME")
    m.add_argument("--to", metavar="HOST:PORT", help="the destination agent's control address (cluster mode: placed)")
    m.add_argument("--max-downtime", type=_positive_float, metavar="MS", help="downtime bound in ms (default 300)")
    m.add_argument("--bandwidth", type=_size, metavar="BYTES_PER_S", help="cap on the memory stream, e.g. 100M")
    m.add_argument("--auto-converge", action="store_true", help="throttle the vCPU when rounds do not converge")
    m.add_argument("--max-rounds", type=int, metavar="N", help="most pre-copy rounds (default 30)")
    m.add_argument("--timeout", type=_positive_float, metavar="S", help="give up after S seconds")
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
    m.add_argument("--in-doubt-timeout", type=_positive_float, metavar="S",
                   help="after COMMIT, how long to keep asking a silent destination (default 60)")
    m.add_argument("--stall-timeout", type=_positive_float, metavar="S",
                   help="a peer silent this long in a wait counts as dead or frozen: the migration fails "
                        "(both agents, this migration; default: each agent's stall-timeout, 4)")
    m.add_argument("--progress-timeout", type=_positive_float, metavar="S",
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
    _add_announce_flags(m)
    m.add_argument("--json", action="store_true", help="print the final MigrationInfo as JSON, no progress")
    m.add_argument("--detach", action="store_true", help="start the migration and return at once")
    m.set_defaults(run=cmd_migrate)
    s = sub.add_parser("migrate-status", help="show the current or last migration of a VM")
    s.add_argument("name", metavar="NAME")
    s.add_argument("--json", action="store_true", help="the MigrationInfo as JSON")
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
    r.set_defaults(run=cmd_migrate_resolve)


def _add_agent_commands(sub: Any) -> None:
    a = sub.add_parser("agent", help="about the agent").add_subparsers(dest="agent_command", metavar="AGENTCOMMAND",
                                                                      required=True)
    info = a.add_parser("info", help="name, version, addresses, memory, dirty tracking backends")
    info.add_argument("--json", action="store_true", help="one JSON object")
    info.set_defaults(run=cmd_agent_info)


def _add_run_command(sub: Any) -> None:
    r = sub.add_parser("run", help="run a program in a local VM, without an agent")
    r.add_argument("program", metavar="PROGRAM", help="shipped program name or an assembly file")
    r.add_argument("--mem", type=_size, default=64 << 20, metavar="SIZE", help="guest RAM (default 64M)")
    r.add_argument("--arg", type=_keyvalue, action="append", default=[], metavar="KEY=VALUE",
                   help="boot argument for the program (repeatable)")
    r.add_argument("--max-seconds", type=_positive_float, metavar="S", help="stop after S seconds (exit 124)")
    add_disk_flag(r, local=True)
    r.set_defaults(run=None)


# -- output helpers -----------------------------------------------------------------------------------
def _print_json(value: Any, out: TextIO | None = None) -> None:
    print(json.dumps(value, indent=None if isinstance(value, list) else 2, default=_json_default), file=out)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _vm_table(vms: list[dict[str, Any]]) -> str:
    rows = [("NAME", "STATE", "MEM", "INSTRUCTIONS", "PROGRAM", "DIRTY-TRACKER", "HOST")]
    rows += [(str(v["name"]), str(v["state"]), format_size(int(v["mem"])), str(v["instructions"]),
              str(v.get("program", "")), str(v.get("dirty-tracker", "")), str(v.get("host", ""))) for v in vms]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _vm_details(info: dict[str, Any]) -> str:
    shown = {**info, "args": " ".join(f"{k}={v}" for k, v in (info.get("args") or {}).items()) or None}
    lines = [f"{k + ':':<15} {format_size(int(v)) if k == 'mem' else v}" for k, v in shown.items()
             if v is not None and k not in ("nics", "disks")]
    return "\n".join(lines + device_lines(info))


# -- VM commands --------------------------------------------------------------------------------------
async def cmd_vm_create(client: ControlClient, ns: argparse.Namespace) -> int:
    args: dict[str, Any] = {"name": ns.name, "program": ns.program, "mem": ns.mem, "args": dict(ns.arg),
                            "paused": ns.paused}
    if ns.dirty_tracker:
        args["dirty-tracker"] = ns.dirty_tracker
    for device in ("nic", "disk"):
        if getattr(ns, device) is not None:
            args[device] = getattr(ns, device)
    args.update(await asyncio.to_thread(_local_program, ns.program))
    info = await client.call("vm-create", args)
    if ns.json:
        _print_json(info)
    else:
        print(f"created VM {info['name']} on agent {info.get('host', '?')}: {info['state']}, "
              f"{format_size(int(info['mem']))}, program {info.get('program', ns.program)}")
    return EXIT_OK


def _local_program(program: str) -> dict[str, str]:
    """The vm-create fields for a program that names a local assembly file: its path and its source,
    shipped because the agent may be on another host and cannot read our files. {} for a shipped name."""
    if not (("/" in program or program.endswith((".fasm", ".asm", ".s"))) and os.path.isfile(program)):
        return {}
    return {"program": os.path.abspath(program), "program-source": Path(program).read_text()}


async def cmd_vm_list(client: ControlClient, ns: argparse.Namespace) -> int:
    result = await client.call("vm-list", {})
    vms = list(result["vms"])
    if ns.json:
        _print_json(vms)
    elif vms:
        print(_vm_table(vms))
    else:
        print(f"no VMs on agent {result.get('host', '?')}")
    return EXIT_OK


async def cmd_vm_info(client: ControlClient, ns: argparse.Namespace) -> int:
    info = await client.call("vm-info", {"name": ns.name})
    if ns.json:
        _print_json(info)
    else:
        print(_vm_details(info))
    return EXIT_OK


async def cmd_vm_console(client: ControlClient, ns: argparse.Namespace) -> int:
    offset, end = 0, None  # without --follow: print what was there at the first call, then stop
    out = sys.stdout.buffer
    while True:
        chunk = await client.call("vm-console", {"name": ns.name, "offset": offset})
        if chunk.get("dropped"):
            print(f"ferry: {chunk['dropped']} console bytes are no longer kept", file=sys.stderr)
        out.write(bytes(chunk["data"]))
        out.flush()
        offset = int(chunk["offset"])
        end = int(chunk.get("total", offset)) if end is None else end
        if not ns.follow and offset >= end:
            return EXIT_OK
        if ns.follow and offset >= int(chunk.get("total", offset)):
            if chunk.get("state") in ("halted", "faulted"):
                return EXIT_OK
            await asyncio.sleep(POLL_INTERVAL)


async def _vm_verb(client: ControlClient, op: str, name: str, done: str) -> int:
    await client.call(op, {"name": name})
    print(f"VM {name} {done}")
    return EXIT_OK


async def cmd_vm_pause(client: ControlClient, ns: argparse.Namespace) -> int:
    return await _vm_verb(client, "vm-pause", ns.name, "paused")


async def cmd_vm_resume(client: ControlClient, ns: argparse.Namespace) -> int:
    return await _vm_verb(client, "vm-resume", ns.name, "resumed")


async def cmd_vm_destroy(client: ControlClient, ns: argparse.Namespace) -> int:
    return await _vm_verb(client, "vm-destroy", ns.name, "destroyed")


async def cmd_vm_announce(client: ControlClient, ns: argparse.Namespace) -> int:
    result = await client.call("vm-announce", {"name": ns.name, "params": _announce_params(ns)}, reply_within=60.0)
    print(f"VM {ns.name} announced: {result['rounds']} round(s) from {result['mac']}")
    return EXIT_OK


async def cmd_vm_wait(client: ControlClient, ns: argparse.Namespace) -> int:
    info = await client.call("vm-wait", {"name": ns.name, "state": ns.state, "timeout": ns.timeout},
                             reply_within=ns.timeout + 10)
    print(f"VM {ns.name} is {info['state']}")
    return EXIT_OK


async def cmd_agent_info(client: ControlClient, ns: argparse.Namespace) -> int:
    info = await client.call("agent-info", {})
    if ns.json:
        _print_json(info)
    else:
        for key, value in info.items():
            shown = format_size(int(value)) if key in ("free-mem", "max-mem") else value
            if isinstance(value, list):
                shown = ", ".join(map(str, value))
            print(f"{key + ':':<18} {shown}")
    return EXIT_OK


# -- migration ----------------------------------------------------------------------------------------
def migrate_params(ns: argparse.Namespace) -> dict[str, Any]:
    """The migration parameters under the names MigrationParams.from_dict accepts; unset flags are left out."""
    params: dict[str, Any] = {"max-downtime": ns.max_downtime, "bandwidth": ns.bandwidth,
                              "max-rounds": ns.max_rounds, "timeout": ns.timeout,
                              "stall-timeout": ns.stall_timeout, "progress-timeout": ns.progress_timeout}
    if ns.auto_converge:
        params["auto-converge"] = True
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
    params.update(_announce_params(ns))
    return {k: v for k, v in params.items() if v is not None}


def progress_line(info: dict[str, Any]) -> str:
    """One line of the live display: status, round, transferred of total, dirty rate, bandwidth, expected downtime."""
    ram = info.get("ram", {})
    page = int(ram.get("page-size", 4096))
    rounds = len(info.get("rounds", []))
    rate = int(ram.get("dirty-pages-rate", 0)) * page
    line = (f"{info.get('status', '?'):<9} round {rounds:>3}  {_mib(ram.get('transferred', 0))} of "
            f"{_mib(ram.get('total', 0))}  remaining {_mib(ram.get('remaining', 0))}  "
            f"dirty {_mib(rate)}/s  bw {float(ram.get('mbps', 0)) / 8:.1f} MB/s  "
            f"expected downtime {info.get('expected-downtime', 0)} ms")
    if info.get("cpu-throttle-percentage"):
        line += f"  throttle {info['cpu-throttle-percentage']}%"
    if "disk" in info:
        line += f"  disk {_mib(info['disk']['transferred'])} remaining {_mib(info['disk']['remaining'])}"
    return line


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
    if info.get("rx-dropped-at-switchover") is not None:
        lines.append(f"  frames left unread on the source's TAP at switch-over: {info['rx-dropped-at-switchover']}")
    return "\n".join(lines + outcome_lines(info))


async def cmd_migrate(client: ControlClient, ns: argparse.Namespace) -> int:
    args: dict[str, Any] = {"name": ns.name, "to": ns.to, "params": migrate_params(ns)}
    if ns.migration_address is not None:
        args["migration"] = ns.migration_address
    if ns.in_doubt_timeout is not None:
        args["in-doubt-timeout"] = ns.in_doubt_timeout
    info = await client.call("migrate", args, reply_within=60.0)
    if ns.detach:
        _print_json(info) if ns.json else print(f"migration of {ns.name} to {ns.to or info.get('peer')} started")
        return EXIT_OK
    progress = None if ns.json else Progress(sys.stdout, progress_line)
    try:
        final = await watch(client, "migrate-status", ns.name, progress)
    except (asyncio.CancelledError, KeyboardInterrupt):
        await _cancel_on_interrupt(client, ns.name)
        raise
    finally:
        if progress is not None:
            progress.end()
    if ns.json:
        _print_json(final)
    else:
        print(summary_text(final))
    return EXIT_OK if final.get("status") == "completed" else EXIT_FAILED


async def _cancel_on_interrupt(client: ControlClient, name: str) -> None:
    """Ctrl-C during `ferry migrate` cancels the migration, so the VM stays on the source."""
    print(f"\nferry: interrupted, cancelling the migration of {name}", file=sys.stderr)
    try:
        await client.call("migrate-cancel", {"name": name}, reply_within=10.0)
    except (ClientError, OSError, TimeoutError):
        pass


async def cmd_migrate_status(client: ControlClient, ns: argparse.Namespace) -> int:
    info = await client.call("migrate-status", {"name": ns.name})
    if ns.json:
        _print_json(info)
    elif info.get("status") in FINAL:
        print(summary_text(info))
    else:
        print(progress_line(info))
    return EXIT_OK


async def cmd_migrate_resolve(client: ControlClient, ns: argparse.Namespace) -> int:
    result = await client.call("migrate-resolve", {"name": ns.name, "action": ns.action})
    print(f"{ns.name}: {result['resolved']}")
    return EXIT_OK


async def cmd_migrate_cancel(client: ControlClient, ns: argparse.Namespace) -> int:
    await client.call("migrate-cancel", {"name": ns.name})
    print(f"migration of {ns.name} cancelled")
    return EXIT_OK


# -- entry --------------------------------------------------------------------------------------------
async def _run_remote(ns: argparse.Namespace, key: bytes, tls_context: ssl.SSLContext | None) -> int:
    client = await connect(ns.agent, key, tls=tls_context)
    try:
        command: Command = ns.run
        return await command(client, ns)
    finally:
        await client.close()


def _run_local(ns: argparse.Namespace) -> int:
    from vmruntime.runlocal import run_local

    disk = None if ns.disk is None else (ns.disk["path"], ns.disk.get("size"))
    return run_local(ns.program, ns.mem, dict(ns.arg), sys.stdout.buffer, max_seconds=ns.max_seconds, disk=disk)


def error(message: str) -> None:
    print(f"ferry: error: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.command == "run":
        return _run_local(ns)
    if ns.command == "certs":
        return certs.run_command(ns)
    try:
        # The key and TLS files are read before the loop runs; the unix socket needs the key too.
        key = load_key(ns.key_file)
        return asyncio.run(_run_remote(ns, key, tls.client_context(ns.tls_dir)))
    except ClientError as e:
        error(f"{e.message} ({e.code})")
    except ConfigError as e:
        error(str(e))
    except TimeoutError:  # before OSError: TimeoutError is one
        error(f"agent {ns.agent} did not answer in time")
    except OSError as e:
        error(f"cannot talk to agent {ns.agent}: {e.strerror or e}")
    except KeyboardInterrupt:
        return 130
    return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
