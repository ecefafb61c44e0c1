"""Post-copy's kernel layer: guest RAM registered for userfaultfd MISSING (and MINOR) faults, and the ioctls that serve them.

A VM arriving by post-copy runs on the destination before all its pages are there. Its VM
process registers its guest-RAM mapping (the memfd, ``MAP_SHARED``, whole range) with a
userfaultfd in MISSING mode: the vCPU's first touch of a page that is a hole of the memfd
blocks in the kernel, and the fault is reported on the userfaultfd. shmem raises MISSING only
for pages absent from the page cache, so pages the agent wrote into the memfd before (pre-copy
rounds, through its own mapping) never fault.

MINOR mode (``UFFD_FEATURE_MINOR_SHMEM``, asked for with ``minor``) adds a fault for a page the
page cache holds but the VM's mapping has no entry for: a stale copy can stay in the memfd (no
punch: docs/PERFORMANCE.md, section 20) and the guest's first touch still reaches the agent,
which writes the fresh copy into the memfd and maps it with UFFDIO_CONTINUE. Registering MINOR
zaps the mapping's entries (MADV_DONTNEED on a shared mapping keeps the page cache), so every
page's first touch faults until the agent maps it.

Two sides live here:

- the VM process's requests (``POSTCOPY_OPS``, dispatched by vmruntime/vmproc.py like the
  devices' ones; docs/CONTRACTS.md): ``postcopy-register`` creates the userfaultfd, registers
  guest RAM and hands a copy to the controller (SCM_RIGHTS); ``postcopy-fd`` hands another copy
  to a controller that attached later; ``postcopy-end`` closes the process's own copy once the
  controller has unregistered guest RAM.
- the controller's side of the fd (:class:`MissingPages`): the fault messages read from it, and
  UFFDIO_COPY / UFFDIO_ZEROPAGE / UFFDIO_WAKE, which act on the VM process's address space
  whoever calls them; the copy's source is the caller's memory. The agent's fault server
  (agent/migration/postcopy_faults.py) decides what to install; this module only installs it.

The VM process keeps its own copy of the userfaultfd until ``postcopy-end``: unlike dirty
tracking's, whose loss only unregisters write protection, losing the last reference to this
one would unregister guest RAM while holes remain, and the guest would read zeros where its
pages should be. Kept, a controller that dies leaves a vCPU that touched a hole blocked in the
kernel (not running on wrong memory) until a new controller takes the fd over (``postcopy-fd``,
or :func:`take_fd` from the process's fd table when the vCPU's thread, which also serves the
control socket, is the one blocked).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
import struct
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vmruntime import guestram
from vmruntime.dirty import _uapi

if TYPE_CHECKING:
    from vmruntime.control import VMHandle
    from vmruntime.vmproc import Reply, VMProcess

PAGE_SIZE = _uapi.PAGE_SIZE
# Asked for in the API handshake: MISSING faults on shmem (the memfd), and the faulting thread's
# id in each message (a per-vCPU block time).
FEATURES = _uapi.UFFD_FEATURE_MISSING_SHMEM | _uapi.UFFD_FEATURE_THREAD_ID
REQUIRED_FEATURES = _uapi.UFFD_FEATURE_MISSING_SHMEM
REQUIRED_IOCTLS = _uapi.UFFD_IOCTL_COPY | _uapi.UFFD_IOCTL_ZEROPAGE | _uapi.UFFD_IOCTL_WAKE
MINOR_FEATURE = _uapi.UFFD_FEATURE_MINOR_SHMEM
MINOR_IOCTLS = REQUIRED_IOCTLS | _uapi.UFFD_IOCTL_CONTINUE
# "0" makes the agent punch stale pages even where MINOR mode works (to measure or rule it out).
MINOR_ENV = "FERRY_POSTCOPY_MINOR"
MSG_SIZE = _uapi.UFFD_MSG_SIZE
_MSG = struct.Struct(_uapi.UFFD_MSG_PAGEFAULT)
assert _MSG.size == MSG_SIZE

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_WHY = {errno.ESRCH: "the VM process is gone", errno.ENOENT: "guest RAM is not registered (any more)"}
_MAX_RETRIES = 1000  # EAGAIN in a row on one install before giving up
_SYS_PIDFD_OPEN = 434  # x86-64
_SYS_PIDFD_GETFD = 438

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.syscall.restype = ctypes.c_long


class PostcopyError(Exception):
    """The kernel refused a post-copy step (registration, an install, a discard)."""


# ---- the VM process's side --------------------------------------------------------------------


def register_missing(addr: int, length: int, minor: bool = False) -> tuple[int, int]:
    """Register [addr, addr+length) of this process for MISSING faults (and MINOR ones with
    ``minor``); returns (uffd, features granted).

    The range must be a whole shared mapping of the memfd: MISSING mode on shmem needs
    UFFD_FEATURE_MISSING_SHMEM (MINOR mode UFFD_FEATURE_MINOR_SHMEM), and the ioctls the agent
    uses (copy, zero page, wake; continue) must be available on it, or PostcopyError says which is not.
    """
    if addr % PAGE_SIZE or length <= 0 or length % PAGE_SIZE:
        raise ValueError(f"range must be page aligned and non-empty: addr=0x{addr:x} length={length}")
    required = REQUIRED_FEATURES | (MINOR_FEATURE if minor else 0)
    fd = _uapi.userfaultfd()
    try:
        granted = _uapi.uffd_api(fd, FEATURES | (MINOR_FEATURE if minor else 0))
        if granted & required != required:
            raise PostcopyError(f"this kernel offers no userfaultfd {'MINOR' if minor else 'MISSING'} mode on "
                                f"shmem (features 0x{granted:x})")
        try:
            ioctls = _uapi.uffd_register_missing(fd, addr, length, minor)
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise PostcopyError("guest RAM is registered with another userfaultfd already "
                                    "(dirty tracking or post-copy under way)") from e
            raise
        wanted = MINOR_IOCTLS if minor else REQUIRED_IOCTLS
        if ioctls & wanted != wanted:
            raise PostcopyError(f"guest RAM supports uffd ioctls 0x{ioctls:x}, post-copy needs 0x{wanted:x}")
    except BaseException:
        os.close(fd)
        raise
    return fd, granted


@functools.cache
def minor_available() -> bool:
    """Whether MINOR mode works for guest RAM here: the kernel grants UFFD_FEATURE_MINOR_SHMEM and
    a shared memfd mapping registered MISSING|MINOR offers UFFDIO_CONTINUE (probed once, on a
    one-page memfd of this process). False when ``FERRY_POSTCOPY_MINOR=0``."""
    if os.environ.get(MINOR_ENV, "1") == "0":
        return False
    fd = guestram.create_memfd(PAGE_SIZE, "ferry-minor-probe")
    try:
        probe = guestram.map_shared(fd, PAGE_SIZE)
        try:
            uffd, _granted = register_missing(guestram.mapping_address(probe), PAGE_SIZE, minor=True)
            os.close(uffd)
            return True
        except (PostcopyError, OSError):
            return False
        finally:
            probe.close()
    finally:
        os.close(fd)


@dataclass
class _Registration:
    fd: int
    addr: int
    length: int
    features: int
    minor: bool

    def fields(self) -> dict[str, Any]:
        return {"addr": self.addr, "length": self.length, "features": self.features, "vm-fd": self.fd,
                "minor": self.minor}


# One registration per VM process (its address space); weak so a VMProcess of a test goes with it.
_registered: weakref.WeakKeyDictionary[VMProcess, _Registration] = weakref.WeakKeyDictionary()


def op_register(vmp: VMProcess, msg: dict[str, Any]) -> Reply:
    """``postcopy-register``: guest RAM registered MISSING (``minor``: MISSING|MINOR, its mapping's
    entries zapped); a copy of the uffd goes with the reply.

    Only for a VM process whose vCPU does not run (an incoming one, before its restore, or a
    paused one): a running guest touching a hole would block until someone serves it.
    """
    if vmp in _registered:
        raise RuntimeError("guest RAM is registered for post-copy already (postcopy-fd hands the uffd over)")
    machine = vmp.machine
    if machine is not None and not vmp.paused and machine.status == "running":
        raise RuntimeError("postcopy-register needs a VM process whose vCPU does not run (before restore, or paused)")
    addr = guestram.mapping_address(vmp.ram)
    minor = bool(msg.get("minor", False))
    fd, features = register_missing(addr, len(vmp.ram), minor)
    if minor:  # no entry may outlive the registration: a stale page mapped here would never fault
        vmp.ram.madvise(mmap.MADV_DONTNEED)
    reg = _registered[vmp] = _Registration(fd, addr, len(vmp.ram), features, minor)
    return reg.fields(), (os.dup(fd),)


def op_fd(vmp: VMProcess, msg: dict[str, Any]) -> Reply:
    """``postcopy-fd``: another copy of the registered uffd, for a controller that attached later."""
    reg = _registered.get(vmp)
    if reg is None:
        raise RuntimeError("guest RAM is not registered for post-copy")
    return reg.fields(), (os.dup(reg.fd),)


def op_end(vmp: VMProcess, msg: dict[str, Any]) -> Reply:
    """``postcopy-end``: close the VM process's copy (the controller unregistered guest RAM, or is
    abandoning the VM). Idempotent: ``registered`` says whether there was one."""
    reg = _registered.pop(vmp, None)
    if reg is not None:
        os.close(reg.fd)
    return {"registered": reg is not None}, ()


POSTCOPY_OPS: dict[str, Callable[[VMProcess, dict[str, Any]], Reply]] = {
    "postcopy-register": op_register,
    "postcopy-fd": op_fd,
    "postcopy-end": op_end,
}


# ---- the controller's side --------------------------------------------------------------------


@dataclass(frozen=True)
class Registered:
    """What ``postcopy-register`` (or ``postcopy-fd``) returns: the uffd (the caller's to close), and
    the VM process's guest-RAM mapping it covers; ``vm_fd`` is the process's own copy's number."""

    uffd: int
    addr: int
    length: int
    features: int
    vm_fd: int
    minor: bool = False  # registered MISSING|MINOR

    @classmethod
    def from_reply(cls, reply: dict[str, Any], fds: list[int]) -> Registered:
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise PostcopyError(f"the VM process's post-copy reply carried {len(fds)} fds, not 1")
        return cls(fds[0], int(reply["addr"]), int(reply["length"]), int(reply["features"]), int(reply["vm-fd"]),
                   bool(reply.get("minor", False)))


def request_register(vm: VMHandle, op: str = "postcopy-register", minor: bool = False) -> Registered:
    """``postcopy-register`` (or ``postcopy-fd``) through a blocking VM handle."""
    reply, fds = vm.request_fds(op, minor=minor) if minor else vm.request_fds(op)
    return Registered.from_reply(reply, fds)


def take_fd(pid: int, fd: int) -> int:
    """A copy of fd number ``fd`` of process ``pid`` (pidfd_getfd; root or the same user under
    ptrace's rules). Reaches a VM process's uffd while its only thread is blocked in a fault."""
    pidfd = _syscall(_SYS_PIDFD_OPEN, pid, 0)
    try:
        return _syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
    finally:
        os.close(pidfd)


def _syscall(nr: int, *args: int) -> int:
    ret = int(_libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args)))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


@dataclass(frozen=True)
class Fault:
    """One page fault read from the uffd: the guest offset of its page, and the faulting thread."""

    offset: int
    address: int
    write: bool
    tid: int
    minor: bool = False  # the page cache holds the page; the mapping has no entry for it


class MissingPages:
    """The controller's handle on a registered guest RAM: faults read, pages installed or woken.

    Offsets are guest offsets (0 .. length); the mapping's base address in the VM process
    turns them into the addresses the kernel wants. Does not own the uffd: the caller closes it.
    Every method may be called from any thread (each is one or a few syscalls).
    """

    def __init__(self, uffd: int, addr: int, length: int) -> None:
        self.uffd = uffd
        self.addr = addr
        self.length = length

    def read_faults(self, max_msgs: int = 64) -> tuple[list[Fault], list[int]]:
        """The fault messages waiting (non-blocking read): (page faults, addresses of faults
        outside guest RAM). Other events (none are asked for) are skipped."""
        try:
            data = os.read(self.uffd, MSG_SIZE * max_msgs)
        except BlockingIOError:
            return [], []
        faults: list[Fault] = []
        outside: list[int] = []
        for event, flags, address, tid in _MSG.iter_unpack(data[:len(data) - len(data) % MSG_SIZE]):
            if event != _uapi.UFFD_EVENT_PAGEFAULT:
                continue
            offset = address - self.addr
            if not 0 <= offset < self.length:
                outside.append(address)
                continue
            faults.append(Fault(offset - offset % PAGE_SIZE, address, bool(flags & _uapi.UFFD_PAGEFAULT_FLAG_WRITE),
                                tid, bool(flags & _uapi.UFFD_PAGEFAULT_FLAG_MINOR)))
        return faults, outside

    def copy(self, offset: int, src: int, length: int) -> list[tuple[int, int]]:
        """Install ``length`` bytes at address ``src`` of this process as guest pages at ``offset``
        (atomically per page: the guest never sees a partial page); wakes their waiters.

        Returns the ranges that were present already (EEXIST: kept as they are, never
        overwritten, their waiters woken). PostcopyError if the kernel refuses otherwise.
        """
        return self._install("UFFDIO_COPY", offset, length,
                             lambda at, n: _uapi.uffd_copy(self.uffd, self.addr + at, src + at - offset, n))

    def zero(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Install zero pages over [offset, offset+length); returns the ranges already present, as copy."""
        return self._install("UFFDIO_ZEROPAGE", offset, length,
                             lambda at, n: _uapi.uffd_zeropage(self.uffd, self.addr + at, n))

    def _install(self, what: str, offset: int, length: int,
                 call: Callable[[int, int], tuple[int, int]]) -> list[tuple[int, int]]:
        existed: list[tuple[int, int]] = []
        at, end, retries = offset, offset + length, 0
        while at < end:
            err, n = call(at, end - at)  # the kernel stops at a present page, having done those before it
            at += n
            if err == errno.EEXIST and n == 0:  # the page at `at` is present: keep it, wake its waiters
                self.wake(at, PAGE_SIZE)
                _append(existed, at, at + PAGE_SIZE)
                at += PAGE_SIZE
            elif err == errno.EAGAIN and n == 0:  # the VM process's mappings changed under the call
                retries += 1
                if retries > _MAX_RETRIES:
                    raise PostcopyError(f"{what} at guest offset 0x{at:x}: the mappings keep changing")
            elif err not in (0, errno.EEXIST, errno.EAGAIN):
                why = _WHY.get(err, os.strerror(err))
                raise PostcopyError(f"{what} at guest offset 0x{at:x}: {why}")
        return existed

    def cont(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Map the page cache's pages over [offset, offset+length) into the VM's mapping (MINOR
        mode: UFFDIO_CONTINUE); wakes their waiters. Returns the ranges mapped already, as copy;
        PostcopyError for a page the page cache does not hold."""
        return self._install("UFFDIO_CONTINUE", offset, length,
                             lambda at, n: _uapi.uffd_continue(self.uffd, self.addr + at, n))

    def wake(self, offset: int, length: int) -> None:
        _uapi.uffd_wake(self.uffd, self.addr + offset, length)

    def unregister(self) -> None:
        """Guest RAM leaves MISSING mode: holes left would read as zeros from now on."""
        _uapi.uffd_unregister(self.uffd, self.addr, self.length)


def _append(out: list[tuple[int, int]], start: int, end: int) -> None:
    if out and out[-1][1] == start:
        out[-1] = (out[-1][0], end)
    else:
        out.append((start, end))


def punch(memfd: int, offset: int, length: int) -> None:
    """Make [offset, offset+length) of the memfd holes (its pages freed, unmapped from every
    mapping), so the guest's next touch faults MISSING again.

    PostcopyError if a page stays: a huge page that cannot be split is zeroed in place rather
    than removed, and a present zero page would never fault (the guest would read zeros).
    """
    if _libc.fallocate(memfd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise PostcopyError(f"punching guest RAM [0x{offset:x}, 0x{offset + length:x}): {os.strerror(err)}")
    try:
        data = os.lseek(memfd, offset, os.SEEK_DATA)
    except OSError as e:
        if e.errno == errno.ENXIO:  # no data from offset to the end
            return
        raise
    if data < offset + length:
        raise PostcopyError(f"guest RAM at 0x{data:x} stayed present after the punch (a huge page?)")
