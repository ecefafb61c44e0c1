"""Translating a guest's blocks ahead of a restore (vmruntime/warmup.py): the Warmup itself on a
Machine, and the VM process's `blocks` and `warm` ops with a restore that uses what was translated."""

from __future__ import annotations

import marshal
import mmap
import os
import time
from typing import Any

import pytest

from tests.conftest import MakeMemfd, SpawnVM
from tests.test_netd import boot, exchange, kv, ping
from vmruntime import interp
from vmruntime.control import VMError
from vmruntime.interp import COMPILER_TAG
from vmruntime.machine import Machine
from vmruntime.programs import load_program
from vmruntime.warmup import MAX_HINT_BLOCKS, Warmup

MiB = 1 << 20


class CountingCompiles:
    """Counts BlockCompiler.translate calls (the costly half of compiling a block)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        original = interp.BlockCompiler.translate

        def translate(compiler: interp.BlockCompiler, pc: int) -> Any:
            self.count += 1
            return original(compiler, pc)

        monkeypatch.setattr(interp.BlockCompiler, "translate", translate)


def served_netd() -> Machine:
    """netd after key-value requests and a ping: the blocks those paths need are compiled."""
    m = boot()
    assert kv(m, b"PUT k v") == b"OK\n"
    assert kv(m, b"GET k") == b"VALUE v\n"
    exchange(m, ping(1, 1, b"x" * 8))
    return m


def moved(m: Machine, ready: dict[int, Any] | None) -> Machine:
    """``m``'s state and RAM in a new machine, as a migration's destination builds it."""
    state = m.save_state()
    ram = mmap.mmap(-1, len(m._ram))
    ram[:] = m._ram[:]
    return Machine.restore(ram, state, lambda: 0, ready)


def warmed(m: Machine, pcs: list[int] | None = None) -> Warmup:
    start, end = m.code_range
    w = Warmup(start, bytes(m._ram[start:end]), len(m._ram), m.block_starts() if pcs is None else pcs)
    while w.pending:
        w.step()
    return w


def test_a_restore_with_the_warmed_blocks_translates_nothing_to_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    m = served_netd()
    w = warmed(m)
    dest = moved(m, w.take(m._ram, m.save_state()))
    assert w.counts() == {"code-blocks-warm": len(m.block_starts()), "code-blocks-cold": 0}
    compiles = CountingCompiles(monkeypatch)
    assert kv(dest, b"GET k") == b"VALUE v\n"  # the value moved with the RAM
    exchange(dest, ping(1, 2, b"y" * 8))
    assert compiles.count == 0


def test_without_the_warm_up_the_destination_translates_on_first_run(monkeypatch: pytest.MonkeyPatch) -> None:
    m = served_netd()
    compiles = CountingCompiles(monkeypatch)
    dest = moved(m, None)
    assert kv(dest, b"GET k") == b"VALUE v\n"
    assert compiles.count > 10


def test_blocks_are_dropped_when_the_code_is_not_the_one_they_were_translated_from() -> None:
    m = served_netd()
    w = warmed(m)
    other = mmap.mmap(-1, len(m._ram))
    other[:] = m._ram[:]
    start, end = m.code_range
    other[end - 1] ^= 0xFF  # one code byte differs
    assert w.take(other, m.save_state()) == {}
    assert w.counts() == {"code-blocks-warm": 0, "code-blocks-cold": len(m.block_starts())}


def test_a_state_naming_another_code_range_gets_nothing() -> None:
    m = served_netd()
    w = warmed(m)
    state = m.save_state()
    state["code"] = [state["code"][0], state["code"][1] - 4]
    assert w.take(m._ram, state) == {}
    assert w.take(m._ram, {"code": "junk"}) == {}


def test_what_is_not_translated_by_the_restore_is_counted_cold() -> None:
    m = served_netd()
    start, end = m.code_range
    w = Warmup(start, bytes(m._ram[start:end]), len(m._ram), m.block_starts())
    w.step()  # one block only
    ready = w.take(m._ram, m.save_state())
    assert len(ready) == 1 and w.counts()["code-blocks-cold"] == len(m.block_starts()) - 1
    assert w.pending == 0  # spent: nothing more is translated


@pytest.mark.parametrize(
    ("start", "code", "pcs", "match"),
    [
        (0, "not bytes", [], "code-start"),
        (True, b"\0" * 16, [], "code-start"),
        (MiB - 8, b"\0" * 16, [], "outside the code region"),
        (0, b"\0" * 16, "0", "pcs must be a list"),
        (0, b"\0" * 16, list(range(MAX_HINT_BLOCKS + 1)), "pcs must be a list"),
    ],
)
def test_a_bad_hint_is_refused(start: object, code: object, pcs: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Warmup(start, code, MiB, pcs)


def test_pcs_outside_the_code_and_repeats_are_skipped() -> None:
    m = served_netd()
    start, end = m.code_range
    first = m.block_starts()[0]
    w = Warmup(start, bytes(m._ram[start:end]), len(m._ram), [first, first, end, end + 64, -1, True, "x"])
    assert w.pending == 1


# --- the VM process's ops ------------------------------------------------------------------------


def copy_ram(src_fd: int, dst_fd: int, size: int) -> None:
    os.lseek(src_fd, 0, os.SEEK_SET)
    data = os.read(src_fd, size)
    os.pwrite(dst_fd, data, 0)


def test_a_vm_process_translates_the_hint_before_its_restore(spawn_vm: SpawnVM, make_memfd: MakeMemfd) -> None:
    size = 1 * MiB
    src_fd = make_memfd(size)
    src = spawn_vm(size, "src", src_fd)
    src.boot(*load_program("counter", {"every": "1000"}))
    src.wait_event(["console"])
    blocks = src.request("blocks")
    start, end = blocks["code"]
    assert blocks["pcs"] and all(start <= pc < end for pc in blocks["pcs"])
    assert blocks["tag"] == COMPILER_TAG and [pc for pc, _ in blocks["translated"]] == blocks["pcs"]
    state = src.pause()

    dst_fd = make_memfd(size)
    copy_ram(src_fd, dst_fd, size)
    dst = spawn_vm(size, "dst", dst_fd)
    code = os.pread(dst_fd, end - start, start)
    reply = dst.request("warm", **{"code-start": start, "code": code, "pcs": blocks["pcs"]})
    assert reply["queued"] == len(blocks["pcs"])
    time.sleep(0.5)  # idle: the process translates between polls
    restored = dst.request("restore", state=state)
    assert (restored["code-blocks-warm"], restored["code-blocks-cold"]) == (len(blocks["pcs"]), 0)
    count = dst.status()["instructions"]
    time.sleep(0.05)
    assert dst.status()["instructions"] > count  # the restored guest runs


def test_warm_is_refused_once_a_machine_runs_and_blocks_needs_one(spawn_vm: SpawnVM) -> None:
    vm = spawn_vm(MiB)
    with pytest.raises(VMError, match="boot or restore first"):
        vm.request("blocks")
    vm.boot(*load_program("counter", {"every": "1000"}))
    with pytest.raises(VMError, match="already runs a machine"):
        vm.request("warm", **{"code-start": 0, "code": b"\0" * 16, "pcs": []})


# --- translations made by another VM process of the host -----------------------------------------


def test_translated_blocks_are_loaded_not_translated(monkeypatch: pytest.MonkeyPatch) -> None:
    m = served_netd()
    start, end = m.code_range
    translated = m.marshalled_blocks(1 << 30)
    assert [pc for pc, _ in translated] == m.block_starts()
    compiles = CountingCompiles(monkeypatch)
    w = Warmup(start, bytes(m._ram[start:end]), len(m._ram), m.block_starts(), translated)
    while w.pending:
        w.step()
    dest = moved(m, w.take(m._ram, m.save_state()))
    assert kv(dest, b"GET k") == b"VALUE v\n"
    exchange(dest, ping(1, 3, b"z" * 8))
    assert compiles.count == 0


def test_what_is_not_a_block_among_the_translations_is_translated_instead(monkeypatch: pytest.MonkeyPatch) -> None:
    m = served_netd()
    start, end = m.code_range
    pcs = m.block_starts()
    other = marshal.dumps(compile("x = 1", "<x>", "exec"))  # code, but not a block's
    translated = [(pcs[0], b"junk"), (pcs[1], other), (pcs[2], "text"), *m.marshalled_blocks(1 << 30)[3:]]
    compiles = CountingCompiles(monkeypatch)
    w = Warmup(start, bytes(m._ram[start:end]), len(m._ram), pcs, translated)
    while w.pending:
        w.step()
    assert compiles.count == 3
    assert len(w.take(m._ram, m.save_state())) == len(pcs)


def test_marshalled_blocks_stop_at_the_byte_limit() -> None:
    m = served_netd()
    one = len(m.marshalled_blocks(1 << 30)[0][1])
    assert len(m.marshalled_blocks(one)) == 1
    assert m.marshalled_blocks(0) == []
