"""The source's RAM digest: kept current through pre-copy, finished in a thread during the final copy.

The digest both ends compare before COMMIT is paid for in the downtime
wherever it is not computed ahead. This module owns the three ways the
source keeps that share small, apart from the session's sequence of steps:

* pre-copy hashes what it can while the guest runs: the chunks each batch
  covered whole, while they are in the CPU cache (``hash_hot``), and at the
  start of the next round the chunks the last round sent and the guest left
  alone since (``hash_stable``). A chunk the guest writes afterwards shows up
  in the next harvest, which invalidates it again (``after_round``);
* the final copy hands the rest to a helper thread (``finish_meanwhile``),
  started ahead of the downtime (``start``), and guest RAM stays mapped until
  that thread is done (``release``);
* ``hash_time`` predicts the hashing left for the downtime from the fastest
  rate measured, for the convergence policy.
"""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from agent.migration import pages
from agent.migration.rounds import MIN_MEASURED_BYTES
from vmruntime.dirty.ranges import Ranges

# Upper bound on waiting for the digest thread when a migration fails mid-way.
DIGEST_WAIT_S = 60.0
# RAM digest bytes/s assumed until a round measured faster: below what xxh3 of 64 KiB chunks does on
# a current CPU (docs/PERFORMANCE.md section 6). Also the floor: a measurement under CPU contention must not make pre-copy look hopeless.
HASH_RATE_GUESS = 2e9


class SourceDigest:
    """The RAM digest of one outgoing migration and the thread that finishes it."""

    def __init__(self, memfd: int, ram: memoryview, mem: int) -> None:
        self._digest: pages.RamDigest | None = pages.RamDigest(memfd, ram, mem)
        self._future: Future[str] | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._hash_rate = HASH_RATE_GUESS  # bytes/s: the fastest measured, for hash_time
        self._stable: set[int] = set()  # chunks sent last round and not dirtied since: hashed next
        self.lock = threading.Lock()  # the digest's bookkeeping, while the streams' threads hash batches

    @property
    def _ram_digest(self) -> pages.RamDigest:
        assert self._digest is not None, "the digest was released"
        return self._digest

    def start(self, extents: Ranges) -> None:
        """Guest RAM outside ``extents`` (the memfd's written extents) is holes; start the thread.

        Called once dirty tracking is armed: a hole written from then on shows
        up in a harvest. The thread starts now, not at the final copy: starting
        a thread waits until it runs, time the downtime would pay on a busy
        host (docs/PERFORMANCE.md section 7).
        """
        self._ram_digest.assume_holes_except(extents)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ferry-digest")
        self._pool.submit(lambda: None)

    # -- pre-copy --------------------------------------------------------------------------------
    def hash_stable(self) -> None:
        """Hash the chunks the previous round sent and the guest then left alone (likely to stay so),
        those the batches did not hash whole already.

        Done at the start of the next round, not right after the harvest: when the policy switches
        over instead, the digest thread hashes them during the final copy, and the time between
        the harvest and the pause stays short. A chunk the guest writes meanwhile shows up in this
        round's harvest, which invalidates it again. Timed: the rate predicts the hashing in the
        downtime (see hash_time).
        """
        stable, self._stable = self._stable, set()
        t = time.monotonic()
        hashed = self._ram_digest.refresh_missing(stable) * pages.DIGEST_CHUNK
        seconds = time.monotonic() - t
        # A thread preempted mid-measure (a busy host) only ever looks slower than the hashing is:
        # the fastest sample of a meaningful size is the estimate, never below the guess.
        if hashed >= MIN_MEASURED_BYTES and seconds > 0:
            self._hash_rate = max(self._hash_rate, hashed / seconds)

    def hash_hot(self, batch: pages.Batch) -> None:
        """Hash the chunks this batch covered whole while they are still in the CPU cache.

        Valid even though the guest runs: a write after this point shows up in
        this round's harvest, which invalidates the chunk again. Called by the
        thread that sent the batch (with several streams, each stream's), before
        the round's end: the chunks inside a data range are hashed without the
        lock, which guards only the digest's bookkeeping.
        """
        digest = self._ram_digest
        whole = batch.ranges[(batch.ranges.ends - batch.ranges.starts) >= pages.DIGEST_CHUNK]
        hashed = []
        for a, b in whole:  # (shorter ranges hold no whole chunk)
            with digest.ram[a:b] as view:
                hashed.append(pages.chunk_digests(a, view))
        with self.lock:
            done: set[int] = set()
            for chunks, digests in hashed:
                done.update(digest.put_chunks(chunks, digests))
            digest.refresh_known(batch.ranges, batch.zeros, done)

    def after_round(self, sent: Ranges, dirty: Ranges, dirty_chunks: set[int]) -> None:
        """The round sent ``sent`` and the harvest found ``dirty``: forget what the guest wrote;
        what it left alone is hashed at the start of the next round."""
        self._ram_digest.invalidate(dirty, dirty_chunks)
        self._stable = pages.chunks_of(sent) - dirty_chunks

    def hash_time(self, chunks: set[int]) -> float:
        """Seconds to hash the digest ``chunks`` the remainder touches (each side does, in the
        downtime), at the fastest rate measured so far."""
        return len(chunks) * pages.DIGEST_CHUNK / self._hash_rate

    # -- the final copy --------------------------------------------------------------------------
    def finish_meanwhile(self, last: Ranges) -> Future[str]:
        """Finish the digest in the helper thread while the final pages go out (the VM is paused).

        xxhash keeps the GIL for inputs of a 64 KiB chunk (it lets go only for
        much larger ones), so the thread hashes while the sender waits in the
        kernel (sendmsg), not beside it: the overlap is partial. Hashing after
        the copy instead, the two ends' hashing overlapped and the downtime came
        out the same (docs/PERFORMANCE.md section 7).
        """
        digest = self._ram_digest
        digest.invalidate(last)
        assert self._pool is not None, "start() first"
        self._future = fut = self._pool.submit(digest.hexdigest)
        return fut

    def release(self) -> None:
        """Let go of guest RAM: the digest thread reads it through the session's view, so it
        finishes first (bounded). Idempotent."""
        if self._future is not None:
            with contextlib.suppress(Exception):
                self._future.result(DIGEST_WAIT_S)
            self._future = None
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
        self._digest = None
