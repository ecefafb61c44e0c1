"""Unit tests of agent.cli: flags, defaults, the progress display and the summary (no agent needed)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from agent import cli
from tests.agents import run_cli, run_cli_in_process


def _info(status: str = "active", rounds: int = 2, **extra: Any) -> dict[str, Any]:
    info: dict[str, Any] = {
        "vm": "c1", "direction": "out", "peer": "B", "status": status, "total-time": 1200, "setup-time": 30,
        "downtime": 45, "expected-downtime": 12, "cpu-throttle-percentage": 0,
        "ram": {"transferred": 300 << 20, "total": 512 << 20, "remaining": 8 << 20, "duplicate": 5, "normal": 7,
                "dirty-pages-rate": 2560, "mbps": 4000.0, "page-size": 4096},
        "rounds": [{}] * rounds, "dirty-tracker": "uffd-wp-async", "downtime-breakdown": {"pause": 1.5},
        "summary": "remainder fits the bound",
    }
    info.update(extra)
    return info


def test_defaults_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FERRY_AGENT", raising=False)
    monkeypatch.delenv("FERRY_KEY_FILE", raising=False)
    ns = cli.build_parser().parse_args(["vm", "list"])
    assert (ns.agent, ns.key_file) == ("/var/lib/ferry/control.sock", "/etc/ferry/cluster.key")
    monkeypatch.setenv("FERRY_AGENT", "10.0.0.1:7700")
    monkeypatch.setenv("FERRY_KEY_FILE", "/tmp/k")
    ns = cli.build_parser().parse_args(["vm", "list"])
    assert (ns.agent, ns.key_file) == ("10.0.0.1:7700", "/tmp/k")


def test_vm_create_flags() -> None:
    ns = cli.build_parser().parse_args(["vm", "create", "c1", "--program", "memstress", "--mem", "4G",
                                        "--arg", "ws=1G", "--arg", "pattern=random"])
    assert (ns.name, ns.program, ns.mem) == ("c1", "memstress", 4 << 30)
    assert dict(ns.arg) == {"ws": "1G", "pattern": "random"}


@pytest.mark.parametrize("argv", [
    ["vm", "create", "c1", "--mem", "1G"],  # --program is required
    ["vm", "create", "c1", "--program", "idle", "--mem", "lots"],
    ["vm", "create", "c1", "--program", "idle", "--arg", "novalue"],
    ["vm", "wait", "c1", "--state", "sleeping"],
    ["migrate", "c1", "--to", "b:1", "--max-downtime", "-5"],
])
def test_usage_errors_exit_2(argv: list[str]) -> None:
    r = run_cli_in_process(*argv, check=False)
    assert r.returncode == 2 and "usage:" in r.stderr


def test_migrate_params_only_carry_what_was_given() -> None:
    p = cli.build_parser()
    assert cli.migrate_params(p.parse_args(["migrate", "c1", "--to", "b:1"])) == {}
    ns = p.parse_args(["migrate", "c1", "--to", "b:1", "--max-downtime", "50", "--bandwidth", "100M",
                       "--auto-converge", "--max-rounds", "7", "--timeout", "30", "--force"])
    assert cli.migrate_params(ns) == {"max-downtime": 50.0, "bandwidth": 100 << 20, "auto-converge": True,
                                      "max-rounds": 7, "timeout": 30.0, "force": True}


def test_migrate_params_are_what_the_engine_accepts() -> None:
    from agent.migration.info import MigrationParams

    ns = cli.build_parser().parse_args(["migrate", "c1", "--to", "b:1", "--max-downtime", "50",
                                        "--bandwidth", "1G", "--auto-converge", "--max-rounds", "3",
                                        "--hot-blocks", "--commit-ahead"])
    params = MigrationParams.from_dict(cli.migrate_params(ns))
    assert (params.max_downtime_ms, params.bandwidth, params.auto_converge, params.max_rounds) == (50, 1 << 30,
                                                                                                  True, 3)
    assert params.hot_blocks and params.commit_ahead
    assert MigrationParams.from_dict(params.to_dict()) == params
    plain = MigrationParams.from_dict(cli.migrate_params(cli.build_parser().parse_args(["migrate", "c1", "--to", "b:1"])))
    assert not plain.hot_blocks and not plain.commit_ahead


def test_progress_line_shows_round_transfer_rates_and_expected_downtime() -> None:
    line = cli.progress_line(_info())
    assert line.startswith("active")
    for part in ("round   2", "300.0 MiB of 512.0 MiB", "remaining 8.0 MiB", "dirty 10.0 MiB/s", "bw 500.0 MB/s",
                 "expected downtime 12 ms"):
        assert part in line
    assert "throttle" not in line
    assert "throttle 40%" in cli.progress_line(_info(**{"cpu-throttle-percentage": 40}))


def test_progress_without_a_terminal_prints_one_line_per_round_or_status() -> None:
    out = io.StringIO()
    progress = cli.Progress(out, cli.progress_line)
    for info in (_info(rounds=0), _info(rounds=0, **{"expected-downtime": 99}), _info(rounds=1),
                 _info("device", rounds=1), _info("completed", rounds=1)):
        progress.show(info)
    progress.end()
    lines = out.getvalue().splitlines()
    assert [ln.split()[0] for ln in lines] == ["active", "active", "device", "completed"]


def test_summary_names_the_outcome_and_the_backend() -> None:
    text = cli.summary_text(_info("failed", **{"error-desc": "destination refused: insufficient-memory"}))
    assert text.splitlines()[0] == "migration of c1 to B: failed"
    assert "downtime 45 ms" in text and "dirty tracking: uffd-wp-async" in text
    assert "error: destination refused: insufficient-memory" in text
    assert cli.summary_text(_info("completed", direction="in")).startswith("migration of c1 from B: completed")


def test_unreachable_agent_and_missing_key_are_errors(tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_text("0123456789abcdef0123456789abcdef")
    r = run_cli_in_process("--agent", str(tmp_path / "nosock"), "--key-file", str(key), "vm", "list", check=False)
    assert r.returncode == 1 and r.stderr.startswith("ferry: error: cannot talk to agent")
    r = run_cli_in_process("--agent", "127.0.0.1:1", "--key-file", str(tmp_path / "nokey"), "vm", "list",
                           check=False)
    assert r.returncode == 1 and "cannot read key file" in r.stderr


def test_ferry_run_uses_the_local_runner() -> None:
    r = run_cli("run", "verify", "--mem", "4M", "--arg", "steps=1000", "--arg", "ws=64K")
    assert r.returncode == 0 and r.stdout.startswith("digest ")
    r = run_cli("run", "idle", "--mem", "4M", "--max-seconds", "0.3", check=False)
    assert r.returncode == 124 and "still running" in r.stderr
    r = run_cli("run", "nonesuch", check=False)
    assert r.returncode == 2 and "unknown program" in r.stderr
