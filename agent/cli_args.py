"""What every `ferry` command module shares: argument types, exit statuses, JSON and table output.

The command modules (agent/cli.py, cli_migrate.py, cli_storage.py) parse and print through these,
so a size, a duration or a table reads the same in every command. docs/cli.md is the reference.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any, TextIO

from agent.config import parse_size

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


# -- argument types -----------------------------------------------------------------------------------
def size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def keyvalue(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


# -- the announce flags (ferry vm announce, ferry migrate) ---------------------------------------------
def add_announce_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--announce-rounds", type=nonnegative_int, metavar="N",
                   help="RARP/gratuitous ARP rounds after the switch-over (default 5; 0: none)")
    for flag, default, text in (("initial", 50, "the wait after the first round, sent at once"),
                                ("max", 550, "the longest wait between rounds"),
                                ("step", 100, "how much each wait grows")):
        p.add_argument(f"--announce-{flag}", type=nonnegative_float, metavar="MS", help=f"{text} (default {default})")


def announce_params(ns: argparse.Namespace) -> dict[str, Any]:
    params = {"announce-rounds": ns.announce_rounds, "announce-initial": ns.announce_initial,
              "announce-max": ns.announce_max, "announce-step": ns.announce_step}
    return {k: v for k, v in params.items() if v is not None}


# -- output ---------------------------------------------------------------------------------------------
def print_json(value: Any, out: TextIO | None = None) -> None:
    print(json.dumps(value, indent=None if isinstance(value, list) else 2, default=_json_default), file=out)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], right: str = "") -> str:
    """Aligned columns, two spaces apart, like `virsh list`; the columns whose letters are in
    ``right`` (by position: "0123...") are right-aligned (numbers)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) if str(i) in right else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip() for r in cells)
