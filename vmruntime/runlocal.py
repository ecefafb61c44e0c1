"""``ferry run``: run one guest program in a local VM process, without an agent.

This module owns the implementation behind ``ferry run PROGRAM [--mem SIZE]
[--arg KEY=VALUE ...] [--disk PATH[,size=SIZE]]``: load the program, start a VM process over a fresh
memfd, boot it, copy its console to ``out`` as it arrives, and turn the way
the guest ended into an exit status. The CLI (agent/cli.py) only parses the
command line and calls :func:`run_local`.
"""

from __future__ import annotations

import os
import sys
import time
from typing import BinaryIO

from vmruntime.control import VMError, VMHandle

EXIT_HALTED = 0     # the guest halted
EXIT_FAULTED = 1    # the guest faulted; the reason goes to stderr
EXIT_BAD_INPUT = 2  # unknown program, bad argument, bad memory size
EXIT_TIMEOUT = 124  # max_seconds passed first (as timeout(1) reports it)
EXIT_INTERRUPTED = 130  # Ctrl-C


def run_local(program: str, mem: int, args: dict[str, str], out: BinaryIO,
              max_seconds: float | None = None, disk: tuple[str, int | None] | None = None) -> int:
    """Run ``program`` with ``mem`` bytes of guest RAM until it halts, faults or time runs out.

    disk: (image path, size or None) gives the guest a disk on that image, created sparse at
    that size when missing (and then removed if the guest cannot even boot on it); the image
    is kept after the run, so a second run continues on the disk the first one wrote.
    """
    from vmruntime.diskimage import ImageError, prepare_image, remove_created
    from vmruntime.programs import load_program

    created = None
    try:
        image, boot_args = load_program(program, args)
        disk_field = None
        if disk is not None:
            path = os.path.abspath(disk[0])
            size, made = prepare_image(path, disk[1])
            created = path if made else None
            disk_field = {"path": path, "size": size}
        vm = VMHandle.spawn(mem, name=f"ferry-run-{program}")
    except (ValueError, OSError, ImageError) as e:
        if created is not None:
            remove_created(created)
        print(f"ferry run: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    with vm:
        try:
            vm.boot(image, boot_args, disk=disk_field)
        except VMError as e:
            if created is not None:
                remove_created(created)
            print(f"ferry run: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        try:
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
