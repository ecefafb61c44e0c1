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

UFFD_FEATURE_MISSING_SHMEM = 1 << 5
UFFD_FEATURE_THREAD_ID = 1 << 8
UFFD_FEATURE_MINOR_SHMEM = 1 << 10
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15

UFFDIO_REGISTER_MODE_MISSING = 1
UFFDIO_REGISTER_MODE_WP = 2
UFFDIO_REGISTER_MODE_MINOR = 4
UFFDIO_CONTINUE_MODE_DONTWAKE = 1
UFFDIO_COPY_MODE_DONTWAKE = 1
UFFDIO_ZEROPAGE_MODE_DONTWAKE = 1
# Bits of uffdio_register.ioctls: the ioctls the registered range supports (_UFFDIO_* numbers).
UFFD_IOCTL_WAKE = 1 << 0x02
UFFD_IOCTL_COPY = 1 << 0x03
UFFD_IOCTL_ZEROPAGE = 1 << 0x04
UFFD_IOCTL_CONTINUE = 1 << 0x07
UFFDIO_WRITEPROTECT_MODE_WP = 1
UFFDIO_WRITEPROTECT_MODE_DONTWAKE = 2

UFFD_EVENT_PAGEFAULT = 0x12
UFFD_PAGEFAULT_FLAG_WRITE = 1
UFFD_PAGEFAULT_FLAG_WP = 2
UFFD_PAGEFAULT_FLAG_MINOR = 4
UFFD_MSG_SIZE = 32
# struct uffd_msg: u8 event, 7 bytes reserved, then for a page fault u64 flags, u64 address,
# u32 ptid (with UFFD_FEATURE_THREAD_ID), 4 bytes of padding.
UFFD_MSG_PAGEFAULT = "<B7xQQI4x"


class UffdioApi(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class UffdioRange(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class UffdioRegister(ctypes.Structure):
    _fields_ = [("range", UffdioRange), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class UffdioWriteprotect(ctypes.Structure):
    _fields_ = [("range", UffdioRange), ("mode", ctypes.c_uint64)]


class UffdioCopy(ctypes.Structure):
    _fields_ = [("dst", ctypes.c_uint64), ("src", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("mode", ctypes.c_uint64), ("copy", ctypes.c_int64)]


class UffdioZeropage(ctypes.Structure):
    _fields_ = [("range", UffdioRange), ("mode", ctypes.c_uint64), ("zeropage", ctypes.c_int64)]


class UffdioContinue(ctypes.Structure):
    _fields_ = [("range", UffdioRange), ("mode", ctypes.c_uint64), ("mapped", ctypes.c_int64)]


UFFDIO_API = _iowr(UFFDIO, 0x3F, ctypes.sizeof(UffdioApi))
UFFDIO_REGISTER = _iowr(UFFDIO, 0x00, ctypes.sizeof(UffdioRegister))
UFFDIO_UNREGISTER = _ior(UFFDIO, 0x01, ctypes.sizeof(UffdioRange))
UFFDIO_WAKE = _ior(UFFDIO, 0x02, ctypes.sizeof(UffdioRange))
UFFDIO_COPY = _iowr(UFFDIO, 0x03, ctypes.sizeof(UffdioCopy))
UFFDIO_ZEROPAGE = _iowr(UFFDIO, 0x04, ctypes.sizeof(UffdioZeropage))
UFFDIO_WRITEPROTECT = _iowr(UFFDIO, 0x06, ctypes.sizeof(UffdioWriteprotect))
UFFDIO_CONTINUE = _iowr(UFFDIO, 0x07, ctypes.sizeof(UffdioContinue))

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


def uffd_register_missing(fd: int, start: int, length: int, minor: bool = False) -> int:
    """Register [start, start+length) for MISSING faults (and MINOR ones: a page in the page cache
    but not mapped here); returns the ioctls the range supports."""
    mode = UFFDIO_REGISTER_MODE_MISSING | (UFFDIO_REGISTER_MODE_MINOR if minor else 0)
    reg = UffdioRegister(range=UffdioRange(start, length), mode=mode, ioctls=0)
    ioctl(fd, UFFDIO_REGISTER, reg)
    return int(reg.ioctls)


def uffd_copy(fd: int, dst: int, src: int, length: int, wake: bool = True) -> tuple[int, int]:
    """UFFDIO_COPY of ``length`` bytes at ``src`` (this process) to ``dst`` (the uffd's mm).

    Returns (errno or 0, bytes copied): the kernel stops at the first page already present
    (EEXIST) or when the mm changed under it (EAGAIN), having copied the pages before it;
    callers tell those apart from real failures, so nothing is raised here.
    """
    arg = UffdioCopy(dst=dst, src=src, len=length, mode=0 if wake else UFFDIO_COPY_MODE_DONTWAKE, copy=0)
    return _call_counted(fd, UFFDIO_COPY, arg, "copy")


def uffd_zeropage(fd: int, start: int, length: int, wake: bool = True) -> tuple[int, int]:
    """UFFDIO_ZEROPAGE over [start, start+length): (errno or 0, bytes zeroed), as uffd_copy."""
    arg = UffdioZeropage(range=UffdioRange(start, length), mode=0 if wake else UFFDIO_ZEROPAGE_MODE_DONTWAKE,
                         zeropage=0)
    return _call_counted(fd, UFFDIO_ZEROPAGE, arg, "zeropage")


def uffd_continue(fd: int, start: int, length: int, wake: bool = True) -> tuple[int, int]:
    """UFFDIO_CONTINUE over [start, start+length): map the page cache's pages there (MINOR mode),
    (errno or 0, bytes mapped) as uffd_copy: EEXIST stops at a page mapped already, EFAULT at a
    page the page cache does not hold."""
    arg = UffdioContinue(range=UffdioRange(start, length), mode=0 if wake else UFFDIO_CONTINUE_MODE_DONTWAKE,
                         mapped=0)
    return _call_counted(fd, UFFDIO_CONTINUE, arg, "mapped")


def _call_counted(fd: int, request: int, arg: ctypes.Structure, field: str) -> tuple[int, int]:
    ret = _libc.ioctl(fd, request, ctypes.addressof(arg))
    err = ctypes.get_errno() if ret < 0 else 0
    # On failure the count field holds -errno when nothing was done.
    return err, max(0, int(getattr(arg, field)))


def uffd_wake(fd: int, start: int, length: int) -> None:
    """Wake the threads blocked in a fault on [start, start+length)."""
    ioctl(fd, UFFDIO_WAKE, UffdioRange(start, length))


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
