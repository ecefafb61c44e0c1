"""The device flags of the `ferry` command line and the devices' lines in `ferry vm info`.

`--nic bridge=BR[,mac=MAC][,ip=A.B.C.D/NN]` (agent/nics.py) and `--disk PATH[,size=SIZE]`
(agent/disks.py) on `ferry vm create`, `--disk` on `ferry run` too; each at most once, as a VM has at
most one of each. The parsing itself is the device modules'; this module turns their errors into
argparse's and formats what `vm info` shows of each device. docs/cli.md is the reference.
"""

from __future__ import annotations

import argparse
from typing import Any

from agent.config import format_size
from agent.disks import DiskError, parse_disk_text
from agent.nics import NicError, parse_nic_text

NIC_METAVAR = "bridge=BR[,mac=MAC][,ip=A.B.C.D/NN]"
DISK_METAVAR = "PATH[,size=SIZE]"
_NAMES = {"nic": "NIC", "disk": "disk"}


def nic_arg(text: str) -> dict[str, str]:
    try:
        return parse_nic_text(text)
    except NicError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def disk_arg(text: str) -> dict[str, Any]:
    try:
        return parse_disk_text(text)
    except DiskError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


class OnlyOnce(argparse.Action):
    """A device flag at most once: one NIC and one disk per VM for now, and a second one silently
    dropped would mislead."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} given twice: a VM has at most one {_NAMES.get(self.dest, self.dest)}")
        setattr(namespace, self.dest, values)


def add_disk_flag(p: argparse.ArgumentParser, local: bool = False) -> None:
    where = ("created sparse at SIZE when missing; kept after the run" if local else
             "in the agent's STATE_DIR/disks (a relative PATH goes there) or its disk-dirs; created "
             "sparse at SIZE when missing; never deleted by the agent")
    p.add_argument("--disk", type=disk_arg, action=OnlyOnce, metavar=DISK_METAVAR,
                   help=f"give the VM a disk on the raw image PATH (at most one): {where}")


def device_lines(info: dict[str, Any]) -> list[str]:
    """The `nic:` and `disk:` lines of `vm info`."""
    lines = [f"{'nic:':<15} {nic_line(nic)}" for nic in info.get("nics") or []]
    lines += [f"{'disk:':<15} {disk_line(disk)}" for disk in info.get("disks") or []]
    return lines


def nic_line(nic: dict[str, Any]) -> str:
    """One NIC of `vm info`: where it is plugged, its addresses and counters."""
    return (f"mac {nic.get('mac')} ip {nic.get('ip') or '-'} bridge {nic.get('bridge')} tap {nic.get('tap')} "
            f"rx-packets {nic.get('rx-packets', 0)} tx-packets {nic.get('tx-packets', 0)} "
            f"rx-dropped {nic.get('rx-dropped', 0)}")


def disk_line(disk: dict[str, Any]) -> str:
    """One disk of `vm info`: its image, size, what it occupies, its counters."""
    return (f"{disk.get('path')} size {format_size(int(disk.get('size', 0)))} "
            f"allocated {format_size(int(disk.get('allocated', 0)))} reads {disk.get('reads', 0)} "
            f"writes {disk.get('writes', 0)} dirty-blocks {disk.get('dirty-blocks', 0)}")
