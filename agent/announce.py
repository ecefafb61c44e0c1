"""Telling the network where a guest went: RARP and gratuitous ARP frames, sent in rounds.

After a migration the switches (here: host bridges) still send the guest's frames to the port it
left. Like QEMU's announce-self, the destination sends frames from the guest's MAC on the guest's
own TAP, so every bridge on the way learns the new port: RARP "reverse request" frames in QEMU's
format and, when the guest has an IP, a gratuitous ARP for it.

The frames enter the network as the guest's own would, written into the TAP by the VM process
(op `nic-send`): a frame sent on the TAP from the host side (an AF_PACKET socket bound to it)
would go to the guest instead, and a bridge learns only from frames that come in on a port.

Pure parts: the frame builders and the round schedule. `send_rounds` runs the rounds on the event
loop (`send_rounds`), sleeping between them (never blocking it), for the caller to start as a task after the VM
resumed, so RESUMED is never delayed.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from agent.nics import parse_ip, parse_mac

ETH_P_ARP = 0x0806
ETH_P_RARP = 0x8035
ETH_P_IP = 0x0800
ARP_REQUEST = 1
RARP_REQUEST_REVERSE = 3
BROADCAST = b"\xff" * 6
MIN_FRAME = 60  # the shortest Ethernet frame without FCS: shorter ones are padded with zeros


@dataclass(frozen=True)
class Schedule:
    """QEMU's announce parameters (its defaults): rounds, the first gap, the cap, the step (ms)."""

    rounds: int = 5
    initial_ms: float = 50.0
    max_ms: float = 550.0
    step_ms: float = 100.0

    def __post_init__(self) -> None:
        if self.rounds < 0:
            raise ValueError("announce-rounds must be 0 (off) or more")
        if self.initial_ms < 0 or self.max_ms < 0 or self.step_ms < 0:
            raise ValueError("announce delays must not be negative (milliseconds)")

    def gaps_s(self) -> list[float]:
        """The wait before each round, in seconds. As QEMU's announce timer: the first round at once
        (the sooner the bridges learn, the fewer frames go to the old port), then initial,
        initial + step, initial + 2 step, ... each capped at max."""
        waits = [min(self.initial_ms + self.step_ms * i, self.max_ms) / 1000 for i in range(max(self.rounds - 1, 0))]
        return [0.0, *waits] if self.rounds else []


def _mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(parse_mac(mac).replace(":", ""))


def _pad(frame: bytes) -> bytes:
    return frame.ljust(MIN_FRAME, b"\0")


def rarp_frame(mac: str) -> bytes:
    """QEMU's announce frame: broadcast RARP reverse request, sender and target hardware address
    the guest's MAC, both protocol addresses 0."""
    m = _mac_bytes(mac)
    arp = struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, RARP_REQUEST_REVERSE, m, bytes(4), m, bytes(4))
    return _pad(BROADCAST + m + struct.pack("!H", ETH_P_RARP) + arp)


def garp_frame(mac: str, ip: int) -> bytes:
    """A gratuitous ARP: a broadcast request for the guest's own IP, from its MAC."""
    m, addr = _mac_bytes(mac), struct.pack("!I", ip)
    arp = struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, ARP_REQUEST, m, addr, bytes(6), addr)
    return _pad(BROADCAST + m + struct.pack("!H", ETH_P_ARP) + arp)


def announce_frames(mac: str, ip: str | None) -> list[bytes]:
    """One round's frames: the RARP, and a gratuitous ARP when the guest has an IP ("A.B.C.D/NN")."""
    frames = [rarp_frame(mac)]
    if ip is not None:
        frames.append(garp_frame(mac, parse_ip(ip)[0]))
    return frames


Send = Callable[[list[bytes]], Awaitable[object]]


async def send_rounds(send: Send, frames: list[bytes], schedule: Schedule) -> int:
    """Send ``frames`` once per round, after each round's gap; the number of rounds sent."""
    sent = 0
    for gap in schedule.gaps_s():
        await asyncio.sleep(gap)
        await send(frames)
        sent += 1
    return sent
