"""The "uffd-wp-sync" backend: synchronous userfaultfd write-protect, faults handled here.

The VM process registered guest RAM for write-protect (without WP_ASYNC) and
handed the fd over. Once armed, the first write to a protected page blocks
the writing vCPU and queues a fault message on the uffd. A handler thread of
this tracker reads the messages, records the pages and un-protects them,
which wakes the writer. A thread (not an event loop reader) so the tracker
works the same in the agent, in tests and in benchmarks.

Atomicity: the handler records and un-protects under one lock; harvest takes
the recorded set and re-protects those pages under the same lock. A write
that lands between the swap and the re-protect goes to a page that is in the
harvested set, and the caller reads its content after harvest returns; a
write after the re-protect faults again and is recorded for the next harvest.
Holding the lock across both steps keeps a late "un-protect" from the
handler from ever undoing a harvest's re-protect of a page it did not record.

Teardown: ``stop()`` un-protects and unregisters everything (which wakes
every blocked writer) before it closes the fd. If the agent dies instead, the
kernel releases the uffd with its last reference and wakes the writers too,
provided the VM process closed its own copy after sending it (see
:mod:`.register`).
"""

from __future__ import annotations

import os
import select
import struct
import threading

from . import _uapi
from .extents import PAGE_SIZE, bitmap_ranges, pages_to_ranges
from .names import UFFD_WP_SYNC
from .ranges import Ranges

# Fault messages read per read(2); each is 32 bytes.
_MSGS_PER_READ = 256
_FAULT = struct.Struct("=B3xI QQ 8x")  # event, reserved, then pagefault.flags, pagefault.address
assert _FAULT.size == _uapi.UFFD_MSG_SIZE
# Above this many ranges, harvest re-protects their whole span in one ioctl.
_SPAN_THRESHOLD = 16


class UffdSyncTracker:
    """Dirty tracker for one VM over a synchronous write-protect userfaultfd.

    Works on its own duplicate of ``uffd`` (closed in ``stop()``); the caller
    keeps and closes the fd it passed in.
    """

    name = UFFD_WP_SYNC
    hot_blocks = False  # uffd-wp-async only (DirtyTracker): ignored here
    whole_bytes = 0

    def __init__(self, *, pid: int, uffd: int, addr: int, length: int) -> None:
        self.pid = pid
        self.uffd = os.dup(uffd)
        self.addr = addr
        self.length = length
        self._lock = threading.Lock()
        # One byte per guest page, 1 = written since the last harvest: cheap to
        # set per fault, and turned into ranges at C speed (bitmap_ranges).
        self._dirty = bytearray(length // PAGE_SIZE)
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._thread: threading.Thread | None = None
        self.faults = 0  # write-protect faults handled, in pages (for benchmarks and diagnostics)
        self._error: BaseException | None = None  # why the handler thread died, if it did
        self._unwp = _uapi.UffdioWriteprotect(range=_uapi.UffdioRange(0, PAGE_SIZE), mode=0)

    def start(self) -> None:
        """Start the fault handler, then write-protect all of guest RAM."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"uffd-wp-sync-{self.pid}", daemon=True)
            self._thread.start()
        _uapi.uffd_writeprotect(self.uffd, self.addr, self.length, protect=True)

    def harvest(self) -> Ranges:
        """Guest ranges written since start()/the last harvest; re-protected before returning."""
        with self._lock:
            if self._stopping:  # checked under the lock: never re-protect with no handler left
                raise RuntimeError(f"uffd-wp-sync tracker is stopped (handler error: {self._error!r})")
            if self._dirty.find(1) == -1:
                return Ranges.empty()
            taken, self._dirty = self._dirty, bytearray(len(self._dirty))
            ranges = bitmap_ranges(taken)
            self._reprotect(ranges)
        return Ranges.from_pairs(ranges)

    def _reprotect(self, ranges: list[tuple[int, int]]) -> None:
        """Write-protect ``ranges`` again; called with the lock held.

        Under the lock the recorded pages are exactly the un-protected ones, so
        protecting the whole span from the first to the last range touches no
        page it should not: one ioctl instead of one per range when there are many.
        """
        if len(ranges) > _SPAN_THRESHOLD:
            ranges = [(ranges[0][0], ranges[-1][1])]
        for start, end in ranges:
            _uapi.uffd_writeprotect(self.uffd, self.addr + start, end - start, protect=True)

    def stop(self) -> None:
        """Un-protect and unregister (waking every blocked writer), stop the handler, close fds."""
        if self.uffd < 0:
            return
        with self._lock:
            self._stopping = True
            _quietly_writeprotect_off(self.uffd, self.addr, self.length)
            try:
                _uapi.uffd_unregister(self.uffd, self.addr, self.length)
            except OSError:
                pass  # the VM process is gone: nothing to unregister
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join()
        for fd in (self.uffd, self._wake_r, self._wake_w):
            os.close(fd)
        self.uffd = -1

    # ---- the handler thread ----

    def _run(self) -> None:
        try:
            self._serve_faults()
        except BaseException as e:  # never leave a writer blocked behind a dead handler
            self._error = e
            self._fail_open()

    def _fail_open(self) -> None:
        """The handler cannot go on: stop protecting, so the guest runs on; harvest will raise."""
        with self._lock:
            self._stopping = True
            _quietly_writeprotect_off(self.uffd, self.addr, self.length)

    def _serve_faults(self) -> None:
        poller = select.poll()
        poller.register(self.uffd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self._wake_r in ready:
                return
            try:
                data = os.read(self.uffd, _FAULT.size * _MSGS_PER_READ)
            except (BlockingIOError, InterruptedError):
                continue  # another reader or a spurious wakeup
            self._handle(data)

    def _handle(self, data: bytes) -> None:
        """Record the write-faulted pages and un-protect them, which wakes their writers."""
        pages = self._fault_pages(data)
        with self._lock:
            if self._stopping:
                return  # stop() already un-protected everything
            for page in pages:
                self._dirty[page] = 1
            self.faults += len(pages)
            if len(pages) == 1:  # the common case, one vCPU: skip the range building
                self._unprotect_page(next(iter(pages)))
                return
            for start, end in pages_to_ranges(pages):
                _quietly_writeprotect_off(self.uffd, self.addr + start, end - start)

    def _unprotect_page(self, page: int) -> None:
        """Un-protect one page and wake its writer, reusing one ioctl argument (handler thread only)."""
        self._unwp.range.start = self.addr + page * PAGE_SIZE
        try:
            _uapi.ioctl(self.uffd, _uapi.UFFDIO_WRITEPROTECT, self._unwp)
        except OSError:
            pass  # the VM process is gone

    def _fault_pages(self, data: bytes) -> set[int]:
        pages: set[int] = set()
        for off in range(0, len(data) - _FAULT.size + 1, _FAULT.size):
            event, _, flags, address = _FAULT.unpack_from(data, off)
            if event == _uapi.UFFD_EVENT_PAGEFAULT and flags & _uapi.UFFD_PAGEFAULT_FLAG_WP:
                pages.add((address - self.addr) // PAGE_SIZE)  # within the range: only it is registered
        return pages


def _quietly_writeprotect_off(uffd: int, start: int, length: int) -> None:
    """Un-protect and wake, ignoring a VM process that has exited (its mm is gone)."""
    try:
        _uapi.uffd_writeprotect(uffd, start, length, protect=False)
    except OSError:
        pass
