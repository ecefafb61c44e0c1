"""The assembler: syntax, layout, data directives, includes, and errors that name file and line."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmruntime import isa
from vmruntime.asm import AsmError, assemble, image_from_dict, image_to_dict
from vmruntime.isa import Op


def test_labels_constants_and_layout() -> None:
    img = assemble("""
        N = 3 * (2 + 1)       ; a constant
    start:
        movi r1, N
        li sp, end
        jmp start  # comment
    end:
    """)
    assert img.isa_version == isa.ISA_VERSION and img.load_addr == 0 and img.entry == 0
    assert isa.decode(img.code, 0) == isa.Insn(Op.MOVI, 1, 0, 0, 9, 8)
    assert isa.decode(img.code, 8) == isa.Insn(Op.LI, isa.SP, 0, 0, 32, 16)
    assert isa.decode(img.code, 24).imm == 0
    assert len(img.code) == 32


def test_entry_directive_and_start_label() -> None:
    assert assemble("nop\nstart: halt").entry == 8
    assert assemble(".entry there\nnop\nthere: halt").entry == 8


def test_data_directives() -> None:
    img = assemble('''
    a: .byte 1, -1, 'A'
       .half 0x1234
       .align 8
       .word 7
       .quad -1
       .ascii "hi, \\"x\\""
       .asciz "z"
       .space 3
    ''')
    want = (bytes([1, 255, 65]) + b"\x34\x12" + bytes(3) + (7).to_bytes(4, "little")
            + b"\xff" * 8 + b'hi, "x"' + b"z\0" + bytes(3))
    assert img.code == want


def test_quoted_text_hides_comment_and_operand_characters() -> None:
    """';', '#' and ',' inside quotes are text, and an escaped quote does not end the string; outside
    quotes they start a comment or separate operands again."""
    img = assemble('''
       .ascii "a;b # c, d" ; a comment
       .ascii "\\"; not a comment\\"" # a comment
       .byte ';', ',', '\\'', '#', (1 + 1) ; five operands
    ''')
    assert img.code == b'a;b # c, d' + b'"; not a comment"' + b";,'#" + bytes([2])


def test_a_string_directive_takes_one_string() -> None:
    with pytest.raises(AsmError, match="expected one string literal"):
        assemble('.ascii "a", "#"')


def test_memory_operands() -> None:
    img = assemble("ld64 r1, [r2]\nst8 r3, [sp + 16]\nld32 r4, [r5 - 4]")
    assert isa.decode(img.code, 0) == isa.Insn(Op.LD64, 1, 2, 0, 0, 8)
    assert isa.decode(img.code, 8) == isa.Insn(Op.ST8, 3, isa.SP, 0, 16, 8)
    assert isa.decode(img.code, 16).imm == -4


def test_predefined_layout_names() -> None:
    img = assemble("li r1, DATA_ADDR + PAGE_SIZE")
    assert isa.decode(img.code, 0).imm == isa.DATA_ADDR + 4096


@pytest.mark.parametrize(("src", "line", "problem"), [
    ("nop\nfrobnicate r1\n", 2, "unknown instruction 'frobnicate'"),
    ("nop\nnop\nadd r1, r2\n", 3, "add takes 3 operands, got 2"),
    ("movi r16, 1", 1, "expected a register"),
    ("jmp nowhere", 1, "undefined symbol 'nowhere'"),
    ("x: nop\nx: nop", 2, "defined twice"),
    ("movi r1, 0x100000000", 1, "does not fit in a signed 32-bit"),
    ("shli r1, r1, 64", 1, "shift count 64"),
    (".byte 256", 1, "does not fit in 1 bytes"),
    (".bogus 1", 1, "unknown directive"),
    (".align 3", 1, "power of two"),
    ("ld64 r1, r2", 1, "memory operand"),
    ("movi r1, 1 +", 1, "bad expression"),
    ("movi r1, foo(2)", 1, "unsupported expression"),
    (".ascii hi", 1, "double-quoted"),
    ("\n\nr3 = 5", 3, "register name"),
])
def test_errors_name_file_line_and_problem(src: str, line: int, problem: str) -> None:
    with pytest.raises(AsmError) as info:
        assemble(src, "prog.fasm")
    err = info.value
    assert (err.file, err.line) == ("prog.fasm", line)
    assert problem in err.message
    assert str(err).startswith(f"prog.fasm:{line}: ")


def test_include_and_errors_inside_included_files(tmp_path: Path) -> None:
    (tmp_path / "lib.fasm").write_text("helper:\n  movi r1, 5\n  ret\n")
    (tmp_path / "bad.fasm").write_text("nop\n\n  oops\n")
    main = tmp_path / "main.fasm"
    main.write_text("start: call helper\n halt\n.include \"lib.fasm\"\n")
    img = assemble(main.read_text(), str(main))
    assert isa.decode(img.code, 0).imm == 16
    main.write_text("start: halt\n.include \"bad.fasm\"\n")
    with pytest.raises(AsmError) as info:
        assemble(main.read_text(), str(main))
    assert info.value.file.endswith("bad.fasm") and info.value.line == 3
    main.write_text("nop\n.include \"missing.fasm\"\n")
    with pytest.raises(AsmError, match=r"main.fasm:2: cannot include"):
        assemble(main.read_text(), str(main))


def test_image_too_large_for_code_region() -> None:
    with pytest.raises(AsmError, match="code region"):
        assemble(f".space {isa.CODE_LIMIT + 1}")


def test_image_dict_round_trip() -> None:
    img = assemble("start: halt")
    assert image_from_dict(image_to_dict(img)) == img
    with pytest.raises(ValueError):
        image_from_dict({**image_to_dict(img), "code": "text"})


_TOKENS = ["start:", "x:", "movi", "li", "add", "ld64", "st8", "jmp", ".byte", ".ascii", ".align", ".space",
           "r1", "r16", "sp", ",", "[", "]", "+", "-", "x", "1", "0x10", "'a'", '"s"', "=", ";", "(", ")", "::"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.sampled_from(_TOKENS), max_size=6).map(" ".join), max_size=8).map("\n".join))
def test_assembler_only_ever_raises_asm_error(src: str) -> None:
    try:
        img = assemble(src, "fuzz.fasm")
    except AsmError as err:
        assert err.file == "fuzz.fasm" and 1 <= err.line <= max(1, len(src.splitlines()))
    else:
        assert len(img.code) <= isa.CODE_LIMIT
