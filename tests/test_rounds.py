"""agent/migration/rounds.py: what a round's wait for SyncAck counts as, for the bandwidth the policy uses."""

from __future__ import annotations

import pytest

from agent.migration.info import MigrationInfo
from agent.migration.rounds import MIN_MEASURED_BYTES, RoundBook


def one_round(held: float) -> tuple[RoundBook, MigrationInfo]:
    info = MigrationInfo(vm="v", direction="out")
    book = RoundBook(info)
    stat = book.begin([], info.started)
    stat.bytes = 4 * MIN_MEASURED_BYTES
    book.sent(stat, 0.1)  # 0.1 s to send
    book.synced(stat, waited=0.3, rtt=0.01, held=held)  # acknowledged 0.3 s later
    book.end(stat, dirty_bytes=0, elapsed=0.4)
    return book, info


def test_the_destinations_hold_for_its_warm_up_is_neither_bandwidth_nor_round_trip() -> None:
    book, info = one_round(held=0.25)
    (r,) = info.rounds
    assert r.seconds == pytest.approx(0.4) and r.held == pytest.approx(0.25) and r.sync_rtt == pytest.approx(0.01)
    # drained in 0.1 s of sending and 0.04 s of the wait: neither the 0.25 s hold nor the round trip
    assert book.bandwidth() == pytest.approx(4 * MIN_MEASURED_BYTES / 0.14)
    assert r.to_dict()["warm-up-wait"] == 250


def test_without_a_hold_the_whole_wait_past_the_round_trip_is_drain() -> None:
    book, info = one_round(held=0.0)
    assert book.bandwidth() == pytest.approx(4 * MIN_MEASURED_BYTES / 0.39)
    assert "warm-up-wait" not in info.rounds[0].to_dict()


def test_the_first_round_reports_a_rate_before_it_ends_and_the_rounds_own_figure_after() -> None:
    from agent.migration.pages import Batch

    info = MigrationInfo(vm="v", direction="out")
    book = RoundBook(info)
    stat = book.begin([(0, 1 << 30)], info.started - 2.0)  # a round that started 2 s ago
    book.count_batch(stat, Batch(ranges=[(0, 64 << 20)], data_bytes=64 << 20), wire=64 << 20)
    # 64 MiB over about 2 s, while the round runs (not 0 until it ends)
    assert 25e6 < info.bandwidth <= 34e6
    assert info.to_dict()["ram"]["mbps"] > 0
    book.sent(stat, 0.5)
    book.synced(stat, waited=0.0, rtt=0.0, held=0.0)
    book.end(stat, dirty_bytes=0, elapsed=0.5)
    assert info.bandwidth == pytest.approx((64 << 20) / 0.5)  # the round's measured figure from then on
    book.count_batch(book.begin([(0, 4096)], info.started), Batch(ranges=[(0, 4096)], data_bytes=4096), wire=4096)
    assert info.bandwidth == pytest.approx((64 << 20) / 0.5)  # later rounds leave it to their end
