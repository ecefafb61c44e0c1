"""The spare VM process (vmruntime/spare.py): started ahead of need, made a VM process by a
hand-over of its guest RAM and control socket; and the agent keeping one for incoming migrations."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agents import SPARE_NAME, AgentProc, finished, make_key, start_agent, wait_for
from vmruntime import control, guestram, spare, vmproc
from vmruntime.asm import assemble

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20


def start_spare() -> tuple[subprocess.Popen[bytes], socket.socket]:
    ours, theirs = control.socketpair()
    try:
        proc = subprocess.Popen(spare.spare_argv(theirs.fileno()), pass_fds=(theirs.fileno(),),
                                stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    finally:
        theirs.close()
    return proc, ours


def comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def test_a_spare_becomes_a_vm_process_that_runs_a_guest() -> None:
    proc, sock = start_spare()
    fd = guestram.create_memfd(4 * MiB, "spare-test")
    parent, child = control.socketpair()
    try:
        wait_for(lambda: comm(proc.pid) == spare.PROCESS_NAME, timeout=10, what="the spare to start")
        spare.hand_over(sock, fd, 4 * MiB, child.fileno())
        child.close()
        vm = control.VMHandle(proc, parent, fd, 4 * MiB, "adopted", owns_ram=False)  # type: ignore[arg-type]
        vm.boot(assemble("start:\n    movi r1, 65\n    out r1\n    halt\n"), {})
        wait_for(lambda: vm.status()["status"] == "halted", timeout=10, what="the guest to halt")
        assert bytes(vm.console) == b"A" and vm.status()["pid"] == proc.pid
        assert comm(proc.pid) == vmproc.PROCESS_NAME
        vm.request("stop")
        assert proc.wait(10) == 0
    finally:
        sock.close()
        parent.close()
        os.close(fd)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_spare_let_go_exits_quietly() -> None:
    proc, sock = start_spare()
    sock.close()
    assert proc.wait(10) == 0


def test_a_bad_hand_over_ends_the_spare_with_an_error() -> None:
    proc, sock = start_spare()
    control.send_msg(sock, {"ram-size": "lots"}, [])
    assert proc.wait(10) == 2
    assert proc.stderr is not None and b"bad hand-over" in proc.stderr.read()
    sock.close()


# -- the agent's spare ----------------------------------------------------------------------------------


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[AgentProc, AgentProc]]:
    key = make_key(tmp_path)
    with start_agent(tmp_path, "A", key) as a, start_agent(tmp_path, "B", key) as b:
        yield a, b


def test_an_incoming_vm_runs_in_the_agents_spare_and_a_new_spare_follows(pair: tuple[AgentProc, AgentProc]) -> None:
    a, b = pair
    wait_for(lambda: len(b.spare_pids()) == 1, timeout=15, what="B's spare VM process")
    (before,) = b.spare_pids()
    a.call("vm-create", name="m", program="counter", mem=str(16 * MiB))
    a.call("migrate", name="m", to=b.control)
    assert finished(a, "m")["status"] == "completed"
    assert b.call("vm-info", name="m")["pid"] == before  # the spare became the VM's process
    assert comm(before) == vmproc.PROCESS_NAME
    wait_for(lambda: len(b.spare_pids()) == 1 and b.spare_pids() != [before], timeout=15, what="B's next spare")
    # The way back: A's spare, unused so far, takes the VM.
    (a_spare,) = a.spare_pids()
    b.call("migrate", name="m", to=a.control)
    assert finished(b, "m")["status"] == "completed"  # the way back
    assert a.call("vm-info", name="m")["pid"] == a_spare


def test_the_spare_goes_with_its_agent(tmp_path: Path) -> None:
    key = make_key(tmp_path)
    with start_agent(tmp_path, "A", key) as a:
        wait_for(lambda: len(a.spare_pids()) == 1, timeout=15, what="the spare VM process")
        (pid,) = a.spare_pids()
        assert comm(pid) == SPARE_NAME
        a.stop()
        assert a.leaked == []
        wait_for(lambda: not Path(f"/proc/{pid}").exists() or comm(pid) != SPARE_NAME, timeout=5,
                 what="the spare to exit")


def test_an_agent_killed_while_its_spare_starts_leaves_nothing_behind(tmp_path: Path) -> None:
    # kill -9 right after start: the spare is still importing (or not yet spawned) and must
    # still exit on its own once it finds the agent's end of its socket closed.
    for i in range(3):
        run = tmp_path / str(i)
        run.mkdir()
        a = start_agent(run, "K", make_key(run))
        a.stop(signal.SIGKILL, keep_vms=True)
        assert a.leaked == []


def test_an_agent_with_spare_vm_off_keeps_none_and_still_takes_migrations(tmp_path: Path) -> None:
    key = make_key(tmp_path)
    with start_agent(tmp_path, "A", key) as a, start_agent(tmp_path, "B", key, spare_vm="off") as b:
        wait_for(lambda: len(a.spare_pids()) == 1, timeout=15, what="A's spare (the default: on)")
        a.call("vm-create", name="v", program="counter", mem=str(16 * MiB))
        a.call("migrate", name="v", to=b.control)
        assert finished(a, "v")["status"] == "completed"
        assert b.call("vm-info", name="v")["state"] == "running"
        time.sleep(1.0)  # past the delay after which an agent that keeps one starts its next spare
        assert len(b.group_processes(spare=True)) == 2  # the agent and v's process: no spare, not even starting
        b.call("vm-destroy", name="v")
