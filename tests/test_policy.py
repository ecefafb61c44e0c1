"""The convergence policy with fixed figures and a fixed clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.migration.policy import (
    THROTTLE_INITIAL,
    THROTTLE_MAX,
    Action,
    Figures,
    Limits,
    decide,
    expected_downtime,
    next_throttle,
)

MiB = 1 << 20
GBPS = 1e9


def fig(remaining: int, prev: int | None = None, *, rounds: int = 3, bw: float = GBPS,
        dirty: float = 0.0, throttle: int = 0, started: float = 0.0, hash_s: float = 0.0,
        fixed_s: float = 0.0) -> Figures:
    return Figures(rounds=rounds, remaining_bytes=remaining, previous_remaining_bytes=prev, bandwidth=bw,
                   dirty_rate=dirty, throttle=throttle, started=started, hash_s=hash_s, fixed_s=fixed_s)


def test_nothing_dirty_switches_over() -> None:
    d = decide(fig(0, 10 * MiB), Limits(), now=1.0)
    assert d.action is Action.SWITCH_OVER
    assert d.expected_downtime_s == 0.0


def test_fitting_and_shrinking_keeps_iterating() -> None:
    # 100 MiB at 1 GB/s = 105 ms fits 300 ms, but the last round halved it: go on.
    d = decide(fig(100 * MiB, 200 * MiB), Limits(max_downtime_s=0.3), now=1.0)
    assert d.action is Action.CONTINUE
    assert d.expected_downtime_s == pytest.approx(100 * MiB / GBPS)


def test_fitting_and_stalled_switches_over() -> None:
    d = decide(fig(100 * MiB, 110 * MiB), Limits(max_downtime_s=0.3), now=1.0)
    assert d.action is Action.SWITCH_OVER
    assert "stopped shrinking" in d.reason


def test_after_round_zero_one_more_round_is_tried() -> None:
    d = decide(fig(50 * MiB, None, rounds=1), Limits(max_downtime_s=0.3), now=1.0)
    assert d.action is Action.CONTINUE


def test_negligible_remainder_switches_at_once() -> None:
    d = decide(fig(256 * 1024, 100 * MiB), Limits(max_downtime_s=0.3), now=1.0)
    assert d.action is Action.SWITCH_OVER
    assert "negligible" in d.reason


def test_hashing_and_fixed_costs_count_against_the_bound() -> None:
    # 200 MiB at 1 GB/s = 210 ms fits 300 ms alone, not with the destination's 100 ms digest check
    # after it and 20 ms of fixed costs (the source's 100 ms of hashing hides under the copy).
    alone = decide(fig(200 * MiB, 210 * MiB), Limits(max_downtime_s=0.3), now=1.0)
    assert alone.action is Action.SWITCH_OVER
    loaded = decide(fig(200 * MiB, 210 * MiB, hash_s=0.1, fixed_s=0.02), Limits(max_downtime_s=0.3), now=1.0)
    assert loaded.action is Action.CONTINUE and "exceeds" in loaded.reason
    assert loaded.expected_downtime_s == pytest.approx(200 * MiB / GBPS + 0.1 + 0.02)


def test_hashing_longer_than_the_copy_counts_twice() -> None:
    assert expected_downtime(10 * MiB, GBPS, hash_s=0.05, fixed_s=0.01) == pytest.approx(0.05 + 0.05 + 0.01)


def test_a_negligible_copy_switches_over_whatever_the_fixed_costs() -> None:
    d = decide(fig(256 * 1024, 100 * MiB, fixed_s=0.01), Limits(max_downtime_s=0.3), now=1.0)
    assert d.action is Action.SWITCH_OVER and "negligible" in d.reason
    assert d.expected_downtime_s == pytest.approx(256 * 1024 / GBPS + 0.01)


def test_fitting_at_round_cap_switches_over() -> None:
    d = decide(fig(100 * MiB, 400 * MiB, rounds=5), Limits(max_rounds=5), now=1.0)
    assert d.action is Action.SWITCH_OVER
    assert "round limit" in d.reason


def test_not_fitting_continues_while_budget_remains() -> None:
    d = decide(fig(1000 * MiB, 1100 * MiB), Limits(max_downtime_s=0.3), now=1.0)
    assert d.action is Action.CONTINUE
    assert d.expected_downtime_s > 0.3


def test_not_fitting_at_round_cap_aborts_by_default() -> None:
    d = decide(fig(1000 * MiB, 1000 * MiB, rounds=30), Limits(max_rounds=30), now=1.0)
    assert d.action is Action.ABORT
    assert "did not converge" in d.reason and "round limit" in d.reason


def test_not_fitting_at_round_cap_forces_when_asked() -> None:
    d = decide(fig(1000 * MiB, 1000 * MiB, rounds=30), Limits(max_rounds=30, force=True), now=1.0)
    assert d.action is Action.FORCE


def test_timeout_counts_from_start() -> None:
    lim = Limits(timeout_s=10.0)
    assert decide(fig(1000 * MiB, 1000 * MiB, started=5.0), lim, now=14.9).action is Action.CONTINUE
    d = decide(fig(1000 * MiB, 1000 * MiB, started=5.0), lim, now=15.0)
    assert d.action is Action.ABORT
    assert "time limit" in d.reason


def test_auto_converge_throttles_when_dirty_rate_outruns_bandwidth() -> None:
    lim = Limits(auto_converge=True)
    d = decide(fig(1000 * MiB, 1000 * MiB, dirty=0.8 * GBPS), lim, now=1.0)
    assert d.action is Action.THROTTLE_UP
    assert d.throttle == THROTTLE_INITIAL
    d2 = decide(fig(1000 * MiB, 1000 * MiB, dirty=0.8 * GBPS, throttle=d.throttle), lim, now=1.0)
    assert d2.throttle == THROTTLE_INITIAL + 10


def test_no_throttle_without_auto_converge() -> None:
    d = decide(fig(1000 * MiB, 1000 * MiB, dirty=0.8 * GBPS), Limits(), now=1.0)
    assert d.action is Action.CONTINUE


def test_no_throttle_when_dirty_rate_is_low() -> None:
    d = decide(fig(1000 * MiB, 1000 * MiB, dirty=0.1 * GBPS), Limits(auto_converge=True), now=1.0)
    assert d.action is Action.CONTINUE


def test_throttle_saturates_then_continues_until_cap() -> None:
    lim = Limits(auto_converge=True, max_rounds=10)
    d = decide(fig(1000 * MiB, 1000 * MiB, dirty=GBPS, throttle=THROTTLE_MAX, rounds=4), lim, now=1.0)
    assert d.action is Action.CONTINUE
    d = decide(fig(1000 * MiB, 1000 * MiB, dirty=GBPS, throttle=THROTTLE_MAX, rounds=10), lim, now=1.0)
    assert d.action is Action.ABORT


def test_unmeasured_bandwidth_never_fits() -> None:
    assert expected_downtime(4096, 0.0) == float("inf")
    d = decide(fig(4096, None, bw=0.0, rounds=1), Limits(), now=0.0)
    assert d.action is Action.CONTINUE


def test_throttle_steps_follow_qemu() -> None:
    steps = [0]
    while steps[-1] < THROTTLE_MAX:
        steps.append(next_throttle(steps[-1]))
    assert steps[:4] == [0, 20, 30, 40]
    assert steps[-1] == 99 and steps[-2] == 90


@given(remaining=st.integers(0, 1 << 34), prev=st.one_of(st.none(), st.integers(0, 1 << 34)),
       rounds=st.integers(1, 40), bw=st.floats(0, 1e10), dirty=st.floats(0, 1e10),
       throttle=st.integers(0, 99), now=st.floats(0, 1000), max_dt=st.floats(0.001, 2.0),
       auto=st.booleans(), force=st.booleans())
def test_never_switches_past_the_bound_unless_forced(remaining: int, prev: int | None, rounds: int,
                                                     bw: float, dirty: float, throttle: int, now: float,
                                                     max_dt: float, auto: bool, force: bool) -> None:
    lim = Limits(max_downtime_s=max_dt, max_rounds=30, timeout_s=600.0, auto_converge=auto, force=force)
    d = decide(fig(remaining, prev, rounds=rounds, bw=bw, dirty=dirty, throttle=throttle), lim, now)
    if d.action is Action.SWITCH_OVER:
        assert expected_downtime(remaining, bw) <= max_dt
    if d.action is Action.FORCE:
        assert force
    if d.action is Action.THROTTLE_UP:
        assert auto and throttle < d.throttle <= THROTTLE_MAX
    if rounds >= 30 or now >= 600.0:
        # Out of budget: the policy must end the pre-copy phase one way or another.
        assert d.action in (Action.SWITCH_OVER, Action.ABORT, Action.FORCE)
