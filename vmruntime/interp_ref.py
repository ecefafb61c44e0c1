"""The reference interpreter: one instruction at a time, the obvious way.

Owns nothing the VM needs at run time.  It exists as the yardstick for the
block compiler: the benchmark (bench/bench_interp.py) measures the naive
dispatch loop against it, and the tests run random programs on both and
demand identical registers, flags, memory, counts and faults.  It drives a
Machine's own register file, RAM and devices, so either engine can continue
where the other stopped.
"""

from __future__ import annotations

from collections.abc import Callable

from vmruntime import isa
from vmruntime.interp import (
    R_FA,
    R_FB,
    R_IC,
    GuestFault,
    Halted,
    Waiting,
    device_fault,
    fill,
    hash_range,
    mem_fault,
    range_fault,
)
from vmruntime.isa import Op
from vmruntime.machine import Machine

Handler = Callable[[int, int, int, int, int], int]
_M = isa.MASK64
_S = isa.SIGN64


def _signed(x: int) -> int:
    return x - (1 << 64) if x & _S else x


_ALU: dict[Op, Callable[[int, int], int]] = {
    Op.ADD: lambda a, b: (a + b) & _M, Op.SUB: lambda a, b: (a - b) & _M, Op.MUL: lambda a, b: (a * b) & _M,
    Op.AND: lambda a, b: a & b, Op.OR: lambda a, b: a | b, Op.XOR: lambda a, b: a ^ b,
    Op.SHL: lambda a, b: (a << (b & 63)) & _M, Op.SHR: lambda a, b: a >> (b & 63),
    Op.SAR: lambda a, b: (_signed(a) >> (b & 63)) & _M,
}
_ALUI: dict[Op, Op] = {Op.ADDI: Op.ADD, Op.MULI: Op.MUL, Op.ANDI: Op.AND, Op.ORI: Op.OR, Op.XORI: Op.XOR,
                       Op.SHLI: Op.SHL, Op.SHRI: Op.SHR, Op.SARI: Op.SAR}
_COND: dict[Op, Callable[[int, int], bool]] = {
    Op.BEQ: lambda a, b: a == b, Op.BNE: lambda a, b: a != b, Op.BLTU: lambda a, b: a < b,
    Op.BGEU: lambda a, b: a >= b, Op.BLT: lambda a, b: _signed(a) < _signed(b),
    Op.BGE: lambda a, b: _signed(a) >= _signed(b),
}


class RefInterpreter:
    """Steps a Machine one instruction at a time: fetch, decode (cached per pc), dispatch, execute."""

    def __init__(self, machine: Machine) -> None:
        self.m = machine
        comp = machine._compiler
        self.code, self.code_start, self.code_end = comp.code, comp.code_start, comp.code_end
        self.size = comp.ram_size
        self.ram = machine._ram
        self.console = comp.ns["CON"]
        self.clock = comp.ns["CLK"]
        self.nic_read, self.nic_write = comp.ns["NICR"], comp.ns["NICW"]
        self.disk_read, self.disk_write = comp.ns["DSKR"], comp.ns["DSKW"]
        self.decoded: dict[int, tuple[Handler, int, int, int, int]] = {}
        self.handlers = self._handler_table()

    def run(self, budget: int) -> int:
        """Like Machine.run, but exact: stops after exactly budget instructions (or a WAIT that yields)."""
        m = self.m
        if m.status != "running" or m.waiting():
            return 0
        R, decoded, pc, done = m._R, self.decoded, m.pc, 0
        try:
            while done < budget:
                insn = decoded.get(pc) or self._decode(pc)
                pc = insn[0](insn[1], insn[2], insn[3], insn[4], pc)
                R[R_IC] += 1
                done += 1
        except Halted as h:
            R[R_IC] += 1
            pc, m.status, done = h.pc, "halted", done + 1
        except Waiting as w:
            R[R_IC] += 1
            pc, m.wait_until_ns, done = w.pc, m.wait_deadline(w.deadline), done + 1
        except GuestFault as f:
            pc, m.status, m.fault_reason = f.pc, "faulted", f.reason
        m.pc = pc
        return done

    def _decode(self, pc: int) -> tuple[Handler, int, int, int, int]:
        if not self.code_start <= pc < self.code_end:
            raise GuestFault(pc, f"pc {pc:#x} outside the code region")
        try:
            insn = isa.decode(self.code, pc - self.code_start)
        except isa.DecodeError as exc:
            raise GuestFault(pc, f"{exc} at pc {pc:#x}") from None
        entry = (self.handlers[insn.op], insn.a, insn.b, insn.c, insn.imm)
        self.decoded[pc] = entry
        return entry

    def _handler_table(self) -> dict[Op, Handler]:
        table: dict[Op, Handler] = {}
        for op in Op:
            if op in _ALU:
                table[op] = self._alu_handler(_ALU[op], imm=False)
            elif op in _ALUI:
                table[op] = self._alu_handler(_ALU[_ALUI[op]], imm=True)
            elif op in _COND:
                table[op] = self._branch_handler(_COND[op])
            elif op in isa.LOADS:
                table[op] = self._load_handler(isa.LOADS[op])
            elif op in isa.STORES:
                table[op] = self._store_handler(isa.STORES[op])
            elif op in (Op.DIVU, Op.REMU):
                table[op] = self._div_handler(op is Op.DIVU)
            else:
                table[op] = getattr(self, "_" + op.name.lower())
        return table

    # Every handler: (a, b, c, imm, pc) -> next pc.

    def _alu_handler(self, f: Callable[[int, int], int], imm: bool) -> Handler:
        R = self.m._R

        def alu(a: int, b: int, c: int, i: int, pc: int) -> int:
            R[a] = f(R[b], i & _M if imm else R[c])
            return pc + 8
        return alu

    def _branch_handler(self, cond: Callable[[int, int], bool]) -> Handler:
        R = self.m._R

        def branch(a: int, b: int, c: int, imm: int, pc: int) -> int:
            return imm if cond(R[R_FA], R[R_FB]) else pc + 8
        return branch

    def _div_handler(self, quotient: bool) -> Handler:
        R = self.m._R

        def div(a: int, b: int, c: int, imm: int, pc: int) -> int:
            if R[c] == 0:
                raise GuestFault(pc, f"division by zero at pc {pc:#x}")
            R[a] = R[b] // R[c] if quotient else R[b] % R[c]
            return pc + 8
        return div

    def _load_handler(self, width: int) -> Handler:
        R = self.m._R

        def load(a: int, b: int, c: int, imm: int, pc: int) -> int:
            addr = (R[b] + imm) & _M
            self._check(pc, "load", addr, width, False)
            R[a] = int.from_bytes(self.ram[addr:addr + width], "little")
            return pc + 8
        return load

    def _store_handler(self, width: int) -> Handler:
        R = self.m._R
        mask = (1 << (8 * width)) - 1

        def store(a: int, b: int, c: int, imm: int, pc: int) -> int:
            addr = (R[b] + imm) & _M
            self._check(pc, "store", addr, width, True)
            self.ram[addr:addr + width] = (R[a] & mask).to_bytes(width, "little")
            return pc + 8
        return store

    def _nop(self, a: int, b: int, c: int, imm: int, pc: int) -> int:
        return pc + 8

    def _halt(self, a: int, b: int, c: int, imm: int, pc: int) -> int:
        raise Halted(pc + 8)

    def _mov(self, a: int, b: int, c: int, imm: int, pc: int) -> int:
        self.m._R[a] = self.m._R[b]
        return pc + 8

    def _movi(self, a: int, b: int, c: int, imm: int, pc: int) -> int:
        self.m._R[a] = imm & _M
        return pc + 8

    def _li(self, a: int, b: int, c: int, imm: int, pc: int) -> int:
        self.m._R[a] = imm
        return pc + 16

    def _cmp(self, a: int, b: int, c: int, imm: int, pc: int) -> int:
        R = self.m._R
        R[R_FA], R[R_FB] = R[a], R[b]
        return pc + 8

    def _cmpi(self, a: int, b: int, c: int, imm: int, pc: int) -> int:
        R = self.m._R
        R[R_FA], R[R_FB] = R[a], imm & _M
        return pc + 8

    def _check(self, pc: int, kind: str, addr: int, width: int, store: bool) -> None:
        if addr > self.size - width or (store and addr < self.code_end):
            raise mem_fault(pc, kind, addr, width)

    def _push_value(self, value: int, pc: int, kind: str) -> None:
        R = self.m._R
        addr = (R[isa.SP] - 8) & _M
        self._check(pc, kind, addr, 8, True)
        self.ram[addr:addr + 8] = value.to_bytes(8, "little")
        R[isa.SP] = addr

    def _pop_value(self, pc: int, kind: str) -> int:
        R = self.m._R
        addr = R[isa.SP]
        self._check(pc, kind, addr, 8, False)
        R[isa.SP] = (addr + 8) & _M
        return int.from_bytes(self.ram[addr:addr + 8], "little")

    def _jmp(self, a: int, b: int, c: int, imm: int, pc: int) -> int:
        return imm

    def _jr(self, a: int, b: int, c: int, imm: int, pc: int) -> int:
        return self.m._R[a]

    def _call(self, a: int, b: int, c: int, imm: int, pc: int) -> int:
        self._push_value(pc + 8, pc, "call push")
        return imm

    def _ret(self, a: int, b: int, c: int, imm: int, pc: int) -> int:
        return self._pop_value(pc, "ret pop")

    def _push(self, a: int, b: int, c: int, imm: int, pc: int) -> int:
        self._push_value(self.m._R[a], pc, "push")
        return pc + 8

    def _pop(self, a: int, b: int, c: int, imm: int, pc: int) -> int:
        self.m._R[a] = self._pop_value(pc, "pop")
        return pc + 8

    def _range(self, pc: int, kind: str, addr: int, length: int, store: bool) -> None:
        if addr + length > self.size or (store and addr < self.code_end):
            raise range_fault(pc, kind, addr, length)

    def _fill(self, a: int, b: int, c: int, imm: int, pc: int) -> int:
        R = self.m._R
        if R[b]:
            self._range(pc, "fill", R[a], R[b], True)
            fill(self.ram, R[a], R[b], R[c] & 255)
        return pc + 8

    def _copy(self, a: int, b: int, c: int, imm: int, pc: int) -> int:
        R = self.m._R
        if R[c]:
            self._range(pc, "copy source", R[b], R[c], False)
            self._range(pc, "copy destination", R[a], R[c], True)
            self.ram.move(R[a], R[b], R[c])
        return pc + 8

    def _hash(self, a: int, b: int, c: int, imm: int, pc: int) -> int:
        R = self.m._R
        self._range(pc, "hash", R[b], R[c], False)
        R[a] = hash_range(self.ram, R[b], R[c], tuple(R[:16]))
        return pc + 8

    def _out(self, a: int, b: int, c: int, imm: int, pc: int) -> int:
        self.console.append(self.m._R[a] & 255)
        return pc + 8

    def _outs(self, a: int, b: int, c: int, imm: int, pc: int) -> int:
        R = self.m._R
        self._range(pc, "console output", R[a], R[b], False)
        self.console.extend(self.ram[R[a]:R[a] + R[b]])
        return pc + 8

    def _rdinsn(self, a: int, b: int, c: int, imm: int, pc: int) -> int:
        self.m._R[a] = self.m._R[R_IC]
        return pc + 8

    def _clock(self, a: int, b: int, c: int, imm: int, pc: int) -> int:
        self.m._R[a] = self.clock()
        return pc + 8

    def _wait(self, a: int, b: int, c: int, imm: int, pc: int) -> int:
        deadline = self.m._R[a]
        if self.clock() < deadline:
            raise Waiting(pc + 8, deadline)
        return pc + 8

    def _nicr(self, a: int, b: int, c: int, imm: int, pc: int) -> int:
        return self._device_read(self.nic_read, "nicr", a, imm, pc)

    def _nicw(self, a: int, b: int, c: int, imm: int, pc: int) -> int:
        return self._device_write(self.nic_write, "nicw", a, imm, pc)

    def _dskr(self, a: int, b: int, c: int, imm: int, pc: int) -> int:
        return self._device_read(self.disk_read, "dskr", a, imm, pc)

    def _dskw(self, a: int, b: int, c: int, imm: int, pc: int) -> int:
        return self._device_write(self.disk_write, "dskw", a, imm, pc)

    def _device_read(self, read: Callable[[int], int | str], op: str, a: int, reg: int, pc: int) -> int:
        """A register device's read: the value into ra, or the device's refusal as a fault."""
        value = read(reg)
        if isinstance(value, str):
            raise device_fault(pc, op, value)
        self.m._R[a] = value
        return pc + 8

    def _device_write(self, write: Callable[[int, int], str | None], op: str, a: int, reg: int, pc: int) -> int:
        reason = write(reg, self.m._R[a])
        if reason is not None:
            raise device_fault(pc, op, reason)
        return pc + 8
