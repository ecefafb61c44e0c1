"""Guest programs shipped with ferry, runnable by name, and their arguments.

Owns the program names scripts rely on (idle, counter, memstress, verify, netd,
diskstress, dbverify),
the arguments each accepts with their defaults, and the parsing of argument
text (sizes such as 64M or 1G, integers, enumerations) into the integer
boot arguments Machine.boot passes to the guest (sorted by name into r1,
r2, ... and the boot block).  Sources live in vmruntime/programs/*.fasm.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from vmruntime.asm import Image, assemble

PROGRAMS: tuple[str, ...] = ("idle", "counter", "memstress", "verify", "netd", "diskstress", "dbverify")
_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "programs")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_U64_MAX = (1 << 64) - 1
MAX_WAIT_MS = 3_600_000  # counter wait=: an hour between bursts
MAX_RATE = 1_000_000_000  # memstress rate=: pages per second, diskstress rate=: blocks per second (far
# beyond what the interpreter reaches)
MAX_KV = 16 << 20  # netd kv=: the table is scanned linearly for every request


def parse_size(text: str) -> int:
    """Bytes from '4096', '64K', '64M', '1G', '2GiB' (binary units)."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"bad size {text!r}: expected a number with an optional K, M, G or T suffix")
    value = int(m.group(1)) * _UNITS[m.group(2).lower()]
    if value > _U64_MAX:
        raise ValueError(f"size {text!r} is too large")
    return value


def parse_count(text: str) -> int:
    """A non-negative integer (decimal or 0x hex)."""
    try:
        value = int(str(text).strip(), 0)
    except ValueError:
        raise ValueError(f"bad number {text!r}: expected a non-negative integer") from None
    if not 0 <= value <= _U64_MAX:
        raise ValueError(f"number {text!r} out of range 0..2**64-1")
    return value


def _choice(*names: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if text not in names:
            raise ValueError(f"bad value {text!r}: expected one of {', '.join(names)}")
        return names.index(text)
    return parse


def parse_ipv4(text: str) -> int:
    """An IPv4 address as a u32 (a.b.c.d -> a<<24|b<<16|c<<8|d), from dotted text or the integer."""
    parts = str(text).strip().split(".")
    if len(parts) == 4 and all(p.isdigit() and int(p) <= 255 for p in parts):
        a, b, c, d = (int(p) for p in parts)
        return a << 24 | b << 16 | c << 8 | d
    if len(parts) == 1 and parts[0].isdigit() and int(parts[0]) <= 0xFFFFFFFF:
        return int(parts[0])
    raise ValueError(f"bad IPv4 address {text!r}: expected a.b.c.d or a 32-bit integer")


def _prefix(text: str) -> int:
    value = parse_count(text)
    if value > 32:
        raise ValueError("must be at most 32")
    return value


def _positive(text: str) -> int:
    value = parse_count(text)
    if value == 0:
        raise ValueError("must be at least 1")
    return value


def _at_most(limit: int, parse_value: Callable[[str], int] = parse_count) -> Callable[[str], int]:
    """A count (or size) no larger than limit: the guest's arithmetic on it must not wrap."""
    def parse(text: str) -> int:
        value = parse_value(text)
        if value > limit:
            raise ValueError(f"must be at most {limit}")
        return value
    return parse


@dataclass(frozen=True)
class _Arg:
    parse: Callable[[str], int]
    default: str | None  # None: the argument is required
    help: str


_ARGS: dict[str, dict[str, _Arg]] = {
    "idle": {},
    "counter": {
        "every": _Arg(_positive, "1048576", "counts between prints"),
        "wait": _Arg(_at_most(MAX_WAIT_MS), "10", "milliseconds of virtual time to wait after each burst of "
                                        "32768 counts, 0 = never wait"),
    },
    "memstress": {
        "ws": _Arg(parse_size, "64M", "working-set bytes (clamped to RAM above DATA_ADDR)"),
        "rate": _Arg(_at_most(MAX_RATE), "0", "pages per second, 0 = as fast as possible"),
        "pattern": _Arg(_choice("seq", "random"), "seq", "page order: seq|random"),
        "values": _Arg(_choice("const", "random"), "const", "stored values: const|random"),
    },
    "verify": {
        "ws": _Arg(parse_size, "1M", "working-set bytes (clamped to RAM above DATA_ADDR)"),
        "steps": _Arg(parse_count, "100000", "LCG steps before the digest"),
    },
    "diskstress": {
        "ws": _Arg(parse_size, "64M", "disk working-set bytes (clamped to the disk), written in 64 KiB blocks"),
        "rate": _Arg(_at_most(MAX_RATE), "0", "blocks per second, 0 = as fast as possible"),
        "pattern": _Arg(_choice("seq", "random"), "seq", "block order: seq|random"),
    },
    "dbverify": {
        "ws": _Arg(parse_size, "1M", "working-set bytes of RAM (clamped to RAM above DATA_ADDR) and of the disk "
                                     "(clamped to both)"),
        "steps": _Arg(parse_count, "100000", "LCG steps before the digest"),
    },
    "netd": {
        "ip": _Arg(parse_ipv4, None, "its IPv4 address, a.b.c.d"),
        "prefix": _Arg(_prefix, "24", "its network prefix length"),
        "kv": _Arg(_at_most(MAX_KV, parse_size), "64K", "bytes of RAM for the key-value table (clamped to RAM)"),
    },
}


def program_help(name: str) -> str:
    """One line per accepted argument of a shipped program."""
    spec = _ARGS[name]
    return "; ".join(f"{k}= ({a.help}, " + ("required)" if a.default is None else f"default {a.default})")
                     for k, a in spec.items()) or "no arguments"


def program_arguments(name: str) -> tuple[str, ...]:
    """The argument names a shipped program accepts (so a caller passes only those)."""
    return tuple(_ARGS[name])


def parse_args(name: str, args: Mapping[str, str]) -> dict[str, int]:
    """Integer boot arguments of a shipped program, defaults filled in."""
    spec = _ARGS[name]
    unknown = sorted(set(args) - set(spec))
    if unknown:
        accepted = ", ".join(spec) or "none"
        raise ValueError(f"program {name!r} does not take {', '.join(unknown)}; it accepts: {accepted}")
    out: dict[str, int] = {}
    for key, arg in spec.items():
        text = args.get(key, arg.default)
        if text is None:
            raise ValueError(f"program {name!r} needs {key}=: {arg.help}")
        try:
            out[key] = arg.parse(text)
        except ValueError as exc:
            raise ValueError(f"{name} {key}={text}: {exc}") from None
    return out


def program_path(name: str) -> str:
    return os.path.join(_DIR, f"{name}.fasm")


def load_program(name_or_path: str, args: Mapping[str, str]) -> tuple[Image, dict[str, int]]:
    """Assemble a shipped program (by name) or an assembly file (by path) with its boot arguments.

    A file's arguments are passed through as integers (sizes allowed), since
    the file declares no argument list.
    """
    if name_or_path in PROGRAMS:
        path, boot_args = program_path(name_or_path), parse_args(name_or_path, args)
    elif os.path.isfile(name_or_path):
        path = name_or_path
        boot_args = {k: parse_size(v) if _SIZE_RE.match(str(v)) else parse_count(v) for k, v in args.items()}
    else:
        raise ValueError(f"unknown program {name_or_path!r}: expected one of {', '.join(PROGRAMS)} "
                         "or the path of an assembly file")
    with open(path, encoding="utf-8") as fh:
        return assemble(fh.read(), path), boot_args
