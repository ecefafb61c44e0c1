"""The block compiler: guest basic blocks turned into Python functions.

Owns how the interpreter runs fast.  Code is decoded from the code region
(never from writable memory: stores there fault, so a decoded block stays
valid) and each block -- a trace of up to MAX_BLOCK instructions that
takes conditional branches as side exits, follows direct jumps and calls
into code not yet in it, and ends at ret, jr, halt or a jump to code already
in it -- becomes the source of one Python function, compiled with exec and
cached by start PC.  Registers live in locals for the whole block and are written back
at every exit, so one Python call runs many guest instructions.  A block
whose branch targets its own start becomes a `while` loop that checks the
instruction budget on each back edge.

Calling convention of a block function: fn(R, M, lim) -> next pc, where R is
the register file (R[0..15] registers, R[16]/R[17] the operands of the last
compare, R[18] the instruction counter), M the guest RAM mapping and lim the
instruction count at which a self-loop must stop.  A fault raises GuestFault,
a HALT raises Halted and a WAIT on a deadline still ahead raises Waiting,
each after writing back registers and an exact count.
"""

from __future__ import annotations

import hashlib
import marshal
import mmap
import struct
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import CodeType, FunctionType
from typing import Any

from vmruntime import isa
from vmruntime.isa import Op

MAX_BLOCK = 64
# Translated blocks travel between this host's VM processes as marshalled code (vmruntime/warmup.py):
# only a process with the same tag (Python bytecode and block calling convention) may load them.
COMPILER_TAG = f"{sys.implementation.cache_tag}-blocks-1"
R_FA, R_FB, R_IC = 16, 17, 18
REGFILE_LEN = 19
_M = isa.MASK64
_S = isa.SIGN64
_FILL_CHUNK = 1 << 20

BlockFn = Callable[[list[int], mmap.mmap, int], int]


class GuestFault(Exception):
    """The guest did something the machine refuses; the VM becomes faulted."""

    def __init__(self, pc: int, reason: str) -> None:
        super().__init__(reason)
        self.pc = pc
        self.reason = reason


class Halted(Exception):
    """The guest executed HALT; pc is the address after it."""

    def __init__(self, pc: int) -> None:
        super().__init__(pc)
        self.pc = pc


class Waiting(Exception):
    """The guest executed WAIT on a deadline still ahead: the vCPU yields until the clock reaches it.

    The WAIT has completed (it is counted and pc is the address after it);
    deadline is in the clock device's virtual nanoseconds.
    """

    def __init__(self, pc: int, deadline: int) -> None:
        super().__init__(pc, deadline)
        self.pc = pc
        self.deadline = deadline


def mem_fault(pc: int, kind: str, addr: int, width: int) -> GuestFault:
    return GuestFault(pc, f"{kind} of {width} bytes at address {addr:#x} outside guest RAM "
                          f"or into the read-only code region (pc={pc:#x})")


def range_fault(pc: int, kind: str, addr: int, length: int) -> GuestFault:
    return GuestFault(pc, f"{kind} range [{addr:#x}, +{length:#x}) outside guest RAM "
                          f"or into the read-only code region (pc={pc:#x})")


def fill(ram: mmap.mmap, dst: int, length: int, value: int) -> None:
    """Set length bytes at dst to value, in bounded chunks so a huge FILL needs no huge buffer."""
    chunk = bytes([value]) * min(length, _FILL_CHUNK)
    end = dst + length
    while dst < end:
        n = min(len(chunk), end - dst)
        ram[dst:dst + n] = chunk if n == len(chunk) else chunk[:n]
        dst += n


def hash_range(ram: mmap.mmap, addr: int, length: int, regs: tuple[int, ...]) -> int:
    """blake2b-64 of RAM[addr, addr+length) followed by r0..r15 as little-endian u64."""
    h = hashlib.blake2b(digest_size=8)
    with memoryview(ram) as view, view[addr:addr + length] as part:
        h.update(part)
    h.update(struct.pack("<16Q", *regs))
    return int.from_bytes(h.digest(), "little")


# A device's register accessors (the NIC's, the disk's): a read returns the value or a fault
# reason (a str), a write None or a fault reason.
RegRead = Callable[[int], "int | str"]
RegWrite = Callable[[int, int], "str | None"]


def device_fault(pc: int, op: str, reason: str) -> GuestFault:
    return GuestFault(pc, f"{op}: {reason} (pc={pc:#x})")


def make_namespace(console: bytearray, clock: Callable[[], int], nic_read: RegRead, nic_write: RegWrite,
                   disk_read: RegRead, disk_write: RegWrite) -> dict[str, Any]:
    """Globals the generated block functions see; the device accessors return a fault reason as a str."""
    return {
        "U16": struct.Struct("<H").unpack_from, "U32": struct.Struct("<I").unpack_from,
        "U64": struct.Struct("<Q").unpack_from, "P16": struct.Struct("<H").pack_into,
        "P32": struct.Struct("<I").pack_into, "P64": struct.Struct("<Q").pack_into,
        "CON": console, "CLK": clock, "HASH": hash_range, "FILL": fill,
        "MF": mem_fault, "RF": range_fault, "GF": GuestFault, "Halted": Halted, "Waiting": Waiting,
        "NICR": nic_read, "NICW": nic_write, "DSKR": disk_read, "DSKW": disk_write, "NF": device_fault,
    }


class BlockCompiler:
    """Compiles blocks of one machine's code region, for one RAM size."""

    def __init__(self, code: bytes, code_start: int, ram_size: int, namespace: dict[str, Any],
                 ready: Mapping[int, CodeType] | None = None) -> None:
        """ready: blocks translated ahead from this same code region and RAM size (vmruntime/warmup.py)."""
        self.code = code
        self.code_start = code_start
        self.code_end = code_start + len(code)
        self.ram_size = ram_size
        self.ns = namespace
        self._ready = dict(ready or {})

    def translate(self, pc: int) -> CodeType:
        """The block at pc as the code object of its function: the costly half of compile(), which
        depends only on the code region and the RAM size, not on the machine's devices."""
        src = _BlockWriter(self, pc, self._trace(pc)).source()
        module = compile(src, f"<guest block {pc:#x}>", "exec")
        return next(c for c in module.co_consts if isinstance(c, CodeType))

    def compile(self, pc: int) -> BlockFn:
        code = self._ready.pop(pc, None)
        fn: BlockFn = FunctionType(code if code is not None else self.translate(pc), self.ns)
        return fn

    def _trace(self, start: int) -> _Trace:
        """Decode the block at start, following direct jumps and calls to code not yet in it."""
        trace = _Trace([], set(), start, None)
        seen: set[int] = set()
        at = start
        while len(trace.insns) < MAX_BLOCK:
            trace.end_pc = at
            if not self.code_start <= at < self.code_end:
                trace.stop = f"pc {at:#x} outside the code region"
                return trace
            try:
                insn = isa.decode(self.code, at - self.code_start)
            except isa.DecodeError as exc:
                trace.stop = f"{exc} at pc {at:#x}"
                return trace
            trace.insns.append((at, insn))
            seen.add(at)
            if insn.op in (Op.JMP, Op.CALL) and self._followable(insn.imm, start, seen):
                trace.followed.add(len(trace.insns) - 1)
                at = insn.imm
                continue
            if insn.op in isa.BLOCK_ENDS:
                break
            at += insn.size
        trace.end_pc = at
        return trace

    def _followable(self, target: int, start: int, seen: set[int]) -> bool:
        # A jump back to the start closes a loop instead; one into the block would duplicate it.
        return target != start and target not in seen and self.code_start <= target < self.code_end


@dataclass(slots=True)
class _Trace:
    """The decoded instructions of one block."""

    insns: list[tuple[int, isa.Insn]]
    followed: set[int]  # indices of jmp/call whose target continues inside the block
    end_pc: int  # where control goes after the last instruction, when it does not end the block
    stop: str | None  # why decoding stopped at end_pc: the block faults there


_ALU3 = {
    Op.ADD: "({a} + {b}) & @K", Op.SUB: "({a} - {b}) & @K", Op.MUL: "({a} * {b}) & @K",
    Op.AND: "{a} & {b}", Op.OR: "{a} | {b}", Op.XOR: "{a} ^ {b}",
    Op.SHL: "({a} << ({b} & 63)) & @K", Op.SHR: "{a} >> ({b} & 63)",
    Op.SAR: "((({a} ^ @S) - @S) >> ({b} & 63)) & @K",
}
_ALUI = {
    Op.ADDI: "({a} + {i}) & @K", Op.MULI: "({a} * {i}) & @K", Op.ANDI: "{a} & {u}",
    Op.ORI: "{a} | {u}", Op.XORI: "{a} ^ {u}", Op.SHLI: "({a} << {s}) & @K", Op.SHRI: "{a} >> {s}",
    Op.SARI: "((({a} ^ @S) - @S) >> {s}) & @K",
}
_CONDS = {
    Op.BEQ: "fa == fb", Op.BNE: "fa != fb", Op.BLTU: "fa < fb", Op.BGEU: "fa >= fb",
    Op.BLT: "(fa ^ @S) < (fb ^ @S)", Op.BGE: "(fa ^ @S) >= (fb ^ @S)",
}
_LOAD_EXPR = {1: "M[a]", 2: "U16(M, a)[0]", 4: "U32(M, a)[0]", 8: "U64(M, a)[0]"}
_STORE_STMT = {1: "M[a] = {v} & 255", 2: "P16(M, a, {v} & 65535)", 4: "P32(M, a, {v} & 4294967295)",
               8: "P64(M, a, {v})"}


def load_block(blob: object) -> CodeType | None:
    """A block's code from marshal_block's output; None for anything that is not one."""
    try:
        code = marshal.loads(blob) if isinstance(blob, bytes) else None
    except (EOFError, ValueError, TypeError):
        return None
    if not isinstance(code, CodeType) or code.co_name != "block" or code.co_argcount != 3 or code.co_freevars:
        return None
    return code


def marshal_block(fn: BlockFn) -> bytes:
    return marshal.dumps(fn.__code__)  # type: ignore[attr-defined]


def within_bytes(blocks: Iterable[tuple[int, bytes]], max_bytes: int) -> list[tuple[int, bytes]]:
    """The first (pc, marshalled code) pairs, in order, whose code adds up to at most ``max_bytes``."""
    out: list[tuple[int, bytes]] = []
    total = 0
    for pc, blob in blocks:
        total += len(blob)
        if total > max_bytes:
            break
        out.append((pc, blob))
    return out


def translated_pairs(raw: object) -> dict[int, bytes]:
    """[[pc, marshalled code], ...] as received (a control message) as a dict; whatever else is left out."""
    if not isinstance(raw, list | tuple):
        return {}
    return {p[0]: p[1] for p in raw if isinstance(p, list | tuple) and len(p) == 2
            and isinstance(p[0], int) and isinstance(p[1], bytes)}


def _r(i: int) -> str:
    return f"r{i}"


class _BlockWriter:
    """Writes the Python source of one block function."""

    def __init__(self, comp: BlockCompiler, start: int, trace: _Trace) -> None:
        self.c = comp
        self.start = start
        self.insns = trace.insns
        self.trace = trace
        self.lines: list[str] = []
        self.indent = 1
        self.written: set[int] = set()
        self.written_now: set[int] = set()  # registers written before the current point
        self.read: set[int] = set()
        self.cmp_seen = False
        self.cmp_done = False  # a compare precedes the instruction being emitted
        self.loop = any(_target(i) == start for _, i in self.insns)
        self._scan()

    # -- analysis --

    def _scan(self) -> None:
        """Which registers are read and written, and whether flags must be loaded."""
        self.needs_flags = False
        cmp_before = False
        for _, insn in self.insns:
            reads, writes = _regs_used(insn)
            self.read |= reads
            self.written |= writes
            if insn.op in isa.BRANCHES and not cmp_before:
                self.needs_flags = True
            if insn.op in (Op.CMP, Op.CMPI):
                cmp_before = self.cmp_seen = True
        # in a loop, an exit before the compare still follows it from the previous iteration
        self.needs_flags = self.needs_flags or (self.loop and self.cmp_seen)

    # -- emission helpers --

    def emit(self, line: str) -> None:
        self.lines.append("    " * self.indent + line)

    def writeback(self, count: str) -> None:
        # in a loop every written register may have changed in an earlier iteration
        for reg in sorted(self.written if self.loop else self.written_now):
            self.emit(f"R[{reg}] = r{reg}")
        if self.cmp_done or (self.loop and self.cmp_seen):
            self.emit(f"R[{R_FA}] = fa")
            self.emit(f"R[{R_FB}] = fb")
        self.emit(f"R[{R_IC}] = {count}")

    def exit_to(self, k: int, target: str) -> None:
        """Leave the block after instruction k (0-based) completes, going to target."""
        if self.loop and target == str(self.start):
            self.emit(f"ic += {k + 1}")
            self.emit("if ic < lim:")
            self.emit("    continue")
            self.writeback("ic")
        else:
            self.writeback(f"ic + {k + 1}")
        self.emit(f"return {target}")

    def fault_if(self, cond: str, k: int, exc: str) -> None:
        self.emit(f"if {cond}:")
        self.indent += 1
        self.writeback(f"ic + {k}")
        self.emit(f"raise {exc}")
        self.indent -= 1

    # -- source --

    def source(self) -> str:
        self.lines = ["def block(R, M, lim):", f"    ic = R[{R_IC}]"]
        for reg in sorted(self.read | self.written):
            self.emit(f"r{reg} = R[{reg}]")
        if self.needs_flags:
            self.emit(f"fa = R[{R_FA}]")
            self.emit(f"fb = R[{R_FB}]")
        if self.loop:
            self.emit("while True:")
            self.indent += 1
        ended = False
        for k, (pc, insn) in enumerate(self.insns):
            ended = self._insn(k, pc, insn)
        if not ended:
            self._tail()
        # @K (the 64-bit mask) and @S (the sign bit) become constants of the generated code.
        return ("\n".join(self.lines) + "\n").replace("@K", str(_M)).replace("@S", str(_S))

    def _tail(self) -> None:
        k = len(self.insns)
        if self.trace.stop is not None:
            self.writeback(f"ic + {k}")
            self.emit(f"raise GF({self.trace.end_pc}, {self.trace.stop!r})")
        else:
            self.exit_to(k - 1, str(self.trace.end_pc))

    # -- instructions: return True when the instruction ends the block --

    def _insn(self, k: int, pc: int, insn: isa.Insn) -> bool:
        writes = _regs_used(insn)[1]
        if insn.op in (Op.CALL, Op.RET):  # these leave the block after updating sp
            self.written_now |= writes
        ended = self._insn_body(k, pc, insn)
        self.written_now |= writes
        return ended

    def _insn_body(self, k: int, pc: int, insn: isa.Insn) -> bool:
        op = insn.op
        if op in _ALU3 or op in _ALUI or op in (Op.MOV, Op.MOVI, Op.LI, Op.NOP):
            self._alu(insn)
        elif op in (Op.DIVU, Op.REMU):
            self._div(k, pc, insn)
        elif op in (Op.CMP, Op.CMPI):
            b = _r(insn.b) if op is Op.CMP else str(insn.imm & _M)
            self.emit(f"fa = {_r(insn.a)}")
            self.emit(f"fb = {b}")
            self.cmp_done = True
        elif op in isa.LOADS or op in isa.STORES or op in (Op.PUSH, Op.POP):
            self._mem(k, pc, insn)
        elif op in (Op.FILL, Op.COPY, Op.HASH, Op.OUT, Op.OUTS, Op.RDINSN, Op.CLOCK, Op.WAIT):
            self._device(k, pc, insn)
        elif op in _REG_DEVICES:
            self._register(k, pc, insn)
        else:
            return self._control(k, pc, insn)
        return False

    def _alu(self, insn: isa.Insn) -> None:
        op, d = insn.op, _r(insn.a)
        if op is Op.NOP:
            return
        if op is Op.MOV:
            self.emit(f"{d} = {_r(insn.b)}")
        elif op in (Op.MOVI, Op.LI):
            self.emit(f"{d} = {insn.imm & _M}")
        elif op in _ALU3:
            self.emit(f"{d} = " + _ALU3[op].format(a=_r(insn.b), b=_r(insn.c)))
        else:
            expr = _ALUI[op].format(a=_r(insn.b), i=insn.imm, u=insn.imm & _M, s=insn.imm & 63)
            self.emit(f"{d} = {expr}")

    def _div(self, k: int, pc: int, insn: isa.Insn) -> None:
        div = _r(insn.c)
        self.fault_if(f"{div} == 0", k, f"GF({pc}, 'division by zero at pc {pc:#x}')")
        sym = "//" if insn.op is Op.DIVU else "%"
        self.emit(f"{_r(insn.a)} = {_r(insn.b)} {sym} {div}")

    def _addr_check(self, k: int, pc: int, kind: str, width: int, store: bool) -> None:
        hi = self.c.ram_size - width
        cond = f"a > {hi}" if not store else f"a < {self.c.code_end} or a > {hi}"
        self.fault_if(cond, k, f"MF({pc}, {kind!r}, a, {width})")

    def _mem(self, k: int, pc: int, insn: isa.Insn) -> None:
        op = insn.op
        if op is Op.PUSH:
            self.emit(f"a = (r{isa.SP} - 8) & @K")
            self._addr_check(k, pc, "push", 8, True)
            self.emit(f"P64(M, a, {_r(insn.a)})")
            self.emit(f"r{isa.SP} = a")
        elif op is Op.POP:
            self.emit(f"a = r{isa.SP}")
            self._addr_check(k, pc, "pop", 8, False)
            self.emit("t = U64(M, a)[0]")
            self.emit(f"r{isa.SP} = (a + 8) & @K")
            self.emit(f"{_r(insn.a)} = t")
        else:
            disp = f" + {insn.imm & _M}) & @K" if insn.imm else ")"
            self.emit(f"a = ({_r(insn.b)}{disp}")
            if op in isa.LOADS:
                width = isa.LOADS[op]
                self._addr_check(k, pc, "load", width, False)
                self.emit(f"{_r(insn.a)} = {_LOAD_EXPR[width]}")
            else:
                width = isa.STORES[op]
                self._addr_check(k, pc, "store", width, True)
                self.emit(_STORE_STMT[width].format(v=_r(insn.a)))

    def _range_check(self, k: int, pc: int, kind: str, addr: str, length: str, store: bool) -> None:
        lo = f"{addr} < {self.c.code_end} or " if store else ""
        cond = f"{lo}{addr} + {length} > {self.c.ram_size}"
        self.fault_if(cond, k, f"RF({pc}, {kind!r}, {addr}, {length})")

    def _device(self, k: int, pc: int, insn: isa.Insn) -> None:
        op, a, b, c = insn.op, _r(insn.a), _r(insn.b), _r(insn.c)
        if op is Op.FILL:
            self.emit(f"if {b}:")
            self.indent += 1
            self._range_check(k, pc, "fill", a, b, True)
            self.emit(f"FILL(M, {a}, {b}, {c} & 255)")
            self.indent -= 1
        elif op is Op.COPY:
            self.emit(f"if {c}:")
            self.indent += 1
            self._range_check(k, pc, "copy source", b, c, False)
            self._range_check(k, pc, "copy destination", a, c, True)
            self.emit(f"M.move({a}, {b}, {c})")
            self.indent -= 1
        elif op is Op.HASH:
            self._range_check(k, pc, "hash", b, c, False)
            regs = ", ".join(_r(i) for i in range(isa.NUM_REGS))
            self.emit(f"{a} = HASH(M, {b}, {c}, ({regs}))")
        elif op is Op.OUT:
            self.emit(f"CON.append({a} & 255)")
        elif op is Op.OUTS:
            self._range_check(k, pc, "console output", a, b, False)
            self.emit(f"CON.extend(M[{a}:{a} + {b}])")
        elif op is Op.RDINSN:
            self.emit(f"{a} = ic + {k}")
        elif op is Op.CLOCK:
            self.emit(f"{a} = CLK()")
        else:
            self._wait(k, pc, insn)

    def _wait(self, k: int, pc: int, insn: isa.Insn) -> None:
        # A deadline already reached costs nothing: the block runs on.  One
        # still ahead leaves the block with the WAIT completed (counted, pc
        # after it) so run() can return and the host can sleep.
        deadline = _r(insn.a)
        self.emit(f"if CLK() < {deadline}:")
        self.indent += 1
        self.writeback(f"ic + {k + 1}")
        self.emit(f"raise Waiting({pc + insn.size}, {deadline})")
        self.indent -= 1

    def _register(self, k: int, pc: int, insn: isa.Insn) -> None:
        # The device answers a fault with its reason (a str), never by raising, so the
        # registers are written back before GuestFault leaves the block.
        name, reads = _REG_DEVICES[insn.op]
        mnemonic = insn.op.name.lower()
        if reads:
            self.emit(f"t = {name}({insn.imm})")
            self.fault_if("t.__class__ is str", k, f"NF({pc}, '{mnemonic}', t)")
            self.emit(f"{_r(insn.a)} = t")
        else:
            self.emit(f"t = {name}({insn.imm}, {_r(insn.a)})")
            self.fault_if("t is not None", k, f"NF({pc}, '{mnemonic}', t)")

    def _control(self, k: int, pc: int, insn: isa.Insn) -> bool:
        op = insn.op
        nxt = pc + insn.size
        if op in _CONDS:
            self.emit(f"if {_CONDS[op]}:")
            self.indent += 1
            self.exit_to(k, str(insn.imm))
            self.indent -= 1
            return False
        if k in self.trace.followed:  # the block continues at the target
            if op is Op.CALL:
                self._push_return(k, pc, nxt)
            return False
        if op is Op.HALT:
            self.writeback(f"ic + {k + 1}")
            self.emit(f"raise Halted({nxt})")
        elif op is Op.JMP:
            self.exit_to(k, str(insn.imm))
        elif op is Op.JR:
            self.exit_to(k, _r(insn.a))
        elif op is Op.CALL:
            self._push_return(k, pc, nxt)
            self.exit_to(k, str(insn.imm))
        else:  # RET
            self.emit(f"a = r{isa.SP}")
            self._addr_check(k, pc, "ret pop", 8, False)
            self.emit(f"r{isa.SP} = (a + 8) & @K")
            self.exit_to(k, "U64(M, a)[0]")
        return True


    def _push_return(self, k: int, pc: int, nxt: int) -> None:
        self.emit(f"a = (r{isa.SP} - 8) & @K")
        self._addr_check(k, pc, "call push", 8, True)
        self.emit(f"P64(M, a, {nxt})")
        self.emit(f"r{isa.SP} = a")


def _target(insn: isa.Insn) -> int | None:
    if insn.op in isa.BRANCHES or insn.op in (Op.JMP, Op.CALL):
        return insn.imm
    return None


# Device register instructions: the namespace name of the accessor, and whether it reads.
_REG_DEVICES: dict[Op, tuple[str, bool]] = {Op.NICR: ("NICR", True), Op.NICW: ("NICW", False),
                                            Op.DSKR: ("DSKR", True), Op.DSKW: ("DSKW", False)}
_WRITES_A = frozenset({Op.MOV, Op.MOVI, Op.LI, Op.POP, Op.HASH, Op.RDINSN, Op.CLOCK, Op.NICR, Op.DSKR}
                      | set(isa.LOADS) | set(_ALU3) | set(_ALUI) | {Op.DIVU, Op.REMU})
_STACK_OPS = frozenset({Op.PUSH, Op.POP, Op.CALL, Op.RET})


def _regs_used(insn: isa.Insn) -> tuple[set[int], set[int]]:
    """(registers read, registers written) by one instruction; generous on reads."""
    form = isa.SPECS[insn.op].form
    reads: set[int] = set()
    writes: set[int] = set()
    if insn.op is Op.HASH:
        reads |= set(range(isa.NUM_REGS))
    if form in ("r", "rr", "rrr", "ri", "rri", "rl", "mem"):
        reads.add(insn.a)
        if form in ("rr", "rrr", "rri", "mem"):
            reads.add(insn.b)
        if form == "rrr":
            reads.add(insn.c)
    if insn.op in _WRITES_A:
        writes.add(insn.a)
    if insn.op in _STACK_OPS:
        reads.add(isa.SP)
        writes.add(isa.SP)
    return reads, writes
