"""Kernel interface for dirty tracking: userfaultfd and PAGEMAP_SCAN through ctypes.

This module owns every number and struct layout taken from the Linux UAPI headers
(``linux/userfaultfd.h``, ``linux/fs.h``) and the thin wrappers that call them.
Nothing here knows about trackers or guest offsets: callers pass virtual
addresses of the process that owns the userfaultfd (or the pagemap being scanned).

ioctls go through ``libc.ioctl`` (ctypes releases the GIL around the call, and
pointers inside structs such as ``pm_scan_arg.vec`` stay valid because the
structs are passed by reference, not copied).
"""

from __future__ import annotations

import ctypes
import os

PAGE_SIZE = 4096

# ---- ioctl number encoding (asm-generic/ioctl.h) ----
_IOC_WRITE = 1
_IOC_READ = 2


def _ioc(direction: int, kind: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (kind << 8) | nr


def _iowr(kind: int, nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, kind, nr, size)


def _ior(kind: int, nr: int, size: int) -> int:
    return _ioc(_IOC_READ, kind, nr, size)


# ---- userfaultfd ----
SYS_userfaultfd = 323  # x86-64
UFFD_API = 0xAA
UFFDIO = 0xAA

UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15

UFFDIO_REGISTER_MODE_WP = 2
UFFDIO_WRITEPROTECT_MODE_WP = 1
UFFDIO_WRITEPROTECT_MODE_DONTWAKE = 2

UFFD_EVENT_PAGEFAULT = 0x12
UFFD_PAGEFAULT_FLAG_WRITE = 1
UFFD_PAGEFAULT_FLAG_WP = 2
UFFD_MSG_SIZE = 32


class UffdioApi(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class UffdioRange(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class UffdioRegister(ctypes.Structure):
    _fields_ = [("range", UffdioRange), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class UffdioWriteprotect(ctypes.Structure):
    _fields_ = [("range", UffdioRange), ("mode", ctypes.c_uint64)]


UFFDIO_API = _iowr(UFFDIO, 0x3F, ctypes.sizeof(UffdioApi))
UFFDIO_REGISTER = _iowr(UFFDIO, 0x00, ctypes.sizeof(UffdioRegister))
UFFDIO_UNREGISTER = _ior(UFFDIO, 0x01, ctypes.sizeof(UffdioRange))
UFFDIO_WRITEPROTECT = _iowr(UFFDIO, 0x06, ctypes.sizeof(UffdioWriteprotect))

# ---- PAGEMAP_SCAN (linux/fs.h) ----
PM_SCAN_WP_MATCHING = 1
PM_SCAN_CHECK_WPASYNC = 2
PAGE_IS_WRITTEN = 1 << 1


class PageRegion(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64), ("categories", ctypes.c_uint64)]


class PmScanArg(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("start", ctypes.c_uint64),
        ("end", ctypes.c_uint64),
        ("walk_end", ctypes.c_uint64),
        ("vec", ctypes.c_uint64),
        ("vec_len", ctypes.c_uint64),
        ("max_pages", ctypes.c_uint64),
        ("category_inverted", ctypes.c_uint64),
        ("category_mask", ctypes.c_uint64),
        ("category_anyof_mask", ctypes.c_uint64),
        ("return_mask", ctypes.c_uint64),
    ]


assert ctypes.sizeof(PmScanArg) == 96
PAGEMAP_SCAN = _iowr(ord("f"), 16, ctypes.sizeof(PmScanArg))

# ---- libc ----
_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int
_libc.syscall.restype = ctypes.c_long


def ioctl(fd: int, request: int, arg: ctypes.Structure) -> int:
    """Call ioctl(fd, request, &arg); raise OSError with errno on failure."""
    ret = _libc.ioctl(fd, request, ctypes.addressof(arg))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"ioctl 0x{request:x}: {os.strerror(err)}")
    return int(ret)


UFFD_USER_MODE_ONLY = 1


def _userfaultfd(flags: int) -> int:
    fd = _libc.syscall(ctypes.c_long(SYS_userfaultfd), ctypes.c_int(flags))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"userfaultfd: {os.strerror(err)}")
    return int(fd)


def userfaultfd(flags: int = os.O_CLOEXEC | os.O_NONBLOCK) -> int:
    """Create a userfaultfd for the calling process's mm.

    Without privilege (vm.unprivileged_userfaultfd=0 and no CAP_SYS_PTRACE) the
    kernel still allows UFFD_USER_MODE_ONLY, which suffices here: guest writes
    come from user space (the interpreter), so we retry with it on EPERM.
    """
    try:
        return _userfaultfd(flags)
    except PermissionError:
        return _userfaultfd(flags | UFFD_USER_MODE_ONLY)


def uffd_api(fd: int, features: int) -> int:
    """UFFDIO_API handshake requesting ``features``; returns the features the kernel granted."""
    api = UffdioApi(api=UFFD_API, features=features, ioctls=0)
    ioctl(fd, UFFDIO_API, api)
    return int(api.features)


def uffd_register_wp(fd: int, start: int, length: int) -> None:
    reg = UffdioRegister(range=UffdioRange(start, length), mode=UFFDIO_REGISTER_MODE_WP, ioctls=0)
    ioctl(fd, UFFDIO_REGISTER, reg)


def uffd_unregister(fd: int, start: int, length: int) -> None:
    ioctl(fd, UFFDIO_UNREGISTER, UffdioRange(start, length))


def uffd_writeprotect(fd: int, start: int, length: int, protect: bool, wake: bool = True) -> None:
    """Write-protect (or un-protect) [start, start+length) in the uffd's mm.

    Un-protecting with ``wake`` wakes the threads blocked in a write fault there;
    protecting never wakes (the kernel rejects WP|DONTWAKE), so ``wake`` only
    matters when un-protecting.
    """
    mode = UFFDIO_WRITEPROTECT_MODE_WP if protect else 0
    if not wake and not protect:
        mode |= UFFDIO_WRITEPROTECT_MODE_DONTWAKE
    ioctl(fd, UFFDIO_WRITEPROTECT, UffdioWriteprotect(range=UffdioRange(start, length), mode=mode))
