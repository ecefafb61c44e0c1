"""The text assembler: source in, a versioned Image out.

Owns the assembly syntax (see docs/isa.md): labels, `NAME = expr` constants,
data directives (.byte .half .word .quad .ascii .asciz .space .align),
`.entry` and `.include`.  Two passes: the first lays out addresses (every
instruction's size is known from its mnemonic alone), the second encodes.
Every error is an AsmError naming file, line and problem.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from vmruntime import isa
from vmruntime.isa import Op

_MAX_INCLUDE_DEPTH = 8
_IMM32 = (-(1 << 31), (1 << 31) - 1)
_DATA_WIDTHS = {".byte": 1, ".half": 2, ".word": 4, ".quad": 8}

# Names every program may use without defining them: the memory layout.
PREDEFINED: dict[str, int] = {
    "PAGE_SIZE": isa.PAGE_SIZE,
    "CODE_ADDR": isa.CODE_ADDR,
    "CODE_LIMIT": isa.CODE_LIMIT,
    "BOOT_ADDR": isa.BOOT_ADDR,
    "STACK_TOP": isa.STACK_TOP,
    "DATA_ADDR": isa.DATA_ADDR,
    "BOOT_MAGIC": isa.BOOT_MAGIC,
    "BOOT_RAM_SIZE": isa.BOOT_ADDR + isa.BOOT_OFF_RAM_SIZE,
    "BOOT_NARGS": isa.BOOT_ADDR + isa.BOOT_OFF_NARGS,
    "ISA_VERSION": isa.ISA_VERSION,
    **isa.NIC_REGS,
    "NIC_SLOT": isa.NIC_SLOT,
    "NIC_MTU_FRAME": isa.NIC_MTU_FRAME,
    **isa.DISK_REGS,
    **isa.DISK_CMDS,
    "DISK_SECTOR_SIZE": isa.DISK_SECTOR_SIZE,
    "DISK_MAX_COUNT": isa.DISK_MAX_COUNT,
}


class AsmError(Exception):
    """A problem in assembly source, located by file and line."""

    def __init__(self, file: str, line: int, message: str) -> None:
        super().__init__(f"{file}:{line}: {message}")
        self.file = file
        self.line = line
        self.message = message


@dataclass(frozen=True)
class Image:
    """An assembled guest program: code and read-only data loaded at load_addr."""

    isa_version: int
    code: bytes
    entry: int
    load_addr: int


@dataclass(frozen=True, slots=True)
class _Line:
    file: str
    line: int
    label: str | None
    word: str | None  # mnemonic, directive, or constant name (with kind "const")
    kind: str  # "insn" | "dir" | "const" | "none"
    rest: str


class _Located(Exception):
    """An error raised deep in parsing; the caller adds file and line."""


def assemble(source: str, filename: str = "<asm>") -> Image:
    """Assemble source text into an Image; AsmError on any problem."""
    lines = list(_expand(source, filename, 0))
    symbols, size = _layout(lines)
    code = bytearray()
    for ln in lines:
        offset = len(code)
        code += _at(ln, lambda ln=ln, offset=offset: _emit(ln, symbols, offset))  # type: ignore[misc]
    if len(code) != size:  # layout and emission disagree: a bug here, not in the source
        raise AssertionError("assembler layout mismatch")
    if len(code) > isa.CODE_LIMIT:
        raise AsmError(filename, len(source.splitlines()) or 1,
                       f"image is {len(code)} bytes, more than the {isa.CODE_LIMIT}-byte code region")
    entry = symbols.get("__entry__", symbols.get("start", isa.CODE_ADDR))
    return Image(isa.ISA_VERSION, bytes(code), entry, isa.CODE_ADDR)


_T = TypeVar("_T")


def _at(ln: _Line, fn: Callable[[], _T]) -> _T:
    """Run fn, turning a _Located error into an AsmError at ln."""
    try:
        return fn()
    except _Located as exc:
        raise AsmError(ln.file, ln.line, str(exc)) from None


# ---- reading source -------------------------------------------------------------------------


def _expand(source: str, filename: str, depth: int) -> Iterator[_Line]:
    """Parse lines, splicing in .include files."""
    for no, text in enumerate(source.splitlines(), start=1):
        ln = _parse_line(filename, no, text)
        if ln.kind == "dir" and ln.word == ".include":
            yield from _include(ln, filename, depth)
        else:
            yield ln


def _include(ln: _Line, filename: str, depth: int) -> Iterator[_Line]:
    if ln.label is not None:
        yield _Line(ln.file, ln.line, ln.label, None, "none", "")
    if depth >= _MAX_INCLUDE_DEPTH:
        raise AsmError(ln.file, ln.line, "includes nested too deeply")
    name = _at(ln, lambda: _string(ln.rest))
    base = os.path.dirname(filename) if not filename.startswith("<") else os.getcwd()
    path = os.path.join(base, name.decode())
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise AsmError(ln.file, ln.line, f"cannot include {path}: {exc.strerror}") from None
    yield from _expand(text, path, depth + 1)


def _unquoted(text: str) -> Iterator[tuple[int, str]]:
    """(index, character) of each character of ``text`` outside its quoted strings ('...' or "...",
    backslash escapes inside); the quotes themselves are not yielded either. Comments and operand
    commas are both found through it, so one quoting rule holds for both."""
    quote, escaped = None, False
    for i, ch in enumerate(text):
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        else:
            yield i, ch


def _strip_comment(text: str) -> str:
    """Text before a ';' or '#' that is not inside a quoted string."""
    for i, ch in _unquoted(text):
        if ch in ";#":
            return text[:i]
    return text


def _parse_line(file: str, no: int, text: str) -> _Line:
    body = _strip_comment(text).strip()
    label = None
    head, sep, tail = body.partition(":")
    if sep and head.strip().isidentifier() and not head.strip().startswith("."):
        label, body = head.strip(), tail.strip()
    if not body:
        return _Line(file, no, label, None, "none", "")
    if "=" in body and body.split("=", 1)[0].strip().isidentifier():
        name, expr = body.split("=", 1)
        return _Line(file, no, label, name.strip(), "const", expr.strip())
    word, rest = (body.split(None, 1) + [""])[:2]
    kind = "dir" if word.startswith(".") else "insn"
    return _Line(file, no, label, word.lower(), kind, rest.strip())


# ---- pass 1: layout -------------------------------------------------------------------------


def _layout(lines: list[_Line]) -> tuple[dict[str, int], int]:
    symbols: dict[str, int] = dict(PREDEFINED)
    addr = isa.CODE_ADDR
    for ln in lines:
        if ln.label is not None:
            _define(ln, symbols, ln.label, addr)
        if ln.kind == "const":
            assert ln.word is not None
            _define(ln, symbols, ln.word, _at(ln, lambda ln=ln: _eval(ln.rest, symbols)))  # type: ignore[misc]
        elif ln.kind != "none":
            addr += _at(ln, lambda ln=ln, a=addr: _size(ln, symbols, a))  # type: ignore[misc]
    return symbols, addr - isa.CODE_ADDR


def _define(ln: _Line, symbols: dict[str, int], name: str, value: int) -> None:
    if name in symbols:
        raise AsmError(ln.file, ln.line, f"symbol {name!r} defined twice")
    if name.lower() in _REG_NAMES:
        raise AsmError(ln.file, ln.line, f"{name!r} is a register name")
    symbols[name] = value


def _size(ln: _Line, symbols: dict[str, int], addr: int) -> int:
    if ln.kind == "insn":
        spec = isa.BY_NAME.get(ln.word or "")
        if spec is None:
            raise _Located(f"unknown instruction {ln.word!r}")
        return spec.size
    return _directive_size(ln, symbols, addr)


def _directive_size(ln: _Line, symbols: dict[str, int], addr: int) -> int:
    word = ln.word or ""
    if word in _DATA_WIDTHS:
        return _DATA_WIDTHS[word] * len(_split_operands(ln.rest))
    if word in (".ascii", ".asciz"):
        return len(_string(ln.rest)) + (word == ".asciz")
    if word == ".space":
        return _nonneg(_eval(ln.rest, symbols), ".space size")
    if word == ".align":
        align = _nonneg(_eval(ln.rest, symbols), ".align")
        if align == 0 or align & (align - 1):
            raise _Located(".align needs a power of two")
        return -addr % align
    if word == ".entry":
        return 0
    raise _Located(f"unknown directive {word!r}")


def _nonneg(value: int, what: str) -> int:
    if value < 0:
        raise _Located(f"{what} must not be negative")
    return value


# ---- pass 2: emission -----------------------------------------------------------------------


def _emit(ln: _Line, symbols: dict[str, int], offset: int) -> bytes:
    if ln.kind == "insn":
        return _emit_insn(ln, symbols)
    if ln.kind != "dir":
        return b""
    word = ln.word or ""
    if word in _DATA_WIDTHS:
        return _emit_data(_DATA_WIDTHS[word], ln.rest, symbols)
    if word in (".ascii", ".asciz"):
        return _string(ln.rest) + (b"\0" if word == ".asciz" else b"")
    if word == ".entry":
        symbols["__entry__"] = _eval(ln.rest, symbols)
        return b""
    return bytes(_directive_size(ln, symbols, isa.CODE_ADDR + offset))


def _emit_data(width: int, rest: str, symbols: dict[str, int]) -> bytes:
    out = bytearray()
    for item in _split_operands(rest):
        value = _eval(item, symbols)
        if not -(1 << (8 * width - 1)) <= value < (1 << (8 * width)):
            raise _Located(f"value {value} does not fit in {width} bytes")
        out += (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
    return bytes(out)


def _emit_insn(ln: _Line, symbols: dict[str, int]) -> bytes:
    spec = isa.BY_NAME[ln.word or ""]
    ops = _split_operands(ln.rest)
    want = {"": 0, "r": 1, "rr": 2, "rrr": 3, "ri": 2, "rri": 3, "rl": 2, "mem": 2, "j": 1}[spec.form]
    if len(ops) != want:
        raise _Located(f"{ln.word} takes {want} operand{'s' if want != 1 else ''}, got {len(ops)}")
    return _ENCODERS[spec.form](spec.op, ops, symbols)


def _enc_regs(op: Op, ops: list[str], symbols: dict[str, int]) -> bytes:
    regs = [_reg(o) for o in ops] + [0, 0, 0]
    return isa.encode(op, regs[0], regs[1], regs[2])


def _enc_ri(op: Op, ops: list[str], symbols: dict[str, int]) -> bytes:
    imm = _imm32(_eval(ops[1], symbols))
    if op in (Op.NICR, Op.NICW) and not 0 <= imm <= 15:
        raise _Located(f"NIC register {imm} out of range 0..15")
    if op in (Op.DSKR, Op.DSKW) and not 0 <= imm <= 15:
        raise _Located(f"disk register {imm} out of range 0..15")
    return isa.encode(op, _reg(ops[0]), imm=imm)


def _enc_rri(op: Op, ops: list[str], symbols: dict[str, int]) -> bytes:
    imm = _imm32(_eval(ops[2], symbols))
    if op in (Op.SHLI, Op.SHRI, Op.SARI) and not 0 <= imm < 64:
        raise _Located(f"shift count {imm} out of range 0..63")
    return isa.encode(op, _reg(ops[0]), _reg(ops[1]), imm=imm)


def _enc_rl(op: Op, ops: list[str], symbols: dict[str, int]) -> bytes:
    value = _eval(ops[1], symbols)
    if not -(1 << 63) <= value <= isa.MASK64:
        raise _Located(f"literal {value} does not fit in 64 bits")
    return isa.encode(op, _reg(ops[0]), imm=value)


def _enc_mem(op: Op, ops: list[str], symbols: dict[str, int]) -> bytes:
    base, disp = _mem_operand(ops[1], symbols)
    return isa.encode(op, _reg(ops[0]), base, imm=disp)


def _enc_jump(op: Op, ops: list[str], symbols: dict[str, int]) -> bytes:
    target = _eval(ops[0], symbols)
    if not 0 <= target <= _IMM32[1]:
        raise _Located(f"jump target {target:#x} out of range")
    return isa.encode(op, imm=target)


_ENCODERS = {
    "": _enc_regs, "r": _enc_regs, "rr": _enc_regs, "rrr": _enc_regs,
    "ri": _enc_ri, "rri": _enc_rri, "rl": _enc_rl, "mem": _enc_mem, "j": _enc_jump,
}

_REG_NAMES: dict[str, int] = {f"r{i}": i for i in range(isa.NUM_REGS)} | {"sp": isa.SP}


def _reg(text: str) -> int:
    reg = _REG_NAMES.get(text.strip().lower())
    if reg is None:
        raise _Located(f"expected a register (r0..r15, sp), got {text.strip()!r}")
    return reg


def _imm32(value: int) -> int:
    if not _IMM32[0] <= value <= _IMM32[1]:
        raise _Located(f"immediate {value} does not fit in a signed 32-bit field (use li)")
    return value


def _mem_operand(text: str, symbols: dict[str, int]) -> tuple[int, int]:
    """Parse `[reg]`, `[reg + expr]` or `[reg - expr]`."""
    text = text.strip()
    if not (text.startswith("[") and text.endswith("]")):
        raise _Located(f"expected a memory operand like [r1 + 8], got {text!r}")
    inner = text[1:-1].strip()
    for i, ch in enumerate(inner):
        if ch in "+-":
            disp = _eval(inner[i:], symbols)
            return _reg(inner[:i]), _imm32(disp)
    return _reg(inner), 0


def _split_operands(rest: str) -> list[str]:
    """Split at top-level commas (not inside quotes, brackets or parentheses)."""
    if not rest.strip():
        return []
    out, start, depth = [], 0, 0
    for i, ch in _unquoted(rest):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(rest[start:i].strip())
            start = i + 1
    out.append(rest[start:].strip())
    if any(not o for o in out):
        raise _Located("empty operand")
    return out


def _string(text: str) -> bytes:
    text = text.strip()
    if not (len(text) >= 2 and text[0] == text[-1] == '"'):
        raise _Located(f"expected a double-quoted string, got {text!r}")
    try:
        value = ast.literal_eval(text)
    except (SyntaxError, ValueError) as exc:
        raise _Located(f"bad string literal: {exc}") from None
    if not isinstance(value, str):  # e.g. `"a", "b"` reads as a tuple
        raise _Located(f"expected one string literal, got {text!r}")
    return value.encode("utf-8")


# ---- expressions ----------------------------------------------------------------------------

_BINOPS = {
    ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
    ast.FloorDiv: lambda a, b: a // b, ast.Div: lambda a, b: a // b, ast.Mod: lambda a, b: a % b,
    ast.LShift: lambda a, b: a << b, ast.RShift: lambda a, b: a >> b,
    ast.BitAnd: lambda a, b: a & b, ast.BitOr: lambda a, b: a | b, ast.BitXor: lambda a, b: a ^ b,
}
_UNOPS = {ast.USub: lambda a: -a, ast.UAdd: lambda a: a, ast.Invert: lambda a: ~a}


def _eval(text: str, symbols: dict[str, int]) -> int:
    """Evaluate an integer expression over numbers, 'c' characters, labels and constants."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        raise _Located(f"bad expression {text.strip()!r}") from None
    return _eval_node(tree.body, symbols)


def _eval_node(node: ast.AST, symbols: dict[str, int]) -> int:
    if isinstance(node, ast.Constant):
        return _constant(node.value)
    if isinstance(node, ast.Name):
        if node.id not in symbols:
            raise _Located(f"undefined symbol {node.id!r}")
        return symbols[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval_node(node.left, symbols), _eval_node(node.right, symbols)
        if isinstance(node.op, (ast.FloorDiv, ast.Div, ast.Mod)) and right == 0:
            raise _Located("division by zero in expression")
        if isinstance(node.op, (ast.LShift, ast.RShift)) and not 0 <= right <= 64:
            raise _Located(f"shift by {right} in expression")
        return int(_BINOPS[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNOPS:
        return int(_UNOPS[type(node.op)](_eval_node(node.operand, symbols)))
    raise _Located(f"unsupported expression {ast.unparse(node)!r}")


def _constant(value: object) -> int:
    if isinstance(value, bool):
        raise _Located("booleans are not numbers here")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and len(value) == 1:
        return ord(value)
    raise _Located(f"unsupported constant {value!r}")


def image_to_dict(image: Image) -> dict[str, object]:
    """The msgpack-able form of an Image (the VM process's `boot` op carries it)."""
    return {"isa_version": image.isa_version, "code": image.code, "entry": image.entry,
            "load_addr": image.load_addr}


def image_from_dict(d: dict[str, object]) -> Image:
    """Inverse of image_to_dict, checking field types."""
    code, entry, load, version = d["code"], d["entry"], d["load_addr"], d["isa_version"]
    if not (isinstance(code, bytes) and isinstance(entry, int) and isinstance(load, int)
            and isinstance(version, int)):
        raise ValueError("malformed image")
    return Image(version, code, entry, load)

