"""The convergence policy with fixed figures and a fixed clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.migration.info import MigrationParams
from agent.migration.policy import (
    NEW_LOW_RATIO,
    THROTTLE_INITIAL,
    THROTTLE_MAX,
    Action,
    Figures,
    Limits,
    decide,
    expected_downtime,
    next_throttle,
    rounds_since_low,
)

MiB = 1 << 20
GBPS = 1e9


def fig(remaining: int, prev: int | None = None, *, earlier: tuple[int, ...] | None = None, rounds: int = 3,
        bw: float = GBPS, dirty: float = 0.0, throttle: int = 0, started: float = 0.0, hash_s: float = 0.0,
        fixed_s: float = 0.0, whole: int = 0) -> Figures:
    """Figures after a round; ``prev`` alone stands for a history of one earlier remainder."""
    if earlier is None:
        earlier = () if prev is None else (prev,)
    return Figures(rounds=rounds, remaining_bytes=remaining, earlier_remaining=earlier, bandwidth=bw,
                   dirty_rate=dirty, throttle=throttle, started=started, hash_s=hash_s, fixed_s=fixed_s,
                   whole_bytes=whole)


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
    # 110 was the last meaningful low (under 90 % of 200); 105 and 100 are not: two stalled rounds,
    # and this one is at the low.
    d = decide(fig(100 * MiB, earlier=(200 * MiB, 110 * MiB, 105 * MiB)), Limits(max_downtime_s=0.3), now=1.0)
    assert d.action is Action.SWITCH_OVER
    assert "stopped shrinking" in d.reason


def test_one_stalled_round_is_not_yet_the_end() -> None:
    # A rule comparing each round with the one before (25 % or stop) would end here; on a busy host a
    # round in three cuts less than that while the remainder still has far to fall.
    d = decide(fig(100 * MiB, 110 * MiB), Limits(max_downtime_s=0.3), now=1.0)
    assert d.action is Action.CONTINUE and "still shrinks" in d.reason


def test_a_spike_above_the_low_waits_for_a_round_at_the_low() -> None:
    lim = Limits(max_downtime_s=0.3)
    low = (40 * MiB, 20 * MiB, 21 * MiB)  # 20 the low, one stalled round since
    spike = decide(fig(35 * MiB, earlier=low), lim, now=1.0)
    assert spike.action is Action.CONTINUE and "at its low" in spike.reason
    back = decide(fig(20 * MiB, earlier=(*low, 35 * MiB)), lim, now=1.0)
    assert back.action is Action.SWITCH_OVER
    # ... but not for ever: after 2 x PATIENCE rounds without a new low it switches anyway.
    late = decide(fig(30 * MiB, earlier=(*low, 35 * MiB, 33 * MiB)), lim, now=1.0)
    assert late.action is Action.SWITCH_OVER


def test_a_measured_memstress_history_is_not_cut_short_by_one_noisy_round() -> None:
    # Remainders (pages) of a 1 GiB memstress guest at 25 % of the bandwidth over 64 MiB, measured
    # with switching disabled (docs/PERFORMANCE.md, section 10). A rule that compared each round with
    # the one before would switch after the second (3528 >= 0.75 x 3578), just before the remainder halved.
    history = [3578, 3528, 3599, 1757, 1800, 1620, 1571, 1359, 1307, 1190, 1873]
    lim = Limits(max_downtime_s=0.3)
    for n in range(1, len(history)):
        d = decide(fig(history[n] * 4096, earlier=tuple(h * 4096 for h in history[:n]), rounds=n + 1,
                       bw=0.3 * GBPS), lim, now=1.0)
        if d.action is Action.SWITCH_OVER:
            break
    assert n >= 3 and history[n] <= 1800


@given(st.lists(st.integers(1, 10**9), min_size=1, max_size=40))
def test_rounds_since_low_counts_from_the_last_meaningful_low(remainders: list[int]) -> None:
    since, low = rounds_since_low(tuple(remainders))
    assert low == min(remainders) and 0 <= since < len(remainders)
    last = len(remainders) - 1 - since  # the round that set the low counted from
    assert all(r >= NEW_LOW_RATIO * min(remainders[:last + 1]) for r in remainders[last + 1:])
    if last > 0:
        assert remainders[last] < NEW_LOW_RATIO * min(remainders[:last])


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
    stalled = (210 * MiB, 205 * MiB, 210 * MiB)  # at its low: switch over if it fits
    alone = decide(fig(200 * MiB, earlier=stalled), Limits(max_downtime_s=0.3), now=1.0)
    assert alone.action is Action.SWITCH_OVER
    loaded = decide(fig(200 * MiB, earlier=stalled, hash_s=0.1, fixed_s=0.02), Limits(max_downtime_s=0.3), now=1.0)
    assert loaded.action is Action.CONTINUE and "exceeds" in loaded.reason
    assert loaded.expected_downtime_s == pytest.approx(200 * MiB / GBPS + 0.1 + 0.02)


def test_hashing_longer_than_the_copy_counts_twice() -> None:
    assert expected_downtime(10 * MiB, GBPS, hash_s=0.05, fixed_s=0.01) == pytest.approx(0.05 + 0.05 + 0.01)


def test_a_negligible_copy_switches_over_whatever_the_fixed_costs() -> None:
    d = decide(fig(256 * 1024, 100 * MiB, fixed_s=0.01), Limits(max_downtime_s=0.3), now=1.0)
    assert d.action is Action.SWITCH_OVER and "negligible" in d.reason
    assert d.expected_downtime_s == pytest.approx(256 * 1024 / GBPS + 0.01)


def test_on_a_long_path_a_remainder_small_next_to_its_round_trips_is_negligible() -> None:
    # 5 MiB at 1 GB/s: 5.2 ms to copy, still shrinking (20 -> 5 MiB). On loopback (10 ms fixed)
    # another round pays; behind 100 ms of round trips it could save 5 % of the downtime, for at
    # least a round trip of total time.
    still_shrinking = (20 * MiB,)
    near = decide(fig(5 * MiB, earlier=still_shrinking, fixed_s=0.01), Limits(max_downtime_s=0.3), now=1.0)
    assert near.action is Action.CONTINUE
    far = decide(fig(5 * MiB, earlier=still_shrinking, fixed_s=0.11), Limits(max_downtime_s=0.3), now=1.0)
    assert far.action is Action.SWITCH_OVER and "negligible" in far.reason
    assert far.expected_downtime_s == pytest.approx(5 * MiB / GBPS + 0.11)
    # A remainder that takes longer than a tenth of them still gets its rounds.
    big = decide(fig(20 * MiB, earlier=(80 * MiB,), fixed_s=0.11), Limits(max_downtime_s=0.3), now=1.0)
    assert big.action is Action.CONTINUE


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
    assert d.action is Action.FORCE  # converging by default: the last resort switches over


def test_hot_blocks_go_off_with_a_throttle_step() -> None:
    """Whole hot blocks keep the remainder up whatever the throttle: each throttle step taken while a
    harvest still reports some whole (the one that cools them does too) asks for them off."""
    lim = Limits(auto_converge=True)
    d = decide(fig(1000 * MiB, 1000 * MiB, dirty=0.8 * GBPS, whole=64 * MiB), lim, now=1.0)
    assert d.action is Action.THROTTLE_UP and d.throttle == THROTTLE_INITIAL and d.hot_blocks_off
    assert "hot blocks off" in d.reason
    d = decide(fig(1000 * MiB, 1000 * MiB, dirty=0.8 * GBPS, throttle=30, whole=2 * MiB), lim, now=1.0)
    assert d.action is Action.THROTTLE_UP and d.throttle == 40 and d.hot_blocks_off
    d = decide(fig(1000 * MiB, 1000 * MiB, dirty=0.8 * GBPS, whole=0), lim, now=1.0)
    assert d.action is Action.THROTTLE_UP and not d.hot_blocks_off and "hot" not in d.reason


def test_hot_blocks_change_nothing_when_no_throttle_is_due() -> None:
    """Whole blocks alone change no decision: a fitting remainder, no auto-converge, a slow dirty rate,
    the throttle at its maximum, an exhausted budget all decide as without them."""
    cases = [
        (dict(remaining=10 * MiB, earlier=(10 * MiB, 10 * MiB, 10 * MiB), dirty=GBPS), Limits(auto_converge=True)),
        (dict(remaining=1000 * MiB, earlier=(1000 * MiB,), dirty=GBPS), Limits()),
        (dict(remaining=1000 * MiB, earlier=(1000 * MiB,), dirty=0.1 * GBPS), Limits(auto_converge=True)),
        (dict(remaining=1000 * MiB, earlier=(1000 * MiB,), dirty=GBPS, throttle=THROTTLE_MAX),
         Limits(auto_converge=True)),
        (dict(remaining=1000 * MiB, earlier=(1000 * MiB,), dirty=GBPS, rounds=30), Limits(auto_converge=True)),
    ]
    actions = []
    for kw, lim in cases:
        remaining = kw.pop("remaining")
        with_whole = decide(fig(remaining, whole=64 * MiB, **kw), lim, now=1.0)  # type: ignore[arg-type]
        assert with_whole == decide(fig(remaining, **kw), lim, now=1.0)  # type: ignore[arg-type]
        assert not with_whole.hot_blocks_off
        actions.append(with_whole.action)
    assert actions == [Action.SWITCH_OVER, Action.CONTINUE, Action.CONTINUE, Action.CONTINUE, Action.ABORT]


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
        assert force or (auto and throttle >= THROTTLE_MAX)
    if d.action is Action.THROTTLE_UP:
        assert auto and throttle < d.throttle <= THROTTLE_MAX
    if rounds >= 30 or now >= 600.0:
        # Out of budget: the policy must end the pre-copy phase one way or another.
        assert d.action in (Action.SWITCH_OVER, Action.ABORT, Action.FORCE)


def test_postcopy_when_the_dirty_rate_outruns_bandwidth_instead_of_throttling() -> None:
    lim = Limits(auto_converge=True, postcopy=True)
    d = decide(fig(1000 * MiB, 1000 * MiB, dirty=0.8 * GBPS), lim, now=1.0)
    assert d.action is Action.POSTCOPY and "will not converge" in d.reason and d.expected_downtime_s > 0.3
    # Without post-copy the same figures throttle.
    assert decide(fig(1000 * MiB, 1000 * MiB, dirty=0.8 * GBPS), Limits(auto_converge=True), 1.0).action \
        is Action.THROTTLE_UP


def test_postcopy_instead_of_failing_at_the_round_cap() -> None:
    d = decide(fig(1000 * MiB, 1000 * MiB, rounds=30), Limits(max_rounds=30, postcopy=True, force=True), now=1.0)
    assert d.action is Action.POSTCOPY and "round limit" in d.reason


def test_postcopy_is_not_chosen_while_pre_copy_converges() -> None:
    lim = Limits(max_downtime_s=0.3, postcopy=True)
    assert decide(fig(100 * MiB, 200 * MiB), lim, now=1.0).action is Action.CONTINUE
    assert decide(fig(100 * MiB, earlier=(200 * MiB, 110 * MiB, 105 * MiB)), lim, 1.0).action is Action.SWITCH_OVER
    # Round 0 and 1 say nothing of the dirty rate yet: keep going.
    assert decide(fig(1000 * MiB, 1000 * MiB, rounds=1, dirty=0.8 * GBPS), lim, 1.0).action is Action.CONTINUE


def test_postcopy_after_round_n_or_auto() -> None:
    from agent.migration.policy import Decision
    from agent.migration.postcopy_source import wanted

    go_on = Decision(Action.CONTINUE, "")
    assert not wanted("never", 5, Decision(Action.POSTCOPY, ""))
    assert not wanted("2", 1, go_on) and wanted("2", 2, go_on) and wanted("1", 1, Decision(Action.SWITCH_OVER, ""))
    assert wanted("auto", 3, Decision(Action.POSTCOPY, "")) and not wanted("auto", 30, Decision(Action.ABORT, ""))


def test_postcopy_towards_an_older_peer_is_refused_before_anything_moves() -> None:
    from types import SimpleNamespace

    from agent.migration.common import MigrationError
    from agent.migration.info import MigrationParams
    from agent.migration.postcopy_source import check_peer

    s: object = SimpleNamespace(params=MigrationParams(postcopy_after="auto"))
    with pytest.raises(MigrationError, match="protocol version 3: post-copy needs 4"):
        check_peer(s, 3)  # type: ignore[arg-type]
    check_peer(s, 4)  # type: ignore[arg-type]
    check_peer(SimpleNamespace(params=MigrationParams()), 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="postcopy-after"):
        MigrationParams(postcopy_after="0")


def test_auto_converge_at_its_last_step_forces_rather_than_fails() -> None:
    """Converging by default: with auto-converge on and the throttle at its top, the round cap
    switches over past the bound; below the top, or with auto-converge off, it still aborts."""
    at_top = fig(1000 * MiB, 1000 * MiB, rounds=30, throttle=THROTTLE_MAX)
    d = decide(at_top, Limits(max_rounds=30, auto_converge=True), now=1.0)
    assert d.action is Action.FORCE and "did not converge" in d.reason
    assert decide(at_top, Limits(max_rounds=30), now=1.0).action is Action.ABORT
    below = fig(1000 * MiB, 1000 * MiB, rounds=30, throttle=50)
    assert decide(below, Limits(max_rounds=30, auto_converge=True), now=1.0).action is Action.ABORT
    assert MigrationParams().auto_converge and MigrationParams.from_dict({}).auto_converge
    assert not MigrationParams.from_dict({"auto-converge": False}).auto_converge
