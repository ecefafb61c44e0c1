"""Unit tests of bench/bench_net.py's reading of the client's log: blackout, latency, losses, pings.

Pure functions only; the bench itself runs under ``make bench``.
"""

from __future__ import annotations

import pytest

from bench.bench_net import blackout, blackout_text, first_failure, pings_in, plan, window_stats

# [send, answer or None, retries], as bench/net_client.py logs them, sorted by send
LOG = [
    [1.000, 1.0005, 0],
    [1.001, 1.0015, 0],
    [1.002, 1.065, 3],  # first try lost, answered on the last retry
    [1.003, None, 3],  # lost after every retry
    [1.004, 1.045, 2],
    [1.005, 1.0502, 0],  # the first answer on a first try after the failure
    [1.006, 1.0510, 0],
]


def test_blackout_runs_from_the_first_failed_first_try_to_the_next_first_try_answer() -> None:
    assert first_failure(LOG, 1.0, 2.0) == 1.002
    assert blackout(LOG, 1.0, 2.0) == pytest.approx(1.0502 - 1.002)
    # a failure before the window is not this migration's
    assert first_failure(LOG, 1.0045, 2.0) is None
    assert blackout(LOG, 1.0045, 2.0) == 0.0


def test_blackout_without_a_later_first_try_answer_is_unknown() -> None:
    assert blackout(LOG[:5], 1.0, 2.0) is None
    assert blackout_text(None) == "> 10 s"
    assert blackout_text(12.34) == "12.3"


def test_window_stats_latency_and_losses() -> None:
    stats = window_stats(LOG, 1.0, 1.0045)
    assert stats["requests"] == 5
    assert stats["lost_first_try"] == 3 and stats["lost_after_retries"] == 1
    # answered ones only, retries included: 0.5, 0.5, 41, 63 ms
    assert stats["p50_ms"] == pytest.approx(41.0)
    assert stats["p99_ms"] == stats["max_ms"] == pytest.approx(63.0)
    empty = window_stats(LOG, 5.0, 6.0)
    assert empty == {"requests": 0, "p50_ms": None, "p99_ms": None, "max_ms": None, "lost_first_try": 0,
                     "lost_after_retries": 0}


def test_pings_in_a_window() -> None:
    pings = [[0.5, True], [1.0, True], [1.01, False], [1.02, False], [1.03, True], [3.0, False]]
    assert pings_in(pings, 1.0, 2.0) == (4, 2)
    assert pings_in(pings, 4.0, 5.0) == (0, 0)


def test_plan_alternates_default_and_no_hint_two_by_two_then_no_announce() -> None:
    assert plan(4, 4, 1) == ["default", "default", "no-hint", "no-hint"] * 2 + ["no-announce"]
    assert plan(3, 1, 0) == ["default", "default", "no-hint", "default"]
    assert plan(0, 0, 2) == ["no-announce", "no-announce"]
