"""``ferry run``: run one guest program in a local VM process, without an agent.

This module owns the implementation behind ``ferry run PROGRAM [--mem SIZE]
[--arg KEY=VALUE ...]``: load the program, start a VM process over a fresh
memfd, boot it, copy its console to ``out`` as it arrives, and turn the way
the guest ended into an exit status. The CLI (agent/cli.py) only parses the
command line and calls :func:`run_local`.
"""

from __future__ import annotations

import sys
import time
from typing import BinaryIO

from vmruntime.control import VMHandle

EXIT_HALTED = 0     # the guest halted
EXIT_FAULTED = 1    # the guest faulted; the reason goes to stderr
EXIT_BAD_INPUT = 2  # unknown program, bad argument, bad memory size
EXIT_TIMEOUT = 124  # max_seconds passed first (as timeout(1) reports it)
EXIT_INTERRUPTED = 130  # Ctrl-C


def run_local(program: str, mem: int, args: dict[str, str], out: BinaryIO,
              max_seconds: float | None = None) -> int:  # fmt: skip
    """Run ``program`` with ``mem`` bytes of guest RAM until it halts, faults or time runs out."""
    from vmruntime.programs import load_program

    try:
        image, boot_args = load_program(program, args)
        vm = VMHandle.spawn(mem, name=f"ferry-run-{program}")
    except (ValueError, OSError) as e:
        print(f"ferry run: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    with vm:
        try:
            vm.boot(image, boot_args)
            status = _follow(vm, out, max_seconds)
        except KeyboardInterrupt:
            status = EXIT_INTERRUPTED
        _write(out, vm.take_console())
        if vm.proc.poll() is None:
            vm.stop()
    return status


def _follow(vm: VMHandle, out: BinaryIO, max_seconds: float | None) -> int:
    """Copy console output to ``out`` until the guest halts or faults; return the exit status."""
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    while deadline is None or time.monotonic() < deadline:
        wait = 0.2 if deadline is None else max(0.0, min(0.2, deadline - time.monotonic()))
        events = vm.poll_events(wait)
        _write(out, vm.take_console())
        for ev in events:
            if ev["ev"] == "halted":
                return EXIT_HALTED
            if ev["ev"] == "faulted":
                print(f"ferry run: guest faulted: {ev.get('reason')}", file=sys.stderr)
                return EXIT_FAULTED
    print(f"ferry run: still running after {max_seconds} s; stopped", file=sys.stderr)
    return EXIT_TIMEOUT


def _write(out: BinaryIO, data: bytes) -> None:
    if data:
        out.write(data)
        out.flush()
