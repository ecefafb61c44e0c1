"""The toy ISA: version, opcode table, instruction encoding, guest memory layout.

This module owns the definition every other part agrees on: what an
instruction looks like in guest RAM, which opcodes exist and what operands
they take, and where the code, boot block, stack and data live.  It holds no
behaviour; the assembler (asm.py) encodes with it and the interpreter
(machine.py) decodes with it.  docs/isa.md is the prose version.

Encoding: every instruction is 8 bytes, little-endian:
    byte 0 opcode, byte 1 operand a, byte 2 operand b, byte 3 operand c,
    bytes 4..7 a signed 32-bit immediate.
`li` alone is followed by an 8-byte unsigned literal (16 bytes in all).
Opcode 0 is invalid so that zeroed memory never decodes to an instruction.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

# Version 2 is version 1 plus the NIC instructions, version 3 version 2 plus the disk instructions:
# images and saved states of every accepted version run here (a version 1 state has no NIC, a
# version 1 or 2 state no disk).
ISA_VERSION = 3
ACCEPTED_ISA_VERSIONS = (1, 2, 3)
# "wait" (the WAIT instruction) came after the first release: a destination without it refuses the VM.
ISA_FEATURES: frozenset[str] = frozenset({"base", "fill", "copy", "clock", "hash", "console", "wait", "nic",
                                          "disk"})
PAGE_SIZE = 4096

NUM_REGS = 16
SP = 15  # r15 is the stack pointer by convention (alias "sp")
MASK64 = (1 << 64) - 1
SIGN64 = 1 << 63

INSN_SIZE = 8
LI_SIZE = 16

# Guest memory layout (guest-physical byte offsets).
CODE_ADDR = 0x0  # images load here; code + read-only data, stores into it fault
CODE_LIMIT = 0x10000  # an image may not exceed 64 KiB
BOOT_ADDR = 0x10000  # one page: boot block
STACK_TOP = 0x20000  # sp starts here and grows down towards BOOT_ADDR + PAGE_SIZE
DATA_ADDR = 0x20000  # working sets and other guest data start here
MIN_RAM = DATA_ADDR + PAGE_SIZE  # smallest RAM that boots a program with one data page

# Boot block layout (all u64 little-endian unless noted).
BOOT_MAGIC = 0x544F4F4259525246  # b"FRRYBOOT" read as a little-endian u64
BOOT_OFF_MAGIC = 0
BOOT_OFF_VERSION = 8
BOOT_OFF_RAM_SIZE = 16
BOOT_OFF_NARGS = 24
BOOT_OFF_ARGS = 32  # nargs entries of (16-byte NUL-padded name, u64 value)
BOOT_ARG_ENTRY = 24
BOOT_ARG_NAME = 16
BOOT_MAX_ARGS = 12  # r1..r12 carry argument values

# The NIC device (vmruntime/nic.py): register numbers for nicr/nicw, the ring slot size, the largest frame.
NIC_REGS: dict[str, int] = {
    "NIC_STATUS": 0, "NIC_MAC": 1, "NIC_RX_BASE": 2, "NIC_RX_SLOTS": 3, "NIC_RX_HEAD": 4, "NIC_RX_TAIL": 5,
    "NIC_TX_BASE": 6, "NIC_TX_SLOTS": 7, "NIC_TX_HEAD": 8, "NIC_TX_TAIL": 9, "NIC_RX_PACKETS": 10,
    "NIC_TX_PACKETS": 11, "NIC_RX_DROPPED": 12, "NIC_TX_DROPPED": 13, "NIC_CTRL": 14,
}
NIC_SLOT = 2048  # bytes per ring slot: u16 length, then the frame
NIC_MTU_FRAME = 1514  # the largest Ethernet frame without FCS

# The disk device (vmruntime/disk.py): register numbers for dskr/dskw, commands, the sector size,
# the most sectors one request moves.
DISK_REGS: dict[str, int] = {
    "DISK_STATUS": 0, "DISK_SECTORS": 1, "DISK_SECTOR": 2, "DISK_COUNT": 3, "DISK_ADDR": 4, "DISK_CMD": 5,
    "DISK_READS": 6, "DISK_WRITES": 7, "DISK_FLUSHES": 8, "DISK_ERRORS": 9, "DISK_SECTORS_READ": 10,
    "DISK_SECTORS_WRITTEN": 11,
}
DISK_CMDS: dict[str, int] = {"DISK_READ": 1, "DISK_WRITE": 2, "DISK_FLUSH": 3}
DISK_SECTOR_SIZE = 512
DISK_MAX_COUNT = 2048  # 1 MiB per request


class Op(IntEnum):
    """Opcodes. Values are the byte stored in guest RAM; 0 stays invalid."""

    NOP = 0x01
    HALT = 0x02
    MOV = 0x03  # rd, rs
    MOVI = 0x04  # rd, imm32 (sign-extended)
    LI = 0x05  # rd, imm64 (16-byte instruction)
    ADD = 0x10  # rd, ra, rb
    SUB = 0x11
    MUL = 0x12
    DIVU = 0x13  # faults on division by zero
    REMU = 0x14  # faults on division by zero
    AND = 0x15
    OR = 0x16
    XOR = 0x17
    SHL = 0x18  # shift counts are taken modulo 64
    SHR = 0x19
    SAR = 0x1A
    ADDI = 0x20  # rd, ra, imm32 (sign-extended)
    MULI = 0x21
    ANDI = 0x22
    ORI = 0x23
    XORI = 0x24
    SHLI = 0x25
    SHRI = 0x26
    SARI = 0x27
    CMP = 0x30  # ra, rb -> flags
    CMPI = 0x31  # ra, imm32 -> flags
    JMP = 0x40  # target (absolute)
    BEQ = 0x41
    BNE = 0x42
    BLT = 0x43  # signed
    BGE = 0x44  # signed
    BLTU = 0x45
    BGEU = 0x46
    CALL = 0x47  # push return address, jump
    RET = 0x48  # pop return address, jump
    JR = 0x49  # jump to register
    PUSH = 0x4A
    POP = 0x4B
    LD8 = 0x50  # rd, [ra + imm32]; zero-extending
    LD16 = 0x51
    LD32 = 0x52
    LD64 = 0x53
    ST8 = 0x58  # rs, [ra + imm32]
    ST16 = 0x59
    ST32 = 0x5A
    ST64 = 0x5B
    FILL = 0x60  # rdst, rlen, rval: bytes [dst, dst+len) = low byte of val
    COPY = 0x61  # rdst, rsrc, rlen: memmove
    HASH = 0x62  # rd, raddr, rlen: rd = blake2b-64(RAM range || r0..r15)
    OUT = 0x70  # rs: one byte to the console
    OUTS = 0x71  # raddr, rlen: a RAM range to the console
    RDINSN = 0x72  # rd = instructions executed before this one
    CLOCK = 0x73  # rd = clock device, virtual nanoseconds
    WAIT = 0x74  # rs: yield the vCPU until the clock device reads >= rs (virtual ns)
    NICR = 0x75  # rd, imm: rd = NIC register imm
    NICW = 0x76  # ra, imm: NIC register imm = ra
    DSKR = 0x77  # rd, imm: rd = disk register imm
    DSKW = 0x78  # ra, imm: disk register imm = ra (DISK_CMD runs a request)


@dataclass(frozen=True, slots=True)
class OpSpec:
    """How an opcode's operands are written in assembly and laid out in the encoding."""

    op: Op
    form: str  # "" | "r" | "rr" | "rrr" | "ri" | "rri" | "rl" | "mem" | "j"
    size: int = INSN_SIZE


_FORMS: dict[str, tuple[Op, ...]] = {
    "": (Op.NOP, Op.HALT, Op.RET),
    "r": (Op.PUSH, Op.POP, Op.OUT, Op.RDINSN, Op.CLOCK, Op.JR, Op.WAIT),
    "rr": (Op.MOV, Op.CMP, Op.OUTS),
    "rrr": (Op.ADD, Op.SUB, Op.MUL, Op.DIVU, Op.REMU, Op.AND, Op.OR, Op.XOR, Op.SHL, Op.SHR,
            Op.SAR, Op.FILL, Op.COPY, Op.HASH),
    "ri": (Op.MOVI, Op.CMPI, Op.NICR, Op.NICW, Op.DSKR, Op.DSKW),
    "rri": (Op.ADDI, Op.MULI, Op.ANDI, Op.ORI, Op.XORI, Op.SHLI, Op.SHRI, Op.SARI),
    "rl": (Op.LI,),
    "mem": (Op.LD8, Op.LD16, Op.LD32, Op.LD64, Op.ST8, Op.ST16, Op.ST32, Op.ST64),
    "j": (Op.JMP, Op.BEQ, Op.BNE, Op.BLT, Op.BGE, Op.BLTU, Op.BGEU, Op.CALL),
}

SPECS: dict[Op, OpSpec] = {
    op: OpSpec(op, form, LI_SIZE if op is Op.LI else INSN_SIZE)
    for form, ops in _FORMS.items()
    for op in ops
}
BY_NAME: dict[str, OpSpec] = {spec.op.name.lower(): spec for spec in SPECS.values()}
VALID_OPCODES: frozenset[int] = frozenset(int(op) for op in Op)

LOADS: dict[Op, int] = {Op.LD8: 1, Op.LD16: 2, Op.LD32: 4, Op.LD64: 8}
STORES: dict[Op, int] = {Op.ST8: 1, Op.ST16: 2, Op.ST32: 4, Op.ST64: 8}
BRANCHES: frozenset[Op] = frozenset({Op.BEQ, Op.BNE, Op.BLT, Op.BGE, Op.BLTU, Op.BGEU})
# Instructions after which control never falls through: a basic block ends.
BLOCK_ENDS: frozenset[Op] = frozenset({Op.JMP, Op.CALL, Op.RET, Op.JR, Op.HALT})

_HEAD = struct.Struct("<BBBBi")
_LIT = struct.Struct("<Q")

# Flags are kept as the operands of the last compare (a, b), both unsigned 64-bit.
FLAG_Z = 1  # a == b
FLAG_LT = 2  # a < b signed
FLAG_B = 4  # a < b unsigned


def flags_of(a: int, b: int) -> int:
    """The flag bits a compare of a with b sets."""
    z = FLAG_Z if a == b else 0
    lt = FLAG_LT if (a ^ SIGN64) < (b ^ SIGN64) else 0
    below = FLAG_B if a < b else 0
    return z | lt | below


@dataclass(frozen=True, slots=True)
class Insn:
    """One decoded instruction."""

    op: Op
    a: int
    b: int
    c: int
    imm: int  # signed imm32, or the unsigned 64-bit literal of `li`
    size: int


def encode(op: Op, a: int = 0, b: int = 0, c: int = 0, imm: int = 0) -> bytes:
    """Encode one instruction; `li` takes its 64-bit literal in imm."""
    if op is Op.LI:
        return _HEAD.pack(op, a, b, c, 0) + _LIT.pack(imm & MASK64)
    return _HEAD.pack(op, a, b, c, imm)


class DecodeError(Exception):
    """The bytes at an address are not a valid instruction."""


def decode(code: bytes, off: int) -> Insn:
    """Decode the instruction at byte offset off of code; DecodeError if invalid or truncated."""
    if off < 0 or off + INSN_SIZE > len(code):
        raise DecodeError("instruction runs past the end of the code region")
    opcode, a, b, c, imm = _HEAD.unpack_from(code, off)
    if opcode not in VALID_OPCODES:
        raise DecodeError(f"invalid opcode {opcode:#04x}")
    op = Op(opcode)
    if a >= NUM_REGS or b >= NUM_REGS or c >= NUM_REGS:
        raise DecodeError(f"invalid register operand in {op.name.lower()}")
    if op is Op.LI:
        if off + LI_SIZE > len(code):
            raise DecodeError("li literal runs past the end of the code region")
        return Insn(op, a, b, c, _LIT.unpack_from(code, off + INSN_SIZE)[0], LI_SIZE)
    return Insn(op, a, b, c, imm, INSN_SIZE)
