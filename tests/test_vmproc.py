"""The VM process and its control channel: codec, requests, events, lifecycle, save/restore.

Codec tests use real socketpairs; everything else starts real VM processes
over real memfds.
"""

from __future__ import annotations

import io
import mmap
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import MakeMemfd, SpawnVM
from vmruntime import control, guestram, runlocal, vmproc
from vmruntime.clock import PausableClock
from vmruntime.control import ControlError, VMError, VMGone

pytestmark = pytest.mark.timeout(60)

# --- codec ------------------------------------------------------------------


def test_codec_round_trips_nested_maps_and_bytes() -> None:
    msg = {"op": "boot", "id": 7, "image": {"code": b"\x00\xffabc", "entry": 4096}, "args": {"n": -3},
           "paused": True, "list": [1, "two", b"3"]}  # fmt: skip
    assert control.decode(control.encode(msg)) == msg


_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=20) | st.binary(max_size=64)
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)  # fmt: skip


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.text(max_size=8), _values, max_size=6))
def test_codec_round_trips_any_map(msg: dict[str, object]) -> None:
    assert control.decode(control.encode(msg)) == msg


@pytest.mark.parametrize("payload", [b"\x93\x01\x02\x03", b"\xc1", b"\x81"])
def test_decode_rejects_non_maps_and_garbage(payload: bytes) -> None:
    with pytest.raises(ControlError):
        control.decode(payload)


def test_encode_refuses_oversized_message() -> None:
    with pytest.raises(ControlError, match="exceeds"):
        control.encode({"data": b"x" * control.MAX_MSG})


def test_send_and_receive_with_fd() -> None:
    a, b = control.socketpair()
    fd = guestram.create_memfd(4096)
    try:
        control.send_msg(a, {"ev": "x", "n": 1}, [fd])
        msg, fds = control.recv_msg(b)
        assert msg == {"ev": "x", "n": 1}
        assert len(fds) == 1 and fds[0] != fd
        # The received fd is the same open file: a write through one shows through the other.
        os.pwrite(fds[0], b"hello", 100)
        assert os.pread(fd, 5, 100) == b"hello"
        os.close(fds[0])
    finally:
        os.close(fd)
        a.close()
        b.close()


def test_recv_reports_eof_and_would_block() -> None:
    a, b = control.socketpair()
    with pytest.raises(BlockingIOError):
        control.recv_msg(b, socket.MSG_DONTWAIT)
    a.close()
    with pytest.raises(EOFError):
        control.recv_msg(b)
    b.close()


def test_recv_rejects_truncated_packet() -> None:
    a, b = control.socketpair()
    a.send(b"\x80" + b"\x00" * control.MAX_MSG)
    with pytest.raises(ControlError, match="truncated"):
        control.recv_msg(b)
    a.close()
    b.close()


# --- guest RAM helpers -------------------------------------------------------


def test_memfd_is_shared_between_mappings(make_memfd: MakeMemfd) -> None:
    fd = make_memfd(8192)
    m1 = guestram.map_shared(fd, 8192)
    m2 = guestram.map_shared(fd, 8192, hugepage=True)
    m1[4096:4100] = b"abcd"
    assert m2[4096:4100] == b"abcd"
    assert guestram.mapping_address(m1) != guestram.mapping_address(m2)
    m1.close()  # the address helper must not leave the buffer exported
    m2.close()


@pytest.mark.parametrize("size", [0, 100, -4096])
def test_memfd_size_must_be_whole_pages(size: int) -> None:
    with pytest.raises(ValueError):
        guestram.create_memfd(size)


# --- VM process lifecycle without a machine ----------------------------------


def test_fresh_process_answers_status_and_refuses_machine_ops(spawn_vm: SpawnVM) -> None:
    vm = spawn_vm()
    st = vm.status()
    assert st["status"] == "created" and st["paused"] is False and st["instructions"] == 0
    assert st["pid"] == vm.pid
    with pytest.raises(VMError, match="boot or restore first"):
        vm.pause()
    with pytest.raises(VMError, match="unknown op"):
        vm.request("reboot")
    for bad in (-1, 100, "50", True):
        with pytest.raises(VMError, match="0-99"):
            vm.throttle(bad)  # type: ignore[arg-type]
    vm.throttle(40)
    assert vm.status()["throttle"] == 40


def test_stop_exits_cleanly(spawn_vm: SpawnVM) -> None:
    vm = spawn_vm()
    assert vm.stop() == 0
    with pytest.raises(VMGone):
        vm.status()


def test_control_eof_makes_process_exit_by_default(spawn_vm: SpawnVM) -> None:
    vm = spawn_vm()
    vm.status()
    vm.sock.close()
    assert vm.proc.wait(10) == 0


def test_process_maps_the_given_memfd(spawn_vm: SpawnVM, make_memfd: MakeMemfd) -> None:
    fd = make_memfd(1 << 20)
    vm = spawn_vm(1 << 20, ram_fd=fd)
    vm.status()
    maps = open(f"/proc/{vm.pid}/maps").read()
    assert "memfd:ferry-test" in maps
    # The handle does not own a memfd it was given: closing it leaves ours open.
    vm.close()
    os.fstat(fd)


def test_request_times_out_on_a_stopped_process(spawn_vm: SpawnVM) -> None:
    vm = spawn_vm()
    vm.status()
    os.kill(vm.pid, 19)  # SIGSTOP: alive, but answering nothing
    try:
        with pytest.raises(TimeoutError):
            vm.request("status", timeout=0.3)
    finally:
        os.kill(vm.pid, 18)  # SIGCONT
    # The late reply to the timed-out request is dropped, not taken for this one's.
    assert vm.request("throttle", percent=7) == {"id": 3, "ok": True}
    assert vm.status()["throttle"] == 7


def _gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie waiting for a reaper counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


PARENT = """
import sys, time
from vmruntime.control import VMHandle
from vmruntime.programs import load_program
vm = VMHandle.spawn(1 << 20, on_eof=sys.argv[1])
vm.boot(*load_program("counter", {"every": "1000"}))
vm.wait_event(["console"])
print(vm.pid, flush=True)
time.sleep(600)
"""


def _guest_word(pid: int, offset: int) -> int:
    """Read a u64 of a VM process's guest RAM through /proc/PID/mem (no fd of ours needed)."""
    with open(f"/proc/{pid}/maps") as f:
        start = next(int(line.split("-")[0], 16) for line in f if "memfd:" in line)
    with open(f"/proc/{pid}/mem", "rb") as mem:
        mem.seek(start + offset)
        return int.from_bytes(mem.read(8), "little")


def _wait_until(cond: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_killed_parent_makes_the_vm_process_exit() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, "exit"], stdout=subprocess.PIPE)
    assert parent.stdout is not None
    vm_pid = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    assert _wait_until(lambda: _gone(vm_pid)), "VM process outlived its parent"


def test_killed_parent_with_on_eof_stay_keeps_the_guest_running() -> None:
    from vmruntime.isa import DATA_ADDR

    parent = subprocess.Popen([sys.executable, "-c", PARENT, "stay"], stdout=subprocess.PIPE)
    assert parent.stdout is not None
    vm_pid = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    try:
        # The counter keeps storing its count: the guest runs on, unattended.
        first = _guest_word(vm_pid, DATA_ADDR)
        assert _wait_until(lambda: _guest_word(vm_pid, DATA_ADDR) > first)
        assert not _gone(vm_pid)
    finally:
        if not _gone(vm_pid):
            os.kill(vm_pid, signal.SIGKILL)


LISTENING_PARENT = """
import sys
from vmruntime.control import VMHandle
from vmruntime.programs import load_program
vm = VMHandle.spawn(1 << 20)
vm.boot(*load_program("counter", {"every": "1000"}))
vm.request("listen", path=sys.argv[1])
vm.wait_event(["console"])
print(vm.pid, flush=True)
import time; time.sleep(600)
"""


def _attach(path: str) -> tuple[socket.socket, dict[str, Any], list[int], bytes]:
    """Connect to a VM process's attach socket and attach: the reply, its fds and the console events."""
    sock = control.connect(path)
    control.send_msg(sock, {"op": "attach", "id": 1})
    console = b""
    while True:
        msg, fds = control.recv_msg(sock)
        if msg.get("id") == 1:
            return sock, msg, fds, console
        console += msg.get("data", b"") if msg.get("ev") == "console" else b""


def test_a_listening_vm_process_outlives_its_parent_and_takes_a_new_controller(tmp_path: Path) -> None:
    from vmruntime.isa import DATA_ADDR

    # A deep directory: the socket path is longer than sun_path holds, and must still work.
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = str(deep / "vm.sock")
    parent = subprocess.Popen([sys.executable, "-c", LISTENING_PARENT, path], stdout=subprocess.PIPE)
    assert parent.stdout is not None
    vm_pid = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    try:
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
        first = _guest_word(vm_pid, DATA_ADDR)
        assert _wait_until(lambda: _guest_word(vm_pid, DATA_ADDR) > first)  # runs unattended
        sock, reply, fds, console = _attach(path)
        assert control.peer_pid(sock) == vm_pid
        assert reply["ok"] and reply["status"] == "running" and reply["pid"] == vm_pid
        assert reply["ram-size"] == 1 << 20 and len(fds) == 1
        # The memfd we got is the guest's RAM: the counter's word moves in our own mapping.
        ram = guestram.map_shared(fds[0], 1 << 20)
        seen = int.from_bytes(ram[DATA_ADDR:DATA_ADDR + 8], "little")
        assert _wait_until(lambda: int.from_bytes(ram[DATA_ADDR:DATA_ADDR + 8], "little") > seen)
        ram.close()
        os.close(fds[0])
        # Output printed while detached was kept and came with the attach.
        assert len(console) > 0
        # A second controller waits while the first is attached; when the first goes, it gets in.
        sock.close()
        sock2, reply2, fds2, _ = _attach(path)
        for fd in fds2:
            os.close(fd)
        assert reply2["status"] == "running"
        control.send_msg(sock2, {"op": "stop", "id": 2})
        assert _wait_until(lambda: _gone(vm_pid))
        assert not os.path.exists(path)  # a VM process that stops removes its socket
        sock2.close()
    finally:
        if not _gone(vm_pid):
            os.kill(vm_pid, signal.SIGKILL)


# --- dirty tracking seam -------------------------------------------------------


def test_track_start_hash_returns_the_mapping_and_no_fd(spawn_vm: SpawnVM) -> None:
    vm = spawn_vm(1 << 20)
    info = vm.track_start("hash")
    assert info.backend == "hash" and info.uffd is None and info.length == 1 << 20
    maps = open(f"/proc/{vm.pid}/maps").read()
    assert f"{info.addr:x}-{info.addr + info.length:x} rw-s" in maps
    with pytest.raises(VMError, match="already"):
        vm.track_start("hash")
    vm.track_stop()
    assert vm.track_start("hash").addr == info.addr
    vm.track_stop()
    with pytest.raises(VMError, match="unknown dirty-tracking backend"):
        vm.track_start("bogus")


@pytest.mark.parametrize("backend", ["uffd-wp-async", "uffd-wp-sync"])
def test_track_start_uffd_records_guest_writes(spawn_vm: SpawnVM, backend: str) -> None:
    """The uffd handed over works with the dirty tracker: guest stores show up in a harvest."""
    from vmruntime import dirty
    from vmruntime.isa import DATA_ADDR
    from vmruntime.programs import load_program

    if backend not in dirty.available_backends():
        pytest.skip(f"{backend} not available on this kernel")
    vm = spawn_vm(1 << 20)
    image, args = load_program("counter", {"every": "1000"})
    vm.boot(image, args, paused=True)
    info = vm.track_start(backend)
    assert info.uffd is not None
    vm.status()  # served after the track-start reply went out and the VM closed its copy
    # The VM process kept no copy: the one we hold is the only reference.
    assert not any(os.readlink(f"/proc/{vm.pid}/fd/{fd}") == "anon_inode:[userfaultfd]"
                   for fd in os.listdir(f"/proc/{vm.pid}/fd"))  # fmt: skip
    with guestram.map_shared(vm.ram_fd, 1 << 20) as ram:
        tracker = dirty.make_tracker(backend, pid=vm.pid, uffd=info.uffd, addr=info.addr,
                                     length=info.length, ram=ram)  # fmt: skip
        tracker.start()
        try:
            vm.resume()
            vm.wait_event(["console"])  # the counter stored its count before printing it
            vm.pause()
            written = tracker.harvest()
        finally:
            tracker.stop()
            os.close(info.uffd)
    assert any(start <= DATA_ADDR < end for start, end in written), written
    vm.track_stop()
    vm.resume()
    assert vm.status()["status"] == "running"


# --- ferry run -------------------------------------------------------------------


def test_run_local_prints_the_console_and_exits_zero_on_halt() -> None:
    out = io.BytesIO()
    assert runlocal.run_local("verify", 1 << 20, {"steps": "1000", "ws": "64K"}, out) == 0
    assert re.fullmatch(rb"digest [0-9a-f]{16}\n", out.getvalue())


def test_run_local_exit_statuses(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = io.BytesIO()
    assert runlocal.run_local("counter", 1 << 20, {"every": "1000"}, out, max_seconds=0.3) == 124
    assert out.getvalue().startswith(b"count 00000000000003e8\n")
    src = tmp_path / "bad.fasm"
    src.write_text("start:\n    movi r1, 0\n    divu r1, r1, r1\n    halt\n")
    assert runlocal.run_local(str(src), 1 << 20, {}, io.BytesIO()) == 1
    assert runlocal.run_local("nonesuch", 1 << 20, {}, io.BytesIO()) == 2
    assert runlocal.run_local("verify", 1 << 20, {"colour": "red"}, io.BytesIO()) == 2
    assert runlocal.run_local("verify", 1000, {}, io.BytesIO()) == 2
    err = capsys.readouterr().err
    assert "guest faulted" in err and "nonesuch" in err and "colour" in err and "multiple of 4096" in err


def test_process_refuses_ram_fd_smaller_than_ram_size(make_memfd: MakeMemfd) -> None:
    fd = make_memfd(4096)
    a, b = control.socketpair()
    argv = control.vmproc_argv(fd, 8192, b.fileno())
    proc = subprocess.run(argv, pass_fds=(fd, b.fileno()), capture_output=True, timeout=30)
    a.close()
    b.close()
    assert proc.returncode == 1 and b"holds 4096 bytes" in proc.stderr


RUN_COUNTER = """
import sys
from vmruntime.runlocal import run_local
sys.exit(run_local("counter", 1 << 20, {"every": "1000"}, sys.stdout.buffer))
"""


def _group_members(pgid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and not _gone(int(entry)):
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except FileNotFoundError:
                continue
            if int(fields[2]) == pgid:
                pids.append(int(entry))
    return pids


def test_run_local_ctrl_c_stops_the_vm_and_exits_130() -> None:
    """Ctrl-C signals the whole foreground group: ferry run stops its VM; the VM does not crash on it."""
    proc = subprocess.Popen([sys.executable, "-c", RUN_COUNTER], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith(b"count ")  # the VM runs and its console flows
    assert len(_group_members(proc.pid)) == 2
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert b"Traceback" not in err
    assert _group_members(proc.pid) == []


# --- unit: the VM process's clock and slice budget --------------------------------


def test_pausable_clock_hides_paused_time(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1_000]
    monkeypatch.setattr(vmproc.time, "monotonic_ns", lambda: now[0])
    clock = PausableClock()
    now[0] = 1_500
    assert clock.now_ns() == 1_500
    clock.set_paused(True)
    now[0] = 9_000
    assert clock.now_ns() == 1_500  # stands still while paused
    clock.set_paused(True)  # idempotent
    clock.set_paused(False)
    now[0] = 9_200
    assert clock.now_ns() == 1_700  # continues where it stopped, 7_500 ns hidden


def test_budget_moves_halfway_towards_the_slice_target() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.close()
    proc = vmproc.VMProcess(mmap.mmap(-1, 4096), b)
    proc.budget = 1000
    # 1000 instructions took two slice lengths: the target is 500, the budget goes to 750.
    proc._tune_budget(1000, 2 * vmproc.SLICE_SECONDS)
    assert proc.budget == 750
    # A slice cut short (halt, fault) says nothing about speed: no change.
    proc._tune_budget(10, 100 * vmproc.SLICE_SECONDS)
    assert proc.budget == 750
    for _ in range(100):  # a very slow host never drives it below the floor
        proc._tune_budget(proc.budget, 1.0)
    assert proc.budget == vmproc.MIN_BUDGET
    b.close()


# --- lanes: a private request/reply socket for one thread of the controller ---------------------


def _lane(vm: control.VMHandle) -> control.Lane:
    _, fds = vm.request_fds("lane")
    assert len(fds) == 1
    return control.Lane(socket.socket(fileno=fds[0]), timeout=10.0)


def test_a_lane_pauses_and_resumes_the_vcpu_and_its_replies_stay_on_it(spawn_vm: SpawnVM) -> None:
    from vmruntime.programs import load_program

    vm = spawn_vm()
    vm.boot(*load_program("counter", {"every": "1000"}))
    lane = _lane(vm)
    state = lane.request("pause")["state"]
    assert state["instructions"] > 0
    st = vm.status()  # the control socket saw no stray reply of the lane: its next reply is its own
    assert st["paused"] is True and st["instructions"] == state["instructions"]
    time.sleep(0.05)
    assert vm.status()["instructions"] == state["instructions"]  # really stopped
    lane.request("resume")
    assert _wait_until(lambda: vm.status()["instructions"] > state["instructions"])
    with pytest.raises(VMError, match="unknown op"):
        lane.request("reboot")
    lane.close()


def test_closing_a_lane_leaves_the_vm_and_its_control_socket_alone(spawn_vm: SpawnVM) -> None:
    from vmruntime.programs import load_program

    vm = spawn_vm()
    vm.boot(*load_program("counter", {"every": "1000"}))
    _lane(vm).close()
    first = vm.status()["instructions"]
    assert _wait_until(lambda: vm.status()["instructions"] > first)
    assert vm.proc.poll() is None


def test_an_open_lane_does_not_keep_an_orphaned_vm_process_alive(spawn_vm: SpawnVM) -> None:
    vm = spawn_vm()
    lane = _lane(vm)
    vm.sock.close()  # the controller's control socket goes (on_eof="exit"): the lane is no reason to stay
    assert vm.proc.wait(10) == 0
    with pytest.raises(VMGone):
        lane.request("status")
    lane.close()


def test_lanes_are_bounded(spawn_vm: SpawnVM) -> None:
    vm = spawn_vm()
    lanes = [_lane(vm) for _ in range(vmproc.MAX_LANES)]
    with pytest.raises(VMError, match="too many lanes"):
        vm.request("lane")
    lanes.pop().close()
    assert _wait_until(lambda: _try_lane(vm))
    for lane in lanes:
        lane.close()


def _try_lane(vm: control.VMHandle) -> bool:
    try:
        _lane(vm).close()
    except VMError:
        return False
    return True

