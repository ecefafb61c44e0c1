"""The systemd side of deploy/: the unit file verified by systemd-analyze, the README's systemd-run lines kept
in step with it, and the agent started by systemd-run where systemd runs (skipped with the reason elsewhere).
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.client import call_sync
from agent.config import build_parser
from tests.agents import free_port, make_key

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "ferry-agent.service"
README = ROOT / "README.md"
INSTALLED_VENV = "/opt/ferry/.venv"
VENV = Path(sys.executable).parent.parent  # this checkout's virtualenv stands in for /opt/ferry/.venv


def unit_service() -> dict[str, str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return dict(parser["Service"])


def readme_systemd_runs() -> list[list[str]]:
    """Every `systemd-run ...` command of the README's Deployment section, continuation lines joined."""
    section = README.read_text().split("## Deployment", 1)[1]
    text = re.sub(r"\\\n\s*", " ", section)
    return [shlex.split(line) for line in text.splitlines() if line.startswith("systemd-run ")]


def properties(argv: list[str]) -> dict[str, str]:
    """The unit properties a systemd-run command line sets (-p K=V, --service-type=)."""
    props: dict[str, str] = {}
    for i, arg in enumerate(argv):
        if arg == "-p":
            key, _, val = argv[i + 1].partition("=")
            props[key] = val
        elif arg.startswith("--service-type="):
            props["Type"] = arg.split("=", 1)[1]
    return props


def agent_argv(argv: list[str]) -> list[str]:
    """The command systemd-run starts: from the ferry-agent path on."""
    start = next(i for i, a in enumerate(argv) if a.endswith("/ferry-agent"))
    return argv[start:]


# -- the unit file and the README -----------------------------------------------------------------------
def test_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    unit = tmp_path / "ferry-agent.service"  # the ExecStart binary must exist for verify: point it here
    unit.write_text(UNIT.read_text().replace(INSTALLED_VENV, str(VENV)))
    r = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (r.stdout + r.stderr).splitlines() if unit.name in line]
    assert r.returncode == 0 and complaints == [], r.stdout + r.stderr


def test_unit_file_settings_the_issue_asks_for() -> None:
    svc = unit_service()
    assert svc["Type"] == "notify" and svc["NotifyAccess"] == "main"
    assert svc["Restart"] == "on-failure" and int(svc["WatchdogSec"]) > 0
    assert svc["KillMode"] == "process"  # the VM processes are not killed by systemd on restart
    assert svc["StateDirectory"] == "ferry"  # /var/lib/ferry
    assert svc["ExecStart"] == f"{INSTALLED_VENV}/bin/ferry-agent --config /etc/ferry/agent.toml"
    assert "--check-config" in svc["ExecStartPre"]


def test_readme_systemd_run_lines_match_the_unit_and_the_agent_flags() -> None:
    runs = readme_systemd_runs()
    assert len(runs) == 2, "one systemd-run line per host"
    svc = unit_service()
    migration_hosts = set()
    for argv in runs:
        props = properties(argv)
        assert props == {k: svc[k] for k in props}, "a property differs from deploy/ferry-agent.service"
        for key in ("Type", "NotifyAccess", "WatchdogSec", "Restart", "KillMode", "TimeoutStopSec", "StateDirectory"):
            assert key in props, f"the README's systemd-run line lacks {key}"
        ns = build_parser().parse_args(agent_argv(argv)[1:])
        assert ns.name and ns.control and ns.migration and ns.metrics
        assert ns.control.rsplit(":", 1)[0] != ns.migration.rsplit(":", 1)[0], "a dedicated migration address"
        migration_hosts.add(ns.migration)
    assert len(migration_hosts) == 2


# -- the agent under systemd-run ------------------------------------------------------------------------
def _systemd_reason() -> str | None:
    if shutil.which("systemd-run") is None or shutil.which("systemctl") is None:
        return "systemd-run or systemctl is not installed"
    if not Path("/run/systemd/system").is_dir():
        comm = Path("/proc/1/comm").read_text().strip() if Path("/proc/1/comm").exists() else "?"
        return f"systemd is not running on this machine (PID 1 is {comm!r}, no /run/systemd/system)"
    if os.geteuid() != 0:
        return "starting a system service with systemd-run needs root"
    return None


@pytest.fixture
def unit_name() -> Iterator[str]:
    reason = _systemd_reason()
    if reason is not None:
        pytest.skip(reason)
    name = f"ferry-agent-test-{os.getpid()}-{os.urandom(3).hex()}"
    yield name
    subprocess.run(["systemctl", "stop", f"{name}.service"], capture_output=True, timeout=120)
    subprocess.run(["systemctl", "reset-failed", f"{name}.service"], capture_output=True, timeout=30)


def _show(unit: str, *props: str) -> dict[str, str]:
    out = subprocess.run(["systemctl", "show", f"{unit}.service", "-p", ",".join(props)], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_agent_under_systemd_run_is_ready_watched_and_stops_in_order(tmp_path: Path, unit_name: str) -> None:
    """The README's line for host A, on loopback addresses and this checkout's virtualenv."""
    key = make_key(tmp_path)
    control = f"127.0.0.1:{free_port()}"
    argv = readme_systemd_runs()[0]
    props = properties(argv)
    agent = agent_argv(argv)
    ns = build_parser().parse_args(agent[1:])
    swap = {ns.control: control, ns.migration: f"127.0.0.1:{free_port()}", ns.metrics: f"127.0.0.1:{free_port()}",
            ns.state_dir: str(tmp_path / "state"), ns.key_file: str(key), ns.name: "sysd"}
    command = [agent[0].replace(INSTALLED_VENV, str(VENV)), *(swap.get(a, a) for a in agent[1:])]
    run = ["systemd-run", f"--unit={unit_name}", f"--service-type={props.pop('Type')}",
           *(f"--property={k}={v}" for k, v in props.items()), *command]
    r = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    # systemd-run returned: the start job finished, which for Type=notify means READY=1 arrived.
    shown = _show(unit_name, "ActiveState", "SubState", "StatusText", "WatchdogUSec", "KillMode")
    assert shown["ActiveState"] == "active" and shown["KillMode"] == "process"
    assert control in shown["StatusText"]
    assert int(shown["WatchdogUSec"]) == int(props["WatchdogSec"]) * 1_000_000
    assert call_sync(control, key.read_bytes().strip(), "vm-list", {})["vms"] == []
    stop = subprocess.run(["systemctl", "stop", f"{unit_name}.service"], capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stderr
    assert _show(unit_name, "ActiveState").get("ActiveState") in ("inactive", "")
