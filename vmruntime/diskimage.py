"""Disk image files: a raw sparse file per disk, created, checked, opened and locked.

Owns what a disk image is on the host: a regular file holding the disk's bytes
from offset 0, its size a whole number of 512-byte sectors, sparse where
nothing was written (a new image is one ftruncate: no block allocated).

- `prepare_image(path, size)`: the agent and `ferry run`, before the VM process
  starts: creates a missing image at `size` (refusing without one), or checks an
  existing one (regular file, readable and writable, whole sectors, not shorter
  than `size`); says whether it created the file, so a caller whose VM then fails
  removes exactly what it made.
- `ImageFile.open(path, size)`: the VM process: opens the image and takes an
  exclusive OFD lock (`F_OFD_SETLK`, whole file) held for as long as the file is
  open, so two VM processes never write one image (a second is refused, naming the
  image); the kernel drops the lock when the fd closes or the process dies.
  ImageFile is the `BlockBackend` of the disk device (vmruntime/disk.py).

Everything here blocks on the file system: the agent calls it from a worker thread.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import struct
import uuid

from vmruntime import isa

SECTOR = isa.DISK_SECTOR_SIZE
MAX_SIZE = 1 << 50  # 1 PiB: a size beyond this is a typo, not a disk
# The image's identity lives next to it (PATH + ID_SUFFIX, a UUID): a migration's destination tells
# the source's image on shared storage from another file at the same path by it.
ID_SUFFIX = ".ferry-id"
_ID = re.compile(r"[0-9a-f]{32}")
# struct flock on Linux (x86_64, aarch64): l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks).
_FLOCK = struct.Struct("hhqqi4x")


class ImageError(Exception):
    """An image that cannot be used: missing, unreadable, truncated, in use, malformed; says which."""


def check_size(size: int) -> int:
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_SIZE or size % SECTOR:
        raise ImageError(f"disk size {size!r} must be a positive multiple of {SECTOR} bytes, at most {MAX_SIZE}")
    return size


def prepare_image(path: str, size: int | None) -> tuple[int, bool]:
    """(the disk's size, whether this call created the file) for image ``path``.

    A missing image is created sparse at ``size`` (ImageError without a size); an existing one
    must be a readable and writable regular file of whole sectors, at least ``size`` bytes
    when a size is given (shorter: truncated). Its size is the disk's size when none is given.
    """
    if size is not None:
        check_size(size)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if size is None:
            raise ImageError(f"disk image {path} does not exist (give size=SIZE to create it)") from None
        return size, _create(path, size)
    except OSError as e:
        raise ImageError(f"disk image {path}: {e.strerror or e}") from e
    return check_existing(path, st, size), False


def check_existing(path: str, st: os.stat_result, size: int | None) -> int:
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"disk image {path} is not a regular file")
    if not os.access(path, os.R_OK | os.W_OK):
        raise ImageError(f"disk image {path} is not readable and writable by this agent")
    if st.st_size == 0 or st.st_size % SECTOR:
        raise ImageError(f"disk image {path} holds {st.st_size} bytes, not a positive whole number of "
                         f"{SECTOR}-byte sectors")
    if size is not None and st.st_size < size:
        raise ImageError(f"disk image {path} is truncated: {st.st_size} bytes, its size is {size}")
    return size if size is not None else st.st_size


def _create(path: str, size: int) -> bool:
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise ImageError(f"cannot create disk image {path}: directory {parent} does not exist")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise ImageError(f"disk image {path} appeared while being created; try again") from None
    except OSError as e:
        raise ImageError(f"cannot create disk image {path}: {e.strerror or e}") from e
    try:
        os.ftruncate(fd, size)
    except OSError as e:
        os.close(fd)
        os.unlink(path)
        raise ImageError(f"cannot create disk image {path} of {size} bytes: {e.strerror or e}") from e
    os.close(fd)
    return True


def read_full(fd: int, buf: memoryview, offset: int) -> None:
    """Fill ``buf`` from ``fd`` at ``offset``; past the end of the file it reads as zeros (a hole
    that was cut off)."""
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            buf[done:] = bytes(len(buf) - done)
            return
        done += n


def remove_created(path: str) -> None:
    """Remove an image this agent created for a VM whose creation failed, and its identity (best effort)."""
    for name in (path, path + ID_SUFFIX):
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass


def image_id(path: str, create: bool = False) -> str | None:
    """The identity of image ``path`` (a UUID in PATH.ferry-id); None when it has none, unless
    ``create``: then a new one is written (an image made before identities, or by another tool)."""
    side = path + ID_SUFFIX
    try:
        with open(side) as f:
            text = f.read().strip()
    except FileNotFoundError:
        if not create:
            return None
        try:
            fd = os.open(side, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:  # another agent on the same shared directory wrote it meanwhile
            return image_id(path)
        except OSError as e:
            raise ImageError(f"cannot write the identity of disk image {path}: {e.strerror or e}") from e
        new = uuid.uuid4().hex
        with os.fdopen(fd, "w") as f:
            f.write(new + "\n")
        return new
    except OSError as e:
        raise ImageError(f"cannot read the identity of disk image {path}: {e.strerror or e}") from e
    if not _ID.fullmatch(text):
        raise ImageError(f"the identity file {side} of disk image {path} is malformed")
    return text


def set_image_id(path: str, ident: str) -> None:
    """Give image ``path`` the identity ``ident`` (a copy of the image that had it); ImageError
    for a malformed identity or a file that cannot be written."""
    if not _ID.fullmatch(ident):
        raise ImageError(f"malformed disk image identity {ident!r}")
    try:
        with open(path + ID_SUFFIX, "w") as f:
            f.write(ident + "\n")
    except OSError as e:
        raise ImageError(f"cannot write the identity of disk image {path}: {e.strerror or e}") from e


def allocated_bytes(st: os.stat_result) -> int:
    return st.st_blocks * 512


class ImageFile:
    """One open, locked image: the disk device's backend in the VM process."""

    def __init__(self, path: str, fd: int, size: int) -> None:
        self.path = path
        self.fd = fd
        self._size = size

    @classmethod
    def open(cls, path: str, size: int) -> ImageFile:
        """Open and lock image ``path`` of ``size`` bytes; ImageError says why not (in use: names it)."""
        check_size(size)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise ImageError(f"cannot open disk image {path}: {e.strerror or e}") from e
        try:
            lock_exclusive(fd, path)
            check_existing(path, os.fstat(fd), size)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, size)

    @property
    def size(self) -> int:
        return self._size

    def read_into(self, offset: int, buf: memoryview) -> None:
        read_full(self.fd, buf, offset)

    def write_from(self, offset: int, buf: memoryview) -> None:
        done = 0
        while done < len(buf):
            done += os.pwrite(self.fd, buf[done:], offset + done)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def allocated(self) -> int:
        """Bytes the file occupies on its file system (a sparse image: only what was written)."""
        return allocated_bytes(os.fstat(self.fd))

    def close(self) -> None:
        """Close the file, which releases the lock."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def lock_exclusive(fd: int, path: str) -> None:
    """An exclusive OFD write lock on the whole file, without waiting; ImageError if another holds one."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            raise ImageError(f"disk image {path} is in use by another VM (it holds the image's lock)") from None
        raise ImageError(f"cannot lock disk image {path}: {e.strerror or e}") from e
