"""Unit tests of the `ferry` command line (agent/cli*.py): flags, defaults, the progress display, the summary,
the tables, completion and --version (no agent needed)."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path
from typing import Any

import pytest

from agent import cli, cli_completion, cli_migrate
from agent.cli_progress import Live, Progress, RateMeter, bar, duration
from tests.agents import run_cli, run_cli_in_process


def _info(status: str = "active", rounds: int | list[dict[str, Any]] = 2, **extra: Any) -> dict[str, Any]:
    info: dict[str, Any] = {
        "vm": "c1", "direction": "out", "peer": "B", "status": status, "total-time": 1200, "setup-time": 30,
        "downtime": 45, "expected-downtime": 12, "cpu-throttle-percentage": 0,
        "ram": {"transferred": 300 << 20, "total": 512 << 20, "remaining": 8 << 20, "duplicate": 5, "normal": 7,
                "dirty-pages-rate": 2560, "mbps": 4000.0, "page-size": 4096},
        "rounds": [{}] * rounds if isinstance(rounds, int) else rounds, "dirty-tracker": "uffd-wp-async", "downtime-breakdown": {"pause": 1.5},
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
    assert cli_migrate.migrate_params(p.parse_args(["migrate", "c1", "--to", "b:1"])) == {}
    ns = p.parse_args(["migrate", "c1", "--to", "b:1", "--max-downtime", "50", "--bandwidth", "100M",
                       "--auto-converge", "--max-rounds", "7", "--timeout", "30", "--force"])
    assert cli_migrate.migrate_params(ns) == {"max-downtime": 50.0, "bandwidth": 100 << 20, "auto-converge": True,
                                      "max-rounds": 7, "timeout": 30.0, "force": True}


def test_migrate_params_are_what_the_engine_accepts() -> None:
    from agent.migration.info import MigrationParams

    ns = cli.build_parser().parse_args(["migrate", "c1", "--to", "b:1", "--max-downtime", "50",
                                        "--bandwidth", "1G", "--auto-converge", "--max-rounds", "3",
                                        "--hot-blocks", "--commit-ahead"])
    params = MigrationParams.from_dict(cli_migrate.migrate_params(ns))
    assert (params.max_downtime_ms, params.bandwidth, params.auto_converge, params.max_rounds) == (50, 1 << 30,
                                                                                                  True, 3)
    assert params.hot_blocks and params.commit_ahead
    assert MigrationParams.from_dict(params.to_dict()) == params
    plain = MigrationParams.from_dict(cli_migrate.migrate_params(cli.build_parser().parse_args(["migrate", "c1", "--to", "b:1"])))
    assert not plain.hot_blocks and not plain.commit_ahead


def test_progress_line_shows_share_round_transfer_rates_and_expected_downtime() -> None:
    line = cli_migrate.progress_line(_info())
    assert line.startswith("active")
    # virsh's share: (total - remaining) / total; round 3 is under way after 2 done
    for part in (" 98%", "round   3", "of 512.0 MiB", "remaining 8.0 MiB", "dirty 10.0 MiB/s", "bw 500.0 MB/s",
                 "expected downtime 12 ms"):
        assert part in line
    assert "throttle" not in line and "[" not in line
    assert "throttle 40%" in cli_migrate.progress_line(_info(**{"cpu-throttle-percentage": 40}))
    queued = cli_migrate.progress_line(_info("setup", rounds=0, queued=2))
    assert queued.startswith("setup") and "queued" in queued and "2 more waiting first" in queued
    done = cli_migrate.progress_line(_info("completed"))
    assert "round   2" in done and "ETA" not in done


def test_progress_line_says_what_was_resent_and_when_nothing_is_measured_yet() -> None:
    first = _info(rounds=0, ram={"transferred": 100 << 20, "total": 512 << 20, "remaining": 412 << 20,
                                 "dirty-pages-rate": 0, "mbps": 0.0, "page-size": 4096})
    line = cli_migrate.progress_line(first, Live(rate=50e6))
    # the first round: no dirty rate measured yet, the display's own rate, an ETA for the pass
    assert "dirty -" in line and "bw 50.0 MB/s" in line and "round   1" in line and " 20%" in line
    assert "ETA 8.6 s" in line and "resent" not in line
    later = _info(rounds=[{"bytes": 500 << 20}, {"bytes": 80 << 20}], ram={
        "transferred": 600 << 20, "total": 512 << 20, "remaining": 4 << 20, "dirty-pages-rate": 256,
        "mbps": 800.0, "page-size": 4096})
    assert "sent 600.0 MiB (100.0 MiB resent) of 512.0 MiB" in cli_migrate.progress_line(later)


def test_a_terminal_gets_a_bar() -> None:
    assert bar(0.5, 10) == "[#####-----]" and bar(2.0, 4) == "[####]" and bar(-1, 3) == "[---]"
    line = cli_migrate.progress_line(_info(), Live(rate=None, tty=True))
    assert line.startswith("[" + "#" * 24)
    assert (duration(0.42), duration(42), duration(185), duration(7440)) == ("0.4 s", "42 s", "3 min 05 s", "2 h 04 min")


def test_the_rate_is_measured_over_the_last_second_of_polls() -> None:
    meter = RateMeter(window=1.0)
    assert meter.add(0.0, 0) is None
    assert meter.add(0.5, 50) == 100.0
    assert meter.add(1.0, 100) == 100.0
    for i in range(3, 20):  # then faster: the window forgets the slow start
        rate = meter.add(i * 0.5, 100 + (i - 2) * 500)
    assert rate is not None and 900 <= rate <= 1000
    assert meter.add(10.0, 5) is None  # a new counter: measured afresh


def test_progress_measures_its_own_rate_from_the_polls() -> None:
    out = io.StringIO()
    seen: list[Live] = []
    progress = Progress(out, lambda info, live: seen.append(live) or "x")
    for t, sent in ((0.0, 0), (0.1, 10 << 20), (0.2, 20 << 20)):
        progress.show(_info(rounds=0, ram={"transferred": sent, "total": 1 << 30}), now=t)
    assert seen[0].rate is None and seen[-1].rate is not None and abs(seen[-1].rate - (100 << 20)) < 1


def test_status_table_lists_migrations_aligned() -> None:
    text = cli_migrate.status_table([_info(), _info("completed", vm="longer-name", peer="10.0.0.2:7701")])
    header, first, second = text.splitlines()
    assert header.split() == ["VM", "DIR", "PEER", "STATUS", "ROUNDS", "DONE", "SENT", "BW", "EXP-DOWNTIME", "TIME"]
    assert first.index("active") == second.index("completed") == header.index("STATUS")
    assert "98%" in first and "500.0 MB/s" in first


def test_version_and_bash_completion() -> None:
    r = run_cli_in_process("--version", check=False)
    assert r.returncode == 0 and r.stdout.startswith("ferry ")
    script = cli_completion.bash_script(cli.build_parser())

    def complete(*words: str) -> list[str]:
        line = " ".join(f"'{w}'" for w in words)
        cmd = (f"{script}\nCOMP_WORDS=(ferry {line}); COMP_CWORD={len(words)}; _ferry; "
               'printf "%s\\n" "${COMPREPLY[@]}"')
        return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, check=True).stdout.split()

    assert sorted(complete("mig")) == ["migrate", "migrate-cancel", "migrate-recover", "migrate-resolve", "migrate-status"]
    assert complete("vm", "cr") == ["create"]
    assert "--max-downtime" in complete("migrate", "c1", "--")
    assert complete("migrate", "c1", "--storage-mode", "") == ["background", "write-blocking"]
    assert complete("--agent", "h:1", "vm", "info", "c1", "--j") == ["--json"]
    r = run_cli_in_process("completion", "fish", check=False)
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_progress_without_a_terminal_prints_one_line_per_round_or_status() -> None:
    out = io.StringIO()
    progress = Progress(out, cli_migrate.progress_line)
    for info in (_info(rounds=0), _info(rounds=0, **{"expected-downtime": 99}), _info(rounds=1),
                 _info("device", rounds=1), _info("completed", rounds=1)):
        progress.show(info)
    progress.end()
    lines = out.getvalue().splitlines()
    assert [ln.split()[0] for ln in lines] == ["active", "active", "device", "completed"]


def test_summary_names_the_outcome_and_the_backend() -> None:
    text = cli_migrate.summary_text(_info("failed", **{"error-desc": "destination refused: insufficient-memory"}))
    assert text.splitlines()[0] == "migration of c1 to B: failed"
    assert "downtime 45 ms" in text and "dirty tracking: uffd-wp-async" in text
    assert "error: destination refused: insufficient-memory" in text
    assert cli_migrate.summary_text(_info("completed", direction="in")).startswith("migration of c1 from B: completed")


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
