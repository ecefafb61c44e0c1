"""VM-process side of dirty tracking: create the userfaultfd and register guest RAM.

userfaultfd registration is per address space, so it must happen in the
process whose page tables hold the guest mapping (the VM process), on
"track-start". The fd it returns goes to the agent over the control socket
(SCM_RIGHTS); the agent's tracker drives everything from there (arming,
harvesting, handling faults), because every uffd ioctl acts on the mm that
created the fd, whoever calls it.

After sending the fd the VM process should close its own copy: then the
agent holds the only reference, and if the agent dies the kernel releases the
userfaultfd, which unregisters the range and wakes any vCPU blocked in a
synchronous write-protect fault. A VM process that keeps its copy would leave
such a writer blocked forever once the agent is gone.
"""

from __future__ import annotations

import os

from . import _uapi
from .names import HASH, UFFD_WP_ASYNC, UFFD_WP_SYNC, check_backend

# Features asked for in the API handshake, per backend. WP_UNPOPULATED makes
# protecting never-touched memory record its first write (needed for anonymous
# memory; shmem gets PTE markers anyway). WP_HUGETLBFS_SHMEM need not be asked
# for: it only advertises that shmem can be registered for WP (verified on 6.18).
ASYNC_FEATURES = _uapi.UFFD_FEATURE_WP_ASYNC | _uapi.UFFD_FEATURE_WP_UNPOPULATED
SYNC_FEATURES = _uapi.UFFD_FEATURE_WP_UNPOPULATED


def features_for(backend: str) -> int:
    return ASYNC_FEATURES if backend == UFFD_WP_ASYNC else SYNC_FEATURES


def open_uffd(backend: str) -> int:
    """Create a userfaultfd and complete the API handshake for ``backend``'s features."""
    wanted = features_for(backend)
    fd = _uapi.userfaultfd()
    try:
        granted = _uapi.uffd_api(fd, wanted)
        if granted & wanted != wanted:
            raise OSError(f"userfaultfd features 0x{wanted:x} requested, kernel granted 0x{granted:x}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def vm_register(backend: str, addr: int, length: int) -> int | None:
    """Register [addr, addr+length) of this process for ``backend``; return the uffd (None for hash).

    The range is registered for write-protect but not yet protected: the
    agent's tracker arms it in ``start()``. The fd is close-on-exec and
    non-blocking.
    """
    check_backend(backend)
    if backend == HASH:
        return None
    if backend not in (UFFD_WP_ASYNC, UFFD_WP_SYNC):
        raise ValueError(f"backend {backend!r} has no VM-side registration")
    if addr % _uapi.PAGE_SIZE or length <= 0 or length % _uapi.PAGE_SIZE:
        raise ValueError(f"range must be page aligned and non-empty: addr=0x{addr:x} length={length}")
    fd = open_uffd(backend)
    try:
        _uapi.uffd_register_wp(fd, addr, length)
    except BaseException:
        os.close(fd)
        raise
    return fd
