"""The NIC device at the Machine level: rings, counters, faults, WAIT wake-up, saved state."""

from __future__ import annotations

import mmap
import secrets
from collections.abc import Callable

import msgpack
import pytest

from tests.test_machine import FakeClock
from vmruntime import isa
from vmruntime.asm import AsmError, Image, assemble
from vmruntime.interp_ref import RefInterpreter
from vmruntime.machine import Machine

RAM = 1 << 20
MAC = 0x525400123456
RX = isa.DATA_ADDR
TX = isa.DATA_ADDR + 0x10000

# Sets up an 8-slot RX ring and an 8-slot TX ring, then echoes every received
# frame (the whole slot: length and frame) into the TX ring and rings the
# doorbell; idle, it waits a virtual second.
ECHO = f"""
RX = {RX}
TX = {TX}
SLOTS = 8
start:
    li r1, RX
    nicw r1, NIC_RX_BASE
    movi r1, SLOTS
    nicw r1, NIC_RX_SLOTS
    li r1, TX
    nicw r1, NIC_TX_BASE
    movi r1, SLOTS
    nicw r1, NIC_TX_SLOTS
    movi r1, 1
    nicw r1, NIC_CTRL
    movi r5, 0
loop:
    nicr r2, NIC_RX_HEAD
    nicr r3, NIC_RX_TAIL
    cmp r3, r2
    beq idle
    andi r4, r3, SLOTS - 1
    muli r4, r4, NIC_SLOT
    li r6, RX
    add r4, r4, r6
    andi r7, r5, SLOTS - 1
    muli r7, r7, NIC_SLOT
    li r6, TX
    add r7, r7, r6
    movi r8, NIC_SLOT
    copy r7, r4, r8
    addi r3, r3, 1
    nicw r3, NIC_RX_TAIL
    addi r5, r5, 1
    nicw r5, NIC_TX_HEAD
    jmp loop
idle:
    clock r9
    li r10, 1000000000
    add r9, r9, r10
    wait r9
    jmp loop
"""

# The same rings, enabled, but the guest never consumes: it only waits.
SINK = ECHO.replace("loop:\n", "loop:\n    jmp idle\n", 1)


def frame(n: int, tag: int = 0) -> bytes:
    body = bytes([0xFF] * 6) + MAC.to_bytes(6, "big") + b"\x08\x00"
    return (body + bytes((tag + i) & 255 for i in range(max(0, n - 14))))[:n]


def boot(src: str, mac: int | None = MAC, clock: FakeClock | None = None) -> Machine:
    return Machine.boot(mmap.mmap(-1, RAM), assemble(src, "<nic>"), {}, clock or FakeClock(), nic_mac=mac)


def settle(m: Machine, run: Callable[[int], int] | None = None) -> None:
    """Run until the guest waits (or stops)."""
    run = run or m.run
    for _ in range(1000):
        if m.status != "running" or m.wait_until_ns is not None:
            return
        run(10_000)
    raise AssertionError("guest never settled")


def test_echo_guest_sends_back_every_delivered_frame() -> None:
    m = boot(ECHO)
    settle(m)
    frames = [frame(14), frame(60, 1), frame(isa.NIC_MTU_FRAME, 2)]
    assert all(m.nic_deliver(f) for f in frames)
    settle(m)
    assert m.nic_take_tx() == frames
    assert m.nic_take_tx() == []
    info = m.nic_info()
    assert info == {"mac": "52:54:00:12:34:56", "link": False, "rx-packets": 3, "tx-packets": 3,
                    "rx-dropped": 0, "tx-dropped": 0}
    # more than a ring's worth, a few at a time
    for round_ in range(5):
        batch = [frame(100 + i, round_) for i in range(6)]
        assert all(m.nic_deliver(f) for f in batch)
        settle(m)
        assert m.nic_take_tx() == batch
    assert m.status == "running"


def test_frame_ends_a_wait() -> None:
    m = boot(ECHO)
    settle(m)
    assert m.wait_until_ns is not None and m.run(1000) == 0 and m.wait_seconds() > 0
    assert m.nic_deliver(frame(64))
    assert m.wait_until_ns is None and m.wait_seconds() == 0.0
    assert m.run(1000) > 0
    assert m.nic_take_tx() == [frame(64)]


@pytest.mark.parametrize("engine", ["fast", "ref"])
def test_a_wait_with_frames_pending_does_not_sleep(engine: str) -> None:
    # A guest that found its ring empty, then waits: a frame that arrived in between (here: one it
    # never consumes) must not sleep until the deadline, whichever interpreter runs it.
    m = boot(SINK)
    run = m.run if engine == "fast" else RefInterpreter(m).run
    settle(m, run)
    assert m.wait_until_ns is not None  # nothing pending: it sleeps
    assert m.nic_deliver(frame(64))
    for _ in range(3):  # each pass runs the guest into its WAIT again, which completes at once
        assert run(1000) > 0
        assert m.wait_until_ns is None and m.wait_seconds() == 0.0


def test_full_ring_drops_and_counts() -> None:
    m = boot(SINK)
    settle(m)
    assert [m.nic_deliver(frame(60, i)) for i in range(10)] == [True] * 8 + [False] * 2
    info = m.nic_info()
    assert (info["rx-packets"], info["rx-dropped"]) == (8, 2)
    regs = _read_regs(m, "NIC_RX_HEAD", "NIC_RX_TAIL", "NIC_RX_DROPPED")
    assert regs == [8, 0, 2]
    for i in range(8):  # the frames sit in their slots: u16 length, then the frame
        at = RX + i * isa.NIC_SLOT
        assert int.from_bytes(m._ram[at:at + 2], "little") == 60
        assert m._ram[at + 2:at + 62] == frame(60, i)


def test_frames_too_small_or_too_big_are_dropped_never_truncated() -> None:
    m = boot(SINK)
    settle(m)
    assert not m.nic_deliver(frame(13))
    assert not m.nic_deliver(b"x" * (isa.NIC_MTU_FRAME + 1))
    assert m.nic_deliver(frame(14)) and m.nic_deliver(frame(isa.NIC_MTU_FRAME))
    assert (m.nic_info()["rx-packets"], m.nic_info()["rx-dropped"]) == (2, 2)


def test_receive_before_the_guest_enables_is_dropped() -> None:
    m = boot("start:\n clock r1\n addi r1, r1, 1000\n wait r1\n jmp start")
    assert not m.nic_deliver(frame(60))
    m2 = boot(ECHO.replace("movi r1, 1\n    nicw r1, NIC_CTRL", "movi r1, 0\n    nicw r1, NIC_CTRL"))
    settle(m2)
    assert not m2.nic_deliver(frame(60))
    assert m.nic_info()["rx-dropped"] == 1 and m2.nic_info()["rx-dropped"] == 1


def test_tx_bad_lengths_are_dropped_and_counted() -> None:
    # three slots: lengths 13, 14 and 1515; the doorbell takes all three, sends only the middle one
    src = f"""
start:
    li r1, {TX}
    nicw r1, NIC_TX_BASE
    movi r1, 4
    nicw r1, NIC_TX_SLOTS
    li r2, {TX}
    movi r3, 13
    st16 r3, [r2]
    movi r3, 14
    st16 r3, [r2 + NIC_SLOT]
    movi r3, 1515
    st16 r3, [r2 + 2 * NIC_SLOT]
    movi r1, 3
    nicw r1, NIC_TX_HEAD
    nicr r4, NIC_TX_TAIL
    nicr r5, NIC_TX_PACKETS
    nicr r6, NIC_TX_DROPPED
    halt
"""
    m = boot(src)
    settle(m)
    assert m.status == "halted" and m.regs[4:7] == [3, 1, 2]
    assert m.nic_take_tx() == [bytes(14)]
    m.nic_tx_failed(2)
    assert m.nic_info()["tx-dropped"] == 4


def _read_regs(m: Machine, *names: str) -> list[int]:
    """The device registers as the guest would read them."""
    assert m._nic is not None
    values = [m._nic.read(isa.NIC_REGS[n]) for n in names]
    assert all(isinstance(v, int) for v in values)
    return values  # type: ignore[return-value]


def test_status_and_mac_registers_and_probe_without_nic() -> None:
    src = "start:\n nicr r1, NIC_STATUS\n nicr r2, NIC_MAC\n halt"
    m = boot(src)
    m.nic_set_link(True)
    settle(m)
    assert m.regs[1:3] == [3, MAC]
    m = boot(src)
    settle(m)
    assert m.regs[1] == 1  # present, link down
    bare = boot("start:\n movi r1, 7\n nicr r1, NIC_STATUS\n halt", mac=None)
    settle(bare)
    assert bare.status == "halted" and bare.regs[1] == 0
    assert bare.nic_info() == {} and bare.nic_mac is None and not bare.nic_deliver(frame(60))
    assert bare.nic_take_tx() == [] and "nic" not in bare.save_state()["devices"]


FAULTS = [
    ("nicr r1, NIC_MAC", None, "no NIC"),
    ("nicw r1, NIC_CTRL", None, "no NIC"),
    ("nicr r1, 15", MAC, "bad NIC register 15"),
    ("nicw r1, 15", MAC, "bad NIC register 15"),
    ("nicw r1, NIC_RX_HEAD", MAC, "read-only"),
    ("nicw r1, NIC_STATUS", MAC, "read-only"),
    ("movi r1, 1\n nicw r1, NIC_RX_TAIL", MAC, "RX_TAIL 1 outside"),
    ("movi r1, 1\n nicw r1, NIC_TX_HEAD", MAC, "TX_HEAD 1 outside"),
    ("movi r1, 257\n nicw r1, NIC_RX_SLOTS", MAC, "at most 256"),
    ("movi r1, 4\n nicw r1, NIC_TX_SLOTS", MAC, "into the image"),  # base 0: the image
    ("li r1, 0xFC800\n nicw r1, NIC_RX_BASE\n movi r1, 8\n nicw r1, NIC_RX_SLOTS", MAC, "outside guest RAM"),
]


@pytest.mark.parametrize("engine", ["fast", "ref"])
@pytest.mark.parametrize(("body", "mac", "reason"), FAULTS)
def test_register_faults(engine: str, body: str, mac: int | None, reason: str) -> None:
    m = boot(f"start:\n movi r9, 42\n {body}\n movi r9, 0\n halt", mac=mac)
    run = m.run if engine == "fast" else RefInterpreter(m).run
    settle(m, run)
    assert m.status == "faulted" and reason in (m.fault_reason or "")
    assert m.regs[9] == 42  # registers written back before the fault
    faulting_pc = m.pc
    assert assemble(f"start:\n movi r9, 42\n {body}", "<n>").code[faulting_pc:faulting_pc + 1] in (
        bytes([isa.Op.NICR]), bytes([isa.Op.NICW]))


def test_engines_agree_on_a_nic_program() -> None:
    fast, slow = boot(ECHO), boot(ECHO)
    ref = RefInterpreter(slow)
    for m, run in ((fast, fast.run), (slow, ref.run)):
        settle(m, run)
        for i in range(5):
            m.nic_deliver(frame(20 + i, i))
        settle(m, run)
    assert fast.nic_take_tx() == slow.nic_take_tx()
    assert (fast.regs, fast.pc, fast.instructions) == (slow.regs, slow.pc, slow.instructions)
    assert fast.save_state()["devices"]["nic"] == slow.save_state()["devices"]["nic"]


def _roundtrip(m: Machine, clock: FakeClock | None = None) -> Machine:
    """Save, msgpack, restore onto a copy of guest RAM (as a migration would)."""
    ram = mmap.mmap(-1, RAM)
    ram[:] = m._ram[:]
    state = msgpack.unpackb(msgpack.packb(m.save_state()), raw=False)
    return Machine.restore(ram, state, clock or FakeClock())


def test_save_restore_mid_traffic_keeps_rings_counters_and_pending_tx() -> None:
    m = boot(ECHO)
    settle(m)
    for i in range(3):
        m.nic_deliver(frame(40, i))
    settle(m)  # three frames echoed, not taken: pending TX
    m.nic_deliver(frame(50, 7))
    m.nic_deliver(frame(5))  # dropped
    m.wait_until_ns = None
    state = m.save_state()
    nic = state["devices"]["nic"]
    assert state["version"] == 4 and state["isa_version"] == 3
    assert (nic["mac"], nic["rx_head"], nic["rx_tail"], nic["tx_head"], nic["rx_dropped"]) == (MAC, 4, 3, 3, 1)
    assert len(nic["pending_tx"]) == 3
    m2 = _roundtrip(m)
    assert m2.nic_mac == MAC and m2.save_state()["devices"]["nic"] == nic
    assert m2.nic_take_tx() == [frame(40, i) for i in range(3)]
    settle(m2)  # the frame delivered before the save is handled after the restore
    assert m2.nic_take_tx() == [frame(50, 7)]
    assert m2.nic_info() | {"link": True} == {"mac": "52:54:00:12:34:56", "link": True, "rx-packets": 4,
                                             "tx-packets": 4, "rx-dropped": 1, "tx-dropped": 0}


def test_restore_checks_the_nic_state() -> None:
    m = boot(ECHO)
    settle(m)
    state = m.save_state()
    nic = state["devices"]["nic"]
    bad = [{**nic, "mac": 1 << 48}, {**nic, "rx_head": 9}, {**nic, "rx_slots": 300},
           {**nic, "tx_head": 5}, {**nic, "pending_tx": [b"short"]}, {**nic, "ctrl": 2},
           {**nic, "rx_base": RAM - 100}, {**nic, "rx_tail": -1}, "nic"]
    for value in bad:
        with pytest.raises(ValueError):
            Machine.restore(m._ram, {**state, "devices": {**state["devices"], "nic": value}}, FakeClock())
    for version, isa_version in ((2, 2), (3, 1)):  # no NIC before state 3 / ISA 2
        with pytest.raises(ValueError, match="cannot carry a NIC"):
            Machine.restore(m._ram, {**state, "version": version, "isa_version": isa_version}, FakeClock())


def test_older_states_and_images_still_load() -> None:
    src = "start:\n addi r1, r1, 1\n cmpi r1, 1000\n bne start\n halt"
    m = boot(src, mac=None)
    m.run(500)
    state = m.save_state()
    for version in (1, 2):
        old = {**state, "version": version, "isa_version": 1}
        if version == 1:
            old["devices"] = {**state["devices"], "clock": {"now_ns": state["devices"]["clock"]["now_ns"]}}
        m2 = Machine.restore(m._ram, old, FakeClock())
        while m2.status == "running":
            m2.run(1000)
        assert m2.status == "halted" and m2.regs[1] == 1000 and m2.nic_mac is None
    image = assemble(src)
    v1 = Machine.boot(mmap.mmap(-1, RAM), Image(1, image.code, image.entry, image.load_addr), {}, FakeClock())
    assert v1.run(10_000) > 0 and v1.status == "halted"
    with pytest.raises(ValueError, match="ISA version"):
        Machine.boot(mmap.mmap(-1, RAM), Image(4, image.code, image.entry, image.load_addr), {}, FakeClock())


def test_boot_refuses_a_bad_mac_before_touching_ram() -> None:
    ram = mmap.mmap(-1, RAM)
    with pytest.raises(ValueError, match="MAC"):
        Machine.boot(ram, assemble(ECHO), {}, FakeClock(), nic_mac=1 << 48)
    assert ram[:16] == bytes(16)


def test_assembler_knows_the_nic() -> None:
    image = assemble("start:\n nicr r3, NIC_CTRL\n nicw r4, NIC_TX_HEAD\n li r1, NIC_SLOT + NIC_MTU_FRAME")
    assert isa.decode(image.code, 0) == isa.Insn(isa.Op.NICR, 3, 0, 0, 14, 8)
    assert isa.decode(image.code, 8) == isa.Insn(isa.Op.NICW, 4, 0, 0, 8, 8)
    assert (isa.Op.NICR, isa.Op.NICW) == (0x75, 0x76)
    assert isa.decode(image.code, 16).imm == 2048 + 1514
    with pytest.raises(AsmError, match="NIC register 16"):
        assemble("nicr r1, 16")
    assert "nic" in isa.ISA_FEATURES and isa.ISA_VERSION == 3


def test_migration_destination_accepts_isa_1_to_3_only() -> None:
    from agent.migration.incoming_checks import Refused
    from agent.migration.incoming_checks import check_compatible as _check_compatible
    from proto.messages import MigrateStart

    def start(version: int) -> MigrateStart:
        return MigrateStart(secrets.token_hex(8), "v", RAM, 4096, version, tuple(sorted(isa.ISA_FEATURES)),
                            "hash", {})

    _check_compatible(start(1))
    _check_compatible(start(2))
    _check_compatible(start(3))
    for version in (0, 4):
        with pytest.raises(Refused):
            _check_compatible(start(version))
