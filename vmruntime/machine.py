"""The toy machine: one vCPU and its devices over a guest RAM mapping.

Owns the machine's lifecycle and state: boot (image and boot block into RAM),
run(budget) to an instruction boundary, the faulted/halted states, the
console and clock devices, the optional NIC (its model is vmruntime/nic.py;
the machine wires it to the instructions and to the WAIT state), the optional
disk (vmruntime/disk.py, over a backend the host gives), the WAIT state (a deadline on the clock device
before which the vCPU does nothing), and save_state()/restore() as a
versioned, msgpack-able dict.  Execution itself is the block compiler's
(interp.py).  A guest error never raises out of run(): the machine becomes
"faulted" with the reason.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable, Mapping
from types import CodeType
from typing import Any

from vmruntime import isa
from vmruntime.asm import Image
from vmruntime.disk import DEFAULT_BLOCK_SIZE, BlockBackend, DiskDevice, no_disk_read, no_disk_write
from vmruntime.interp import (
    R_FA,
    R_FB,
    R_IC,
    REGFILE_LEN,
    BlockCompiler,
    BlockFn,
    GuestFault,
    Halted,
    Waiting,
    make_namespace,
    marshal_block,
    within_bytes,
)
from vmruntime.nic import NicDevice, no_nic_read, no_nic_write

# Version 2 added devices.clock.wait_until_ns (the WAIT instruction), version 3
# devices.nic (present only on a machine with a NIC), version 4 devices.disk (only
# with a disk); older states are still accepted (no guest could be waiting in 1,
# none has a NIC before 3 nor a disk before 4).
STATE_VERSION = 4
ACCEPTED_STATE_VERSIONS = (1, 2, 3, 4)
# The longest a host is told to sleep before calling run() again: a deadline
# far ahead is re-checked now and then (cheaply) rather than slept on whole.
MAX_WAIT_SECONDS = 1.0
STATUSES = ("running", "halted", "faulted")
_U64 = struct.Struct("<Q")


class ClockDevice:
    """Guest-visible virtual nanoseconds: host clock plus an offset that migrates.

    Virtual time starts at 0 at boot; on restore the offset is chosen so the
    guest sees time continue from the saved reading (no jump over the pause).
    """

    def __init__(self, clock_ns: Callable[[], int], now_ns: int = 0) -> None:
        self._host = clock_ns
        self._offset = now_ns - clock_ns()

    def read(self) -> int:
        return (self._host() + self._offset) & isa.MASK64

    def save(self) -> dict[str, int]:
        return {"now_ns": self.read()}


class Machine:
    """One toy VM's CPU and devices; see docs/isa.md."""

    def __init__(self, ram: mmap.mmap, code_range: tuple[int, int], clock: ClockDevice,
                 nic: NicDevice | None = None, ready: Mapping[int, CodeType] | None = None,
                 disk: DiskDevice | None = None) -> None:
        self._ram = ram
        self._size = len(ram)
        self._R: list[int] = [0] * REGFILE_LEN
        self.pc = 0
        self.status = "running"
        self.fault_reason: str | None = None
        # Virtual-clock deadline of a WAIT still in progress; run() does nothing before it.
        self.wait_until_ns: int | None = None
        self._code_range = code_range
        self._console = bytearray()
        self._clock = clock
        start, end = code_range
        self._nic = nic
        self.disk = disk  # the host side (vmruntime/devices.py) harvests its dirty blocks and counters
        ns = make_namespace(self._console, clock.read, no_nic_read if nic is None else nic.read,
                            no_nic_write if nic is None else nic.write,
                            no_disk_read if disk is None else disk.read,
                            no_disk_write if disk is None else disk.write)
        self._compiler = BlockCompiler(bytes(ram[start:end]), start, self._size, ns, ready)
        self._blocks: dict[int, BlockFn] = {}

    # ---- creation ----

    @classmethod
    def boot(cls, ram: mmap.mmap, image: Image, args: Mapping[str, int],
             clock_ns: Callable[[], int], nic_mac: int | None = None,
             disk: BlockBackend | None = None, disk_block: int = DEFAULT_BLOCK_SIZE) -> Machine:
        """Write image and boot block into ram; the machine starts at image.entry.

        nic_mac (a 48-bit integer, first octet most significant) gives the machine a NIC; disk
        gives it a disk over that backend, its writes tracked in blocks of disk_block bytes.
        """
        _check_image(image, len(ram))
        packed = _pack_args(args)
        end = image.load_addr + len(image.code)
        nic = None if nic_mac is None else NicDevice(ram, end, nic_mac)
        dev = None if disk is None else DiskDevice(ram, end, disk, disk_block)
        ram[image.load_addr:end] = image.code
        _write_boot_block(ram, packed)
        m = cls(ram, (image.load_addr, end), ClockDevice(clock_ns), nic, disk=dev)
        m._R[0] = isa.BOOT_ADDR
        for i, (_, value) in enumerate(packed, start=1):
            m._R[i] = value
        m._R[isa.SP] = isa.STACK_TOP
        m.pc = image.entry
        return m

    @classmethod
    def restore(cls, ram: mmap.mmap, state: Mapping[str, Any], clock_ns: Callable[[], int],
                ready: Mapping[int, CodeType] | None = None, disk: BlockBackend | None = None,
                disk_block: int = DEFAULT_BLOCK_SIZE) -> Machine:
        """Continue from save_state() output; ram already holds guest memory, code included.

        ready: blocks translated ahead from this code region (vmruntime/warmup.py checks they are).
        disk: the backend of the saved state's disk, given exactly when the state has one.
        """
        _check_state(state, len(ram))
        code = state["code"]
        clock = ClockDevice(clock_ns, state["devices"]["clock"]["now_ns"])
        saved_nic = state["devices"].get("nic")
        nic = None if saved_nic is None else NicDevice.restore(ram, code[1], saved_nic)
        saved_disk = state["devices"].get("disk")
        if (saved_disk is None) != (disk is None):
            raise ValueError("the machine state has a disk and no image was given" if disk is None
                             else "an image was given for a machine state without a disk")
        dev = None if disk is None else DiskDevice.restore(ram, code[1], disk, saved_disk, disk_block)
        m = cls(ram, (code[0], code[1]), clock, nic, ready, dev)
        m._R[:isa.NUM_REGS] = list(state["regs"])
        m._R[R_FA], m._R[R_FB] = state["cmp"]
        m._R[R_IC] = state["instructions"]
        m.pc = state["pc"]
        m.status = state["status"]
        m.fault_reason = state["fault_reason"]
        m._console += state["devices"]["console"]["pending"]
        m.wait_until_ns = state["devices"]["clock"].get("wait_until_ns")
        return m

    # ---- running ----

    @property
    def code_range(self) -> tuple[int, int]:
        return self._code_range

    def block_starts(self) -> list[int]:
        """The start PCs of the blocks compiled so far, in the order they were first run: what a
        migration's destination translates ahead of the resume (vmruntime/warmup.py)."""
        return list(self._blocks)

    def marshalled_blocks(self, max_bytes: int) -> list[tuple[int, bytes]]:
        """(pc, marshalled code) of the compiled blocks, in first-run order, up to ``max_bytes``."""
        return within_bytes(((pc, marshal_block(fn)) for pc, fn in list(self._blocks.items())), max_bytes)

    @property
    def instructions(self) -> int:
        return self._R[R_IC]

    @property
    def regs(self) -> list[int]:
        """A copy of r0..r15 (for tests and debugging)."""
        return self._R[:isa.NUM_REGS]

    @property
    def flags(self) -> int:
        return isa.flags_of(self._R[R_FA], self._R[R_FB])

    def run(self, budget: int) -> int:
        """Run about budget instructions (a block may overshoot); return how many ran.

        Returns early after a WAIT whose deadline is still ahead; until that
        deadline passes, run() returns 0 at once (see wait_seconds()).
        """
        if self.status != "running" or budget <= 0 or self.waiting():
            return 0
        R = self._R
        start = R[R_IC]
        try:
            self.pc = self._loop(R, start + budget)
        except Waiting as w:
            self.pc, self.wait_until_ns = w.pc, self.wait_deadline(w.deadline)
        except Halted as h:
            self.pc, self.status = h.pc, "halted"
        except GuestFault as f:
            self._fault(f.pc, f.reason)
        except Exception as exc:  # a host-side failure must not take the VM process down
            self._fault(self.pc, f"internal error: {type(exc).__name__}: {exc}")
        return R[R_IC] - start

    def _loop(self, R: list[int], lim: int) -> int:
        """The dispatch loop: one dict lookup and one call per block."""
        get = self._blocks.get
        compile_block = self._compile
        M = self._ram
        pc = self.pc
        try:
            while R[R_IC] < lim:
                pc = (get(pc) or compile_block(pc))(R, M, lim)
        finally:
            self.pc = pc  # the start of the last block entered, for an internal-error report
        return pc

    def wait_deadline(self, deadline: int) -> int | None:
        """The deadline a WAIT sleeps until, or None: a WAIT does not sleep while the NIC's RX ring
        holds frames the guest has not consumed, as a pending interrupt would wake a CPU at once. A
        guest that checked its ring, then found a frame delivered between two run() slices before
        its WAIT, would otherwise sleep on a frame until the deadline."""
        if self._nic is not None and self._nic.rx_pending():
            return None
        return deadline

    def waiting(self) -> bool:
        """True while a WAIT's deadline is ahead; clears a deadline the clock has reached."""
        if self.wait_until_ns is None:
            return False
        if self._clock.read() < self.wait_until_ns:
            return True
        self.wait_until_ns = None
        return False

    def wait_seconds(self) -> float:
        """How long the host may sleep before run() has work again: 0.0 unless waiting.

        Virtual time runs at the host clock's rate while the VM runs, so the
        virtual time left is the host time left.  Capped at MAX_WAIT_SECONDS.
        """
        if self.status != "running" or self.wait_until_ns is None:
            return 0.0
        # One clock read: the deadline may pass between two (and sleep() refuses a negative time).
        left = self.wait_until_ns - self._clock.read()
        return 0.0 if left <= 0 else min(left / 1e9, MAX_WAIT_SECONDS)

    def _compile(self, pc: int) -> BlockFn:
        fn = self._compiler.compile(pc)
        self._blocks[pc] = fn
        return fn

    def _fault(self, pc: int, reason: str) -> None:
        self.pc = pc
        self.status = "faulted"
        self.fault_reason = reason

    # ---- devices ----

    def console_drain(self) -> bytes:
        out = bytes(self._console)
        del self._console[:]
        return out

    def clock_now(self) -> int:
        return self._clock.read()

    @property
    def nic_mac(self) -> int | None:
        """The NIC's MAC, or None on a machine without a NIC."""
        return None if self._nic is None else self._nic.mac

    def nic_deliver(self, frame: bytes) -> bool:
        """Receive one frame from the host into the RX ring; False when dropped (or no NIC).

        A delivered frame ends a WAIT: the guest gets to handle it on the next run().
        """
        if self._nic is None or not self._nic.deliver(frame):
            return False
        self.wait_until_ns = None
        return True

    def nic_take_tx(self) -> list[bytes]:
        """The frames the guest queued since the last call, oldest first."""
        return [] if self._nic is None else self._nic.take_tx()

    def nic_tx_failed(self, count: int = 1) -> None:
        """The host could not send count frames it took: counted as TX_DROPPED."""
        if self._nic is not None:
            self._nic.tx_failed(count)

    def nic_set_link(self, up: bool) -> None:
        if self._nic is not None:
            self._nic.link = up

    def nic_info(self) -> dict[str, Any]:
        """mac, link and the four counters; {} on a machine without a NIC."""
        return {} if self._nic is None else self._nic.info()

    # ---- state ----

    def save_state(self) -> dict[str, Any]:
        """CPU and device state at the current instruction boundary; msgpack-able."""
        R = self._R
        devices: dict[str, Any] = {
            "console": {"pending": bytes(self._console)},
            "clock": {**self._clock.save(), "wait_until_ns": self.wait_until_ns},
        }
        if self._nic is not None:
            devices["nic"] = self._nic.save()
        if self.disk is not None:
            devices["disk"] = self.disk.save()
        return {
            "version": STATE_VERSION,
            "isa_version": isa.ISA_VERSION,
            "ram_size": self._size,
            "code": [self._code_range[0], self._code_range[1]],
            "pc": self.pc,
            "regs": R[:isa.NUM_REGS],
            "cmp": [R[R_FA], R[R_FB]],
            "flags": isa.flags_of(R[R_FA], R[R_FB]),
            "instructions": R[R_IC],
            "status": self.status,
            "fault_reason": self.fault_reason,
            "devices": devices,
        }


def _check_image(image: Image, ram_size: int) -> None:
    if image.isa_version not in isa.ACCEPTED_ISA_VERSIONS:
        raise ValueError(f"image is for ISA version {image.isa_version}, this machine runs {isa.ISA_VERSION}")
    if image.load_addr != isa.CODE_ADDR or len(image.code) > isa.CODE_LIMIT:
        raise ValueError(f"image must load at {isa.CODE_ADDR:#x} and fit in {isa.CODE_LIMIT} bytes")
    if not image.load_addr <= image.entry < image.load_addr + len(image.code):
        raise ValueError(f"image entry {image.entry:#x} is outside its code")
    if ram_size < isa.MIN_RAM:
        raise ValueError(f"guest RAM of {ram_size} bytes is below the minimum of {isa.MIN_RAM}")


def _pack_args(args: Mapping[str, int]) -> list[tuple[bytes, int]]:
    """Boot arguments sorted by name (the order of r1, r2, ... and of the boot block)."""
    if len(args) > isa.BOOT_MAX_ARGS:
        raise ValueError(f"at most {isa.BOOT_MAX_ARGS} boot arguments, got {len(args)}")
    packed = []
    for name in sorted(args):
        raw, value = name.encode(), args[name]
        if not raw or len(raw) > isa.BOOT_ARG_NAME or not name.isascii():
            raise ValueError(f"boot argument name {name!r} must be 1..{isa.BOOT_ARG_NAME} ASCII characters")
        if not isinstance(value, int) or not 0 <= value <= isa.MASK64:
            raise ValueError(f"boot argument {name}={value!r} is not an unsigned 64-bit integer")
        packed.append((raw, value))
    return packed


def _write_boot_block(ram: mmap.mmap, packed: list[tuple[bytes, int]]) -> None:
    base = isa.BOOT_ADDR
    block = bytearray(isa.BOOT_OFF_ARGS + isa.BOOT_ARG_ENTRY * len(packed))
    for off, value in ((isa.BOOT_OFF_MAGIC, isa.BOOT_MAGIC), (isa.BOOT_OFF_VERSION, isa.ISA_VERSION),
                       (isa.BOOT_OFF_RAM_SIZE, len(ram)), (isa.BOOT_OFF_NARGS, len(packed))):
        _U64.pack_into(block, off, value)
    for i, (name, value) in enumerate(packed):
        off = isa.BOOT_OFF_ARGS + i * isa.BOOT_ARG_ENTRY
        block[off:off + isa.BOOT_ARG_NAME] = name.ljust(isa.BOOT_ARG_NAME, b"\0")
        _U64.pack_into(block, off + isa.BOOT_ARG_NAME, value)
    ram[base:base + len(block)] = block


def _check_state(state: Mapping[str, Any], ram_size: int) -> None:
    """Refuse a state this machine cannot continue, before touching anything."""
    if not isinstance(state, Mapping):
        raise ValueError("machine state must be a map")
    if state.get("version") not in ACCEPTED_STATE_VERSIONS:
        raise ValueError(f"machine state version {state.get('version')!r}, expected one of "
                         f"{', '.join(map(str, ACCEPTED_STATE_VERSIONS))}")
    if state.get("isa_version") not in isa.ACCEPTED_ISA_VERSIONS:
        raise ValueError(f"machine state is for ISA version {state.get('isa_version')!r}")
    if state.get("ram_size") != ram_size:
        raise ValueError(f"state was saved with {state.get('ram_size')} bytes of RAM, mapping has {ram_size}")
    code = state.get("code")
    if not (isinstance(code, list | tuple) and len(code) == 2 and all(map(_is_u64, code))
            and code[0] <= code[1] <= min(ram_size, isa.CODE_LIMIT)):
        raise ValueError("state's code region is malformed or outside guest RAM")
    if state.get("status") not in STATUSES:
        raise ValueError(f"unknown machine status {state.get('status')!r}")
    regs, cmp = state.get("regs"), state.get("cmp")
    if not (isinstance(regs, list | tuple) and len(regs) == isa.NUM_REGS and all(map(_is_u64, regs))):
        raise ValueError("state's registers are malformed")
    if not (isinstance(cmp, list | tuple) and len(cmp) == 2 and all(map(_is_u64, cmp))):
        raise ValueError("state's flags are malformed")
    if not (_is_u64(state.get("pc")) and _is_u64(state.get("instructions"))):
        raise ValueError("state's pc or instruction counter is malformed")
    _check_devices(state.get("devices"), state["version"])
    if "nic" in state["devices"] and (state["version"] < 3 or state["isa_version"] < 2):
        raise ValueError("a machine state before version 3 or ISA version 2 cannot carry a NIC")
    if "disk" in state["devices"] and (state["version"] < 4 or state["isa_version"] < 3):
        raise ValueError("a machine state before version 4 or ISA version 3 cannot carry a disk")
    # The NIC's and the disk's own fields are checked by their restore(), before anything is built.


def _check_devices(devices: object, version: int) -> None:
    try:
        pending = devices["console"]["pending"]  # type: ignore[index]
        clock = devices["clock"]  # type: ignore[index]
        now_ns = clock["now_ns"]
        # Version 2 always carries the field (None when not waiting); version 1 never does.
        wait = clock["wait_until_ns"] if version >= 2 else clock.get("wait_until_ns")
    except (KeyError, TypeError, AttributeError):
        raise ValueError("state's device section is malformed") from None
    if not isinstance(pending, bytes) or not _is_u64(now_ns):
        raise ValueError("state's console or clock device is malformed")
    if version < 2 and wait is not None:
        raise ValueError("a version 1 machine state cannot carry a WAIT deadline")
    if wait is not None and not _is_u64(wait):
        raise ValueError("state's WAIT deadline is malformed")


def _is_u64(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= isa.MASK64
