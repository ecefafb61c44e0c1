"""Which dirty-tracking backends work on this host, and which one to use.

The probe exercises each userfaultfd backend for real on a small memfd
mapping of this process (API handshake with the backend's features, register,
write-protect, and for async a PAGEMAP_SCAN of our own pagemap), once per
process. "hash" needs nothing from the kernel and is always available.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os

from . import _uapi
from .names import BACKENDS, HASH, UFFD_WP_ASYNC, UFFD_WP_SYNC
from .register import vm_register

_PROBE_PAGES = 4


def available_backends() -> list[str]:
    """Backends that work here, best first (always ends with "hash"); probed once per process."""
    return list(_probe_all())


@functools.cache
def _probe_all() -> tuple[str, ...]:
    return (*(b for b in (UFFD_WP_ASYNC, UFFD_WP_SYNC) if _probe(b)), HASH)


def choose_backend(preferred: str | None) -> str:
    """``preferred`` if it is available; the best available for None or "auto".

    Raises ValueError naming the available backends when ``preferred`` is
    unknown or does not work on this host.
    """
    available = available_backends()
    if preferred in (None, "auto"):
        return available[0]
    if preferred not in available:
        kind = "unknown" if preferred not in BACKENDS else "unavailable on this host"
        raise ValueError(
            f"dirty-tracking backend {preferred!r} is {kind}; available: {', '.join(available)}"
        )
    assert preferred is not None
    return preferred


def _probe(backend: str) -> bool:
    """Try ``backend`` end to end on a throwaway memfd mapping; False on any OSError."""
    size = _PROBE_PAGES * _uapi.PAGE_SIZE
    memfd = os.memfd_create("ferry-dirty-probe", os.MFD_CLOEXEC)
    try:
        os.ftruncate(memfd, size)
        with mmap.mmap(memfd, size) as m:
            return _probe_mapping(backend, m, size)
    except OSError:
        return False
    finally:
        os.close(memfd)


def _probe_mapping(backend: str, m: mmap.mmap, size: int) -> bool:
    buf = ctypes.c_char.from_buffer(m)
    addr = ctypes.addressof(buf)
    try:
        uffd = vm_register(backend, addr, size)
        assert uffd is not None
        try:
            _uapi.uffd_writeprotect(uffd, addr, size, protect=True)
            if backend == UFFD_WP_ASYNC:
                _probe_scan(addr, size)
            # Un-protect before anyone could touch the mapping (a sync fault would block us).
            _uapi.uffd_writeprotect(uffd, addr, size, protect=False)
        finally:
            os.close(uffd)
    finally:
        del buf  # release the exported buffer so the mmap can close
    return True


def _probe_scan(addr: int, size: int) -> None:
    """One PAGEMAP_SCAN with WP matching over our own pagemap (raises OSError if unsupported)."""
    vec = (_uapi.PageRegion * 1)()
    fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        arg = _uapi.PmScanArg(
            size=ctypes.sizeof(_uapi.PmScanArg),
            flags=_uapi.PM_SCAN_WP_MATCHING | _uapi.PM_SCAN_CHECK_WPASYNC,
            start=addr,
            end=addr + size,
            vec=ctypes.addressof(vec),
            vec_len=1,
            category_mask=_uapi.PAGE_IS_WRITTEN,
            return_mask=_uapi.PAGE_IS_WRITTEN,
        )
        _uapi.ioctl(fd, _uapi.PAGEMAP_SCAN, arg)
    finally:
        os.close(fd)
