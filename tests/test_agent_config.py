"""Unit tests of agent.config: sizes, addresses, the key file, flags over the TOML file."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import (
    ConfigError,
    describe,
    format_hostport,
    format_size,
    load_config,
    load_key,
    parse_hostport,
    parse_size,
)


@pytest.mark.parametrize(("text", "expected"), [
    ("4096", 4096), ("64M", 64 << 20), ("4G", 4 << 30), ("256m", 256 << 20), ("1k", 1024),
    ("2GiB", 2 << 30), ("16MB", 16 << 20), (" 8M ", 8 << 20), ("1T", 1 << 40),
])
def test_parse_size_accepts_binary_suffixes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "M", "-1", "1.5G", "12X", "G4"])
def test_parse_size_refuses_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


def test_format_size_round_trips_whole_units() -> None:
    for n in (4096, 64 << 20, 3 << 30, 1 << 40):
        assert parse_size(format_size(n)) == n


def test_parse_hostport() -> None:
    assert parse_hostport("127.0.0.1:7700") == ("127.0.0.1", 7700)
    assert parse_hostport("[::1]:9") == ("::1", 9)
    assert parse_hostport(format_hostport("::1", 9)) == ("::1", 9)
    for bad in ("7700", "host:", ":80", "h:99999", "h:x"):
        with pytest.raises(ValueError):
            parse_hostport(bad)


def test_load_key_strips_whitespace(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_bytes(b"  abcdefghijklmnopqrstuvwxyz0123\n\n")
    assert load_key(path) == b"abcdefghijklmnopqrstuvwxyz0123"


def test_load_key_refuses_short_or_missing(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_bytes(b"short-key\n")
    with pytest.raises(ConfigError, match="too short"):
        load_key(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_key(tmp_path / "missing")


def _key(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.key"
    path.write_text("0123456789abcdef0123456789abcdef\n")
    return path


def test_flags_override_config_file(tmp_path: Path) -> None:
    key = _key(tmp_path)
    conf = tmp_path / "agent.toml"
    conf.write_text(f'name = "fromfile"\ncontrol = "127.0.0.1:1000"\nmax-mem = "1G"\nkey-file = "{key}"\n'
                    f'state-dir = "{tmp_path}/s"\ndirty-tracker = "hash"\n')
    cfg = load_config(["--config", str(conf), "--name", "fromflag", "--max-mem", "512M"])
    assert cfg.name == "fromflag"
    assert cfg.max_mem == 512 << 20
    assert cfg.control == ("127.0.0.1", 1000)
    assert cfg.dirty_tracker == "hash"
    assert cfg.key == b"0123456789abcdef0123456789abcdef"
    assert cfg.control_socket == tmp_path / "s" / "control.sock"


def test_config_file_refuses_unknown_keys_and_bad_values(tmp_path: Path) -> None:
    key = _key(tmp_path)
    conf = tmp_path / "agent.toml"
    conf.write_text('nmae = "typo"\n')
    with pytest.raises(ConfigError, match="unknown keys nmae"):
        load_config(["--config", str(conf), "--key-file", str(key)])
    with pytest.raises(ConfigError, match="control"):
        load_config(["--control", "nohostport", "--key-file", str(key)])
    with pytest.raises(ConfigError, match="dirty-tracker"):
        load_config(["--dirty-tracker", "soft-dirty", "--key-file", str(key)])


def test_default_max_mem_is_a_share_of_the_host(tmp_path: Path) -> None:
    cfg = load_config(["--key-file", str(_key(tmp_path))])
    total = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    assert 0 < cfg.max_mem < total


def test_spare_vm_is_an_on_off_switch(tmp_path: Path) -> None:
    key = str(_key(tmp_path))
    assert load_config(["--key-file", key]).spare_vm is True  # on unless turned off
    assert load_config(["--key-file", key, "--spare-vm", "off"]).spare_vm is False
    assert load_config(["--key-file", key, "--spare-vm", "ON"]).spare_vm is True
    conf = tmp_path / "agent.toml"
    conf.write_text("spare-vm = false\n")
    cfg = load_config(["--config", str(conf), "--key-file", key])
    assert cfg.spare_vm is False
    assert 'spare-vm = "off"' in describe(cfg)  # and it reads back
    conf.write_text('spare-vm = "off"\n')
    assert load_config(["--config", str(conf), "--key-file", key]).spare_vm is False
    with pytest.raises(ConfigError, match="spare-vm: 'maybe' is not on or off"):
        load_config(["--key-file", key, "--spare-vm", "maybe"])
    conf.write_text("spare-vm = 1\n")
    with pytest.raises(ConfigError, match="spare-vm must be a string or a boolean, not int"):
        load_config(["--config", str(conf), "--key-file", key])
    conf.write_text("max-mem = true\n")
    with pytest.raises(ConfigError, match="max-mem must be a string or an integer, not bool"):
        load_config(["--config", str(conf), "--key-file", key])


def test_max_outgoing_is_a_whole_number_from_1_to_64(tmp_path: Path) -> None:
    key = str(_key(tmp_path))
    assert load_config(["--key-file", key]).max_outgoing == 4
    assert load_config(["--key-file", key, "--max-outgoing", "1"]).max_outgoing == 1
    conf = tmp_path / "agent.toml"
    conf.write_text("max-outgoing = 8\n")
    cfg = load_config(["--config", str(conf), "--key-file", key])
    assert cfg.max_outgoing == 8 and 'max-outgoing = "8"' in describe(cfg)
    for bad in ("0", "65", "two", "1.5"):
        with pytest.raises(ConfigError, match="max-outgoing"):
            load_config(["--key-file", key, "--max-outgoing", bad])
