"""Shipped guest programs: argument parsing, and what each program does to RAM and console."""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

import pytest

from tests.test_machine import FakeClock, run_to_end
from vmruntime import isa
from vmruntime.machine import Machine
from vmruntime.programs import PROGRAMS, load_program, parse_size, program_help

PAGE = isa.PAGE_SIZE
DATA = isa.DATA_ADDR


def boot(name: str, args: dict[str, str], size: int = 4 << 20, clock: FakeClock | None = None) -> Machine:
    image, boot_args = load_program(name, args)
    return Machine.boot(mmap.mmap(-1, size), image, boot_args, clock or FakeClock())


def touched_pages(m: Machine, start: int, end: int) -> set[int]:
    ram = m._ram
    return {p for p in range(start, end, PAGE) if ram[p:p + 8] != bytes(8)}


def test_program_names() -> None:
    assert PROGRAMS == ("idle", "counter", "memstress", "verify", "netd", "diskstress", "dbverify")


@pytest.mark.parametrize(("text", "value"), [("4096", 4096), ("64K", 64 << 10), ("64M", 64 << 20),
                                             ("1G", 1 << 30), ("2GiB", 2 << 30), ("8m", 8 << 20)])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


def test_bad_names_and_arguments_say_what_is_accepted() -> None:
    with pytest.raises(ValueError, match="idle, counter, memstress, verify"):
        load_program("nosuch", {})
    with pytest.raises(ValueError, match="accepts: ws, rate, pattern, values"):
        load_program("memstress", {"speed": "1"})
    with pytest.raises(ValueError, match="seq, random"):
        load_program("memstress", {"pattern": "zigzag"})
    with pytest.raises(ValueError, match="bad size"):
        load_program("verify", {"ws": "lots"})
    with pytest.raises(ValueError, match="at most 3600000"):
        load_program("counter", {"wait": "3600001"})
    with pytest.raises(ValueError, match="at most 1000000000"):
        load_program("memstress", {"rate": "1000000001"})


def test_program_help_lists_arguments_and_defaults() -> None:
    assert program_help("idle") == "no arguments"
    text = program_help("memstress")
    assert all(f"{k}=" in text for k in ("ws", "rate", "pattern", "values")) and "default 64M" in text


def test_boot_args_defaults_and_order() -> None:
    _, args = load_program("memstress", {"ws": "16M", "pattern": "random"})
    assert args == {"ws": 16 << 20, "rate": 0, "pattern": 1, "values": 0}


def run_for(m: Machine, clock: FakeClock, virtual_ns: int, step_ns: int, budget: int = 1 << 20) -> None:
    """Let virtual time pass in steps, giving the guest a large budget at each step (as a host would)."""
    for _ in range(virtual_ns // step_ns):
        clock.now += step_ns
        m.run(budget)


def test_idle_touches_nothing_and_runs_slowly() -> None:
    clock = FakeClock()
    m = boot("idle", {}, clock=clock)
    before = bytes(m._ram)
    run_for(m, clock, 10**9, 1_000_000)  # one virtual second, the host calling run() every ms
    assert m.status == "running" and bytes(m._ram) == before
    # 4 instructions per 10 ms turn: the counter moves, at about 400 a second, not millions
    assert 396 <= m.instructions <= 408
    assert m.wait_until_ns is not None and m.run(1 << 20) == 0


def test_idle_is_bounded_however_often_the_host_calls_run() -> None:
    clock = FakeClock()
    m = boot("idle", {}, clock=clock)
    for _ in range(10_000):
        m.run(1 << 20)  # the clock stands still: every call after the first does nothing
    assert m.instructions == 3


def test_counter_counts_and_prints() -> None:
    m = boot("counter", {"every": "1000"})
    while m.instructions < 14_000:  # about three instructions per count
        m.run(1000)
    lines = m.console_drain().decode().splitlines()
    assert lines[:3] == ["count 00000000000003e8", "count 00000000000007d0", "count 0000000000000bb8"]
    assert struct.unpack_from("<Q", m._ram, DATA)[0] == 1000 * len(lines)


COUNTER_BURST = 32768


def test_counter_counts_in_bursts_then_waits() -> None:
    clock = FakeClock()
    m = boot("counter", {"every": "5000"}, clock=clock)
    m.run(1 << 24)  # a huge budget, the clock standing still: one burst, then the WAIT
    assert m.wait_until_ns == 10_000_000  # 10 ms of virtual time after the burst (read at time 0)
    assert m.regs[1] == COUNTER_BURST
    assert 3 * COUNTER_BURST <= m.instructions <= 4 * COUNTER_BURST
    assert m.run(1 << 24) == 0
    run_for(m, clock, 100_000_000, 1_000_000, budget=1 << 24)  # 100 virtual ms
    assert m.regs[1] == 11 * COUNTER_BURST  # one burst per 10 ms: the core is not spun flat out


def test_counter_output_does_not_depend_on_waiting() -> None:
    clock = FakeClock()
    paced = boot("counter", {"every": "20000"}, clock=clock)
    run_for(paced, clock, 200_000_000, 3_000_000, budget=50_000)
    flat = boot("counter", {"every": "20000", "wait": "0"})
    while flat.regs[1] < paced.regs[1]:
        flat.run(1000)
    out = paced.console_drain()
    assert out.count(b"\n") >= 10 and flat.console_drain().startswith(out)
    assert flat.wait_until_ns is None  # wait=0 never waits


def test_memstress_rate_waits_instead_of_spinning() -> None:
    clock = FakeClock()
    m = boot("memstress", {"ws": "1M", "rate": "100"}, clock=clock)
    m.run(1 << 20)
    first = m.instructions
    for _ in range(1000):
        m.run(1 << 20)  # 10 ms to the next page and the clock stands still: nothing runs
    assert m.instructions == first < 100 and m.wait_until_ns == 10_000_000
    assert len(touched_pages(m, DATA, DATA + (1 << 20))) == 1


@pytest.mark.parametrize("pattern", ["seq", "random"])
@pytest.mark.parametrize("values", ["const", "random"])
def test_memstress_dirties_every_page_of_its_working_set(pattern: str, values: str) -> None:
    m = boot("memstress", {"ws": "64K", "pattern": pattern, "values": values})
    m.run(20_000)
    assert m.status == "running"
    assert touched_pages(m, DATA, DATA + (64 << 10)) == set(range(DATA, DATA + (64 << 10), PAGE))
    assert touched_pages(m, DATA + (64 << 10), 4 << 20) == set()
    words = {struct.unpack_from("<Q", m._ram, p)[0] for p in range(DATA, DATA + (64 << 10), PAGE)}
    assert (len(words) == 1) == (values == "const")


def test_memstress_clamps_ws_to_ram() -> None:
    m = boot("memstress", {"ws": "1G"}, size=1 << 20)
    m.run(100_000)
    assert m.status == "running"
    assert touched_pages(m, DATA, 1 << 20) == set(range(DATA, 1 << 20, PAGE))


def test_memstress_rate_is_paced_by_the_clock_device() -> None:
    clock = FakeClock()
    m = boot("memstress", {"ws": "1M", "rate": "1000"}, clock=clock)  # one page per virtual ms
    for _ in range(10):
        clock.now += 1_000_000
        m.run(2_000)
    written = touched_pages(m, DATA, DATA + (1 << 20))
    assert 9 <= len(written) <= 11


@pytest.mark.parametrize("pattern", ["seq", "random"])
def test_memstress_fast_rates_write_pages_in_millisecond_batches(pattern: str) -> None:
    clock = FakeClock()
    ws = 64 << 20  # 16384 pages: 300 random picks rarely repeat one
    m = boot("memstress", {"ws": "64M", "rate": "2500", "pattern": pattern}, size=DATA + ws, clock=clock)
    m.run(1 << 20)  # ceil(2500 / 1000) = 3 pages, then a WAIT 1.2 ms (3 pages at 2500/s) ahead
    assert (len(touched_pages(m, DATA, DATA + ws)), m.wait_until_ns) == (3, 1_200_000)
    run_for(m, clock, 120_000_000, 100_000)  # 120 virtual ms in steps of 0.1 ms
    low = 300 if pattern == "seq" else 290
    assert low <= len(touched_pages(m, DATA, DATA + ws)) <= 303


def test_memstress_drops_backlog_after_a_long_stall() -> None:
    clock = FakeClock()
    m = boot("memstress", {"ws": "4M", "rate": "1000"}, size=8 << 20, clock=clock)
    m.run(2_000)
    clock.now += 10**9  # one virtual second passes without the guest running
    m.run(50_000)
    assert len(touched_pages(m, DATA, DATA + (4 << 20))) < 10


def test_verify_prints_a_digest_and_halts_deterministically() -> None:
    outs = set()
    for _ in range(2):
        m = run_to_end(boot("verify", {"ws": "64K", "steps": "2000"}))
        assert m.status == "halted"
        outs.add(m.console_drain())
    (out,) = outs
    assert out.startswith(b"digest ") and len(out) == len("digest ") + 17 and out.endswith(b"\n")
    other = run_to_end(boot("verify", {"ws": "64K", "steps": "2001"}))
    assert other.console_drain() != out


def test_verify_never_reads_the_clock() -> None:
    a = run_to_end(boot("verify", {"ws": "64K", "steps": "3000"}, clock=FakeClock(0)))
    ticking = FakeClock(10**15)
    b = boot("verify", {"ws": "64K", "steps": "3000"}, clock=ticking)
    while b.status == "running":
        ticking.now += 977
        b.run(500)
    assert a.console_drain() == b.console_drain()


def test_programs_run_on_a_sparse_memfd(tmp_path: Path) -> None:
    fd = os.memfd_create("prog", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 64 << 20)
        with mmap.mmap(fd, 64 << 20) as ram:
            image, args = load_program("verify", {"ws": "32K", "steps": "100"})
            m = run_to_end(Machine.boot(ram, image, args, FakeClock()))
            assert m.status == "halted"
            del m
    finally:
        os.close(fd)


def test_load_program_from_a_path(tmp_path: Path) -> None:
    path = tmp_path / "mine.fasm"
    path.write_text("start: add r3, r1, r2\n halt\n")
    image, args = load_program(str(path), {"a": "2", "b": "4K"})
    assert args == {"a": 2, "b": 4096}
    m = run_to_end(Machine.boot(mmap.mmap(-1, 1 << 20), image, args, FakeClock()))
    assert m.regs[3] == 4098


@pytest.mark.parametrize(("name", "args"), [("verify", {"ws": "64K", "steps": "1500"}),
                                            ("memstress", {"ws": "64K", "pattern": "random", "values": "random"}),
                                            ("memstress", {"ws": "64K", "rate": "20000"}),
                                            ("counter", {"every": "300"}), ("idle", {})])
def test_shipped_programs_agree_with_the_reference_interpreter(name: str, args: dict[str, str]) -> None:
    from vmruntime.interp_ref import RefInterpreter

    c_fast, c_slow = FakeClock(), FakeClock()
    fast, slow = boot(name, args, clock=c_fast), boot(name, args, clock=c_slow)
    ref = RefInterpreter(slow)
    ran = 0
    for _ in range(200):  # the same steps of virtual time on both; waits included
        if fast.status != "running" or ran >= 30_000:
            break
        step = fast.run(997)
        assert ref.run(step) == step
        ran += step
        c_fast.now += 20_000
        c_slow.now += 20_000
    assert (fast.status, fast.pc, fast._R) == (slow.status, slow.pc, slow._R)
    assert bytes(fast._ram) == bytes(slow._ram)
    assert fast.console_drain() == slow.console_drain()


def test_paced_memstress_keeps_its_rate_across_save_and_restore() -> None:
    import msgpack

    clock = FakeClock(10**9)
    m = boot("memstress", {"ws": "1M", "rate": "1000"}, clock=clock)
    for _ in range(5):
        clock.now += 1_000_000
        m.run(2_000)
    state = msgpack.unpackb(msgpack.packb(m.save_state()))
    ram = mmap.mmap(-1, len(m._ram))
    ram[:] = m._ram[:]
    other_host = FakeClock(7)  # another host's clock epoch: virtual time must not jump
    m2 = Machine.restore(ram, state, other_host)
    for _ in range(5):
        other_host.now += 1_000_000
        m2.run(2_000)
    assert 9 <= len(touched_pages(m2, DATA, DATA + (1 << 20))) <= 11
