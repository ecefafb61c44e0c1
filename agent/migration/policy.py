"""The pre-copy convergence policy: a pure function of measured figures.

This module owns the one decision of a pre-copy migration: after each round,
keep copying, switch over to stop-and-copy, throttle the vCPU harder, switch
over to post-copy (the guest outruns the link, or the budget is spent, and the
operator allowed it), or give up (abort, or force the switch-over past the
downtime bound); and whether a
migration that moved no byte for a while has stalled (``progress_stalled``,
the progress timeout). It does no I/O
and reads no clock: the caller passes the figures and ``now`` (like Cloud
Hypervisor's ``is_precopy_converged``), so tests build any scenario with
fixed numbers.

The max downtime is a bound, not a target (docs/cli.md): while the
remainder fits the bound we keep iterating as long as rounds still set
meaningful new lows, and switch over when the remainder is as small as it is
going to get: no new low for PATIENCE rounds, and this round at its low (a
round-to-round spike is not the moment to pause), or at once when the
remainder's copy is negligible: under 2 ms, or under a tenth of the fixed
downtime no round removes (on a long path, the switch-over's round trips).
When it does not fit, auto-converge throttles the vCPU in growing steps (QEMU's cpu-throttle:
initial 20 %, increment 10 %, max 99 %), turning hot blocks off with the
first step (whole blocks would keep the remainder up whatever the throttle);
when the round cap or the time limit is reached, the operator's choice decides
between abort and force.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

# QEMU's cpu-throttle defaults.
THROTTLE_INITIAL = 20
THROTTLE_INCREMENT = 10
THROTTLE_MAX = 99

# A round sets a meaningful new low when its remainder is below this fraction
# of the lowest remainder before it. A guest that keeps dirtying settles near
# an equilibrium (its dirty rate times a round's fixed costs, over what the
# rounds' per-page cost leaves), approached by cuts per round that the host's
# noise often hides (docs/PERFORMANCE.md section 10):
# comparing with the lowest so far, with patience, rather than each round with
# the one before, keeps a noisy round from ending pre-copy early.
NEW_LOW_RATIO = 0.9
# Rounds without a meaningful new low after which the remainder is taken to be
# at its equilibrium; switch over at the next round at (or below) the low, or
# after twice as many in any case.
PATIENCE = 2

# QEMU's throttle-trigger-threshold: auto-converge steps in when the guest
# dirties at least this fraction of what a round manages to send.
THROTTLE_TRIGGER = 0.5

# Below this expected downtime another round cannot be worth its cost.
NEGLIGIBLE_DOWNTIME_S = 0.002
# Nor when the remainder's copy is under this share of the fixed downtime no round can remove (the
# switch-over's round trips): on a long path another round costs at least a round trip of total
# time and resends what the guest wrote meanwhile, to save a small share of the downtime
# (docs/PERFORMANCE.md section 10). On a short path NEGLIGIBLE_DOWNTIME_S decides.
NEGLIGIBLE_SHARE = 0.1


class Action(enum.Enum):
    """What the source session does next."""

    CONTINUE = "continue"  # send the current dirty set as another round
    SWITCH_OVER = "switch-over"  # pause the vCPU and send the remainder
    THROTTLE_UP = "throttle-up"  # raise the vCPU throttle, then continue
    ABORT = "abort"  # give up: the VM keeps running on the source
    FORCE = "force"  # switch over although the remainder exceeds the bound
    POSTCOPY = "postcopy"  # switch over to post-copy: pre-copy will not converge (postcopy-after auto)


@dataclass(frozen=True, slots=True)
class Figures:
    """What the source measured, as of the end of the latest round."""

    rounds: int  # rounds completed so far (round 0 included)
    remaining_bytes: int  # dirty bytes harvested and not sent yet
    earlier_remaining: tuple[int, ...]  # the same figure after each earlier round, oldest first
    bandwidth: float  # bytes/s the data path achieved in the latest round
    dirty_rate: float  # bytes/s the guest dirtied during the latest round
    throttle: int  # current vCPU throttle percent
    started: float  # when the migration started (same clock as ``now``)
    # The downtime that is not copying, as the source expects it. hash_s: hashing the RAM digest
    # chunks the remainder touches, once on each side (the source's overlaps the copy, the
    # destination's check follows it); fixed_s: pause, state, READY, COMMIT to RESUMED, with the
    # path's round trips the switch-over waits for.
    hash_s: float = 0.0
    fixed_s: float = 0.0
    # Bytes of the remainder that hot blocks reported whole (un-protected 2 MiB blocks, uffd-wp-async):
    # a bound on what the guest wrote there, not a measure of it.
    whole_bytes: int = 0


@dataclass(frozen=True, slots=True)
class Limits:
    """The operator's parameters that bear on convergence."""

    max_downtime_s: float = 0.3
    max_rounds: int = 30
    timeout_s: float | None = None
    auto_converge: bool = False
    force: bool = False  # on non-convergence: True -> force, False -> abort
    postcopy: bool = False  # on non-convergence: post-copy (before throttling, instead of force or abort)


@dataclass(frozen=True, slots=True)
class Decision:
    """The policy's answer; ``reason`` goes into the migration summary."""

    action: Action
    reason: str
    throttle: int = 0  # the new throttle percent for THROTTLE_UP
    hot_blocks_off: bool = False  # with THROTTLE_UP: stop sending hot blocks whole from the next harvest on
    expected_downtime_s: float = 0.0


def expected_downtime(remaining_bytes: int, bandwidth: float, hash_s: float = 0.0, fixed_s: float = 0.0) -> float:
    """Seconds of downtime: the copy of ``remaining_bytes`` at ``bandwidth`` (inf when unmeasured) or
    the source's hashing of what it touches, whichever is longer (they overlap), then the
    destination's hashing, then the fixed costs."""
    return max(copy_time(remaining_bytes, bandwidth), hash_s) + hash_s + fixed_s


def copy_time(remaining_bytes: int, bandwidth: float) -> float:
    """Seconds needed to send ``remaining_bytes`` at ``bandwidth`` (inf when unmeasured)."""
    if remaining_bytes <= 0:
        return 0.0
    if bandwidth <= 0:
        return float("inf")
    return remaining_bytes / bandwidth


def next_throttle(current: int) -> int:
    """QEMU's throttle steps: 20 %, then +10 % up to 99 %."""
    if current <= 0:
        return THROTTLE_INITIAL
    return min(THROTTLE_MAX, current + THROTTLE_INCREMENT)


def decide(fig: Figures, lim: Limits, now: float) -> Decision:
    """The next step of a pre-copy migration, from figures and limits only."""
    exp = expected_downtime(fig.remaining_bytes, fig.bandwidth, fig.hash_s, fig.fixed_s)
    if fig.remaining_bytes <= 0:
        return Decision(Action.SWITCH_OVER, "nothing left to copy", expected_downtime_s=fig.fixed_s)
    if exp <= lim.max_downtime_s:
        return _decide_fitting(fig, lim, now, exp)
    return _decide_not_fitting(fig, lim, now, exp)


def _out_of_budget(fig: Figures, lim: Limits, now: float) -> str | None:
    """Why no further round is allowed, or None while rounds and time remain."""
    if fig.rounds >= lim.max_rounds:
        return f"round limit reached ({lim.max_rounds} rounds)"
    if lim.timeout_s is not None and now - fig.started >= lim.timeout_s:
        return f"time limit reached ({lim.timeout_s:g} s)"
    return None


def _decide_fitting(fig: Figures, lim: Limits, now: float, exp: float) -> Decision:
    """The remainder fits the bound: iterate only while that still pays."""
    if copy_time(fig.remaining_bytes, fig.bandwidth) <= max(NEGLIGIBLE_DOWNTIME_S, NEGLIGIBLE_SHARE * fig.fixed_s):
        return Decision(Action.SWITCH_OVER, "remainder negligible", expected_downtime_s=exp)
    budget = _out_of_budget(fig, lim, now)
    if budget is not None:
        return Decision(Action.SWITCH_OVER, f"remainder fits the bound; {budget}", expected_downtime_s=exp)
    since, low = rounds_since_low((*fig.earlier_remaining, fig.remaining_bytes))
    if since < PATIENCE:
        return Decision(Action.CONTINUE, "remainder fits the bound and still shrinks", expected_downtime_s=exp)
    if fig.remaining_bytes <= low or since >= 2 * PATIENCE:
        return Decision(Action.SWITCH_OVER, f"remainder fits the bound and stopped shrinking "
                        f"(no new low in {since} rounds)", expected_downtime_s=exp)
    return Decision(Action.CONTINUE, "remainder fits the bound; waiting for a round at its low",
                    expected_downtime_s=exp)


def rounds_since_low(remainders: tuple[int, ...]) -> tuple[int, int]:
    """Rounds since the last meaningful new low of ``remainders`` (oldest first), and the lowest.

    The first remainder is a low by definition. After round 0 alone (one remainder, the dirty
    set of the whole copy) that makes 0: one more round is always worth trying.
    """
    low, since = remainders[0], 0
    for r in remainders[1:]:
        since = 0 if r < low * NEW_LOW_RATIO else since + 1
        low = min(low, r)
    return since, low


def _decide_not_fitting(fig: Figures, lim: Limits, now: float, exp: float) -> Decision:
    """The remainder exceeds the bound: keep going, throttle, or give up."""
    budget = _out_of_budget(fig, lim, now)
    if lim.postcopy and (budget is not None or _outrun(fig)):
        why = budget or "dirty rate outruns bandwidth"
        return Decision(Action.POSTCOPY, f"pre-copy will not converge: {why}, expected downtime "
                        f"{exp * 1000:.0f} ms > {lim.max_downtime_s * 1000:.0f} ms", expected_downtime_s=exp)
    if budget is not None:
        # Auto-converge at its last step: the remainder is as small as throttling makes it, and
        # converging by default means switching over rather than failing.
        action = Action.FORCE if lim.force or (lim.auto_converge and fig.throttle >= THROTTLE_MAX) else Action.ABORT
        why = f"did not converge: {budget}, expected downtime {exp * 1000:.0f} ms > {lim.max_downtime_s * 1000:.0f} ms"
        return Decision(action, why, expected_downtime_s=exp)
    if lim.auto_converge and _outrun(fig) and fig.throttle < THROTTLE_MAX:
        new = next_throttle(fig.throttle)
        # Whole hot blocks are a floor under the remainder that no throttle lowers (a block is
        # reported whole however little the slowed guest writes there): off with them. Not first
        # and throttle later: each round of waiting resends a dense working set (1.5x the bytes).
        off = fig.whole_bytes > 0
        return Decision(Action.THROTTLE_UP, f"dirty rate outruns bandwidth: throttle {new}%"
                        + (", hot blocks off" if off else ""),
                        throttle=new, expected_downtime_s=exp, hot_blocks_off=off)
    return Decision(Action.CONTINUE, "remainder exceeds the bound", expected_downtime_s=exp)


def _outrun(fig: Figures) -> bool:
    """True when the guest dirties memory too fast for pre-copy to catch up."""
    if fig.rounds < 2:
        # Round 0 copies everything; its dirty rate says nothing yet.
        return False
    return fig.dirty_rate >= fig.bandwidth * THROTTLE_TRIGGER


def progress_stalled(idle_s: float, limit_s: float | None) -> str | None:
    """Why the migration fails for want of progress, or None: ``idle_s`` seconds without a new
    byte on its connection (either way) against the progress timeout (None: off)."""
    if limit_s is None or idle_s < limit_s:
        return None
    return f"no progress: no bytes transferred for {idle_s:.1f} s (progress-timeout {limit_s:g} s)"
