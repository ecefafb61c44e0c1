"""`ferry-agent --check-config`: the real entry point on good and bad configurations, deploy/agent.toml included."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from tests.agents import free_port, make_key

EXAMPLE = Path(__file__).resolve().parent.parent / "deploy" / "agent.toml"


def check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.daemon", "--check-config", *args], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


def _local(tmp_path: Path) -> list[str]:
    """Flags that make the example config usable on this host (flags win over the file)."""
    return ["--control", f"127.0.0.1:{free_port()}", "--migration", f"127.0.0.1:{free_port()}",
            "--metrics", f"127.0.0.1:{free_port()}", "--key-file", str(make_key(tmp_path)),
            "--state-dir", str(tmp_path / "state" / "ferry")]


def test_example_config_is_valid_toml_with_every_key() -> None:
    from agent.config import build_parser

    data = tomllib.loads(EXAMPLE.read_text())
    flags = {a.dest.replace("_", "-") for a in build_parser()._actions} - {"help", "config", "check-config"}
    assert set(data) == flags  # the example documents every setting the agent has


def test_example_config_checks_out_with_local_addresses_and_prints_what_it_resolved(tmp_path: Path) -> None:
    r = check("--config", str(EXAMPLE), *_local(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"# ferry-agent: config file {EXAMPLE}: OK")
    resolved = tomllib.loads(r.stdout)
    assert resolved["name"] == "hostA" and resolved["max-mem"] == "8G" and resolved["metrics"].startswith("127.0.0.1:")
    assert "key" not in resolved  # the key file's path, never the key
    assert not (tmp_path / "state").exists()  # checking starts nothing and creates nothing

    # What it printed is itself a valid config file.
    again = tmp_path / "resolved.toml"
    again.write_text(r.stdout)
    assert check("--config", str(again)).returncode == 0


def test_example_config_on_a_host_that_is_not_host_a_says_what_is_wrong() -> None:
    r = check("--config", str(EXAMPLE), "--key-file", "/nonexistent/ferry/cluster.key")
    assert r.returncode == 2 and r.stdout == ""
    assert "cannot read key file '/nonexistent/ferry/cluster.key'" in r.stderr


def test_every_problem_is_listed_not_only_the_first(tmp_path: Path) -> None:
    key = make_key(tmp_path)
    port = free_port()
    r = check("--key-file", str(key), "--control", f"127.0.0.1:{port}", "--migration", f"127.0.0.1:{port}",
              "--log-level", "loud", "--max-mem", "lots", "--metrics", "nohostport")
    assert r.returncode == 2
    assert "4 problems" in r.stderr
    for expected in ("log-level: 'loud' is not one of", "max-mem: invalid size 'lots'",
                     "metrics: invalid address 'nohostport'", f"migration: 127.0.0.1:{port} is also the control"):
        assert expected in r.stderr


def test_file_problems_unknown_keys_and_wrong_types(tmp_path: Path) -> None:
    conf = tmp_path / "agent.toml"
    conf.write_text('nmae = "typo"\ncontrol = 7700\nmax-mem = 1.5\n')
    r = check("--config", str(conf))
    assert r.returncode == 2
    assert "unknown keys nmae" in r.stderr
    assert "control must be a string, not int 7700" in r.stderr
    assert "max-mem must be a string or an integer, not float 1.5" in r.stderr
    conf.write_text('control = "127.0.0.1:1"\n[broken\n')
    r = check("--config", str(conf))
    assert r.returncode == 2 and f"config file '{conf}'" in r.stderr
    r = check("--config", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "cannot read config file" in r.stderr


def test_host_problems_state_dir_and_foreign_addresses(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    r = check("--key-file", str(make_key(tmp_path)), "--state-dir", str(blocker / "ferry"),
              "--control", "192.0.2.77:7700", "--migration", f"127.0.0.1:{free_port()}")
    assert r.returncode == 2
    assert f"state-dir: '{blocker}' is not a directory" in r.stderr
    assert "control: cannot listen on '192.0.2.77' on this host" in r.stderr


def test_a_port_in_use_is_not_a_problem_for_the_check(tmp_path: Path) -> None:
    """Checking the config of a running agent (its ports taken) before a restart must pass."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = check("--key-file", str(make_key(tmp_path)), "--state-dir", str(tmp_path / "s"),
                  "--control", f"127.0.0.1:{port}", "--migration", f"127.0.0.1:{free_port()}")
    assert r.returncode == 0, r.stderr
