"""The NIC device: guest-visible registers, RX/TX rings in guest RAM, host-side frame exchange.

Owns the device model of docs/isa.md ("The NIC"): the fifteen registers the
`nicr`/`nicw` instructions reach, the ring rules (slot layout, bounds, the
TX doorbell), the counters, the frames the guest has queued and the host has
not taken yet, and the device's part of the saved state.  The host side (the
VM process's TAP, vmruntime/tap.py) only calls deliver(), take_tx(),
tx_failed() and the link setter; it never touches the rings.

Register accessors return a fault reason (a str) instead of raising, so the
block compiler can write its registers back before it raises GuestFault.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Mapping
from typing import Any

from vmruntime import isa

SLOT = isa.NIC_SLOT
MAX_SLOTS = 256
MIN_FRAME = 14  # an Ethernet header
MAX_FRAME = isa.NIC_MTU_FRAME
# Frames the guest queued and the host has not taken; beyond this a doorbell
# drops (TX_DROPPED) so a host that never takes cannot grow the saved state without bound.
MAX_PENDING_TX = 1024
MAC_LIMIT = 1 << 48

# Register numbers (the assembler's NIC_* constants).
STATUS, MAC, RX_BASE, RX_SLOTS, RX_HEAD, RX_TAIL = 0, 1, 2, 3, 4, 5
TX_BASE, TX_SLOTS, TX_HEAD, TX_TAIL = 6, 7, 8, 9
RX_PACKETS, TX_PACKETS, RX_DROPPED, TX_DROPPED, CTRL = 10, 11, 12, 13, 14
NUM_REGS = 15
WRITABLE = frozenset({RX_BASE, RX_SLOTS, RX_TAIL, TX_BASE, TX_SLOTS, TX_HEAD, CTRL})
STATUS_PRESENT, STATUS_LINK = 1, 2
CTRL_ENABLED = 1

_U16 = struct.Struct("<H")
_FIELDS = ("rx_base", "rx_slots", "rx_head", "rx_tail", "tx_base", "tx_slots", "tx_head", "tx_tail",
           "rx_packets", "tx_packets", "rx_dropped", "tx_dropped", "ctrl")


def no_nic_read(reg: int) -> int | str:
    """nicr on a machine without a NIC: STATUS reads 0 (so a guest can probe), anything else faults."""
    return 0 if reg == STATUS else "no NIC"


def no_nic_write(reg: int, value: int) -> str | None:
    return "no NIC"


def mac_text(mac: int) -> str:
    return ":".join(f"{b:02x}" for b in mac.to_bytes(6, "big"))


def parse_mac(text: str) -> int:
    """'52:54:00:12:34:56' -> 0x525400123456; ValueError when malformed."""
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"malformed MAC {text!r}")
    try:
        return int("".join(parts), 16)
    except ValueError:
        raise ValueError(f"malformed MAC {text!r}") from None


class NicDevice:
    """One NIC over one guest RAM mapping; see docs/isa.md "The NIC"."""

    def __init__(self, ram: mmap.mmap, code_end: int, mac: int) -> None:
        if not 0 <= mac < MAC_LIMIT:
            raise ValueError(f"NIC MAC {mac!r} is not a 48-bit integer")
        self._ram = ram
        self._ram_size = len(ram)
        self._code_end = code_end
        self.mac = mac
        # Host view: the TAP is open and the VM is running.  Not saved: the host sets it.
        self.link = False
        self.rx_base = self.rx_slots = self.rx_head = self.rx_tail = 0
        self.tx_base = self.tx_slots = self.tx_head = self.tx_tail = 0
        self.rx_packets = self.tx_packets = self.rx_dropped = self.tx_dropped = 0
        self.ctrl = 0
        self.pending_tx: list[bytes] = []

    # ---- guest side: registers ----

    def read(self, reg: int) -> int | str:
        if reg == STATUS:
            return STATUS_PRESENT | (STATUS_LINK if self.link else 0)
        if reg == MAC:
            return self.mac
        if 0 < reg < NUM_REGS:
            return int(getattr(self, _FIELDS[reg - 2]))
        return f"bad NIC register {reg}"

    def write(self, reg: int, value: int) -> str | None:
        if reg not in WRITABLE:
            if 0 <= reg < NUM_REGS:
                return f"NIC register {reg} is read-only"
            return f"bad NIC register {reg}"
        if reg in (RX_BASE, RX_SLOTS, TX_BASE, TX_SLOTS):
            return self._set_ring(reg, value)
        if reg == RX_TAIL:
            if not self.rx_tail <= value <= self.rx_head:
                return f"NIC RX_TAIL {value} outside [RX_TAIL {self.rx_tail}, RX_HEAD {self.rx_head}]"
            self.rx_tail = value
            return None
        if reg == TX_HEAD:
            return self._doorbell(value)
        self.ctrl = value & CTRL_ENABLED
        return None

    def _set_ring(self, reg: int, value: int) -> str | None:
        rx = reg in (RX_BASE, RX_SLOTS)
        base = self.rx_base if rx else self.tx_base
        slots = self.rx_slots if rx else self.tx_slots
        if reg in (RX_BASE, TX_BASE):
            base = value
        else:
            slots = value
        if slots > MAX_SLOTS:
            return f"NIC ring of {slots} slots, at most {MAX_SLOTS}"
        if not self._ring_ok(base, slots):
            return (f"NIC ring [{base:#x}, +{slots * SLOT:#x}) outside guest RAM "
                    f"or into the image (which ends at {self._code_end:#x})")
        if rx:
            self.rx_base, self.rx_slots, self.rx_head, self.rx_tail = base, slots, 0, 0
        else:
            self.tx_base, self.tx_slots, self.tx_head, self.tx_tail = base, slots, 0, 0
        return None

    def _ring_ok(self, base: int, slots: int) -> bool:
        # An empty ring may sit anywhere: a guest sets BASE and SLOTS one after the other.
        return slots == 0 or (self._code_end <= base and base + slots * SLOT <= self._ram_size)

    def _doorbell(self, head: int) -> str | None:
        """The guest queued frames [TX_TAIL, head): copy them out of guest RAM now."""
        tail = self.tx_tail
        if not tail <= head <= tail + self.tx_slots:
            return f"NIC TX_HEAD {head} outside [TX_TAIL {tail}, TX_TAIL + TX_SLOTS {tail + self.tx_slots}]"
        ram = self._ram
        for i in range(tail, head):
            at = self.tx_base + (i % self.tx_slots) * SLOT
            length = _U16.unpack_from(ram, at)[0]
            if MIN_FRAME <= length <= MAX_FRAME and len(self.pending_tx) < MAX_PENDING_TX:
                self.pending_tx.append(ram[at + 2:at + 2 + length])
                self.tx_packets += 1
            else:
                self.tx_dropped += 1
        self.tx_head = self.tx_tail = head
        return None

    # ---- host side ----

    def deliver(self, frame: bytes) -> bool:
        """Write one received frame into the next RX slot; False (and counted) when dropped."""
        n = len(frame)
        if (not self.ctrl & CTRL_ENABLED or self.rx_slots == 0 or not MIN_FRAME <= n <= MAX_FRAME
                or self.rx_head - self.rx_tail >= self.rx_slots):
            self.rx_dropped += 1
            return False
        at = self.rx_base + (self.rx_head % self.rx_slots) * SLOT
        _U16.pack_into(self._ram, at, n)
        self._ram[at + 2:at + 2 + n] = frame
        self.rx_head += 1
        self.rx_packets += 1
        return True

    def take_tx(self) -> list[bytes]:
        out, self.pending_tx = self.pending_tx, []
        return out

    def tx_failed(self, count: int = 1) -> None:
        """The host could not send count taken frames (e.g. the TAP's queue was full)."""
        self.tx_dropped += count

    def info(self) -> dict[str, Any]:
        return {"mac": mac_text(self.mac), "link": self.link, "rx-packets": self.rx_packets,
                "tx-packets": self.tx_packets, "rx-dropped": self.rx_dropped, "tx-dropped": self.tx_dropped}

    # ---- state ----

    def save(self) -> dict[str, Any]:
        state: dict[str, Any] = {"mac": self.mac}
        state.update((name, getattr(self, name)) for name in _FIELDS)
        state["pending_tx"] = list(self.pending_tx)
        return state

    @classmethod
    def restore(cls, ram: mmap.mmap, code_end: int, state: object) -> NicDevice:
        """A device continuing from save(); ValueError on anything malformed or inconsistent."""
        if not isinstance(state, Mapping):
            raise ValueError("state's NIC device is malformed")
        mac = state.get("mac")
        if not (_is_u64(mac) and mac < MAC_LIMIT):  # type: ignore[operator]
            raise ValueError("state's NIC MAC is malformed")
        dev = cls(ram, code_end, mac)  # type: ignore[arg-type]
        for name in _FIELDS:
            value = state.get(name)
            if not _is_u64(value):
                raise ValueError(f"state's NIC field {name} is malformed")
            setattr(dev, name, value)
        pending = state.get("pending_tx")
        if not (isinstance(pending, list | tuple) and len(pending) <= MAX_PENDING_TX
                and all(isinstance(f, bytes) and MIN_FRAME <= len(f) <= MAX_FRAME for f in pending)):
            raise ValueError("state's NIC pending frames are malformed")
        dev.pending_tx = list(pending)
        dev._check_consistent()
        return dev

    def _check_consistent(self) -> None:
        for base, slots, name in ((self.rx_base, self.rx_slots, "RX"), (self.tx_base, self.tx_slots, "TX")):
            if slots > MAX_SLOTS or not self._ring_ok(base, slots):
                raise ValueError(f"state's NIC {name} ring is outside guest RAM or too large")
        if not self.rx_tail <= self.rx_head <= self.rx_tail + self.rx_slots:
            raise ValueError("state's NIC RX indexes are inconsistent")
        if self.tx_head != self.tx_tail or self.ctrl & ~CTRL_ENABLED:
            raise ValueError("state's NIC TX indexes or control bits are inconsistent")


def _is_u64(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= isa.MASK64
