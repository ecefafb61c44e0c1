"""Real agents with mutual TLS for the tests: started with a --tls-dir, talked to with an operator's.

Not a conftest: import it (tests/test_tls.py, tests/test_tls_reload.py).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent import tls
from agent.client import call_sync
from tests.agents import AgentProc, make_key, wait_for


class TLSAgent(AgentProc):
    """An agent with a --tls-dir; the test talks to it with an operator's TLS dir (``client_dir``)."""

    def __init__(self, tmp_path: Path, name: str, key_path: Path, tls_dir: Path, client_dir: Path,
                 **extra: Any) -> None:
        self.client_dir = client_dir
        super().__init__(tmp_path, name, key_path, {"tls_dir": tls_dir, **extra})

    def call(self, op: str, **args: Any) -> Any:
        key = self.key_path.read_bytes().strip()
        return call_sync(self.control, key, op, {k.replace("_", "-"): v for k, v in args.items()},
                         tls=tls.load(self.client_dir).client)

    def cli(self, *args: str, **kw: Any) -> Any:
        return super().cli("--tls-dir", str(self.client_dir), *args, **kw)

    def reload(self, count: int = 1) -> None:
        """SIGHUP, then wait for the agent to log the outcome of its ``count``-th reload."""
        os.kill(self.proc.pid, signal.SIGHUP)
        wait_for(lambda: self.log().count('"tls reload') >= count, what=f"agent {self.name} to reload")


def start_tls_agent(tmp: Path, name: str, key: Path, tls_dir: Path, client_dir: Path, **extra: Any) -> TLSAgent:
    agent = TLSAgent(tmp, name, key, tls_dir, client_dir, **extra)
    try:
        agent.wait_ready()
    except BaseException:
        agent.stop()
        raise
    return agent


def tls_pair(tmp: Path, pki: dict[str, Path]) -> Iterator[tuple[TLSAgent, TLSAgent]]:
    """Agents A and B with the certificates ``pki`` names ("A", "B", and "cli" for the operator),
    for a fixture to ``yield from``; their VMs destroyed and both stopped afterwards, each exiting 0."""
    key = make_key(tmp)
    a = start_tls_agent(tmp, "A", key, pki["A"], pki["cli"])
    try:
        b = start_tls_agent(tmp, "B", key, pki["B"], pki["cli"])
    except BaseException:
        a.stop()
        raise
    yield a, b
    for agent in (a, b):
        agent.destroy_all_vms()
        agent.stop()
        assert agent.returncode == 0, f"agent {agent.name} exited with {agent.returncode}"
