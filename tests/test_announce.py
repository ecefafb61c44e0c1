"""The announce after a migration: QEMU's RARP frame, the gratuitous ARP, the round schedule, the
NIC's proposal and the destination's checks (agent/announce.py, agent/migration/nic_move.py)."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import pytest

from agent import announce
from agent.migration import nic_move
from agent.migration.info import MigrationParams
from agent.nics import NicConfig, NicError

MAC = "52:54:00:12:34:56"
MAC_BYTES = bytes.fromhex("525400123456")


def test_rarp_frame_is_qemus_reverse_request_from_the_guest_mac() -> None:
    f = announce.rarp_frame(MAC)
    assert len(f) == 60 and f[42:] == bytes(18)  # padded to the Ethernet minimum with zeros
    assert f[0:6] == b"\xff" * 6 and f[6:12] == MAC_BYTES
    assert struct.unpack("!H", f[12:14])[0] == 0x8035
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = struct.unpack("!HHBBH6s4s6s4s", f[14:42])
    assert (htype, ptype, hlen, plen, op) == (1, 0x0800, 6, 4, 3)
    assert sha == tha == MAC_BYTES and spa == tpa == bytes(4)


def test_gratuitous_arp_asks_for_the_guests_own_ip() -> None:
    f = announce.garp_frame(MAC, 0x0AD5070A)
    assert len(f) == 60 and f[0:6] == b"\xff" * 6 and f[6:12] == MAC_BYTES
    assert struct.unpack("!H", f[12:14])[0] == 0x0806
    _, _, _, _, op, sha, spa, tha, tpa = struct.unpack("!HHBBH6s4s6s4s", f[14:42])
    assert (op, sha, tha) == (1, MAC_BYTES, bytes(6))
    assert spa == tpa == bytes([10, 213, 7, 10])


def test_a_round_has_the_garp_only_when_the_guest_has_an_ip() -> None:
    assert announce.announce_frames(MAC, None) == [announce.rarp_frame(MAC)]
    assert announce.announce_frames(MAC, "10.213.7.10/24") == [announce.rarp_frame(MAC),
                                                                announce.garp_frame(MAC, 0x0AD5070A)]


def test_schedule_defaults_are_qemus_and_the_gaps_are_capped() -> None:
    # QEMU's net/announce.c: the first round at once, then initial + k * step, capped at max
    assert announce.Schedule().gaps_s() == pytest.approx([0, 0.05, 0.15, 0.25, 0.35])
    assert announce.Schedule(rounds=9).gaps_s()[-4:] == pytest.approx([0.45, 0.55, 0.55, 0.55])
    assert announce.Schedule(rounds=1).gaps_s() == [0]
    assert announce.Schedule(rounds=0).gaps_s() == []
    assert announce.Schedule(rounds=3, initial_ms=0, step_ms=0).gaps_s() == [0, 0, 0]
    with pytest.raises(ValueError):
        announce.Schedule(rounds=-1)


def test_send_rounds_sends_each_round_once() -> None:
    sent: list[list[bytes]] = []

    async def send(frames: list[bytes]) -> None:
        sent.append(frames)

    rounds = asyncio.run(announce.send_rounds(send, [b"x"], announce.Schedule(3, 0, 0, 0)))
    assert rounds == 3 and sent == [[b"x"]] * 3


def test_migration_params_carry_the_announce_and_the_nic_map() -> None:
    p = MigrationParams.from_dict({"announce-rounds": 2, "announce-initial": 10, "announce-max": 20,
                                   "announce-step": 5, "nic-map": ["br0=br1"]})
    assert p.announce() == announce.Schedule(2, 10, 20, 5) and p.nic_map == {"br0": "br1"}
    assert MigrationParams.from_dict(p.to_dict()) == p
    with pytest.raises(ValueError, match="SRC_BR=DST_BR"):
        MigrationParams.from_dict({"nic-map": ["br0"]})
    with pytest.raises(ValueError):
        MigrationParams.from_dict({"announce-rounds": -1})


def test_the_proposed_nic_is_mapped_and_checked(tmp_path: Path) -> None:
    nic = NicConfig(bridge="br0", mac=MAC, tap="fy-v", ip="10.0.0.2/24")
    params = {nic_move.PARAMS_KEY: nic_move.proposal(nic)}
    assert "tap" not in params[nic_move.PARAMS_KEY]
    assert nic_move.proposed({}, {}) is None
    got = nic_move.proposed(params, {"br0": "br9"})
    assert got is not None and got[0].bridge == "br9" and got[0].mac == MAC and got[1] == "br0"
    with pytest.raises(NicError):
        nic_move.proposed({nic_move.PARAMS_KEY: {"bridge": "br0"}}, {})
    (tmp_path / "br0" / "bridge").mkdir(parents=True)
    assert nic_move.host_refusal(NicConfig("br0", MAC, ""), "br0", str(tmp_path)) is None
    assert "bridge br9 (mapped from br0 by --nic-map) does not exist on the destination" in str(
        nic_move.host_refusal(NicConfig("br9", MAC, ""), "br0", str(tmp_path)))
    assert "--nic-map SRC_BR=DST_BR" in str(nic_move.host_refusal(NicConfig("br7", MAC, ""), "br7", str(tmp_path)))


def test_free_tap_takes_a_suffix_when_the_name_is_in_use(tmp_path: Path) -> None:
    assert nic_move.free_tap("v1", sys_net=str(tmp_path)) == "fy-v1"
    (tmp_path / "fy-v1").mkdir()
    assert nic_move.free_tap("v1", sys_net=str(tmp_path)) == "fy-v1-1"
    assert nic_move.free_tap("v1", {"fy-v1-1"}, sys_net=str(tmp_path)) == "fy-v1-2"
    long = nic_move.free_tap("a-rather-long-vm-name", {"x"}, sys_net=str(tmp_path))
    (tmp_path / long).mkdir()
    again = nic_move.free_tap("a-rather-long-vm-name", sys_net=str(tmp_path))
    assert again != long and len(again) <= 15 and again.endswith("-1")
