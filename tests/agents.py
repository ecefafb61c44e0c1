"""Test helper: real ferry-agent processes on free loopback ports, and the real `ferry` CLI against them.

Not a conftest: import it. Typical use:

    key = make_key(tmp_path)
    with start_agent(tmp_path, "A", key) as a, start_agent(tmp_path, "B", key) as b:
        a.cli("vm", "create", "c1", "--program", "counter", "--mem", "64M")
        info = a.cli("vm", "info", "c1", json=True).json
        a.cli("migrate", "c1", "--to", b.control, json=True)

Each agent gets its own state dir and log file under tmp_path. `stop()` (also on leaving the `with`)
sends SIGTERM, waits, kills the VM processes the agent left running by design (VMs outlive their
agent: those named by the records in its state dir), kills what else is left of the agent's process
group, and prints the agent's log, which pytest shows only when the test failed. `leaked` lists the
processes the agent left behind that no record accounts for. `stop(keep_vms=True)` leaves the VMs
running for a restarted agent on the same state dir (start_agent with the same name).
`start_agent(..., netns=NS, host=IP)` runs the agent inside network namespace NS (tests/nettopo.py's
hosts), listening on IP; the test then reaches it through its unix socket (`AgentProc.address`).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json as jsonlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

START_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0
CLI_TIMEOUT = 120.0
SPARE_NAME = "ferry-spare"  # /proc/PID/comm of an agent's spare VM process (vmruntime/spare.py)
STARTING_SPARE = "(spare starting)"  # _group_members' name for a spare not yet named
VM_NAME = "ferry-vm"  # /proc/PID/comm of a VM process, a spare's after its hand-over too


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_key(tmp_path: Path, name: str = "cluster.key") -> Path:
    """A fresh cluster key file: base64 of 32 random bytes, as deployments write it."""
    path = tmp_path / name
    path.write_bytes(base64.b64encode(os.urandom(32)) + b"\n")
    return path


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str
    json: Any = None


def run_cli(*args: str, check: bool = True, timeout: float = CLI_TIMEOUT, context: str = "") -> CliResult:
    """Run the real `ferry` entry point in a subprocess."""
    proc = subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    result = CliResult(proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"ferry {' '.join(args)} exited {proc.returncode}\nstdout: {proc.stdout}\n"
                             f"stderr: {proc.stderr}{context}")
    return result


def run_cli_in_process(*args: str, check: bool = True, context: str = "") -> CliResult:
    """Run agent.cli.main() in this process: the same code as the entry point, without a Python start-up."""
    from agent.cli import main

    out, err = io.BytesIO(), io.StringIO()
    stdout = io.TextIOWrapper(out, encoding="utf-8", write_through=True)
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(err):
        try:
            code: Any = main(list(args))
        except SystemExit as e:  # argparse: --help and usage errors
            code = e.code
    stdout.flush()
    result = CliResult(int(code or 0), out.getvalue().decode(), err.getvalue())
    if check and result.returncode != 0:
        raise AssertionError(f"ferry {' '.join(args)} exited {result.returncode}\nstdout: {result.stdout}\n"
                             f"stderr: {result.stderr}{context}")
    return result


def _flags(extra: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for key, value in extra.items():
        out += [f"--{key.replace('_', '-')}", str(value)]
    return out


class AgentProc:
    """One ferry-agent process started by start_agent()."""

    def __init__(self, tmp_path: Path, name: str, key_path: Path, extra: dict[str, Any], *,
                 netns: str | None = None, host: str = "127.0.0.1") -> None:
        self.name = name
        self.key_path = key_path
        self.netns = netns
        self.state_dir = tmp_path / name
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = tmp_path / f"{name}.log"
        # In another namespace every port of ``host`` is free; free_port() just picks a number.
        self.control = f"{host}:{free_port()}"
        self.migration = f"{host}:{free_port()}"
        self.argv = [sys.executable, "-m", "agent.daemon", "--name", name, "--control", self.control,
                     "--migration", self.migration, "--state-dir", str(self.state_dir),
                     "--key-file", str(key_path), *_flags(extra)]
        if netns is not None:
            # The test drives it through its unix socket: a path, reachable from every network
            # namespace (its TCP address is only for the agents of the namespaces that route to it).
            assert len(str(self.socket_path)) < 108, f"unix socket path too long: {self.socket_path}"
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 (kept open for the agent's lifetime)
        # `ip netns exec` execs the agent: the pid below stays the agent's.
        prefix = [] if netns is None else ["ip", "netns", "exec", netns]
        # Its own session: the agent and its VM processes form one process group we can account for.
        self.proc = subprocess.Popen([*prefix, *self.argv], stdin=subprocess.DEVNULL, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.leaked: list[int] = []
        self.returncode: int | None = None
        self.kept_vms = False  # stopped with keep_vms: a later stop() (the fixture's) kills those VMs
        # True: .cli() calls agent.cli.main() in-process (fast); False: the `ferry` entry point in a subprocess.
        self.cli_in_process = False

    @property
    def socket_path(self) -> Path:
        return self.state_dir / "control.sock"

    @property
    def address(self) -> str:
        """Where this test process reaches the agent: its TCP control address, or its unix socket
        when it runs in another network namespace."""
        return self.control if self.netns is None else f"unix:{self.socket_path}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _context(self) -> str:
        return f"\n--- log of agent {self.name} ---\n{self.log()[-6000:]}"

    def cli(self, *args: str, check: bool = True, json: bool = False, timeout: float = CLI_TIMEOUT,
            key_path: Path | None = None) -> CliResult:
        """Run `ferry --agent <this agent> --key-file <key> ARGS [--json]`; .json holds the parsed output."""
        argv = ["--agent", self.address, "--key-file", str(key_path or self.key_path), *args]
        if json:
            argv.append("--json")
        if self.cli_in_process:
            result = run_cli_in_process(*argv, check=check, context=self._context())
        else:
            result = run_cli(*argv, check=check, timeout=timeout, context=self._context())
        if json and result.returncode == 0:
            try:
                result.json = jsonlib.loads(result.stdout)
            except ValueError as e:
                raise AssertionError(f"ferry {' '.join(args)} printed no JSON: {result.stdout!r}") from e
        return result

    def call(self, op: str, **args: Any) -> Any:
        """One control API call in-process (faster than the CLI, for polling and setup)."""
        from agent.client import call_sync

        key = self.key_path.read_bytes().strip()
        return call_sync(self.address, key, op, {k.replace("_", "-"): v for k, v in args.items()})

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Poll vm-list until the agent answers; fail with its log if it exits or stays silent."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent {self.name} exited with {self.proc.returncode}{self._context()}")
            try:
                self.call("vm-list")
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise AssertionError(f"agent {self.name} not ready in {timeout} s{self._context()}") from None
                time.sleep(0.05)

    def group_processes(self, spare: bool = False) -> list[int]:
        """Live processes in the agent's process group (the agent and the VM processes it spawned);
        its spare VM process (vmruntime/spare.py, not yet a VM's) only if ``spare``."""
        return [pid for pid, name in self._group_members() if spare or name not in (SPARE_NAME, STARTING_SPARE)]

    def _group_members(self) -> list[tuple[int, str]]:
        """(pid, process name) of the live processes in the agent's process group, in one pass."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) == self.proc.pid and fields[0] != "Z":  # fields[2]: pgrp; Z: zombie
                name = stat[stat.index("(") + 1:stat.rindex(")")]
                if name not in (SPARE_NAME, VM_NAME) and _is_spare_command(int(entry)):
                    name = STARTING_SPARE  # a spare still importing: named only once its imports are done
                found.append((int(entry), name))
        return found

    def spare_pids(self) -> list[int]:
        """The agent's spare VM process(es) (vmruntime/spare.py): one once started, none while it
        is being replaced after an incoming migration took it."""
        return self._spares(starting=False)

    def _spares(self, starting: bool) -> list[int]:
        names = (SPARE_NAME, STARTING_SPARE) if starting else (SPARE_NAME,)
        return [pid for pid, name in self._group_members() if name in names]

    def wait_spare(self, timeout: float = 15.0) -> int:
        """Wait until the agent has its spare VM process (so its descriptors are all there); its pid."""
        found: list[int] = []

        def one() -> bool:
            found[:] = self.spare_pids()
            return len(found) == 1

        wait_for(one, timeout=timeout, what=f"agent {self.name}'s spare VM process")
        return found[0]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT, keep_vms: bool = False) -> int:
        """Signal the agent, wait for it, kill its VMs (unless keep_vms) and leftovers (in .leaked), print its log."""
        if self.returncode is not None:
            if not keep_vms and self.kept_vms:  # killed earlier with its VMs left running: the test is over
                self.kept_vms = False
                self.kill_recorded_vms()
            return self.returncode
        self.kept_vms = keep_vms
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.returncode = self.proc.wait()
        if keep_vms:  # the VMs run on for the next agent; anything else left is a leak
            recorded = set(self.recorded_vm_pids().values())
            # A spare VM process exits once it sees the agent gone, after its imports (slow under load).
            deadline = time.monotonic() + 10.0
            while self._spares(starting=True) and time.monotonic() < deadline:
                time.sleep(0.05)
            self.leaked = [p for p in self.group_processes(spare=True) if p not in recorded]
        else:
            self.kill_recorded_vms()
            self._reap_group()
        self._log_file.close()
        print(self._context())  # pytest shows it only for failed tests
        return self.returncode

    def recorded_vm_pids(self) -> dict[str, int]:
        """VM name -> pid of each live VM process the records in the state dir name (pid + start time)."""
        from agent.records import process_start_time

        found = {}
        for path in sorted((self.state_dir / "vms").glob("*.json")):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                rec = jsonlib.loads(path.read_text())
                if rec.get("pid-start") is not None and process_start_time(rec["pid"]) == rec["pid-start"]:
                    found[rec["name"]] = int(rec["pid"])
        return found

    def kill_recorded_vms(self) -> list[int]:
        """Kill the VM processes this agent left running by design (the test is over); returns their pids."""
        pids = list(self.recorded_vm_pids().values())
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not self.recorded_vm_pids(), timeout=5.0, what="recorded VM processes to exit")
        return pids

    def _reap_group(self) -> None:
        deadline = time.monotonic() + 10.0
        while (left := self.group_processes(spare=True)) and time.monotonic() < deadline:
            time.sleep(0.05)  # an incoming VM process exits on its own once the agent's socket closes
        self.leaked = left
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def destroy_all_vms(self) -> None:
        """Destroy every VM of this agent and check that no VM process is left (between tests)."""
        for vm in self.call("vm-list")["vms"]:
            self.call("vm-destroy", name=vm["name"])
        wait_for(lambda: self.group_processes() == [self.proc.pid], timeout=5.0, what="VM processes to exit")

    def __enter__(self) -> AgentProc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_agent(tmp_path: Path, name: str, key_path: Path, *, netns: str | None = None,
                host: str = "127.0.0.1", **extra_flags: Any) -> AgentProc:
    """Start a ferry-agent on free ports of ``host`` (loopback by default) and wait until it answers
    `vm list`. With ``netns`` it runs in that network namespace (`ip netns exec`), its VMs too,
    and the test reaches it through its unix socket (`AgentProc.address`).

    extra_flags become flags: max_mem="128M" -> --max-mem 128M.
    """
    agent = AgentProc(tmp_path, name, key_path, extra_flags, netns=netns, host=host)
    try:
        agent.wait_ready()
    except BaseException:
        agent.stop(signal.SIGKILL)
        raise
    return agent


def agent_pair(tmp_path: Path, *, a: dict[str, Any] | None = None, b: dict[str, Any] | None = None,
               cli_in_process: bool = False, check_exit: bool = True) -> Iterator[tuple[AgentProc, AgentProc]]:
    """Agents A and B sharing one key, started with the flags ``a`` and ``b``, for a fixture to
    ``yield from``. Afterwards both are stopped and must leave no process behind, and exit 0 unless
    ``check_exit`` is off (for a test that kills one)."""
    key = make_key(tmp_path)
    first = start_agent(tmp_path, "A", key, **(a or {}))
    try:
        second = start_agent(tmp_path, "B", key, **(b or {}))
    except BaseException:
        first.stop()
        raise
    first.cli_in_process = second.cli_in_process = cli_in_process
    yield first, second
    stopped = {agent.name: (agent.stop(), agent.leaked) for agent in (first, second)}  # both, then judge
    assert all(leaked == [] for _, leaked in stopped.values()), f"(exit code, processes left behind): {stopped}"
    assert not check_exit or all(code == 0 for code, _ in stopped.values()), f"(exit code, leaked): {stopped}"


def agent_list() -> Iterator[list[AgentProc]]:
    """Every agent a test starts (it appends them), for a fixture to ``yield from``: each stopped
    afterwards, and none may leave a process behind."""
    started: list[AgentProc] = []
    yield started
    for agent in started:
        agent.stop()
        assert agent.leaked == [], f"agent {agent.name} left processes behind: {agent.leaked}"


def agent_trio(tmp_path: Path) -> Iterator[tuple[AgentProc, AgentProc, AgentProc]]:
    """Agents A, B and C sharing one key, for a fixture to ``yield from``: a source, a destination
    a test may cut off or kill, and a third to prove the survivor takes the next migration.
    Afterwards each is stopped and must leave no process behind."""
    key = make_key(tmp_path)
    agents = tuple(start_agent(tmp_path, n, key) for n in ("A", "B", "C"))
    yield agents  # type: ignore[misc]
    for agent in agents:
        agent.stop()
        assert agent.leaked == [], f"agent {agent.name} left processes behind: {agent.leaked}"


def _is_spare_command(pid: int) -> bool:
    """Whether process ``pid`` runs vmruntime/spare.py (its command line; False once it is gone)."""
    try:
        return b"vmruntime.spare" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll predicate() until it returns something truthy; AssertionError after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def names(agent: AgentProc) -> list[str]:
    """The names of the VMs on ``agent``, as vm-list gives them."""
    return [v["name"] for v in agent.call("vm-list")["vms"]]


def runs_on(agent: AgentProc, name: str) -> None:
    """The VM is running on ``agent`` and its instruction counter moves."""
    first = agent.call("vm-info", name=name)
    assert first["state"] == "running", first
    wait_for(lambda: agent.call("vm-info", name=name)["instructions"] > first["instructions"],
             what=f"{name} executing on {agent.name}")


FINAL_STATUSES = ("completed", "failed", "cancelled")  # of migrate-status: nothing changes after these


def finished(agent: AgentProc, name: str, timeout: float = 60.0) -> dict[str, Any]:
    """migrate-status of ``name`` on ``agent`` once its migration has ended (a FINAL_STATUSES one)."""

    def done() -> dict[str, Any] | None:
        info: dict[str, Any] = agent.call("migrate-status", name=name)
        return info if info["status"] in FINAL_STATUSES else None

    result: dict[str, Any] = wait_for(done, timeout=timeout, what=f"migration of {name} to end")
    return result


def digest_line(console: bytes) -> bytes:
    """The one `digest <hex>` line a `verify` guest prints before it halts."""
    lines = [ln for ln in console.splitlines() if ln.startswith(b"digest ")]
    assert len(lines) == 1, console[-500:]
    return lines[0]


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (a full file system for a test); the test is skipped,
    saying why, where mounting is not allowed (not root, no CAP_SYS_ADMIN)."""
    import pytest

    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def unmigrated_verify_digest(mem: int, args: dict[str, str]) -> Iterator[Callable[[], bytes]]:
    """The `digest` line of a `verify` run that is never migrated (the oracle of migration tests),
    computed in a background thread while the test migrates its own copy; call the result to get it."""
    from vmruntime.runlocal import run_local

    out = io.BytesIO()
    status: list[int] = []
    t = threading.Thread(target=lambda: status.append(run_local("verify", mem, dict(args), out, max_seconds=100)))
    t.start()

    def result() -> bytes:
        t.join()
        assert status == [0], out.getvalue()[-500:]
        return digest_line(out.getvalue())

    try:
        yield result
    finally:
        t.join()


def run_ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """iproute2's `ip ARGS` (namespaces, veths, bridges of the network tests); fails the test on error."""
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)} failed: {r.stderr.strip()}")
    return r
