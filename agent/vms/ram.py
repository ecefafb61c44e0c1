"""Guest RAM: a memfd shared with the VM process, and the agent's own mapping of it.

Creating it touches nothing (the memory is committed as the guest or a migration writes it);
releasing it is what costs: unmapping returns every page to the kernel, which takes time in
proportion to what was written (docs/PERFORMANCE.md section 11), so it never runs on the event
loop (docs/ARCHITECTURE.md: nothing that blocks runs on the loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os

from vmruntime import guestram

PAGE_SIZE = 4096


def create_guest_ram(name: str, size: int) -> tuple[int, mmap.mmap]:
    """A memfd of `size` bytes and the agent's shared mapping of it; nothing is touched, so it costs nothing yet."""
    fd = guestram.create_memfd(size, f"ferry-{name}")
    try:
        # Huge pages: far fewer page faults when a migration fills the destination's RAM; a no-op
        # where the host has them off.
        return fd, guestram.map_shared(fd, size, hugepage=True)
    except BaseException:
        os.close(fd)
        raise


def close_guest_ram(fd: int, ram: mmap.mmap) -> None:
    """Unmap and close (blocking: call it in a worker thread, or through release_guest_ram)."""
    with contextlib.suppress(BufferError, ValueError):
        ram.close()  # BufferError: a migration still holds a view; the fd close below still frees it later
    with contextlib.suppress(OSError):
        os.close(fd)


async def release_guest_ram(fd: int, ram: mmap.mmap) -> None:
    """close_guest_ram in a worker thread: the loop goes on serving while the kernel frees the pages."""
    await asyncio.to_thread(close_guest_ram, fd, ram)
