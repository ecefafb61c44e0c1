"""The `ferry` command line: a client of an agent's control API, plus `ferry run` (no agent).

This module owns the top-level parser (global flags, `--version`), the VM and agent commands, and
the exit statuses; the migration commands are agent/cli_migrate.py's, the storage moves
agent/cli_storage.py's, shell completion agent/cli_completion.py's. Every command talks to one agent through
agent.client; errors go to stderr as `ferry: error: MESSAGE (CODE)` with exit status 1 (2 for
usage errors, as argparse does). docs/cli.md is the reference.

Defaults: --agent from $FERRY_AGENT, else the unix socket of the default state dir
(/var/lib/ferry/control.sock); --key-file from $FERRY_KEY_FILE, else /etc/ferry/cluster.key;
--tls-dir from $FERRY_TLS_DIR, else none (plaintext TCP). `ferry certs` (agent/certs.py) is local too.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from agent import certs, cli_cluster, cli_completion, cli_migrate, cli_storage, ferry_version, tls
from agent.cli_args import (
    EXIT_FAILED,
    EXIT_OK,
    add_announce_flags,
    announce_params,
    keyvalue,
    positive_float,
    print_json,
    size,
    table,
)
from agent.cli_devices import NIC_METAVAR, OnlyOnce, add_disk_flag, device_lines, nic_arg
from agent.client import ClientError, ControlClient, connect
from agent.config import (
    CONTROL_SOCKET_NAME,
    DEFAULT_KEY_FILE,
    DEFAULT_STATE_DIR,
    ConfigError,
    format_size,
    load_key,
)

DEFAULT_AGENT = f"{DEFAULT_STATE_DIR}/{CONTROL_SOCKET_NAME}"
VM_STATES = ("running", "paused", "halted", "faulted", "migrating")
POLL_INTERVAL = 0.1  # seconds between two polls of a console follow


Command = Callable[[ControlClient, argparse.Namespace], Awaitable[int]]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ferry", description="Run toy VMs on ferry agents and live-migrate them.")
    p.add_argument("--version", action="version", version=f"ferry {ferry_version()}")
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
    cli_migrate.add_commands(sub)
    _add_agent_commands(sub)
    _add_run_command(sub)
    certs.add_commands(sub)
    cli_cluster.add_commands(sub)
    cli_completion.add_command(sub)
    return p


def _add_vm_commands(sub: Any) -> None:
    vm = sub.add_parser("vm", help="create, inspect and control VMs").add_subparsers(
        dest="vm_command", metavar="VMCOMMAND", required=True)
    c = vm.add_parser("create", help="create and boot a VM")
    c.add_argument("name", metavar="NAME")
    c.add_argument("--program", required=True, help="shipped program name (idle, counter, memstress, verify, netd, "
                                                    "diskstress, dbverify) "
                                                    "or an assembly file")
    c.add_argument("--mem", type=size, default=64 << 20, metavar="SIZE", help="guest RAM, e.g. 256M (default 64M)")
    c.add_argument("--arg", type=keyvalue, action="append", default=[], metavar="KEY=VALUE",
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
    w.add_argument("--timeout", type=positive_float, default=30.0, metavar="S", help="seconds (default 30)")
    w.set_defaults(run=cmd_vm_wait)
    a = vm.add_parser("announce", help="re-send the VM's RARP and gratuitous ARP rounds on its TAP")
    a.add_argument("name", metavar="NAME")
    add_announce_flags(a)
    a.set_defaults(run=cmd_vm_announce)
    cli_storage.add_commands(vm)


def _add_agent_commands(sub: Any) -> None:
    a = sub.add_parser("agent", help="about the agent").add_subparsers(dest="agent_command", metavar="AGENTCOMMAND",
                                                                      required=True)
    info = a.add_parser("info", help="name, version, addresses, memory, dirty tracking backends")
    info.add_argument("--json", action="store_true", help="one JSON object")
    info.set_defaults(run=cmd_agent_info)


def _add_run_command(sub: Any) -> None:
    r = sub.add_parser("run", help="run a program in a local VM, without an agent")
    r.add_argument("program", metavar="PROGRAM", help="shipped program name or an assembly file")
    r.add_argument("--mem", type=size, default=64 << 20, metavar="SIZE", help="guest RAM (default 64M)")
    r.add_argument("--arg", type=keyvalue, action="append", default=[], metavar="KEY=VALUE",
                   help="boot argument for the program (repeatable)")
    r.add_argument("--max-seconds", type=positive_float, metavar="S", help="stop after S seconds (exit 124)")
    add_disk_flag(r, local=True)
    r.set_defaults(run=None)


# -- output helpers -----------------------------------------------------------------------------------
def _vm_table(vms: list[dict[str, Any]]) -> str:
    rows = [(v["name"], v["state"], format_size(int(v["mem"])), v["instructions"], v.get("program", ""),
             v.get("dirty-tracker", ""), v.get("host", "")) for v in vms]
    return table(("NAME", "STATE", "MEM", "INSTRUCTIONS", "PROGRAM", "DIRTY-TRACKER", "HOST"), rows, right="23")


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
        print_json(info)
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
        print_json(vms)
    elif vms:
        print(_vm_table(vms))
    else:
        print(f"no VMs on agent {result.get('host', '?')}")
    return EXIT_OK


async def cmd_vm_info(client: ControlClient, ns: argparse.Namespace) -> int:
    info = await client.call("vm-info", {"name": ns.name})
    if ns.json:
        print_json(info)
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
    result = await client.call("vm-announce", {"name": ns.name, "params": announce_params(ns)}, reply_within=60.0)
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
        print_json(info)
    else:
        for key, value in info.items():
            shown = format_size(int(value)) if key in ("free-mem", "max-mem") else value
            if isinstance(value, list):
                shown = ", ".join(map(str, value))
            print(f"{key + ':':<18} {shown}")
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
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command == "run":
        return _run_local(ns)
    if ns.command == "certs":
        return certs.run_command(ns)
    if ns.command == "completion":
        return cli_completion.run_command(ns, parser)
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
