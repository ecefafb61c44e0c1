"""End-to-end tests of ferry-agent and the ferry CLI: real agent processes, real VM processes, real sockets."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agents import AgentProc, free_port, make_key, run_cli, start_agent, wait_for

VERIFY_FASM = Path(__file__).resolve().parent.parent / "vmruntime" / "programs" / "verify.fasm"


@pytest.fixture
def key(tmp_path: Path) -> Path:
    return make_key(tmp_path)


@pytest.fixture(scope="module")
def shared_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProc]:
    """One agent for the tests that need no special configuration (starting agents is the slow part)."""
    tmp = tmp_path_factory.mktemp("shared")
    a = start_agent(tmp, "A", make_key(tmp), max_mem="200M")
    yield a
    assert a.stop() == 0
    assert a.leaked == [], f"processes left behind: {a.leaked}"


@pytest.fixture
def agent(shared_agent: AgentProc) -> Iterator[AgentProc]:
    """The shared agent, emptied after each test (which also checks that destroy leaves no process)."""
    shared_agent.cli_in_process = True  # the CLI's code without a Python start-up; some tests switch it off
    yield shared_agent
    shared_agent.destroy_all_vms()


def _pid_alive(pid: int) -> bool:
    try:
        stat_text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat_text.rsplit(")", 1)[1].split()[0] != "Z"


def test_vm_lifecycle_through_the_cli(agent: AgentProc) -> None:
    out = agent.cli("vm", "create", "c1", "--program", "counter", "--mem", "64M", "--arg", "every=4096").stdout
    assert "c1" in out and "running" in out
    info = agent.cli("vm", "info", "c1", json=True).json
    assert {k: info[k] for k in ("name", "state", "mem", "host", "program")} == {
        "name": "c1", "state": "running", "mem": 64 << 20, "host": "A", "program": "counter"}
    assert info["dirty-tracker"] in ("uffd-wp-async", "uffd-wp-sync", "hash")
    assert isinstance(info["instructions"], int)
    wait_for(lambda: agent.call("vm-info", name="c1")["instructions"] > info["instructions"], what="progress")

    listed = agent.cli("vm", "list", json=True).json
    assert [v["name"] for v in listed] == ["c1"]
    assert "count" in wait_for(lambda: agent.cli("vm", "console", "c1").stdout, what="console output")

    agent.cli("vm", "pause", "c1")
    paused = agent.call("vm-info", name="c1")
    assert paused["state"] == "paused"
    assert agent.call("vm-info", name="c1")["instructions"] == paused["instructions"]
    agent.cli("vm", "resume", "c1")
    wait_for(lambda: agent.call("vm-info", name="c1")["instructions"] > paused["instructions"], what="resumed")

    agent.cli("vm", "destroy", "c1")
    assert agent.cli("vm", "list", json=True).json == []
    wait_for(lambda: not _pid_alive(info["pid"]), what="VM process exit")


def test_errors_are_clear_and_exit_non_zero(agent: AgentProc, tmp_path: Path) -> None:
    r = agent.cli("vm", "info", "ghost", check=False)
    assert r.returncode == 1
    assert r.stderr.strip() == "ferry: error: no VM named 'ghost' on agent A (no-such-vm)"

    agent.cli("vm", "create", "c1", "--program", "idle", "--mem", "128M")
    r = agent.cli("vm", "create", "c1", "--program", "idle", "--mem", "4M", check=False)
    assert r.returncode == 1 and "(vm-exists)" in r.stderr
    r = agent.cli("vm", "create", "c2", "--program", "idle", "--mem", "128M", check=False)
    assert r.returncode == 1 and "not enough memory" in r.stderr and "(insufficient-memory)" in r.stderr
    r = agent.cli("vm", "create", "c3", "--program", "nonesuch", check=False)
    assert r.returncode == 1 and "unknown program" in r.stderr and "(bad-request)" in r.stderr
    r = agent.cli("vm", "create", "c4", "--program", "counter", "--arg", "bogus=1", check=False)
    assert r.returncode == 1 and "bogus" in r.stderr
    r = agent.cli("vm", "create", "c5", "--program", "idle", "--mem", "12X", check=False)
    assert r.returncode == 2 and "invalid size" in r.stderr
    assert [v["name"] for v in agent.call("vm-list")["vms"]] == ["c1"]


def test_wrong_or_short_key_is_refused(agent: AgentProc, tmp_path: Path) -> None:
    agent.cli_in_process = False  # the real `ferry` entry point and its exit status
    wrong = make_key(tmp_path, "wrong.key")
    r = agent.cli("vm", "list", "--json", check=False, key_path=wrong)
    assert r.returncode != 0 and "(auth-failed)" in r.stderr and r.stdout == ""
    short = tmp_path / "short.key"
    short.write_text("tooshort\n")
    r = agent.cli("vm", "list", check=False, key_path=short)
    assert r.returncode != 0 and "too short" in r.stderr
    # The CLI tells the agent why it gave up, so the agent's log names the cause too.
    assert 'msg="control handshake refused"' in agent.log() and "code=auth-failed" in agent.log()


HELLO_FASM = """
start:
    movi r1, 104
    out r1
    movi r1, 105
    out r1
    movi r1, 10
    out r1
    halt
"""


def test_vm_wait_console_and_assembly_files(agent: AgentProc, tmp_path: Path) -> None:
    hello = tmp_path / "hello.fasm"
    hello.write_text(HELLO_FASM)
    agent.cli("vm", "create", "h1", "--program", str(hello), "--mem", "4M")
    assert agent.cli("vm", "console", "h1", "--follow").stdout == "hi\n"  # returns once the VM halted
    assert agent.call("vm-info", name="h1")["state"] == "halted"
    assert agent.cli("vm", "console", "h1").stdout == "hi\n"

    # A VM that prints without pause: `vm console` prints what is there and returns.
    agent.cli("vm", "create", "chatty", "--program", "counter", "--mem", "4M", "--arg", "every=16")
    wait_for(lambda: agent.call("vm-info", name="chatty")["console-bytes"] > 100_000, what="console output")
    out = agent.cli("vm", "console", "chatty").stdout
    assert len(out) > 100_000 and out.startswith("count ")

    # A shipped source by path (its .include resolves next to it), with boot arguments.
    agent.cli("vm", "create", "v1", "--program", str(VERIFY_FASM), "--mem", "8M", "--arg", "steps=20000",
              "--arg", "ws=1M")
    agent.cli("vm", "wait", "v1", "--state", "halted", "--timeout", "60")
    assert agent.call("vm-info", name="v1")["state"] == "halted"
    console = agent.cli("vm", "console", "v1").stdout
    assert console.startswith("digest ")
    # The same program run locally (ferry run, no agent) prints the same digest: determinism.
    local = run_cli("run", str(VERIFY_FASM), "--mem", "8M", "--arg", "steps=20000", "--arg", "ws=1M")
    assert local.stdout == console
    r = agent.cli("vm", "pause", "v1", check=False)
    assert r.returncode == 1 and "halted" in r.stderr

    agent.cli("vm", "create", "c1", "--program", "counter", "--mem", "4M")
    r = agent.cli("vm", "wait", "c1", "--state", "halted", "--timeout", "0.5", check=False)
    assert r.returncode == 1 and "(timeout)" in r.stderr


def test_unix_socket_speaks_the_same_authenticated_api(agent: AgentProc) -> None:
    sock = agent.socket_path
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    r = run_cli("--agent", str(sock), "--key-file", str(agent.key_path), "vm", "create", "u1", "--program", "idle",
                "--mem", "4M")
    assert r.returncode == 0
    env_listing = run_cli("--agent", f"unix:{sock}", "--key-file", str(agent.key_path), "vm", "list", "--json")
    assert '"u1"' in env_listing.stdout


def test_agent_info(agent: AgentProc) -> None:
    info = agent.cli("agent", "info", json=True).json
    assert info["name"] == "A"
    assert info["control"] == agent.control and info["migration"] == agent.migration
    assert info["max-mem"] == 200 << 20 and info["free-mem"] == 200 << 20 and info["vms"] == 0
    agent.cli("vm", "create", "i1", "--program", "idle", "--mem", "48M")
    assert agent.call("agent-info")["free-mem"] == 152 << 20
    assert info["dirty-backends"] and set(info["dirty-backends"]) <= {"uffd-wp-async", "uffd-wp-sync", "hash"}


def test_sigterm_leaves_the_vms_running_and_exits_cleanly(tmp_path: Path, key: Path) -> None:
    conf = tmp_path / "agent.toml"
    conf.write_text('name = "overridden-by-flag"\nmax-mem = "64M"\nlog-level = "debug"\n')
    a = start_agent(tmp_path, "S", key, config=conf)
    try:
        a.cli("vm", "create", "c1", "--program", "counter", "--mem", "32M")
        a.cli("vm", "create", "c2", "--program", "memstress", "--mem", "32M", "--arg", "ws=8M")
        info = a.call("agent-info")
        assert (info["name"], info["max-mem"], info["free-mem"]) == ("S", 64 << 20, 0)  # flag over file
        pids = [v["pid"] for v in a.call("vm-list")["vms"]]
        assert len(pids) == 2 and all(_pid_alive(p) for p in pids)
    finally:
        assert a.stop(keep_vms=True) == 0
    try:
        # `systemctl restart ferry-agent` must not kill guests: they run on, and their records stay.
        assert a.leaked == []
        assert all(_pid_alive(p) for p in pids)
        assert sorted(a.recorded_vm_pids()) == ["c1", "c2"]
        assert not a.socket_path.exists()
        log = a.log()
        assert "agent stopped" in log and "vm left running at agent shutdown" in log
        assert "vm stopped at agent shutdown" not in log
        assert "level=debug" in log  # log-level from the config file
    finally:
        assert sorted(a.kill_recorded_vms()) == sorted(pids)


def test_vm_processes_outlive_a_killed_agent(tmp_path: Path, key: Path) -> None:
    a = start_agent(tmp_path, "K", key)
    a.cli_in_process = True
    try:
        a.cli("vm", "create", "c1", "--program", "counter", "--mem", "16M")
        pid = a.call("vm-info", name="c1")["pid"]
    finally:
        a.stop(signal.SIGKILL, keep_vms=True)
    # Like a QEMU guest whose libvirtd died: the VM runs on until an agent re-adopts it (test_restart.py).
    try:
        assert a.leaked == []
        assert _pid_alive(pid)
        assert a.recorded_vm_pids() == {"c1": pid}
    finally:
        assert a.kill_recorded_vms() == [pid]
    assert not _pid_alive(pid)


def test_an_address_in_use_or_a_bad_config_makes_the_agent_exit_non_zero(tmp_path: Path, key: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        argv = [sys.executable, "-m", "agent.daemon", "--name", "busy", "--control",
                f"127.0.0.1:{busy.getsockname()[1]}", "--migration", f"127.0.0.1:{free_port()}",
                "--state-dir", str(tmp_path / "busy"), "--key-file", str(key)]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert r.returncode == 1
        assert 'msg="cannot listen"' in r.stderr
        # The same with the migration address taken (the listener belongs to the migration engine).
        argv[argv.index("--control") + 1] = f"127.0.0.1:{free_port()}"
        argv[argv.index("--migration") + 1] = f"127.0.0.1:{busy.getsockname()[1]}"
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert r.returncode == 1 and 'msg="cannot listen"' in r.stderr
        assert 'msg="agent started"' not in r.stderr  # the bind error comes before the agent says it runs
    r = subprocess.run([sys.executable, "-m", "agent.daemon", "--key-file", str(tmp_path / "missing.key")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stderr.startswith("ferry-agent: error: cannot read key file")


def test_garbage_and_unauthenticated_requests_do_not_hurt_the_agent(agent: AgentProc) -> None:
    from proto.codec import Decoder, encode
    from proto.messages import ErrorResponse, Request

    host, port = agent.control.rsplit(":", 1)
    for payload in (b"GET / HTTP/1.0\r\n\r\n", b"\x00" * 64, encode(Request(1, "vm-destroy", {"name": "x"}))):
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
        decoder = Decoder()
        decoder.receive_data(reply)
        answer = decoder.next_event()
        assert isinstance(answer, ErrorResponse) and answer.code == "protocol-error", answer
    agent.cli("vm", "create", "after", "--program", "idle", "--mem", "4M")
    assert [v["name"] for v in agent.call("vm-list")["vms"]] == ["after"]
    assert "control handshake refused" in agent.log()


def test_an_unauthenticated_peer_cannot_announce_a_large_body(agent: AgentProc) -> None:
    """Before the handshake the agent refuses a frame header claiming more than a handshake needs,
    at once: it answers without waiting for (or buffering) the announced body."""
    import zlib

    from proto import frame
    from proto.codec import Decoder
    from proto.limits import CURRENT_VERSION, MAX_HANDSHAKE_BODY
    from proto.messages import MESSAGE_TYPES, ErrorResponse, Request

    # A Request (not a handshake message, so only the connection's pre-auth limit applies).
    request_type = next(code for code, cls in MESSAGE_TYPES.items() if cls is Request)
    fixed = frame._LAYOUT.pack(frame.MAGIC, CURRENT_VERSION, 0, request_type, MAX_HANDSHAKE_BODY + 1, 0, 0)
    host, port = agent.control.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(fixed + frame._CRC.pack(zlib.crc32(fixed)))
        reply = b""
        while chunk := s.recv(4096):  # the body is never sent: only an early refusal ends this
            reply += chunk
    decoder = Decoder()
    decoder.receive_data(reply)
    answer = decoder.next_event()
    assert isinstance(answer, ErrorResponse) and answer.code == "protocol-error", answer


def test_vm_records_follow_the_vms_and_a_killed_agent_s_vms_are_re_adopted(tmp_path: Path, key: Path) -> None:
    a = start_agent(tmp_path, "R", key)
    a.cli_in_process = True
    records = a.state_dir / "vms"
    try:
        a.cli("vm", "create", "r1", "--program", "idle", "--mem", "4M")
        a.cli("vm", "create", "r2", "--program", "idle", "--mem", "8M")
        assert sorted(p.name for p in records.glob("*.json")) == ["r1.json", "r2.json"]
        a.cli("vm", "destroy", "r1")
        assert [p.name for p in records.glob("*.json")] == ["r2.json"]
        assert not (records / "r1.sock").exists()
    finally:
        a.stop(signal.SIGKILL, keep_vms=True)  # r2's record stays behind, and r2 runs on
    again = start_agent(tmp_path, "R", key)
    again.cli_in_process = True
    try:
        assert 'msg="vm re-adopted" vm=r2' in again.log()
        assert [v["name"] for v in again.call("vm-list")["vms"]] == ["r2"]
        again.cli("vm", "create", "r3", "--program", "idle", "--mem", "4M")
        assert sorted(p.name for p in records.glob("*.json")) == ["r2.json", "r3.json"]
        again.cli("vm", "destroy", "r2")
        again.cli("vm", "destroy", "r3")
        assert list(records.iterdir()) == []  # destroyed VMs leave neither record nor socket
    finally:
        assert again.stop() == 0
    assert again.leaked == []
