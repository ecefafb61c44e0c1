"""The source's account of a migration's figures: what each round moved, what the policy is told,
where the downtime went.

The session decides when a round starts and ends; this module keeps the
figures in between apart from that sequence: the counters of every batch in
MigrationInfo, each round's RoundStat and the RoundEnd that tells the
destination about it, the bandwidth estimate, the ``Figures`` the
convergence policy (policy.decide) judges, and the downtime's breakdown and
summary. Nothing here does I/O.
"""

from __future__ import annotations

import time

from agent.migration import pages
from agent.migration.info import PAGE_SIZE, MigrationInfo, RoundStat
from agent.migration.policy import Figures
from proto.messages import RoundEnd
from vmruntime.dirty.ranges import Ranges

# A round (or a hashing spell) must move this much before its rate is trusted for the next estimate.
MIN_MEASURED_BYTES = 1 << 20


class RoundBook:
    """The rounds of one outgoing migration, kept in its MigrationInfo."""

    def __init__(self, info: MigrationInfo) -> None:
        self.info = info
        self._sent_bytes = 0  # over every round, for the overall bandwidth
        self._send_seconds = 0.0  # the time those bytes took, the Sync round trips left out
        self._saved_before = 0  # what compression had saved when the current round began

    def begin(self, ranges: Ranges, t0: float) -> RoundStat:
        """A round of ``ranges`` starts at ``t0`` (time.monotonic)."""
        self.info.remaining = pages.total_bytes(ranges)
        self._saved_before = self._saved()
        return RoundStat(start=t0 - self.info.started)

    def _saved(self) -> int:
        c = self.info.compression
        return c.raw_size - c.compressed_size if c is not None else 0

    def count_batch(self, stat: RoundStat, batch: pages.Batch, wire: int) -> None:
        """A batch of the round went out, ``wire`` bytes with its frame."""
        data_pages = batch.data_bytes // PAGE_SIZE
        zero_pages = batch.zero_bytes // PAGE_SIZE
        stat.pages += data_pages + zero_pages
        stat.zero_pages += zero_pages
        stat.bytes += wire
        info = self.info
        info.transferred += wire
        info.normal += data_pages
        info.duplicate += zero_pages
        info.remaining = max(0, info.remaining - batch.data_bytes - batch.zero_bytes)
        info.first_round_rate(stat.bytes, stat.start)

    def sent(self, stat: RoundStat, seconds: float) -> None:
        """Every batch of the round is out, after ``seconds``."""
        stat.seconds = seconds
        stat.saved = self._saved() - self._saved_before
        self._sent_bytes += stat.bytes + stat.saved
        self._send_seconds += seconds

    def synced(self, stat: RoundStat, waited: float, rtt: float, held: float = 0.0) -> None:
        """The destination acknowledged the round ``waited`` seconds after its Sync went out, having
        held the answer ``held`` seconds for its code warm-up (agent/migration/code_hint.py).

        The round's time includes the wait, the bandwidth only the drain, not
        the round trip (``rtt``): the policy's fixed downtime has that already,
        and counting it here makes a small round on a long path look slow
        (docs/PERFORMANCE.md section 10); nor the hold, which no page waited for.
        """
        stat.seconds += waited
        stat.held = min(max(held, 0.0), waited)
        stat.sync_rtt = min(waited - stat.held, rtt)
        self._send_seconds += waited - stat.held - stat.sync_rtt

    def bandwidth(self) -> float:
        """The lower of: bytes/s over all rounds, and of the latest round that moved enough to measure.

        The latest round predicts the next best (a dirty set of scattered pages
        goes much slower than round 0's long ranges, and the final copy is such
        a set), but a round that fits in the socket buffers looks faster than
        the link: the overall figure caps it. A round of a few pages is all
        fixed costs, so it does not count. Compressed batches count as the bytes they stand for:
        the policy weighs the pages left to send, not their compressed size.
        """
        overall = self._sent_bytes / self._send_seconds if self._send_seconds > 0 else 0.0
        for r in reversed(self.info.rounds):
            drain = r.seconds - r.sync_rtt - r.held
            if r.bytes + r.saved >= MIN_MEASURED_BYTES and drain > 0:
                return min(overall, (r.bytes + r.saved) / drain)
        return overall

    def end(self, stat: RoundStat, dirty_bytes: int, elapsed: float, final: bool = False) -> RoundEnd:
        """Record the round (``dirty_bytes`` left after it, ``elapsed`` seconds in all); returns
        the RoundEnd that tells the destination its figures."""
        stat.dirty_pages = dirty_bytes // PAGE_SIZE
        stat.final = final
        info = self.info
        info.rounds.append(stat)
        info.remaining = dirty_bytes
        info.bandwidth = self.bandwidth()
        rate = stat.dirty_pages / elapsed
        if not final:  # the paused guest dirties nothing: keep the last measured rate on display
            info.dirty_pages_rate = rate
        return RoundEnd(round=len(info.rounds) - 1, pages=stat.pages - stat.zero_pages,
                        zero_pages=stat.zero_pages, bytes_sent=stat.bytes, seconds=stat.seconds,
                        dirty_pages=stat.dirty_pages, dirty_rate=rate)

    def figures(self, *, dirty_bytes: int, earlier: tuple[int, ...], elapsed: float, throttle: int,
                hash_s: float, fixed_s: float, whole_bytes: int) -> Figures:
        """What the policy judges after a recorded round."""
        return Figures(rounds=len(self.info.rounds), remaining_bytes=dirty_bytes, earlier_remaining=earlier,
                       bandwidth=self.bandwidth(), dirty_rate=dirty_bytes / elapsed, throttle=throttle,
                       started=self.info.started, hash_s=hash_s, fixed_s=fixed_s, whole_bytes=whole_bytes)

    # -- the downtime ------------------------------------------------------------------------------
    def lap(self, part: str, since: float) -> float:
        """Record ``part`` of the downtime as the time since ``since``; returns now (time.monotonic)."""
        now = time.monotonic()
        self.info.breakdown[part] = now - since
        return now

    def note_downtime(self, bound_ms: float) -> None:
        """Never exceed the bound silently: the summary says by how much and where the time went."""
        info = self.info
        assert info.downtime_s is not None
        if info.throttle:
            info.summary += f"; auto-converge throttled the vCPU to {info.throttle}%"
        actual = info.downtime_s * 1000
        if actual <= bound_ms:
            return
        part, seconds = max(info.breakdown.items(), key=lambda kv: kv[1], default=("?", 0.0))
        info.summary += (f"; downtime {actual:.0f} ms exceeded the {bound_ms:g} ms bound "
                         f"(largest part: {part} {seconds * 1000:.0f} ms)")
