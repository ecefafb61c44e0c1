"""ISA semantics, instruction by instruction, checked against a Python reference model."""

from __future__ import annotations

import random
import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_machine import FakeClock, boot_asm, run_to_end
from vmruntime import isa
from vmruntime.isa import Op
from vmruntime.machine import Machine

M = isa.MASK64
u64 = st.integers(min_value=0, max_value=M)
DATA = isa.DATA_ADDR


def signed(x: int) -> int:
    return x - (1 << 64) if x >> 63 else x


REF3 = {
    "add": lambda a, b: (a + b) & M, "sub": lambda a, b: (a - b) & M, "mul": lambda a, b: (a * b) & M,
    "and": lambda a, b: a & b, "or": lambda a, b: a | b, "xor": lambda a, b: a ^ b,
    "shl": lambda a, b: (a << (b & 63)) & M, "shr": lambda a, b: a >> (b & 63),
    "sar": lambda a, b: (signed(a) >> (b & 63)) & M,
    "divu": lambda a, b: a // b, "remu": lambda a, b: a % b,
}


def run3(op: str, a: int, b: int) -> int:
    m = run_to_end(boot_asm(f"start: li r1, {a}\n li r2, {b}\n {op} r3, r1, r2\n halt"))
    assert m.status == "halted", m.fault_reason
    return m.regs[3]


@settings(max_examples=25, deadline=None)
@given(a=u64, b=u64)
@pytest.mark.parametrize("op", sorted(REF3))
def test_three_register_alu(op: str, a: int, b: int) -> None:
    if op in ("divu", "remu") and b == 0:
        b = 7
    assert run3(op, a, b) == REF3[op](a, b)


REFI = {
    "addi": lambda a, i: (a + i) & M, "muli": lambda a, i: (a * i) & M, "andi": lambda a, i: a & (i & M),
    "ori": lambda a, i: a | (i & M), "xori": lambda a, i: a ^ (i & M),
}


@settings(max_examples=25, deadline=None)
@given(a=u64, i=st.integers(min_value=-(1 << 31), max_value=(1 << 31) - 1))
@pytest.mark.parametrize("op", sorted(REFI))
def test_immediate_alu_sign_extends(op: str, a: int, i: int) -> None:
    m = run_to_end(boot_asm(f"start: li r1, {a}\n {op} r2, r1, {i}\n halt"))
    assert m.regs[2] == REFI[op](a, i)


@settings(max_examples=25, deadline=None)
@given(a=u64, s=st.integers(min_value=0, max_value=63))
def test_immediate_shifts(a: int, s: int) -> None:
    m = run_to_end(boot_asm(f"start: li r1, {a}\n shli r2, r1, {s}\n shri r3, r1, {s}\n sari r4, r1, {s}\n halt"))
    assert m.regs[2:5] == [(a << s) & M, a >> s, (signed(a) >> s) & M]


def test_mov_movi_li() -> None:
    m = run_to_end(boot_asm("start: movi r1, -1\n movi r2, 0x7fffffff\n li r3, 0x123456789abcdef0\n"
                            " mov r4, r3\n halt"))
    assert m.regs[1:5] == [M, 0x7FFFFFFF, 0x123456789ABCDEF0, 0x123456789ABCDEF0]


BRANCH_REF = {
    "beq": lambda a, b: a == b, "bne": lambda a, b: a != b,
    "blt": lambda a, b: signed(a) < signed(b), "bge": lambda a, b: signed(a) >= signed(b),
    "bltu": lambda a, b: a < b, "bgeu": lambda a, b: a >= b,
}
EDGE = [0, 1, 2, (1 << 63) - 1, 1 << 63, M - 1, M]


@pytest.mark.parametrize("op", sorted(BRANCH_REF))
def test_conditional_branches(op: str) -> None:
    for a in EDGE:
        for b in EDGE:
            src = (f"start: li r1, {a}\n li r2, {b}\n movi r3, 0\n cmp r1, r2\n {op} taken\n halt\n"
                   "taken: movi r3, 1\n halt")
            m = run_to_end(boot_asm(src))
            assert m.regs[3] == int(BRANCH_REF[op](a, b)), (op, a, b)


def test_flags_survive_a_block_boundary() -> None:
    # The compare and the branch sit in different blocks (a label between them is a jump target).
    src = ("start: movi r1, 5\n cmpi r1, 9\n jmp next\nnext: blt yes\n movi r2, 2\n halt\n"
           "yes: movi r2, 1\n halt")
    m = run_to_end(boot_asm(src))
    assert m.regs[2] == 1
    assert m.flags == isa.FLAG_LT | isa.FLAG_B


@pytest.mark.parametrize(("width", "op"), [(1, "8"), (2, "16"), (4, "32"), (8, "64")])
def test_loads_and_stores_every_width(width: int, op: str) -> None:
    value = 0x8877665544332211
    src = (f"start: li r1, {DATA + 3}\n li r2, {value}\n st{op} r2, [r1 + 5]\n"
           f" ld{op} r3, [r1 + 5]\n ld64 r4, [r1 + 5]\n halt")
    m = run_to_end(boot_asm(src))
    mask = (1 << (8 * width)) - 1
    assert m.regs[3] == value & mask  # zero-extended
    assert m.regs[4] == value & mask  # the store wrote only its width
    assert m._ram[DATA + 8:DATA + 8 + width] == (value & mask).to_bytes(width, "little")


def test_load_with_negative_displacement() -> None:
    src = f"start: li r1, {DATA + 64}\n movi r2, 77\n st64 r2, [r1 - 16]\n ld64 r3, [r1 - 16]\n halt"
    m = run_to_end(boot_asm(src))
    assert m.regs[3] == 77
    assert struct.unpack_from("<Q", m._ram, DATA + 48)[0] == 77


def test_call_ret_push_pop_use_a_stack_in_guest_ram() -> None:
    src = ("start: movi r1, 11\n push r1\n call f\n pop r4\n halt\n"
           "f: movi r2, 22\n push r2\n pop r3\n ret")
    m = run_to_end(boot_asm(src))
    assert m.status == "halted"
    assert m.regs[2:5] == [22, 22, 11]
    assert m.regs[isa.SP] == isa.STACK_TOP
    # the return address was written below the pushed 11
    assert struct.unpack_from("<Q", m._ram, isa.STACK_TOP - 8)[0] == 11


def test_jr_jumps_to_a_register() -> None:
    m = run_to_end(boot_asm("start: movi r1, there\n jr r1\n movi r2, 1\n halt\nthere: movi r2, 2\n halt"))
    assert m.regs[2] == 2


def test_fill_and_copy_move_byte_ranges() -> None:
    src = (f"start: li r1, {DATA}\n li r2, 10000\n movi r3, 0x1ab\n fill r1, r2, r3\n"
           f" li r4, {DATA + 5000}\n movi r5, 100\n copy r4, r1, r5\n"
           f" li r6, {DATA + 20000}\n movi r7, 0\n fill r6, r7, r3\n halt")
    m = run_to_end(boot_asm(src))
    assert m.status == "halted"
    assert m._ram[DATA:DATA + 10000] == b"\xab" * 10000
    assert m._ram[DATA + 10000:DATA + 10001] == b"\0"
    assert m._ram[DATA + 20000:DATA + 20001] == b"\0"  # zero-length fill touches nothing


def test_copy_overlapping_is_memmove() -> None:
    src = (f"start: li r1, {DATA}\n movi r2, 8\n movi r3, 0\nloop: st8 r3, [r1]\n addi r1, r1, 1\n"
           f" addi r3, r3, 1\n cmp r3, r2\n bne loop\n li r1, {DATA}\n addi r4, r1, 2\n copy r4, r1, r2\n halt")
    m = run_to_end(boot_asm(src))
    assert m._ram[DATA:DATA + 10] == bytes([0, 1, 0, 1, 2, 3, 4, 5, 6, 7])


def test_hash_covers_ram_range_and_registers() -> None:
    base = f"start: li r1, {DATA}\n movi r2, 4096\n movi r9, 3\n"
    a = run_to_end(boot_asm(base + " hash r3, r1, r2\n halt"))
    b = run_to_end(boot_asm(base + " movi r4, 1\n st8 r4, [r1 + 100]\n movi r4, 0\n hash r3, r1, r2\n halt"))
    c = run_to_end(boot_asm(base + " movi r9, 4\n hash r3, r1, r2\n halt"))
    assert a.regs[3] != b.regs[3]  # one byte of RAM differs
    assert a.regs[3] != c.regs[3]  # one register differs
    again = run_to_end(boot_asm(base + " hash r3, r1, r2\n halt"))
    assert again.regs[3] == a.regs[3]


def test_console_out_and_outs() -> None:
    m = run_to_end(boot_asm("start: movi r1, 0x148\n out r1\n movi r2, msg\n movi r3, 2\n outs r2, r3\n halt\n"
                            "msg: .ascii \"ok\""))
    assert m.console_drain() == b"Hok"
    assert m.console_drain() == b""


def test_rdinsn_counts_instructions_before_it() -> None:
    m = run_to_end(boot_asm("start: nop\n nop\n rdinsn r1\n jmp x\nx: rdinsn r2\n halt"))
    assert m.regs[1] == 2
    assert m.regs[2] == 4
    assert m.instructions == 6


def test_clock_reads_virtual_time_from_the_host_clock() -> None:
    clock = FakeClock(5_000_000)
    m = boot_asm("start: clock r1\n clock r2\n halt", clock=clock)
    m.run(1)  # both clock reads are in one block: run it all
    assert m.regs[1] == 0  # virtual time starts at 0 at boot
    clock.now += 1234
    m2 = boot_asm("start: clock r1\n halt", clock=clock)
    clock.now += 500
    run_to_end(m2)
    assert m2.regs[1] == 500


def test_halt_stops_and_counts() -> None:
    m = run_to_end(boot_asm("start: movi r1, 1\n halt\n movi r1, 2"))
    assert (m.status, m.regs[1], m.instructions, m.pc) == ("halted", 1, 2, 16)
    assert m.run(100) == 0


def test_encode_decode_round_trip() -> None:
    for op in Op:
        raw = isa.encode(op, 1, 2, 3, -5 if op is not Op.LI else M)
        insn = isa.decode(raw, 0)
        assert (insn.op, insn.a, insn.b, insn.c, insn.size) == (op, 1, 2, 3, isa.SPECS[op].size)
        assert insn.imm == (M if op is Op.LI else -5)


def test_decode_rejects_opcode_zero_and_bad_registers() -> None:
    with pytest.raises(isa.DecodeError, match="invalid opcode"):
        isa.decode(bytes(8), 0)
    with pytest.raises(isa.DecodeError, match="register"):
        isa.decode(bytes([Op.ADD, 16, 0, 0, 0, 0, 0, 0]), 0)


# ---- differential: the block compiler against the one-at-a-time reference interpreter ----

_ALU_OPS = ["add", "sub", "mul", "and", "or", "xor", "shl", "shr", "sar", "divu", "remu"]
_IMM_OPS = ["addi", "muli", "andi", "ori", "xori", "shli", "shri", "sari"]
_BRANCH_OPS = ["beq", "bne", "blt", "bge", "bltu", "bgeu", "jmp", "call"]
_MEM_OPS = ["ld8", "ld16", "ld32", "ld64", "st8", "st16", "st32", "st64"]


def _random_program(rng: random.Random) -> str:
    """Random code over registers that start as data addresses or random words; faults allowed."""
    n = rng.randint(1, 40)
    reg = lambda: f"r{rng.randint(0, 15)}"  # noqa: E731
    small = lambda: rng.randint(-300, 300)  # noqa: E731
    lines = [f" li r{i}, {rng.getrandbits(64) if i % 3 else isa.DATA_ADDR + 64 * i}" for i in range(15)]
    for k in range(n):
        kind = rng.choice(["alu", "imm", "cmp", "branch", "mem", "misc"])
        if kind == "alu":
            line = f"{rng.choice(_ALU_OPS)} {reg()}, {reg()}, {reg()}"
        elif kind == "imm":
            op = rng.choice(_IMM_OPS)
            line = f"{op} {reg()}, {reg()}, {rng.randint(0, 63) if op.startswith('s') else small()}"
        elif kind == "cmp":
            line = f"cmp {reg()}, {reg()}" if rng.random() < 0.5 else f"cmpi {reg()}, {small()}"
        elif kind == "branch":
            line = f"{rng.choice(_BRANCH_OPS)} L{rng.randint(0, n)}"
        elif kind == "mem":
            line = f"{rng.choice(_MEM_OPS)} {reg()}, [{reg()} + {small()}]"
        else:
            line = rng.choice(["push r3", "pop r4", "rdinsn r5", "clock r6", "out r7", "nop",
                               "mov r8, r9", "movi r10, -7", "hash r11, r12, r13", "ret", "jr r10",
                               "fill r3, r10, r7", "copy r6, r0, r10", "outs r9, r10", "movi r10, 40",
                               "wait r6", "wait r10", "wait r1"])
        lines.append(f"L{k}: {line}")
    lines.append(f"L{n}: halt")
    return "start:\n" + "\n".join(lines)


def test_block_compiler_matches_reference_interpreter() -> None:
    from vmruntime.interp_ref import RefInterpreter

    rng = random.Random(2026)
    for _ in range(300):
        src, budget = _random_program(rng), rng.randint(1, 3000)
        fast = boot_asm(src, ram_size=256 << 10)
        slow = boot_asm(src, ram_size=256 << 10)
        ran = fast.run(budget)
        # the reference stops exactly; a faulting instruction is not counted, so let it try one more
        ref = RefInterpreter(slow)
        assert ref.run(ran) == ran, src
        if fast.status == "faulted":
            assert ref.run(1) == 0, src
        assert (fast.status, fast.fault_reason, fast.pc, fast.instructions, fast.wait_until_ns) == \
            (slow.status, slow.fault_reason, slow.pc, slow.instructions, slow.wait_until_ns), src
        assert fast._R == slow._R, src
        assert bytes(fast._ram) == bytes(slow._ram), src
        assert fast.console_drain() == slow.console_drain(), src


def test_fill_larger_than_the_host_chunk() -> None:
    length = (5 << 19) + 3  # 2.5 MiB + 3: several 1 MiB host chunks and a ragged end
    src = f"start: li r1, {DATA}\n li r2, {length}\n movi r3, 0x5c\n fill r1, r2, r3\n halt"
    m = run_to_end(boot_asm(src, ram_size=4 << 20))
    assert m._ram[DATA:DATA + length] == b"\x5c" * length
    assert m._ram[DATA + length] == 0


# ---- WAIT: yield the vCPU until the clock device reaches a deadline ----

WAIT_LOOP = "start: clock r1\n addi r1, r1, 100\n wait r1\n addi r2, r2, 1\n jmp start"


@pytest.mark.parametrize("engine", ["fast", "ref"])
def test_wait_on_a_future_deadline_completes_and_returns_early(engine: str) -> None:
    clock = FakeClock()
    m = boot_asm(WAIT_LOOP, clock=clock)
    run = _engine(m, engine)
    assert run(10_000) == 3  # clock, addi, wait: the WAIT counts and run() returns at once
    assert (m.pc, m.instructions, m.wait_until_ns, m.regs[2]) == (24, 3, 100, 0)
    assert m.status == "running"
    assert m.wait_seconds() == pytest.approx(100e-9)


@pytest.mark.parametrize("engine", ["fast", "ref"])
def test_run_before_the_deadline_does_nothing(engine: str) -> None:
    clock = FakeClock()
    m = boot_asm(WAIT_LOOP, clock=clock)
    run = _engine(m, engine)
    run(10_000)
    before = (m.pc, m._R[:], bytes(m._ram))
    clock.now += 99  # one nanosecond short
    assert run(10_000) == 0
    assert (m.pc, m._R[:], bytes(m._ram)) == before
    assert m.wait_seconds() == pytest.approx(1e-9)
    clock.now += 1  # the deadline is reached: the guest goes on to its next WAIT
    assert run(10_000) == 5
    assert (m.regs[2], m.wait_until_ns, m.instructions) == (1, 200, 8)


@pytest.mark.parametrize("engine", ["fast", "ref"])
def test_wait_on_a_passed_deadline_is_one_instruction_and_no_yield(engine: str) -> None:
    m = boot_asm("start: clock r1\n wait r1\n wait r3\n addi r2, r2, 1\n halt", clock=FakeClock())
    assert _engine(m, engine)(10_000) == 5  # r1 = now and r3 = 0 are both reached: no early return
    assert (m.status, m.regs[2], m.wait_until_ns) == ("halted", 1, None)


def test_wait_seconds_is_capped_and_zero_when_not_waiting() -> None:
    from vmruntime.machine import MAX_WAIT_SECONDS

    m = boot_asm(f"start: li r1, {M}\n wait r1\n halt", clock=FakeClock())
    assert m.wait_seconds() == 0.0
    m.run(100)
    assert m.wait_until_ns == M  # a deadline 584 years ahead: the host re-checks it now and then
    assert m.wait_seconds() == MAX_WAIT_SECONDS
    assert m.run(100) == 0 and m.status == "running"


def test_wait_seconds_never_goes_negative_on_a_moving_clock() -> None:
    ticks = iter(range(0, 10**9, 7))  # every clock read is 7 ns later than the one before
    m = boot_asm("start: clock r1\n addi r1, r1, 50\n wait r1\n halt", clock=lambda: next(ticks))  # type: ignore[arg-type]
    m.run(10)
    assert m.wait_until_ns is not None
    seen = []
    while m.run(10) == 0:
        seen.append(m.wait_seconds())
    assert seen and min(seen) >= 0.0 and max(seen) < 50e-9
    assert m.status == "halted"


def test_wait_ends_a_self_loop_block_with_exact_registers_and_flags() -> None:
    # The WAIT sits inside a loop the compiler turns into a `while`: registers
    # written in earlier iterations and the flags must be written back at the exit.
    src = ("start: movi r3, 0\nloop: addi r3, r3, 1\n cmpi r3, 5\n wait r4\n bne loop\n"
           " li r4, 1000\n jmp loop")
    clock = FakeClock()
    fast, slow = boot_asm(src, clock=clock), boot_asm(src, clock=clock)
    from vmruntime.interp_ref import RefInterpreter

    ran = fast.run(1000)
    assert RefInterpreter(slow).run(ran) == ran
    assert fast.wait_until_ns == 1000 and fast.regs[3] == 6  # five turns, out, one more turn
    assert (fast._R, fast.pc, fast.wait_until_ns) == (slow._R, slow.pc, slow.wait_until_ns)


def _engine(m: Machine, engine: str) -> Callable[[int], int]:
    from vmruntime.interp_ref import RefInterpreter

    return m.run if engine == "fast" else RefInterpreter(m).run


def _waiting_program(rng: random.Random) -> str:
    """Random loops mixing computation, clock reads and WAITs on near and far deadlines."""
    body = []
    for _ in range(rng.randint(3, 25)):
        kind = rng.random()
        if kind < 0.25:
            body.append(f"clock r{rng.randint(1, 6)}\n addi r{rng.randint(1, 6)}, r{rng.randint(1, 6)}, "
                        f"{rng.randint(-50, 5000)}")
        elif kind < 0.5:
            body.append(f"wait r{rng.randint(1, 6)}")
        elif kind < 0.7:
            body.append(f"cmpi r{rng.randint(1, 6)}, {rng.randint(0, 3000)}\n bltu W{rng.randint(0, 30)}")
        else:
            body.append(f"addi r{rng.randint(1, 6)}, r{rng.randint(1, 6)}, {rng.randint(-9, 9)}\n"
                        f" st8 r1, [r7 + {rng.randint(0, 4000)}]")
    lines = [f"W{k}: {line}" for k, line in enumerate(body)]
    lines += [f"W{k}: nop" for k in range(len(body), 31)]
    return f"start: li r7, {DATA}\n" + "\n".join(lines) + "\n jmp start"


def test_block_compiler_matches_reference_while_the_clock_moves() -> None:
    from vmruntime.interp_ref import RefInterpreter

    rng = random.Random(74)
    yields = resumes = 0
    for _ in range(60):
        src = _waiting_program(rng)
        c_fast, c_slow = FakeClock(), FakeClock()
        fast, slow = boot_asm(src, clock=c_fast), boot_asm(src, clock=c_slow)
        ref = RefInterpreter(slow)
        waiting = False
        for _ in range(40):
            ran = fast.run(rng.randint(1, 500))
            assert ref.run(ran) == ran, src
            assert (fast.pc, fast.instructions, fast.wait_until_ns, fast.status) == \
                (slow.pc, slow.instructions, slow.wait_until_ns, slow.status), src
            assert fast._R == slow._R, src
            resumes += waiting and ran > 0
            waiting = fast.wait_until_ns is not None
            yields += waiting
            step = rng.choice([0, 1, 37, 400, 5000])
            c_fast.now += step
            c_slow.now += step
        assert bytes(fast._ram) == bytes(slow._ram), src
        assert fast.status == "running", fast.fault_reason
    assert yields > 400 and resumes > 60  # the programs really waited, and went on after deadlines
