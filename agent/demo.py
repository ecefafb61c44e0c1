"""`make demo`: two agents on this host, a memstress VM, a live migration with its progress display.

This module owns the demo script. It starts two real `ferry-agent` processes on free loopback ports
with temporary state dirs and a fresh cluster key, then runs the real `ferry` CLI, echoing each
command: create a VM that keeps dirtying memory, show it, migrate it live to the other agent with
the progress display, show it running there (its instruction counter still moving), and stop the
agents. It exits non-zero, with the agents' logs, if any step failed.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

READY_TIMEOUT = 15.0


class DemoError(Exception):
    """A demo step failed; the message says which."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DemoAgent:
    """One ferry-agent process of the demo."""

    def __init__(self, workdir: Path, name: str, key: Path) -> None:
        self.name = name
        self.control = f"127.0.0.1:{_free_port()}"
        self.migration = f"127.0.0.1:{_free_port()}"
        self.log_path = workdir / f"{name}.log"
        state = workdir / name
        state.mkdir()
        argv = [sys.executable, "-m", "agent.daemon", "--name", name, "--control", self.control,
                "--migration", self.migration, "--state-dir", str(state), "--key-file", str(key)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


class Demo:
    """The demo's steps, run in order."""

    def __init__(self, workdir: Path, mem: str, ws: str) -> None:
        self.workdir = workdir
        self.mem = mem
        self.ws = ws
        self.key = workdir / "cluster.key"
        self.key.write_bytes(base64.b64encode(os.urandom(32)) + b"\n")
        self.agents: list[DemoAgent] = []

    def ferry(self, agent: DemoAgent, *args: str, echo: bool = True, capture: bool = False) -> str:
        """Run the real CLI against an agent; DemoError when it fails."""
        argv = ["ferry", "--agent", agent.control, "--key-file", str(self.key), *args]
        if echo:
            print(f"\n$ {shlex.join(argv)}", flush=True)
        proc = subprocess.run([sys.executable, "-m", "agent.cli", *argv[1:]], stdin=subprocess.DEVNULL,
                              capture_output=capture, text=True, timeout=300)
        if proc.returncode != 0:
            detail = f": {proc.stderr.strip()}" if capture else ""
            raise DemoError(f"`ferry {' '.join(args)}` exited {proc.returncode}{detail}")
        return proc.stdout if capture else ""

    def start_agents(self) -> tuple[DemoAgent, DemoAgent]:
        for name in ("alpha", "beta"):
            self.agents.append(DemoAgent(self.workdir, name, self.key))
        for agent in self.agents:
            self._wait_ready(agent)
            print(f"agent {agent.name}: control {agent.control}, migration {agent.migration}")
        return self.agents[0], self.agents[1]

    def _wait_ready(self, agent: DemoAgent) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if agent.proc.poll() is not None:
                raise DemoError(f"agent {agent.name} exited with status {agent.proc.returncode}")
            try:
                self.ferry(agent, "vm", "list", echo=False, capture=True)
                return
            except DemoError:
                if time.monotonic() > deadline:
                    raise DemoError(f"agent {agent.name} did not answer within {READY_TIMEOUT:g} s") from None
                time.sleep(0.1)

    def info(self, agent: DemoAgent, vm: str) -> dict[str, object]:
        return dict(json.loads(self.ferry(agent, "vm", "info", vm, "--json", echo=False, capture=True)))

    def run(self) -> None:
        src, dst = self.start_agents()
        self.ferry(src, "vm", "create", "demo", "--program", "memstress", "--mem", self.mem, "--arg", f"ws={self.ws}")
        time.sleep(1.0)  # let the guest dirty its working set, so there is something to chase
        self.ferry(src, "vm", "list")
        self.ferry(src, "migrate", "demo", "--to", dst.control)
        self.ferry(dst, "vm", "info", "demo")
        self._check_moved(src, dst)
        print("\nthe VM left alpha and runs on beta, still executing")

    def _check_moved(self, src: DemoAgent, dst: DemoAgent) -> None:
        if '"demo"' in self.ferry(src, "vm", "list", "--json", echo=False, capture=True):
            raise DemoError("the VM is still listed on the source agent")
        before = self.info(dst, "demo")
        time.sleep(0.5)
        after = self.info(dst, "demo")
        if after["state"] != "running" or int(str(after["instructions"])) <= int(str(before["instructions"])):
            raise DemoError(f"the VM is not executing on the destination: {after}")

    def stop(self) -> bool:
        """Destroy the demo VM (VMs outlive their agent), then stop the agents; True when each exited cleanly."""
        for agent in self.agents:
            try:
                self.ferry(agent, "vm", "destroy", "demo", echo=False, capture=True)
            except (DemoError, OSError, subprocess.SubprocessError):
                pass  # not on this agent (or the agent is gone)
        statuses = [agent.stop() for agent in self.agents]
        if self.agents:
            print(f"\nagents stopped (exit statuses {statuses})")
        return all(s == 0 for s in statuses)

    def dump_logs(self) -> None:
        for agent in self.agents:
            print(f"\n--- log of agent {agent.name} ---", file=sys.stderr)
            print(agent.log_path.read_text(errors="replace")[-4000:], file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agent.demo", description=__doc__.splitlines()[0] if __doc__ else "")
    p.add_argument("--mem", default="512M", help="guest RAM of the demo VM (default 512M)")
    p.add_argument("--ws", default="128M", help="working set memstress keeps dirtying (default 128M)")
    ns = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ferry-demo-") as tmp:
        demo = Demo(Path(tmp), ns.mem, ns.ws)
        try:
            demo.run()
        except (DemoError, OSError, subprocess.TimeoutExpired) as e:
            print(f"\ndemo failed: {e}", file=sys.stderr)
            demo.stop()
            demo.dump_logs()
            return 1
        except KeyboardInterrupt:
            demo.stop()
            return 130
        if not demo.stop():
            demo.dump_logs()
            return 1
    print("demo passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
