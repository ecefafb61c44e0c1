"""Guest RAM: the memfd that holds a guest's memory and shared mappings of it.

This module owns how guest RAM is created and mapped, for every party that
touches it: the agent creates the memfd (and maps it to send or receive
pages), the VM process maps the same memfd to run the guest, tests map it to
compute digests. Guest RAM is always a memfd mapped ``MAP_SHARED`` so that
all of them see one copy of every page.
"""

from __future__ import annotations

import ctypes
import mmap
import os

PAGE_SIZE = 4096

_SHMEM_THP = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"


def check_size(size: int) -> None:
    """Raise ValueError unless ``size`` is a positive whole number of pages."""
    if size <= 0 or size % PAGE_SIZE:
        raise ValueError(f"guest RAM size must be a positive multiple of {PAGE_SIZE}, got {size}")


def create_memfd(size: int, name: str = "ferry-guest") -> int:
    """Create a memfd of ``size`` bytes (all holes: nothing is allocated until written).

    The fd is close-on-exec; pass it to a child with ``pass_fds``.
    """
    check_size(size)
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def map_shared(fd: int, size: int, *, hugepage: bool = False) -> mmap.mmap:
    """Map ``size`` bytes of memfd ``fd`` shared, read-write.

    ``hugepage`` advises transparent huge pages on the mapping. It pays off
    when this mapping is the one that first fills guest RAM (the agent
    receiving a migration: one fault per 2 MiB instead of per 4 KiB) and only
    when the host's ``shmem_enabled`` allows it (see :func:`shmem_thp_mode`);
    elsewhere it is a no-op, so it is never an error.
    """
    check_size(size)
    mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    if hugepage and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass  # THP compiled out: the mapping works without it
    return mm


def mapping_address(mm: mmap.mmap) -> int:
    """Return the virtual address of ``mm`` in this process (for userfaultfd registration).

    The ctypes view exports the mmap's buffer; it is dropped before returning
    so the mapping can still be closed later.
    """
    view = ctypes.c_char.from_buffer(mm)
    try:
        return ctypes.addressof(view)
    finally:
        del view


def shmem_thp_mode() -> str | None:
    """The host's shared-memory THP policy (``never``, ``advise``, ...), or None if unknown."""
    try:
        with open(_SHMEM_THP) as f:
            text = f.read()
    except OSError:
        return None
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return None
