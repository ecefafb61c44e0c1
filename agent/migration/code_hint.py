"""The code hint: the guest blocks the source compiled, translated on the destination ahead of the resume.

A VM process compiles each guest block on its first run; a migrated guest starts on the
destination with none, and its first answers to the network wait for that compilation, after
the VM already runs again (docs/PERFORMANCE.md, "The guest network"). So as pre-copy starts
the source asks its VM process which blocks it compiled (op ``blocks``) and sends them, with the
code's bytes, as a ``CodeHint``; the destination hands them to its idle VM process (op
``warm``), which translates them while the guest's RAM arrives (vmruntime/warmup.py), or loads
the translations this host kept from an earlier VM with the same code (agent/code_cache.py).

A small guest's pre-copy can end before the translation does; so the destination holds its
answer to a pre-copy round's Sync until the warm-up is done (at most HOLD_MAX_S from the hint on):
the source does not pause the VM before the destination can run it at speed, and it leaves the
hold (SyncAck's ``held_s``) out of its bandwidth estimate.

The hint is advice: a peer speaking protocol version 1 (it gets none), a VM process that cannot
say, or one that refuses the hint, costs the migration nothing but the warm-up.
"""

from __future__ import annotations

import time

from agent.code_cache import CodeCache, cache_key
from agent.migration.seams import Lane, LogLike
from proto.limits import MAX_HINT_CODE, MAX_HINT_PCS
from proto.messages import CodeHint
from vmruntime.control import VMError
from vmruntime.interp import COMPILER_TAG, translated_pairs, within_bytes
from vmruntime.warmup import MAX_TRANSLATED_BYTES

HINT_TIMEOUT_S = 10.0  # a VM process answers between two slices; this only bounds a stuck one
# How long, from the hint on, the destination may hold SyncAck while its VM process translates:
# the guest runs on at the source meanwhile, and a cold code region that takes longer than this
# is compiled on its first run after the resume instead.
HOLD_MAX_S = 0.5
HOLD_POLL_S = 0.002


def ask(lane: Lane, ram: memoryview, cache: CodeCache | None = None) -> CodeHint | None:
    """The hint from the source VM process behind ``lane`` and its guest RAM; None when there is
    nothing to send. The translations the VM process reports go into ``cache`` (agent/code_cache.py)
    whether or not the hint is sent. VMGone and OSError propagate: the VM process is gone."""
    try:
        reply = lane.request("blocks", timeout=HINT_TIMEOUT_S)
    except VMError:  # no machine runs (nothing compiled), or a VM process without the op
        return None
    code, pcs = reply.get("code"), reply.get("pcs")
    if not (isinstance(code, list) and len(code) == 2 and all(isinstance(v, int) for v in code)
            and 0 <= code[0] <= code[1] <= min(len(ram), code[0] + MAX_HINT_CODE) and isinstance(pcs, list)):
        return None
    start, end = int(code[0]), int(code[1])
    inside = tuple(pc for pc in pcs if isinstance(pc, int) and start <= pc < end)[:MAX_HINT_PCS]
    if not inside:
        return None
    hint = CodeHint(start, bytes(ram[start:end]), inside)
    tag, translated = reply.get("tag"), reply.get("translated")
    pairs = translated_pairs(translated)
    if cache is not None and isinstance(tag, str) and pairs:
        cache.put(cache_key(tag, start, hint.code, len(ram)), list(pairs.items()))
    return hint


def forward(lane: Lane, hint: CodeHint, ram_size: int, log: LogLike, vm: str, cache: CodeCache | None = None) -> None:
    """Hand ``hint`` to the incoming VM process behind ``lane``, with the translations this host
    keeps for that code; its reply comes at once (the translation runs in that process while it
    waits for the restore). A refusal is logged only."""
    translated = [] if cache is None else cache.get(cache_key(COMPILER_TAG, hint.code_start, hint.code, ram_size))
    fields = {"code-start": hint.code_start, "code": hint.code, "pcs": list(hint.pcs), "tag": COMPILER_TAG,
              "translated": within_bytes(translated, MAX_TRANSLATED_BYTES)}
    try:
        lane.request("warm", timeout=HINT_TIMEOUT_S, **fields)
    except VMError as exc:
        log.warning("code hint not used", vm=vm, error=str(exc))


def hold(lane: Lane, until: float) -> float:
    """Wait until the VM process behind ``lane`` has no block left to translate, or ``until``
    (time.monotonic()) passed; the seconds waited."""
    t0 = time.monotonic()
    waited = 0.0  # (none when the first look finds the warm-up over)
    while True:
        try:
            pending = int(lane.request("warm-status", timeout=HINT_TIMEOUT_S).get("pending", 0))
        except VMError:  # a VM process without the op: nothing to wait for
            pending = 0
        now = time.monotonic()
        if pending == 0 or now >= until:
            return waited
        time.sleep(min(HOLD_POLL_S, until - now))
        waited = time.monotonic() - t0
