"""The source and destination sessions against a scripted peer over real sockets, with a fake VM
manager (unit tests: the VM side is a mock; real VMs are in test_migration.py).

These pin the ownership rules: before COMMIT every failure ends with the destination discarding
and the source resuming; after COMMIT the source keeps the VM paused until the destination says
what happened; the destination never starts a VM without COMMIT, and an in-doubt answer "not
resumed" fences a COMMIT that arrives later.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import mmap
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from agent.announce import Schedule
from agent.code_cache import CodeCache, cache_key
from agent.disks import DiskConfig
from agent.migration import code_hint, pages, transport
from agent.migration.common import (
    RUN_STATE_KEY,
    LoopBridge,
    MigrationError,
    client_handshake,
    server_handshake,
)
from agent.migration.destination import DestinationSession
from agent.migration.info import MigrationInfo, MigrationParams, Status
from agent.migration.outcomes import Outcomes
from agent.migration.seams import IncomingHost, Lane, LogLike, MigratingVM, SourceHost
from agent.migration.source import FIXED_DOWNTIME_S, SourceSession
from agent.migration.transport import Connection, ConnectionClosed, connect, prepare_socket
from agent.nics import NicConfig
from agent.vms.vm import on_disk
from agent.vmspec import VMSpec
from proto.auth import ServerHandshake
from proto.errors import ErrorCode, ProtocolError
from proto.limits import COMPRESSION_VERSION, SUPPORTED_VERSIONS
from proto.messages import (
    Abort,
    CodeHint,
    Commit,
    DeviceState,
    Digest,
    InDoubtAnswer,
    InDoubtQuery,
    MigrateAccept,
    MigrateRefuse,
    MigrateStart,
    PageBatch,
    Ready,
    Resumed,
    RoundEnd,
    Sync,
    SyncAck,
)
from vmruntime import guestram, isa
from vmruntime.dirty import DirtyTracker, Ranges
from vmruntime.interp import COMPILER_TAG

pytestmark = pytest.mark.timeout(60)

KEY = b"k" * 32
MiB = 1 << 20
P = 4096
SIZE = 4 * MiB


class Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def _log(self, level: str, msg: str, **kw: Any) -> None:
        self.lines.append((level, msg, kw))

    def info(self, msg: str, **kw: Any) -> None:
        self._log("info", msg, **kw)

    def warning(self, msg: str, **kw: Any) -> None:
        self._log("warning", msg, **kw)

    def error(self, msg: str, **kw: Any) -> None:
        self._log("error", msg, **kw)


@pytest.fixture
def bridge() -> Iterator[LoopBridge]:
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    yield LoopBridge(loop)
    # Let what sessions submitted last (fire and forget, as incoming_restored) run before stopping.
    asyncio.run_coroutine_threadsafe(asyncio.sleep(0.01), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    t.join()
    loop.close()


def new_ram(size: int = SIZE) -> tuple[int, mmap.mmap]:
    fd = guestram.create_memfd(size)
    return fd, guestram.map_shared(fd, size)


# -- the source against a scripted destination -----------------------------------------------------


class FakeTracker:
    name = "fake-tracker"
    hot_blocks = False
    whole_bytes = 0

    def __init__(self, dirty: list[list[tuple[int, int]]]) -> None:
        self.dirty = dirty
        self.harvested_at: list[float] = []  # time.monotonic() of each harvest

    def start(self) -> None:
        pass

    def harvest(self) -> Ranges:
        self.harvested_at.append(time.monotonic())
        return Ranges.from_pairs(self.dirty.pop(0) if self.dirty else [])

    def stop(self) -> None:
        pass


@dataclass
class FakeVM:
    name: str = "v"
    mem: int = SIZE
    state: str = "running"
    dirty_backend: str = "fake-tracker"
    program: str = "counter"
    args: dict[str, str] = field(default_factory=dict)
    nic: NicConfig | None = None
    disk: DiskConfig | None = None
    calls: list[Any] = field(default_factory=list)
    dirty: list[list[tuple[int, int]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.memfd, self.ram = new_ram(self.mem)
        self.ram[0:MiB] = os.urandom(MiB)
        self.ram[3 * MiB:3 * MiB + P] = b"\x07" * P

    async def pause(self) -> dict[str, Any]:
        self.calls.append("pause")
        return {"version": 1, "pc": 1234}

    async def open_lane(self) -> FakeLane:
        return FakeLane(self)

    def paused_by_lane(self, state: dict[str, Any]) -> None:
        self.calls.append("paused-by-lane")

    async def resume(self) -> None:
        self.calls.append("resume")

    async def throttle(self, percent: int) -> None:
        self.calls.append(("throttle", percent))

    async def track_start(self, hot_blocks: bool = False) -> FakeTracker:
        self.calls.append(("track_start", hot_blocks) if hot_blocks else "track_start")
        self.tracker = FakeTracker(self.dirty)
        return self.tracker

    async def track_stop(self) -> None:
        self.calls.append("track_stop")

    async def begin_migration(self) -> None:
        self.state = "migrating"

    async def end_migration(self, run_state: str) -> None:
        self.state = run_state

    def mark_commit_sent(self, ref: dict[str, str]) -> concurrent.futures.Future[None]:
        assert set(ref) == {"id", "to"}
        self.calls.append("commit_sent")
        return on_disk(None)


class FakeLane:
    """The session thread's own socket to the VM process: requests are recorded like the VM's calls."""

    def __init__(self, vm: FakeVM) -> None:
        self.vm = vm

    def request(self, op: str, *, timeout: float | None = None, **fields: Any) -> dict[str, Any]:
        self.vm.calls.append(op)
        if op == "blocks":  # one PC outside the code range, which the hint leaves out
            return {"code": [0, 0x400], "pcs": [0x10, 0x3FC, 0x800], "tag": "tag-1",
                    "translated": [[0x10, b"b1"], [0x3FC, b"b2"]]}
        return {"state": {"version": 1, "pc": 1234}} if op == "pause" else {}

    def close(self) -> None:
        self.vm.calls.append("lane-closed")


class FakeSourceVMs:
    def __init__(self) -> None:
        self.removed: list[str] = []

    async def remove_migrated(self, name: str) -> None:
        self.removed.append(name)


class ScriptedDestination:
    """A destination listener that behaves as told: on_digest / on_commit / on_query."""

    def __init__(self, on_digest: str = "ready", on_commit: str = "resumed", on_query: bool | None = True,
                 refuse: tuple[str, str] | None = None, size: int = SIZE, sync_delay: float = 0.0,
                 wait_for_commit: float = 0.0, handshake_delay: float = 0.0,
                 versions: frozenset[int] | None = None) -> None:
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.versions = versions  # the protocol versions it speaks (None: this code's)
        self.address = self.lsock.getsockname()[:2]
        self.on_digest, self.on_commit, self.on_query, self.refuse = on_digest, on_commit, on_query, refuse
        self.size = size
        self.sync_delay = sync_delay  # seconds before each SyncAck (a destination still applying pages)
        self.acked_at: list[float] = []  # time.monotonic() of each SyncAck sent
        # Seconds to wait, on the Digest, for a COMMIT behind it before answering (commit ahead);
        # commit_behind_digest says whether one came.
        self.wait_for_commit = wait_for_commit
        self.commit_behind_digest: bool | None = None
        self.handshake_delay = handshake_delay  # seconds before each handshake answer: a long path's round trip
        self.fd, self.ram = new_ram(size)
        self.got: list[Any] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                sock, _ = self.lsock.accept()
            except OSError:
                return
            conn = Connection(prepare_socket(sock), guest_size=self.size)
            try:
                self._one(conn)
            except (OSError, ConnectionClosed):
                pass
            finally:
                conn.close()

    def _one(self, conn: Connection) -> None:
        if self.handshake_delay or self.versions is not None:
            hs = ServerHandshake(KEY, "D", versions=SUPPORTED_VERSIONS if self.versions is None else self.versions)
            for _ in range(2):  # Hello -> HelloReply, Auth -> AuthOk, each answered late
                answer = hs.receive(conn.recv())
                time.sleep(self.handshake_delay)
                conn.send(answer)
            assert hs.version is not None
            conn.channel.speak(hs.version)
        else:
            server_handshake(conn, KEY, "D")
        while True:
            msg = conn.recv(memoryview(self.ram))
            self.got.append(msg)
            if isinstance(msg, MigrateStart):
                conn.send(MigrateRefuse(*self.refuse) if self.refuse else MigrateAccept(msg.migration_id))
            elif isinstance(msg, PageBatch):
                pages.punch_zeros(self.fd, memoryview(self.ram), msg.zeros)
            elif isinstance(msg, Sync):
                time.sleep(self.sync_delay)
                self.acked_at.append(time.monotonic())
                conn.send(SyncAck(msg.round))
            elif isinstance(msg, Digest):
                if self.wait_for_commit:
                    deadline = time.monotonic() + self.wait_for_commit
                    while not conn.next_frame_is(Commit) and time.monotonic() < deadline:
                        time.sleep(0.005)
                    self.commit_behind_digest = conn.next_frame_is(Commit)
                if self.on_digest == "vanish":
                    return  # the connection drops with the digest unanswered
                if self.on_digest != "ready":
                    conn.send(Abort(ErrorCode.DIGEST_MISMATCH, "bad digest"))
                    return  # like a real destination: it never reads what follows
                conn.send(Ready())
            elif isinstance(msg, Commit):
                if self.on_commit == "resumed":
                    conn.send(Resumed())
                return  # "vanish": the connection drops with COMMIT unanswered
            elif isinstance(msg, InDoubtQuery):
                if self.on_query is not None:
                    conn.send(InDoubtAnswer(msg.migration_id, self.on_query))
                return

    def close(self) -> None:
        self.lsock.shutdown(socket.SHUT_RDWR)  # wakes accept(); a session in progress ends on EOF
        self.thread.join(10)
        self.lsock.close()
        self.ram.close()
        os.close(self.fd)


def run_source(bridge: LoopBridge, dest: ScriptedDestination, vm: FakeVM, vms: FakeSourceVMs,
               code_cache: CodeCache | None = None, **params: Any) -> tuple[SourceSession, MigrationInfo]:
    p = MigrationParams(**params)
    info = MigrationInfo(vm=vm.name, direction="out", params=p, mem=vm.mem)
    s = SourceSession(vm=vm, vms=vms, dest=dest.address, params=p, key=KEY, agent_name="S", bridge=bridge,
                      info=info, log=Log(), in_doubt_timeout=1.0, code_cache=code_cache)
    s.run()
    return s, info


@pytest.fixture
def scripted() -> Iterator[Callable[..., ScriptedDestination]]:
    made: list[ScriptedDestination] = []

    def make(**kw: Any) -> ScriptedDestination:
        made.append(ScriptedDestination(**kw))
        return made[-1]

    yield make
    for d in made:
        d.close()


def test_source_completes_and_hands_the_vm_over(bridge: LoopBridge, scripted: Any) -> None:
    dest = scripted()
    vm, vms = FakeVM(dirty=[[(0, 2 * P)], [(3 * MiB, 3 * MiB + P)]]), FakeSourceVMs()
    _, info = run_source(bridge, dest, vm, vms)
    assert info.status is Status.COMPLETED, info.error
    # Paused once (on the lane, the manager told after), never resumed here.
    assert vm.calls == ["track_start", "blocks", "pause", "paused-by-lane", "commit_sent", "track_stop", "lane-closed"]
    assert vms.removed == ["v"]
    assert dest.ram[:] == vm.ram[:]
    kinds = [type(m).__name__ for m in dest.got]
    assert kinds[0] == "MigrateStart" and kinds[-4:] == ["RoundEnd", "DeviceState", "Digest", "Commit"]
    assert dest.got[0].params["spec"] == {"program": "counter", "args": {}}  # the VM's spec travels
    # The code hint goes once, first, with the code's bytes, naming only PCs inside the code.
    assert kinds.count("CodeHint") == 1 and kinds[:3] == ["MigrateStart", "CodeHint", "PageBatch"]
    assert dest.got[1] == CodeHint(0, bytes(vm.ram[:0x400]), (0x10, 0x3FC))
    state = next(m for m in dest.got if isinstance(m, DeviceState))
    assert state.state == {"version": 1, "pc": 1234, RUN_STATE_KEY: "running"}  # the run state travels too
    digest = next(m for m in dest.got if isinstance(m, Digest))
    assert digest.value == pages.ram_digest(vm.memfd, memoryview(vm.ram), SIZE)
    assert info.rounds[-1].final and info.downtime_s is not None
    assert info.dirty_sync_count == len(info.rounds)
    assert_digest_thread_gone()


def assert_digest_thread_gone() -> None:
    """The digest thread (started in pre-copy, handed the work at the pause) ends with the session."""
    deadline = time.monotonic() + 5
    while any(t.name.startswith("ferry-digest") for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the digest thread outlived its migration"
        time.sleep(0.01)


def test_source_harvests_only_once_the_destination_applied_the_round(bridge: LoopBridge, scripted: Any) -> None:
    # Each pre-copy round ends with Sync; the destination answers 0.2 s later. The source must not
    # harvest (nor decide, nor pause) before the answer, and the wait is part of the round's time.
    dest = scripted(sync_delay=0.2)
    # 1 MiB dirty after round 0 is worth a round at the bandwidth the 0.2 s waits make (~5 MB/s).
    vm, vms = FakeVM(dirty=[[(0, MiB)], [(3 * MiB, 3 * MiB + P)]]), FakeSourceVMs()
    _, info = run_source(bridge, dest, vm, vms)
    assert info.status is Status.COMPLETED, info.error
    kinds = [type(m).__name__ for m in dest.got if isinstance(m, Sync | RoundEnd)]
    precopy = len(info.rounds) - 1
    assert precopy >= 2 and kinds == ["Sync", "RoundEnd"] * precopy + ["RoundEnd"]  # the final round: no Sync
    assert [m.round for m in dest.got if isinstance(m, Sync)] == list(range(precopy))
    assert all(r.seconds >= 0.2 for r in info.rounds[:-1])
    # Harvest i follows SyncAck i (the last harvest, after the pause, follows them all).
    assert len(vm.tracker.harvested_at) == precopy + 1
    assert all(h >= a for h, a in zip(vm.tracker.harvested_at, dest.acked_at, strict=False))
    assert dest.ram[:] == vm.ram[:]


def test_source_in_doubt_waits_for_the_destination_and_completes(bridge: LoopBridge, scripted: Any) -> None:
    dest = scripted(on_commit="vanish", on_query=True)
    vm, vms = FakeVM(), FakeSourceVMs()
    _, info = run_source(bridge, dest, vm, vms)
    assert info.status is Status.COMPLETED
    assert "resume" not in vm.calls and vms.removed == ["v"]
    assert any(isinstance(m, InDoubtQuery) for m in dest.got)


def test_source_in_doubt_resumes_only_when_told_not_resumed(bridge: LoopBridge, scripted: Any) -> None:
    dest = scripted(on_commit="vanish", on_query=False)
    vm, vms = FakeVM(), FakeSourceVMs()
    _, info = run_source(bridge, dest, vm, vms)
    assert info.status is Status.FAILED
    assert vm.calls[-3:] == ["track_stop", "resume", "lane-closed"] and vms.removed == []
    assert vm.state == "running"


def test_source_never_resumes_while_the_destination_is_silent(bridge: LoopBridge, scripted: Any) -> None:
    dest = scripted(on_commit="vanish", on_query=None)
    vm, vms = FakeVM(), FakeSourceVMs()
    _, info = run_source(bridge, dest, vm, vms)
    assert info.status is Status.FAILED and info.error is not None and "in doubt" in info.error
    assert "resume" not in vm.calls and vms.removed == []
    assert vm.state == "paused"


def test_digest_mismatch_before_commit_resumes_the_vm(bridge: LoopBridge, scripted: Any) -> None:
    dest = scripted(on_digest="abort")
    vm, vms = FakeVM(), FakeSourceVMs()
    _, info = run_source(bridge, dest, vm, vms)
    assert info.status is Status.FAILED and info.error_code == ErrorCode.DIGEST_MISMATCH
    assert vm.calls == ["track_start", "blocks", "pause", "paused-by-lane", "track_stop", "resume", "lane-closed"]
    assert not any(isinstance(m, Commit) for m in dest.got)
    assert_digest_thread_gone()


def test_commit_ahead_sends_commit_behind_the_digest_and_completes(bridge: LoopBridge, scripted: Any) -> None:
    dest = scripted(wait_for_commit=5.0)
    vm, vms = FakeVM(dirty=[[(0, 2 * P)], [(3 * MiB, 3 * MiB + P)]]), FakeSourceVMs()
    _, info = run_source(bridge, dest, vm, vms, commit_ahead=True)
    assert info.status is Status.COMPLETED, info.error
    assert dest.commit_behind_digest is True, "the source waited for READY before COMMIT"
    assert vm.calls == ["track_start", "blocks", "pause", "paused-by-lane", "commit_sent", "track_stop", "lane-closed"]
    assert vms.removed == ["v"] and dest.ram[:] == vm.ram[:]
    assert {"verify", "commit"} <= set(info.breakdown)
    assert_digest_thread_gone()


def test_without_commit_ahead_commit_waits_for_ready(bridge: LoopBridge, scripted: Any) -> None:
    dest = scripted(wait_for_commit=0.3)
    _, info = run_source(bridge, dest, FakeVM(), FakeSourceVMs())
    assert info.status is Status.COMPLETED, info.error
    assert dest.commit_behind_digest is False


def test_commit_ahead_refused_digest_resumes_the_vm(bridge: LoopBridge, scripted: Any) -> None:
    dest = scripted(on_digest="abort", wait_for_commit=5.0)
    vm, vms = FakeVM(), FakeSourceVMs()
    _, info = run_source(bridge, dest, vm, vms, commit_ahead=True)
    assert dest.commit_behind_digest is True
    assert info.status is Status.FAILED and info.error_code == ErrorCode.DIGEST_MISMATCH, (info.error, info.error_code)
    assert vm.calls == ["track_start", "blocks", "pause", "paused-by-lane", "commit_sent", "track_stop", "resume", "lane-closed"]
    assert vms.removed == [] and vm.state == "running"
    assert_digest_thread_gone()


@pytest.mark.parametrize("answer, status, resumed_here", [(True, Status.COMPLETED, False),
                                                          (False, Status.FAILED, True),
                                                          (None, Status.FAILED, False)])
def test_commit_ahead_is_in_doubt_while_the_digest_is_checked(bridge: LoopBridge, scripted: Any,
                                                               answer: bool | None, status: Status,
                                                               resumed_here: bool) -> None:
    # The destination drops the connection without answering the digest: COMMIT went out behind
    # it, so the source may no longer resume on its own; only the destination's answer decides.
    dest = scripted(on_digest="vanish", on_query=answer)
    vm, vms = FakeVM(), FakeSourceVMs()
    s, info = run_source(bridge, dest, vm, vms, commit_ahead=True)
    assert info.status is status, info.error
    assert any(isinstance(m, InDoubtQuery) for m in dest.got)
    assert ("resume" in vm.calls) is resumed_here
    assert vms.removed == (["v"] if answer else [])
    assert s.in_doubt is (answer is None)
    if answer is not True:  # (a VM handed over is removed here: its state no longer matters)
        assert vm.state == ("running" if resumed_here else "paused")


@pytest.mark.parametrize("ahead, round_trips", [(False, 2), (True, 1)])
def test_the_policy_expects_the_switch_overs_round_trips(bridge: LoopBridge, scripted: Any, ahead: bool,
                                                         round_trips: int) -> None:
    # Each handshake message answered 0.1 s late: a path of >= 0.1 s round trip as the source sees
    # it, and the switch-over waits for two of them (one with commit ahead).
    dest = scripted(handshake_delay=0.1)
    s, info = run_source(bridge, dest, FakeVM(), FakeSourceVMs(), commit_ahead=ahead)
    assert info.status is Status.COMPLETED, info.error
    assert s._rtt >= 0.1, "the handshake did not measure the path's round trip"
    # The count of round trips, not a timing: the policy's fixed part holds that many measured ones.
    assert s._fixed_s == pytest.approx(FIXED_DOWNTIME_S + round_trips * s._rtt)
    assert info.expected_downtime_s is not None and info.expected_downtime_s >= s._fixed_s


def test_the_bandwidth_leaves_the_sync_round_trip_out(bridge: LoopBridge, scripted: Any) -> None:
    # A 0.1 s round trip (handshake and every SyncAck answered 0.1 s late): each round's time holds
    # one, the bandwidth the policy predicts the final copy with must not (the fixed part has it).
    dest = scripted(handshake_delay=0.1, sync_delay=0.1)
    vm = FakeVM(dirty=[[(0, 2 * MiB)], [(3 * MiB, 3 * MiB + P)]])
    _, info = run_source(bridge, dest, vm, FakeSourceVMs())
    assert info.status is Status.COMPLETED, info.error
    measured = [r for r in info.rounds[:-1] if r.bytes >= MiB]
    assert measured and all(r.seconds >= 0.1 for r in measured)
    assert all(0.1 <= r.sync_rtt <= r.seconds for r in measured)
    r = measured[-1]
    assert info.bandwidth > r.bytes / r.seconds * 1.2, (info.bandwidth, r.bytes / r.seconds)


def test_refusal_touches_nothing(bridge: LoopBridge, scripted: Any) -> None:
    dest = scripted(refuse=(ErrorCode.VM_EXISTS, "a VM named 'v' already exists"))
    vm, vms = FakeVM(), FakeSourceVMs()
    _, info = run_source(bridge, dest, vm, vms)
    assert info.status is Status.FAILED and info.error_code == ErrorCode.VM_EXISTS
    assert info.error is not None and "already exists" in info.error
    assert vm.calls == [] and vm.state == "running"


def test_non_convergence_aborts_and_lifts_the_throttle(bridge: LoopBridge, scripted: Any) -> None:
    dest = scripted()
    # The guest dirties all of its first MiB every round: with a 1 ms bound it never fits.
    vm, vms = FakeVM(dirty=[[(0, MiB)] for _ in range(10)]), FakeSourceVMs()
    _, info = run_source(bridge, dest, vm, vms, max_downtime_ms=0.001, max_rounds=4, auto_converge=True)
    assert info.status is Status.FAILED and info.error is not None and "did not converge" in info.error
    assert ("throttle", 0) in vm.calls and "pause" not in vm.calls
    assert info.throttle == 0 and len(info.rounds) == 4


class HotFakeTracker(FakeTracker):
    """Hot blocks as the session sees them: while live, each harvest reports 1 MiB whole (whole_bytes);
    the first harvest after ``hot_blocks`` is switched off cools them, reporting them whole once more."""

    def __init__(self, dirty: list[list[tuple[int, int]]], calls: list[Any]) -> None:
        super().__init__(dirty)
        self.calls, self.hot_blocks, self.whole_bytes, self._live = calls, True, 0, True
        self.searched: list[bool] = []

    def harvest(self) -> Ranges:
        out = super().harvest()
        self.whole_bytes = MiB if self._live else 0
        self._live = self._live and self.hot_blocks
        self.calls.append(("harvest", self.whole_bytes))
        self.searched.append(self.hot_blocks)  # whether this harvest looked for new dense blocks
        return out


@dataclass
class HotFakeVM(FakeVM):
    async def track_start(self, hot_blocks: bool = False) -> FakeTracker:
        self.calls.append(("track_start", hot_blocks))
        self.tracker = HotFakeTracker(self.dirty, self.calls)
        return self.tracker


def test_auto_converge_turns_hot_blocks_off_with_its_first_throttle(bridge: LoopBridge, scripted: Any) -> None:
    """A guest that never converges, hot blocks on: the first throttle step also switches hot blocks off;
    the next harvest cools them (whole once more), the ones after are page-exact."""
    dest = scripted()
    vm, vms = HotFakeVM(dirty=[[(0, MiB)] for _ in range(10)]), FakeSourceVMs()
    _, info = run_source(bridge, dest, vm, vms, max_downtime_ms=0.001, max_rounds=6, auto_converge=True,
                         hot_blocks=True)
    assert info.status is Status.FAILED and info.error is not None and "did not converge" in info.error
    tracker = vm.tracker
    assert isinstance(tracker, HotFakeTracker) and tracker.hot_blocks is False
    steps = [c for c in vm.calls if isinstance(c, tuple) and c[0] in ("harvest", "throttle")]
    # After round 0 no throttle is due (its dirty rate says nothing); after round 1 it is.
    assert steps[:6] == [("harvest", MiB), ("harvest", MiB), ("throttle", 20),
                         ("harvest", MiB), ("throttle", 30), ("harvest", 0)], vm.calls


def test_the_final_harvest_does_not_search_for_hot_blocks(bridge: LoopBridge, scripted: Any) -> None:
    """Hot blocks on: pre-copy harvests look for dense blocks; the one after the pause does not (no
    round follows to send them whole in, and the search scans all guest RAM inside the downtime)."""
    dest = scripted()
    vm, vms = HotFakeVM(dirty=[[(0, 2 * P)], [(4096, 2 * P)]]), FakeSourceVMs()
    _, info = run_source(bridge, dest, vm, vms, hot_blocks=True)
    assert info.status is Status.COMPLETED, info.error
    tracker = vm.tracker
    assert isinstance(tracker, HotFakeTracker) and len(tracker.searched) == len(info.rounds) >= 2
    assert tracker.searched[-1] is False and all(tracker.searched[:-1]), tracker.searched
    assert dest.ram[:] == vm.ram[:]


def test_cancel_before_commit_resumes_and_reports_cancelled(bridge: LoopBridge, scripted: Any) -> None:
    dest = scripted()
    vm, vms = FakeVM(dirty=[[(0, MiB)] for _ in range(1000)]), FakeSourceVMs()
    p = MigrationParams(max_downtime_ms=0.001, max_rounds=1000, bandwidth=4 * MiB)
    info = MigrationInfo(vm=vm.name, direction="out", params=p, mem=vm.mem)
    s = SourceSession(vm=vm, vms=vms, dest=dest.address, params=p, key=KEY, agent_name="S", bridge=bridge,
                      info=info, log=Log())
    t = threading.Thread(target=s.run)
    t.start()
    s.setup_done.wait(10)
    assert s.cancel()
    t.join(10)
    assert info.status is Status.CANCELLED and vms.removed == []
    assert vm.state == "running" and "pause" not in vm.calls


# -- the destination against a scripted source ----------------------------------------------------


@dataclass
class Inc:
    name: str
    mem: int
    memfd: int
    ram: mmap.mmap
    nic: NicConfig | None = None

    def restore_fields(self) -> dict[str, Any]:
        return {}


class FakeDestLane:
    """The destination session's lane to the (fake) incoming VM process: records the restores."""

    def __init__(self, vms: FakeDestVMs) -> None:
        self.vms = vms

    def request(self, op: str, *, timeout: float | None = None, **fields: Any) -> dict[str, Any]:
        if op == "warm":
            self.vms.warmed.append(fields)
            return {"queued": len(fields["pcs"])}
        if op == "warm-status":  # the warm-up's progress, as scripted: each poll takes the next figure
            self.vms.warm_polls += 1
            return {"pending": self.vms.warm_pending.pop(0) if self.vms.warm_pending else self.vms.warm_stuck}
        assert op == "restore"
        self.vms.events.append("restore")
        if self.vms.fail_restore:
            raise ConnectionError("the VM process died")
        self.vms.started.append(fields["state"])
        return {"listening": True}

    def close(self) -> None:
        pass


class FakeDestVMs:
    """The destination's VM-manager API (agent.vms.VMManager's incoming side) over plain RAM."""

    def __init__(self, refuse: Exception | None = None) -> None:
        self.refuse = refuse
        self.fail_restore = False
        self.reserved: list[Inc] = []
        self.started: list[dict[str, Any]] = []
        self.claimed: list[str] = []
        self.dropped: list[str] = []
        self.discarded: list[str] = []
        self.events: list[str] = []  # "claim" and "restore", in the order they happened
        self.claim_delay = 0.0  # seconds claim_incoming takes (a slow record write)
        self.warmed: list[dict[str, Any]] = []  # the fields of each `warm` request (a code hint)
        self.warm_pending: list[int] = []  # what successive `warm-status` polls answer, then warm_stuck
        self.warm_stuck = 0
        self.warm_polls = 0
        self.specs: list[VMSpec | None] = []  # the spec each reservation was given

    def reserve_incoming(self, name: str, mem: int, nic: NicConfig | None = None,
                         disk: DiskConfig | None = None, spec: VMSpec | None = None) -> Inc:
        if self.refuse is not None:
            raise self.refuse
        self.specs.append(spec)
        fd, ram = new_ram(mem)
        self.reserved.append(Inc(name, mem, fd, ram))
        return self.reserved[-1]

    def allowed_disk_dirs(self) -> tuple[Path, ...]:
        return ()

    async def incoming_lane(self, inc: Inc) -> FakeDestLane:
        return FakeDestLane(self)

    def incoming_socket_path(self, inc: Inc) -> str | None:
        return None

    def claim_incoming(self, inc: Inc, state: dict[str, Any], paused: bool,
                       socket_path: str | None, migration_id: str | None = None) -> tuple[str, concurrent.futures.Future[None]]:
        self.claimed.append(inc.name)
        recorded: concurrent.futures.Future[None] = concurrent.futures.Future()

        def on_disk() -> None:
            self.events.append("claim")
            recorded.set_result(None)

        threading.Timer(self.claim_delay, on_disk).start()  # the record's write, in another thread
        return inc.name, recorded

    def incoming_restored(self, vm: str, reply: dict[str, Any]) -> None:
        pass

    def announce_incoming(self, vm: str, schedule: Schedule) -> None:
        self.events.append("announce")

    async def drop_claimed(self, vm: str) -> None:
        self.dropped.append(vm)

    def arrived_by(self, name: str, migration_id: str) -> bool:
        return False

    def discard_incoming(self, inc: Inc) -> None:
        self.discarded.append(inc.name)


# mypy checks each fake against the seam it stands in for (`make lint` runs mypy on this module):
# a fake that lacks a method the sessions call, or has it with another signature, fails the lint.
if TYPE_CHECKING:
    def _fakes_fit_their_seams(vm: FakeVM, hot: HotFakeVM, source_vms: FakeSourceVMs, lane: FakeLane,
                               tracker: FakeTracker, dest_vms: FakeDestVMs, dest_lane: FakeDestLane,
                               log: Log) -> None:
        _vm: MigratingVM = vm
        _hot: MigratingVM = hot
        _source_host: SourceHost = source_vms
        _lane: Lane = lane
        _tracker: DirtyTracker = tracker
        _incoming_host: IncomingHost[Inc, str] = dest_vms
        _dest_lane: Lane = dest_lane
        _log: LogLike = log


class Harness:
    """One DestinationSession thread and the connected source end of its socket."""

    def __init__(self, bridge: LoopBridge, vms: FakeDestVMs, outcomes: Outcomes[DestinationSession],
                 code_cache: CodeCache | None = None) -> None:
        lsock = socket.create_server(("127.0.0.1", 0))
        self.src = Connection(connect(lsock.getsockname()[:2]))
        server, _ = lsock.accept()
        lsock.close()
        self.infos: dict[str, MigrationInfo] = {}
        self.session = DestinationSession(conn=Connection(prepare_socket(server)), vms=vms, key=KEY,
                                          agent_name="D", bridge=bridge, outcomes=outcomes, infos=self.infos,
                                          log=Log(), code_cache=code_cache)
        self.thread = threading.Thread(target=self.session.run, daemon=True)
        self.thread.start()
        client_handshake(self.src, KEY, "S")

    def start(self, mid: str = "m1", isa_version: int = isa.ISA_VERSION, params: dict[str, Any] | None = None) -> Any:
        self.src.send(MigrateStart(mid, "v", SIZE, P, isa_version, tuple(sorted(isa.ISA_FEATURES)), "t",
                                   params or {}))
        return self.src.recv()

    def send_ram(self, ram: mmap.mmap, sync: bool = True) -> None:
        mv = memoryview(ram)
        for b in pages.plan_batches(mv, [(0, SIZE)]):
            self.src.send_pages(mv, b.ranges.tolist(), b.zeros.tolist())
        if sync:  # (a source need not: the destination answers Sync, never asks for it)
            self.src.send(Sync(0))
            assert self.src.recv() == SyncAck(0)  # answered once every page before it is applied
        self.src.send(RoundEnd(0, 1, 0, SIZE, 0.1, 0, 0.0))
        self.src.send(DeviceState({"version": 1}))

    def to_commit(self, fd: int, ram: mmap.mmap) -> None:
        """A whole migration of ``ram`` up to COMMIT (sent): what the destination does next is the test."""
        self.start()
        self.send_ram(ram)
        self.src.send(Digest(pages.DIGEST_ALGORITHM, pages.ram_digest(fd, memoryview(ram), SIZE)))
        assert isinstance(self.src.recv(), Ready)
        self.src.send(Commit("m1"))

    def finish(self) -> None:
        self.src.close()
        self.thread.join(10)


@pytest.fixture
def source_ram() -> Iterator[tuple[int, mmap.mmap]]:
    fd, ram = new_ram()
    ram[MiB:2 * MiB] = os.urandom(MiB)
    yield fd, ram
    ram.close()
    os.close(fd)


def test_destination_starts_the_vm_only_on_commit(bridge: LoopBridge, source_ram: Any) -> None:
    fd, ram = source_ram
    vms = FakeDestVMs()
    h = Harness(bridge, vms, Outcomes())
    assert isinstance(h.start(), MigrateAccept)
    h.send_ram(ram)
    h.src.send(Digest(pages.DIGEST_ALGORITHM, pages.ram_digest(fd, memoryview(ram), SIZE)))
    assert isinstance(h.src.recv(), Ready)
    assert vms.started == [] and vms.reserved[0].ram[:] == ram[:]
    h.src.send(Commit("m1"))
    assert isinstance(h.src.recv(), Resumed)
    h.finish()
    assert vms.started == [{"version": 1}] and vms.discarded == []
    assert h.infos["v"].status is Status.COMPLETED and h.infos["v"].direction == "in"


def test_destination_names_the_incoming_vm_by_the_sources_spec_if_it_sent_one(bridge: LoopBridge) -> None:
    vms = FakeDestVMs()
    for params in ({"spec": {"program": "verify", "args": {"ws": "1M"}}, "max-downtime": 50}, {}):
        h = Harness(bridge, vms, Outcomes())
        assert isinstance(h.start(params=params), MigrateAccept)
        h.finish()
    assert vms.specs == [VMSpec("verify", {"ws": "1M"}), None]  # None: an older source's (no spec)


def test_destination_hands_a_code_hint_to_the_vm_process_with_this_hosts_translations(
        bridge: LoopBridge, source_ram: Any) -> None:
    fd, ram = source_ram
    code = bytes(ram[:0x400])
    cache = CodeCache()
    cache.put(cache_key(COMPILER_TAG, 0, code, SIZE), [(0x10, b"t1"), (0x20, b"t2")])
    cache.put(cache_key(COMPILER_TAG, 0, code[:-1] + b"!", SIZE), [(0x30, b"other code")])
    vms = FakeDestVMs()
    h = Harness(bridge, vms, Outcomes(), code_cache=cache)
    assert isinstance(h.start(), MigrateAccept)
    h.src.send(CodeHint(0, code, (0x10, 0x40)))
    h.send_ram(ram)
    h.src.send(Digest(pages.DIGEST_ALGORITHM, pages.ram_digest(fd, memoryview(ram), SIZE)))
    assert isinstance(h.src.recv(), Ready)
    h.src.send(Commit("m1"))
    assert isinstance(h.src.recv(), Resumed)
    h.finish()
    (warm,) = vms.warmed
    assert (warm["code-start"], warm["code"], warm["pcs"], warm["tag"]) == (0, code, [0x10, 0x40], COMPILER_TAG)
    assert sorted(warm["translated"]) == [(0x10, b"t1"), (0x20, b"t2")]
    assert h.infos["v"].status is Status.COMPLETED


@pytest.mark.parametrize("stuck", [False, True])
def test_destination_holds_syncack_until_the_warm_up_is_done_and_only_once(
        bridge: LoopBridge, source_ram: Any, monkeypatch: pytest.MonkeyPatch, stuck: bool) -> None:
    monkeypatch.setattr(code_hint, "HOLD_MAX_S", 0.2)
    fd, ram = source_ram
    vms = FakeDestVMs()
    vms.warm_pending, vms.warm_stuck = [5, 3, 1], (7 if stuck else 0)  # stuck: never done, given up at the cap
    h = Harness(bridge, vms, Outcomes())
    assert isinstance(h.start(), MigrateAccept)
    h.src.send(CodeHint(0, bytes(ram[:0x400]), (0x10,)))
    mv = memoryview(ram)
    for b in pages.plan_batches(mv, [(0, SIZE)]):
        h.src.send_pages(mv, b.ranges.tolist(), b.zeros.tolist())
    h.src.send(Sync(0))
    first = h.src.recv()
    assert isinstance(first, SyncAck) and first.round == 0 and first.held_s > 0
    assert vms.warm_polls == 4 or (stuck and vms.warm_polls > 4)
    polls = vms.warm_polls
    h.src.send(RoundEnd(0, 1, 0, SIZE, 0.1, 0, 0.0))
    h.src.send(Sync(1))  # a later round is not held, whatever the warm-up does
    assert h.src.recv() == SyncAck(1, 0.0) and vms.warm_polls == polls
    h.finish()


@pytest.mark.parametrize("hint", [True, False])
def test_source_keeps_its_vm_processs_translations_for_later_incoming_vms(bridge: LoopBridge, scripted: Any,
                                                                         hint: bool) -> None:
    dest = scripted()
    vm, cache = FakeVM(), CodeCache()
    _, info = run_source(bridge, dest, vm, FakeSourceVMs(), code_cache=cache, code_hint=hint)
    assert info.status is Status.COMPLETED, info.error
    assert any(isinstance(m, CodeHint) for m in dest.got) is hint  # --no-code-hint: none sent
    assert sorted(cache.get(cache_key("tag-1", 0, bytes(vm.ram[:0x400]), vm.mem))) == [(0x10, b"b1"), (0x3FC, b"b2")]


def test_a_destination_speaking_version_1_gets_no_code_hint_and_the_migration_completes(
        bridge: LoopBridge, scripted: Any) -> None:
    dest = scripted(versions=frozenset({1}))
    vm = FakeVM()
    _, info = run_source(bridge, dest, vm, FakeSourceVMs(), code_cache=CodeCache())
    assert info.status is Status.COMPLETED, info.error
    assert not any(isinstance(m, CodeHint) for m in dest.got) and dest.ram[:] == vm.ram[:]


def test_compressed_batches_reach_a_destination_of_this_version(bridge: LoopBridge, scripted: Any) -> None:
    dest = scripted()
    vm = FakeVM()
    vm.ram[MiB:3 * MiB] = b"\x5a" * (2 * MiB)  # pages that compress
    _, info = run_source(bridge, dest, vm, FakeSourceVMs(), compress="zstd")
    assert info.status is Status.COMPLETED, info.error
    assert any(isinstance(m, PageBatch) and m.compressed for m in dest.got) and dest.ram[:] == vm.ram[:]
    assert info.compression is not None and 0 < info.compression.compressed_size < info.compression.raw_size


def test_a_destination_of_the_version_before_compression_never_sees_the_flag(
        bridge: LoopBridge, scripted: Any) -> None:
    # Its decoder refuses a body with a field it does not know: the migration completing is the proof.
    dest = scripted(versions=frozenset(range(1, COMPRESSION_VERSION)))
    vm = FakeVM()
    vm.ram[MiB:3 * MiB] = b"\x5a" * (2 * MiB)
    _, info = run_source(bridge, dest, vm, FakeSourceVMs(), compress="zstd")
    assert info.status is Status.COMPLETED, info.error
    start = next(m for m in dest.got if isinstance(m, MigrateStart))
    assert "compress" not in start.params
    assert not any(isinstance(m, PageBatch) and m.compressed for m in dest.got) and dest.ram[:] == vm.ram[:]
    assert info.compression is not None and info.compression.mode == "none" and info.compression.pages == 0


def test_destination_records_the_vm_before_its_process_runs(bridge: LoopBridge, source_ram: Any) -> None:
    # A restored VM process outlives its agent: were it restored before the loop recorded it, an
    # agent killed in between would leave a running VM that a restarted agent does not know, and
    # its in-doubt answer "not resumed" would have the source resume a second copy. A slow record
    # write (0.3 s) must hold the restore back, not race it.
    fd, ram = source_ram
    vms = FakeDestVMs()
    vms.claim_delay = 0.3
    h = Harness(bridge, vms, Outcomes())
    h.to_commit(fd, ram)
    assert isinstance(h.src.recv(), Resumed)
    h.finish()
    assert vms.events == ["claim", "restore"]


def test_destination_digest_holds_for_scattered_batches_in_any_order(bridge: LoopBridge, source_ram: Any) -> None:
    # The destination hashes chunks touched in part some time after their pages arrived; a round
    # whose batches touch the same chunks again, out of address order, must still check out.
    fd, ram = source_ram
    vms = FakeDestVMs()
    h = Harness(bridge, vms, Outcomes())
    h.start()
    mv = memoryview(ram)
    for b in pages.plan_batches(mv, [(0, SIZE)]):
        h.src.send_pages(mv, b.ranges.tolist(), b.zeros.tolist())
    h.src.send(RoundEnd(0, 1, 0, SIZE, 0.1, 0, 0.0))
    # Round 1: scattered single pages, two of them in one 64 KiB chunk, sent high to low and
    # then low to high, each batch touching chunks the other one touched.
    scattered = [p * P for p in (3, 5, 300, 301, 17, 18, 200)]
    for off in scattered:
        ram[off:off + P] = os.urandom(P)
    high = sorted(o for o in scattered if o >= 100 * P)
    low = sorted(o for o in scattered if o < 100 * P)
    for group in (high, low, high):
        h.src.send_pages(mv, [(o, o + P) for o in group])
    h.src.send(RoundEnd(1, 1, 0, len(scattered) * P, 0.1, 0, 0.0))
    h.src.send(DeviceState({"version": 1}))
    h.src.send(Digest(pages.DIGEST_ALGORITHM, pages.ram_digest(fd, mv, SIZE)))
    assert isinstance(h.src.recv(), Ready)
    assert vms.reserved[0].ram[:] == ram[:]
    mv.release()
    h.finish()


def test_destination_whose_restore_fails_says_not_resumed(bridge: LoopBridge, source_ram: Any) -> None:
    fd, ram = source_ram
    vms = FakeDestVMs()
    vms.fail_restore = True
    h = Harness(bridge, vms, Outcomes())
    h.to_commit(fd, ram)
    reply = h.src.recv()
    assert isinstance(reply, InDoubtAnswer) and reply.resumed is False  # the source may resume its copy
    h.finish()
    assert vms.started == [] and vms.claimed == ["v"] and vms.dropped == ["v"]
    assert h.infos["v"].status is Status.FAILED


def test_destination_refuses_a_wrong_digest_and_discards(bridge: LoopBridge, source_ram: Any) -> None:
    _, ram = source_ram
    vms = FakeDestVMs()
    h = Harness(bridge, vms, Outcomes())
    h.start()
    h.send_ram(ram)
    h.src.send(Digest(pages.DIGEST_ALGORITHM, "0" * 32))
    reply = h.src.recv()
    assert isinstance(reply, Abort) and reply.code == ErrorCode.DIGEST_MISMATCH
    h.finish()
    assert vms.started == [] and vms.discarded == ["v"]
    assert h.infos["v"].status is Status.FAILED


def test_destination_discards_when_the_source_vanishes(bridge: LoopBridge, source_ram: Any) -> None:
    _, ram = source_ram
    vms = FakeDestVMs()
    h = Harness(bridge, vms, Outcomes())
    h.start()
    h.send_ram(ram)
    h.finish()  # gone before the digest
    assert vms.started == [] and vms.discarded == ["v"]


def test_destination_out_of_room_for_guest_ram_aborts_clearly(bridge: LoopBridge, source_ram: Any,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # The memfd takes no more pages (a tmpfs limit, a memory cgroup): pwrite fails with ENOSPC.
    def full(fd: int, data: Any, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(transport.os, "pwrite", full)
    _, ram = source_ram
    vms = FakeDestVMs()
    h = Harness(bridge, vms, Outcomes())
    h.start()
    with contextlib.suppress(OSError):
        h.send_ram(ram, sync=False)
    reply = h.src.recv()
    assert isinstance(reply, Abort) and reply.code == ErrorCode.INSUFFICIENT_MEMORY
    assert reply.reason.startswith("guest RAM cannot be stored on the destination")
    h.finish()
    assert vms.started == [] and vms.discarded == ["v"]
    assert h.infos["v"].status is Status.FAILED


def test_destination_refuses_before_touching_anything(bridge: LoopBridge) -> None:
    vms = FakeDestVMs(refuse=MigrationError(ErrorCode.INSUFFICIENT_MEMORY, "not enough memory on D"))
    h = Harness(bridge, vms, Outcomes())
    reply = h.start()
    assert isinstance(reply, MigrateRefuse) and reply.code == ErrorCode.INSUFFICIENT_MEMORY
    h.finish()
    vms2 = FakeDestVMs()
    h2 = Harness(bridge, vms2, Outcomes())
    reply = h2.start(isa_version=isa.ISA_VERSION + 1)
    assert isinstance(reply, MigrateRefuse) and reply.code == ErrorCode.INCOMPATIBLE
    h2.finish()
    assert vms2.reserved == []


def test_in_doubt_answer_fences_a_late_commit(bridge: LoopBridge, source_ram: Any) -> None:
    fd, ram = source_ram
    vms, outcomes = FakeDestVMs(), Outcomes[DestinationSession]()
    h = Harness(bridge, vms, outcomes)
    h.start("m7")
    h.send_ram(ram)
    h.src.send(Digest(pages.DIGEST_ALGORITHM, pages.ram_digest(fd, memoryview(ram), SIZE)))
    assert isinstance(h.src.recv(), Ready)
    # A source in doubt asks on a new connection before its COMMIT arrived: the answer is "no",
    # and from then on this migration can never start here.
    assert outcomes.answer("m7") is False
    with pytest.raises((OSError, ConnectionClosed)):
        h.src.send(Commit("m7"))
        h.src.recv()
    h.finish()
    assert vms.started == [] and vms.discarded == ["v"]
    assert outcomes.answer("m7") is False and outcomes.answer("never-seen") is False


def test_the_migration_listener_refuses_a_wrong_key(bridge: LoopBridge) -> None:
    lsock = socket.create_server(("127.0.0.1", 0))
    src = Connection(connect(lsock.getsockname()[:2]))
    server, _ = lsock.accept()
    lsock.close()
    vms = FakeDestVMs()
    session = DestinationSession(conn=Connection(prepare_socket(server)), vms=vms, key=KEY, agent_name="D",
                                 bridge=bridge, outcomes=Outcomes(), infos={}, log=Log())
    t = threading.Thread(target=session.run, daemon=True)
    t.start()
    with pytest.raises(ProtocolError) as err:
        client_handshake(src, b"x" * 32, "S")
    assert err.value.code == ErrorCode.AUTH_FAILED
    src.close()  # the client gave up at the server's MAC: the server sees the connection end
    t.join(10)
    assert vms.reserved == [] and not t.is_alive()


def test_time_limit_holds_inside_a_long_round(bridge: LoopBridge, scripted: Any) -> None:
    dest = scripted(size=16 * MiB)
    vm, vms = FakeVM(mem=16 * MiB), FakeSourceVMs()
    vm.ram[:12 * MiB] = os.urandom(12 * MiB)
    # Three 4 MiB batches at 4 MiB/s cannot finish round 0 within 0.5 s.
    _, info = run_source(bridge, dest, vm, vms, bandwidth=4 * MiB, timeout_s=0.5)
    assert info.status is Status.FAILED and info.error_code == ErrorCode.TIMEOUT
    assert info.error is not None and "time limit" in info.error
    assert "pause" not in vm.calls and vm.state == "running" and info.rounds == []


def test_unreachable_destination_fails_at_once_and_touches_nothing(bridge: LoopBridge) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[:2]  # bound, not listening: connections are refused
        vm, vms = FakeVM(), FakeSourceVMs()
        p = MigrationParams()
        info = MigrationInfo(vm=vm.name, direction="out", params=p, mem=vm.mem)
        SourceSession(vm=vm, vms=vms, dest=closed, params=p, key=KEY, agent_name="S", bridge=bridge,
                      info=info, log=Log()).run()
    assert info.status is Status.FAILED and info.error is not None and "connection" in info.error
    assert vm.calls == [] and vm.state == "running"
