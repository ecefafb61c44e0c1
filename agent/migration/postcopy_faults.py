"""Post-copy's destination half in the agent: the guest's page faults served, and the received map.

A VM running on the destination before all its pages arrived touches pages it does not have;
its VM process registered guest RAM for userfaultfd MISSING faults (vmruntime/postcopy.py,
``postcopy-register``) and handed the agent the uffd. :class:`FaultServer` owns that uffd in
the agent and keeps the *received map*, one byte per guest page:

- ``MISSING``: the destination has no data for it (a hole of the memfd);
- ``REQUESTED``: missing, and asked of the :class:`PageSource` (the source, later over the
  migration's return channel); its answer comes back through :meth:`FaultServer.place`;
- ``PRESENT``: installed (received in pre-copy, or placed since);
- ``ZERO``: known to read as zero and left a hole (zero pages travel as ranges without data,
  docs/protocol.md; :meth:`FaultServer.mark_zero`): installed with UFFDIO_ZEROPAGE only if the
  guest touches it.

A fault on a present page only wakes the thread (it raced an install; a hole there means the map
was wrong: the page is asked for), on a zero page
installs a zero page, on a missing page asks the source for it (and up to ``readahead`` missing
pages after it: a guest that touched one page soon touches the next); a fault on a requested
page waits for the answer already asked for. Pages arrive by :meth:`place`, for an answer or a
background push alike, installed with UFFDIO_COPY: atomically per page, never over a page that is
there already (the kernel answers EEXIST: that copy is dropped and counted, the guest keeps the
page it has). :meth:`discard` makes pages missing again (the source's last dirty pages, whose
copies here are stale): their holes are punched in the memfd, so the guest's next touch faults.

Threads (docs/ARCHITECTURE.md, threads and the event loop): :meth:`serve` runs in a migration
session thread, a blocking poll on the uffd with a timeout, never on the event loop; ``place``,
``discard`` and the queries may be called from any other thread (the one receiving pages). One
lock orders them: a page's state and its install change together, so a discard can never leave
the map saying "present" over a hole (a fault there would be woken forever, never served).

MINOR mode (guest RAM registered MISSING|MINOR, ``Registered.minor``; vmruntime/postcopy.py): a
discarded page is not punched. Its stale copy stays in the page cache, *cached* in a second map,
and no entry of the VM's mapping points at it (the registration zapped them), so the guest's
first touch faults MINOR. Such a page is missing all the same (asked for, pushed), but arrives
by writing the fresh copy into the memfd and mapping it with UFFDIO_CONTINUE: it cannot be
copied in (the page cache has it), and it is written only while the guest cannot see it. A
MINOR fault on a present page (up to date in the page cache, not mapped yet) is answered with
UFFDIO_CONTINUE at once, without the source; :meth:`FaultServer.map_present` maps all of them
in bulk, one UFFDIO_CONTINUE per contiguous range, once the guest runs.

Counters follow QEMU's names (docs/CONTRACTS.md): ``postcopy-requests``, ``postcopy-blocktime``
(milliseconds the faulting threads waited, summed, from the fault's read to its page installed),
``postcopy-vcpu-blocktime`` (the same per faulting thread), and the request latency (a request's
first page, asked to installed) at p50 and p99.
"""

from __future__ import annotations

import collections
import ctypes
import os
import select
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from agent.migration import page_maps
from vmruntime.postcopy import Fault, MissingPages, PostcopyError, Registered, punch

_ZEROS = bytes(1 << 20)  # a stale page settled as zero is written from here
MAP_CHUNK_PAGES = 2048  # map_present's pages per lock hold: faults are served between chunks

PAGE_SIZE = 4096
MISSING, REQUESTED, PRESENT, ZERO = 0, 1, 2, 3
STATE_NAMES = ("missing", "requested", "present", "zero")
LATENCY_SAMPLES = 65536  # latency samples kept (the newest): bounded memory however long it runs
MAX_READAHEAD = 255

Range = tuple[int, int]
# bytes.translate tables: a state byte -> 1 where the state is the one wanted, else 0.
_IS = [bytes(1 if i == state else 0 for i in range(256)) for state in range(4)]
_UNSETTLED = bytes(1 if i in (MISSING, REQUESTED) else 0 for i in range(256))
_MISSING_TO_ZERO = bytes([ZERO, *range(1, 256)])


class PageSource(Protocol):
    """Where missing pages come from: the source host, over the migration's return channel.

    ``request`` asks for ``npages`` pages from guest offset ``offset``; it must not block on the
    answer (it runs in the fault-serving thread): the answer comes later, from any thread, as
    FaultServer.place calls. Asked again for pages already asked (a recovery re-asks the pages in
    flight), the source sends them again; duplicates are dropped on arrival.
    """

    def request(self, offset: int, npages: int) -> None: ...


class BadPages(ValueError):
    """Refused input: a range outside guest RAM or not page aligned, a fault outside the
    registered range, or pages arriving after the post-copy ended. Nothing was changed."""


class FaultServer:
    """The destination's userfaultfd and received map of one post-copy migration.

    ``registered``: the VM process's reply to ``postcopy-register`` (its uffd becomes this
    object's: closed by done or close). ``memfd``: guest RAM's memfd (discard punches it).
    ``present`` / ``zero``: ranges the destination holds data for / knows to be zero already
    (what pre-copy delivered); everything else starts missing. ``stale``: ranges discarded at once
    (:meth:`discard`: punched, or in MINOR mode left cached). ``stale_map``: one byte per page,
    non-zero where the copy here is stale, made missing as by discard, except that outside MINOR
    mode the caller punched them already.
    """

    def __init__(self, registered: Registered, memfd: int, source: PageSource, *,
                 present: Iterable[Range] = (), zero: Iterable[Range] = (), stale: Iterable[Range] = (),
                 stale_map: bytes | bytearray | None = None, readahead: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        if not 0 <= readahead <= MAX_READAHEAD:
            raise ValueError(f"readahead must be 0-{MAX_READAHEAD} pages, got {readahead}")
        self.size = registered.length
        self.pages = MissingPages(registered.uffd, registered.addr, registered.length)
        self.memfd = memfd
        self.minor = registered.minor
        self.source = source
        self.readahead = readahead
        self._clock = clock
        self._uffd = registered.uffd
        self._lock = threading.Lock()
        self._settled_all = threading.Condition(self._lock)
        self._closed = False
        self._ended: str | None = None  # why pages are refused from now on ("done", "closed")
        self._map = bytearray(self.size // PAGE_SIZE)
        self._cached = bytearray(len(self._map))  # MINOR mode: 1 where the page cache holds a stale copy
        self._set_state(zero, ZERO)
        self._set_state(present, PRESENT)
        self._unsettled = self._map.translate(_UNSETTLED).count(1)
        self._asked_at: dict[int, float] = {}   # first page of a request -> when it was asked
        self._fault_at: dict[int, tuple[float, int]] = {}  # faulted page -> (when read, thread id)
        self.latencies: collections.deque[float] = collections.deque(maxlen=LATENCY_SAMPLES)
        self.vcpu_blocktime: dict[int, float] = {}  # thread id -> seconds blocked
        self.counts = dict.fromkeys(("faults", "requests", "requested-pages", "placed", "duplicate", "zero-installed",
                                     "woken", "refetched", "discarded", "outside", "continued",
                                     "stale-mapped"), 0)
        self.blocktime = 0.0
        if stale_map is not None:
            if len(stale_map) != len(self._map):
                raise BadPages(f"stale map of {len(stale_map)} pages for guest RAM of {len(self._map)}")
            self.counts["discarded"] += self._mark_stale(np.frombuffer(stale_map, np.uint8).astype(bool))
        if stale:
            self.discard(stale)

    def _mark_stale(self, hit: npt.NDArray[np.bool_]) -> int:
        """Pages where ``hit`` is True become missing (requested ones stay requested); in MINOR mode
        present ones are cached (their stale copies stay in the page cache). Vectorised: the
        switch-over's stale set is tens of thousands of ranges, marked while the VM is paused.
        Returns the pages that were present or zero. The caller holds the lock (or owns the map)."""
        states = np.frombuffer(self._map, np.uint8)
        try:
            was_present = hit & (states == PRESENT)
            gone = int(np.count_nonzero(was_present | (hit & (states == ZERO))))
            states[hit & (states != REQUESTED)] = MISSING
        finally:
            del states  # the map must not stay exported
        if self.minor:
            cached = np.frombuffer(self._cached, np.uint8)
            cached[was_present] = 1
            del cached
        self._unsettled += gone
        return gone

    def _set_state(self, ranges: Iterable[Range], state: int) -> None:
        for start, end in ranges:
            self._check_range(start, end, "initial range")
            self._map[start // PAGE_SIZE:end // PAGE_SIZE] = bytes([state]) * ((end - start) // PAGE_SIZE)

    # -- serving faults (the session thread) --

    def serve(self, stop: threading.Event, poll_s: float = 0.05,
              readers: Mapping[int, Callable[[], None]] | None = None) -> None:
        """Serve faults until ``stop`` is set or the server ends (done, close). BadPages if the
        kernel reports a fault outside the registered range.

        ``readers``: more fds polled in the same wait, each with the call to make when it is
        readable (in this thread, without the lock). The socket the source's answers arrive on
        can be read here, and its pages placed, without a hop to another thread per answer.

        Settled is not the end: zero pages left as holes still fault until done() unregisters
        guest RAM, so the session calls done() (from any thread) once wait_complete() says so.
        """
        others = dict(readers or {})
        poller = select.poll()
        poller.register(self._uffd, select.POLLIN)
        for fd in others:
            poller.register(fd, select.POLLIN)
        while not stop.is_set():
            with self._lock:
                if self._closed:
                    return
            for fd, flags in poller.poll(poll_s * 1000):
                if fd in others:
                    others[fd]()
                elif flags & (select.POLLERR | select.POLLNVAL):
                    with self._lock:
                        if self._closed:  # done() or close() from another thread, during the poll
                            return
                    raise PostcopyError("the userfaultfd reports an error (not a non-blocking uffd?)")
                else:
                    self.serve_ready()

    def serve_ready(self) -> int:
        """Handle the fault messages waiting (without blocking); returns how many."""
        with self._lock:
            if self._closed:
                return 0
            faults, outside = self.pages.read_faults()
        for fault in faults:
            self.handle_fault(fault)
        if outside:  # after the faults in range: their threads are not left waiting
            with self._lock:
                self.counts["outside"] += len(outside)
            raise BadPages(f"fault at 0x{outside[0]:x}, outside the registered guest RAM "
                           f"[0x{self.pages.addr:x}, 0x{self.pages.addr + self.size:x})")
        return len(faults)

    def handle_fault(self, fault: Fault) -> None:
        """Serve one fault: wake, install a zero page, or ask the source (outside the lock)."""
        offset = fault.offset
        if not 0 <= offset < self.size or offset % PAGE_SIZE:
            with self._lock:
                self.counts["outside"] += 1
            raise BadPages(f"fault at guest offset 0x{offset:x}, outside guest RAM of {self.size} bytes")
        page = offset // PAGE_SIZE
        ask = 0
        with self._lock:
            if self._closed:
                return
            self.counts["faults"] += 1
            now = self._clock()
            state = self._map[page]
            if fault.minor and state != PRESENT:  # the page cache has it: written, then continued
                self._cached[page] = 1
            if state == PRESENT and not fault.minor and self._is_hole(offset):
                # The map said present over a hole (a caller's wrong `present`): woken, the
                # thread would fault again at once, forever. Ask for the page instead.
                self.counts["refetched"] += 1
                self._map[page] = MISSING
                self._unsettled += 1
                state = MISSING
            if state == PRESENT and fault.minor:  # up to date, not mapped yet: no need of the source
                self.counts["continued"] += 1
                self.pages.cont(offset, PAGE_SIZE)
            elif state == PRESENT:
                self.counts["woken"] += 1
                self.pages.wake(offset, PAGE_SIZE)
            elif state == ZERO:
                self._fault_at.setdefault(page, (now, fault.tid))
                self._install_zero(page)
            else:
                self._fault_at.setdefault(page, (now, fault.tid))
                if state == MISSING:
                    ask = self._mark_requested(page, now)
        if ask:
            self.source.request(offset, ask)

    def _is_hole(self, offset: int) -> bool:
        try:
            return os.lseek(self.memfd, offset, os.SEEK_DATA) != offset
        except OSError:  # ENXIO: no data from offset on
            return True

    def _mark_requested(self, page: int, now: float) -> int:
        """Mark the missing run from ``page`` (up to 1 + readahead pages) requested; its length."""
        limit = min(len(self._map), page + 1 + self.readahead)
        end = page + 1
        while end < limit and self._map[end] == MISSING:
            end += 1
        self._map[page:end] = bytes([REQUESTED]) * (end - page)
        self._asked_at[page] = now
        self.counts["requests"] += 1
        self.counts["requested-pages"] += end - page
        return end - page

    def _install_zero(self, page: int) -> None:
        offset = page * PAGE_SIZE
        if self._cached[page]:
            self.counts["zero-installed"] += self._write_cached(page, page + 1, None)
            self._settled(page, page + 1, self._clock())
            return
        existed = self.pages.zero(offset, PAGE_SIZE)
        if existed:  # the memfd had the page after all: it stays as it is
            self.counts["duplicate"] += 1
        else:
            self.counts["zero-installed"] += 1
        self._settled(page, page + 1, self._clock())

    def _settled(self, first: int, end: int, now: float) -> None:
        """Pages [first, end) are installed: mark them present, account the waits they end."""
        before = self._map[first:end].translate(_UNSETTLED).count(1)
        self._map[first:end] = bytes([PRESENT]) * (end - first)
        self._unsettled -= before
        if before and not self._unsettled:
            self._settled_all.notify_all()
        if self._asked_at:
            for page in [p for p in self._asked_at if first <= p < end]:
                self.latencies.append(now - self._asked_at.pop(page))
        if self._fault_at:
            for page in [p for p in self._fault_at if first <= p < end]:
                at, tid = self._fault_at.pop(page)
                self.blocktime += now - at
                self.vcpu_blocktime[tid] = self.vcpu_blocktime.get(tid, 0.0) + now - at

    # -- pages arriving (any thread) --

    def place(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Install pages at ``offset`` (an answer to a request, or a background push); returns how
        many were installed. Pages present already are left untouched and counted (``duplicate``);
        BadPages for a range outside guest RAM, not page aligned, or after the post-copy ended."""
        view = memoryview(data).cast("B")
        length = len(view)
        self._check_range(offset, offset + length, "placed pages")
        if view.readonly:  # ctypes needs a writable buffer to take its address; copy once
            view = memoryview(bytearray(view))
        buf = (ctypes.c_char * length).from_buffer(view)
        try:
            src = ctypes.addressof(buf)
            with self._lock:
                self._check_open("place")
                return self._place_locked(offset, src, length, view)
        finally:
            del buf

    def _place_locked(self, offset: int, src: int, length: int, view: memoryview) -> int:
        first, end = offset // PAGE_SIZE, (offset + length) // PAGE_SIZE
        installed = 0
        for a, b in _runs_not(self._map, first, end, PRESENT):
            runs = [(a, b, False)]
            if self.minor and 1 in self._cached[a:b]:
                runs = sorted([(c, d, True) for c, d in _runs_not(self._cached, a, b, 0)]
                              + [(c, d, False) for c, d in _runs_not(self._cached, a, b, 1)])
            for c, d, cached in runs:
                if cached:
                    installed += self._write_cached(c, d, view[(c - first) * PAGE_SIZE:(d - first) * PAGE_SIZE])
                    continue
                existed = self.pages.copy(c * PAGE_SIZE, src + (c - first) * PAGE_SIZE, (d - c) * PAGE_SIZE)
                installed += d - c - sum(e - s for s, e in existed) // PAGE_SIZE
            self._settled(a, b, self._clock())
        self.counts["duplicate"] += (end - first) - installed  # present already: never overwritten
        self.counts["placed"] += installed
        return installed

    def _write_cached(self, first: int, end: int, data: memoryview | None) -> int:
        """MINOR mode: pages [first, end), whose stale copies the guest cannot see, get ``data``
        (None: zeros) written into the memfd, then are mapped (UFFDIO_CONTINUE, waking their
        waiters). Returns how many; a page mapped already (the invariant broken: written while
        visible) is counted ``stale-mapped``."""
        at, stop = first * PAGE_SIZE, end * PAGE_SIZE
        while at < stop:
            n = min(stop - at, len(_ZEROS))
            chunk = _ZEROS[:n] if data is None else data[at - first * PAGE_SIZE:at - first * PAGE_SIZE + n]
            if os.pwrite(self.memfd, chunk, at) != n:
                raise PostcopyError(f"short write into guest RAM at 0x{at:x}")
            at += n
        self._cached[first:end] = bytes(end - first)
        mapped = sum(e - s for s, e in self.pages.cont(first * PAGE_SIZE, (end - first) * PAGE_SIZE)) // PAGE_SIZE
        self.counts["stale-mapped"] += mapped
        return end - first - mapped

    def map_present(self, chunk_pages: int = MAP_CHUNK_PAGES) -> int:
        """MINOR mode: map every present page into the VM's mapping, one UFFDIO_CONTINUE per
        contiguous range (``chunk_pages`` at most per lock hold), so the guest does not fault once
        per page that was up to date all along. Returns the pages mapped (0 outside MINOR mode)."""
        if not self.minor:
            return 0
        mapped = 0
        for a, b in self.ranges(PRESENT):
            for at in range(a, b, chunk_pages * PAGE_SIZE):
                n = min(b - at, chunk_pages * PAGE_SIZE)
                with self._lock:
                    if self._closed:
                        return mapped
                    try:
                        done = n // PAGE_SIZE - sum(e - s for s, e in self.pages.cont(at, n)) // PAGE_SIZE
                    except PostcopyError:
                        # A page the map calls present is a hole (a caller's wrong `present`), or the
                        # VM process is gone: the faults are served one by one (a hole refetched), or fail.
                        return mapped
                    self.counts["continued"] += done
                mapped += done
        return mapped

    def mark_zero(self, ranges: Iterable[Range]) -> int:
        """Zero pages arriving (the background push's zero grains, which travel without data):
        missing pages become ``zero`` (left holes, installed only if touched), requested ones get
        their zero page now (a thread waits for it); present ones are left as they are and
        counted (``duplicate``). All ranges are checked first. Returns the pages newly settled."""
        todo = list(ranges)
        for start, end in todo:
            self._check_range(start, end, "zero range")
        settled = 0
        with self._lock:
            self._check_open("mark_zero")
            for start, end in todo:
                first, last = start // PAGE_SIZE, end // PAGE_SIZE
                if self.minor:  # stale copies in the page cache: zeros written over them at once
                    for a, b in _runs_not(self._cached, first, last, 0):
                        self.counts["zero-installed"] += self._write_cached(a, b, None)
                        settled += b - a
                        self._settled(a, b, self._clock())
                chunk = self._map[first:last]
                self.counts["duplicate"] += chunk.count(PRESENT)
                missing = chunk.count(MISSING)
                requested = _positions(chunk, REQUESTED)
                self._map[first:last] = chunk.translate(_MISSING_TO_ZERO)
                self._unsettled -= missing
                for i in requested:
                    self._install_zero(first + i)
                settled += missing + len(requested)
            if not self._unsettled:
                self._settled_all.notify_all()
        return settled

    def discard(self, ranges: Iterable[Range]) -> int:
        """Make ``ranges`` missing again: the destination's copies are stale (the source's last
        dirty pages). Their holes are punched in the memfd (in MINOR mode, present pages stay in
        the page cache, cached), so the guest's next touch faults and is served afresh. All
        ranges are checked before any is applied. Returns the pages that were present or zero
        (requested ones stay requested: the answer asked for is fresh).

        Meant for the switch-over, before the guest runs here or the source pushes pages (in
        MINOR mode also before map_present: a page the VM's mapping shows would never fault).
        """
        todo = list(ranges)
        for start, end in todo:
            self._check_range(start, end, "discarded range")
        discarded = 0
        with self._lock:
            self._check_open("discard")
            if self.minor:  # nothing to punch: the map alone changes, all ranges at once
                discarded = self._mark_stale(page_maps.covered(todo, len(self._map)))
                todo = []
            for start, end in todo:
                first, last = start // PAGE_SIZE, end // PAGE_SIZE
                punch(self.memfd, start, end - start)
                for a, b in _runs_not(self._map, first, last, REQUESTED):
                    gone = self._map[a:b].translate(_UNSETTLED).count(0)
                    discarded += gone
                    self._unsettled += gone
                    self._map[a:b] = bytes(b - a)  # MISSING
            self.counts["discarded"] += discarded
        return discarded

    # -- the end --

    @property
    def complete(self) -> bool:
        """Every page is present or known zero: no fault can need the source any more."""
        return self._unsettled == 0

    def wait_complete(self, timeout: float | None = None) -> bool:
        """Wait until every page is settled (or ``timeout`` seconds); whether it is."""
        with self._lock:
            return self._settled_all.wait_for(lambda: not self._unsettled, timeout)

    def done(self) -> dict[str, Any]:
        """Every page settled: unregister guest RAM (zero pages left as holes read as zeros from
        then on, which they are), close the uffd; later pages are refused. Returns the stats.
        RuntimeError while pages are missing or requested (nothing is changed)."""
        with self._lock:
            self._check_open("done")
            if self._unsettled:
                raise RuntimeError(f"post-copy not complete: {self._unsettled} pages missing or requested")
            self.pages.unregister()
            self._close_locked("done")
        return self.stats()

    def close(self) -> None:
        """Abandon: close the uffd without unregistering (the VM process's copy keeps guest RAM
        registered: a vCPU touching a hole blocks rather than reads zeros). Idempotent."""
        with self._lock:
            if not self._closed:
                self._close_locked("closed")

    def _close_locked(self, why: str) -> None:
        self._closed = True
        self._ended = why
        os.close(self._uffd)

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise BadPages(f"{what} after the post-copy ended ({self._ended})")

    def _check_range(self, start: int, end: int, what: str) -> None:
        if start % PAGE_SIZE or end % PAGE_SIZE:
            raise BadPages(f"{what} [0x{start:x}, 0x{end:x}) is not page aligned")
        if not 0 <= start < end <= self.size:
            raise BadPages(f"{what} [0x{start:x}, 0x{end:x}) is empty or outside guest RAM of {self.size} bytes")

    # -- queries --

    def state(self, offset: int) -> str:
        """The received map's state of the page holding guest offset ``offset``."""
        return STATE_NAMES[self._map[offset // PAGE_SIZE]]

    def ranges(self, state: int) -> list[Range]:
        """The ranges of pages in ``state`` (e.g. REQUESTED: the pages in flight, which a
        recovered link asks for again; MISSING: what the background push has still to send)."""
        with self._lock:
            mask = self._map.translate(_IS[state])
        return _bitmap_ranges(mask)

    def received_map(self) -> bytes:
        """A copy of the received map (one state byte per page)."""
        with self._lock:
            return bytes(self._map)

    def stats(self) -> dict[str, Any]:
        """Counters with QEMU's names where it has one; times in milliseconds."""
        with self._lock:
            lat = sorted(self.latencies)
            counts = dict(self.counts)
            blocktime = self.blocktime
            per_thread = dict(self.vcpu_blocktime)
            missing = self._unsettled
        return {
            "postcopy-requests": counts["requests"],
            "postcopy-blocktime": round(blocktime * 1000, 3),
            "postcopy-vcpu-blocktime": [round(per_thread[t] * 1000, 3) for t in sorted(per_thread)],
            "postcopy-latency-p50": _percentile(lat, 0.50),
            "postcopy-latency-p99": _percentile(lat, 0.99),
            "postcopy-faults": counts["faults"],
            "pages-requested": counts["requested-pages"],
            "pages-placed": counts["placed"],
            "pages-duplicate": counts["duplicate"],
            "pages-zero": counts["zero-installed"],
            "pages-woken": counts["woken"],
            "pages-discarded": counts["discarded"],
            "pages-refetched": counts["refetched"],
            "pages-continued": counts["continued"],
            "pages-stale-mapped": counts["stale-mapped"],
            "postcopy-mode": "minor" if self.minor else "punch",
            "pages-unsettled": missing,
            "faults-outside": counts["outside"],
        }


def _percentile(sorted_s: list[float], q: float) -> float | None:
    """The q-quantile of sorted seconds, in milliseconds (nearest rank); None without samples."""
    if not sorted_s:
        return None
    return round(sorted_s[min(len(sorted_s) - 1, int(q * len(sorted_s)))] * 1000, 3)


def _runs_not(states: bytearray, first: int, end: int, state: int) -> list[tuple[int, int]]:
    """The runs of pages in [first, end) whose state is not ``state``, as page-number ranges."""
    mask = states[first:end].translate(_IS[state])  # 1: in ``state``
    out: list[tuple[int, int]] = []
    pos = mask.find(0)
    while pos != -1:
        stop = mask.find(1, pos)
        stop = len(mask) if stop == -1 else stop
        out.append((first + pos, first + stop))
        pos = mask.find(0, stop)
    return out


def _positions(states: bytearray, state: int) -> list[int]:
    out: list[int] = []
    pos = states.find(state)
    while pos != -1:
        out.append(pos)
        pos = states.find(state, pos + 1)
    return out


def _bitmap_ranges(mask: bytes | bytearray) -> list[Range]:
    out: list[Range] = []
    pos = mask.find(1)
    while pos != -1:
        stop = mask.find(0, pos)
        stop = len(mask) if stop == -1 else stop
        out.append((pos * PAGE_SIZE, stop * PAGE_SIZE))
        pos = mask.find(1, stop)
    return out


__all__ = ["MISSING", "PRESENT", "REQUESTED", "ZERO", "BadPages", "FaultServer", "PageSource", "PostcopyError"]
