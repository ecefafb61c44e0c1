"""Tests of a VM's disk on the agent side: `--disk` parsing, allowed directories, the VM manager's
create (sparse image, reuse, refusals, nothing left behind), `vm info`'s disks, destroy keeping the
image, re-adoption after a restart, the disk-dirs setting, and a migration on shared storage.

The VM manager runs real VM processes over real image files in a temporary state dir.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import disks
from agent.cli import _vm_details, build_parser
from agent.config import ConfigError, describe, load_config
from agent.logs import Log
from agent.ops import AgentIdentity, ControlOps, OpError
from agent.records import VMRecords
from agent.vms import VM, VMError, VMManager
from tests.agents import make_key, start_agent
from tests.test_vmproc_disk import WRITER

MiB = 1 << 20
GiB = 1 << 30


# -- parsing and paths (agent/disks.py) ------------------------------------------------------------------
def test_disk_text_parses_to_the_control_api_map() -> None:
    assert disks.parse_disk_text("a.img") == {"path": "a.img"}
    assert disks.parse_disk_text("/d/a.img, size=1G") == {"path": "/d/a.img", "size": GiB}
    assert disks.parse_disk_text("a.img,size=4096") == {"path": "a.img", "size": 4096}
    assert disks.disk_request({"path": "a.img", "size": "2G"}) == {"path": "a.img", "size": 2 * GiB}  # the API's


@pytest.mark.parametrize(("text", "words"), [
    ("", "expected PATH"),
    ("a.img,colour=red", "keys: size"),
    ("a.img,size=1G,size=2G", "size given twice"),
    ("a.img,size=lots", "invalid size"),
    ("a.img,size=1000", "multiple of 512"),
    ("a.img,size=0", "positive multiple"),
])
def test_bad_disk_text_is_refused_with_the_reason(text: str, words: str) -> None:
    with pytest.raises(disks.DiskError, match=words):
        disks.parse_disk_text(text)


def test_paths_must_resolve_inside_an_allowed_directory(tmp_path: Path) -> None:
    state, extra = tmp_path / "state" / "disks", tmp_path / "extra"
    state.mkdir(parents=True)
    extra.mkdir()
    allowed = disks.allowed_dirs(tmp_path / "state", [extra])
    assert allowed == (state, extra)
    assert disks.resolve_path("a.img", allowed) == str(state / "a.img")  # relative: STATE_DIR/disks
    assert disks.resolve_path(str(extra / "b.img"), allowed) == str(extra / "b.img")
    (extra / "link.img").symlink_to(tmp_path / "elsewhere.img")
    for outside in ("../a.img", str(tmp_path / "a.img"), str(extra), str(extra / "link.img"), "/etc/passwd"):
        with pytest.raises(disks.DiskError, match="outside the allowed directories"):
            disks.resolve_path(outside, allowed)
    with pytest.raises(disks.DiskError, match="no disk image directories"):
        disks.resolve_path("a.img", ())


def test_disk_config_round_trips_through_the_record() -> None:
    config = disks.DiskConfig("/d/a.img", GiB)
    assert disks.DiskConfig.from_record(config.to_record()) == config
    for bad in ({"path": "a.img", "size": GiB}, {"path": "/a", "size": 1000}, {"path": "/a"}):
        with pytest.raises(disks.DiskError):
            disks.DiskConfig.from_record(bad)
    assert config.info({"allocated": 4096, "reads": 1, "writes": 2, "dirty-blocks": 3, "flushes": 9}) == {
        "path": "/d/a.img", "size": GiB, "allocated": 4096, "reads": 1, "writes": 2, "dirty-blocks": 3}


def test_cli_takes_one_disk(capsys: pytest.CaptureFixture[str]) -> None:
    ns = build_parser().parse_args(["vm", "create", "n1", "--program", "idle", "--disk", "a.img,size=1G"])
    assert ns.disk == {"path": "a.img", "size": GiB}
    assert build_parser().parse_args(["run", "idle", "--disk", "/x/r.img"]).disk == {"path": "/x/r.img"}
    for argv in (["--disk", "a.img", "--disk", "b.img"], ["--disk", "a.img,size=1x"]):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(["vm", "create", "n1", "--program", "idle", *argv])
        assert e.value.code == 2 and "--disk" in capsys.readouterr().err
    info = {"name": "n1", "mem": 4 * MiB, "nics": [], "disks": [{"path": "/d/a.img", "size": GiB,
                                                                  "allocated": 65536, "reads": 1, "writes": 2,
                                                                  "dirty-blocks": 1}]}
    assert "disk:           /d/a.img size 1G allocated 64K reads 1 writes 2 dirty-blocks 1" in _vm_details(info)


def test_disk_dirs_setting(tmp_path: Path) -> None:
    key = tmp_path / "cluster.key"
    key.write_text("0123456789abcdef0123456789abcdef\n")
    cfg = load_config(["--key-file", str(key), "--disk-dirs", f"{tmp_path}/a:{tmp_path}/b"])
    assert cfg.disk_dirs == (tmp_path / "a", tmp_path / "b")
    assert f'disk-dirs = "{tmp_path}/a:{tmp_path}/b"' in describe(cfg)
    assert load_config(["--key-file", str(key)]).disk_dirs == ()
    conf = tmp_path / "agent.toml"
    conf.write_text(f'disk-dirs = ["{tmp_path}/c"]\n')
    assert load_config(["--config", str(conf), "--key-file", str(key)]).disk_dirs == (tmp_path / "c",)
    with pytest.raises(ConfigError, match="not an absolute path"):
        load_config(["--key-file", str(key), "--disk-dirs", "relative/dir"])
    conf.write_text("disk-dirs = 3\n")
    with pytest.raises(ConfigError, match="disk-dirs must be a string or an array"):
        load_config(["--config", str(conf), "--key-file", str(key)])


# -- the VM manager over real VM processes and images ----------------------------------------------------
@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A short state dir (attach socket paths must fit in 107 bytes), with its disks/ directory."""
    path = Path(tempfile.mkdtemp(prefix="ferry-disk-", dir="/tmp"))
    (path / "disks").mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


MakeVMs = Callable[..., VMManager]


@pytest.fixture
async def make_vms(state_dir: Path) -> AsyncIterator[MakeVMs]:
    made: list[VMManager] = []

    def make(name: str = "T", records: bool = False) -> VMManager:
        vms = VMManager(agent_name=name, max_mem=256 * MiB, log=Log("debug", io.StringIO(), agent=name),
                        records=VMRecords(state_dir) if records else None,
                        disk_dirs=disks.allowed_dirs(state_dir))
        made.append(vms)
        return vms

    yield make
    for vms in made:
        for vm in vms.list():
            await vms.drop(vm)
        await vms.shutdown()


@pytest.fixture
def writer(state_dir: Path) -> str:
    path = state_dir / "writer.fasm"
    path.write_text(WRITER)
    return str(path)


async def _written(vm: VM, writes: int) -> dict[str, Any]:
    for _ in range(200):
        await vm.refresh()
        info = vm.info()["disks"][0]
        if info["writes"] >= writes:
            return dict(info)
        await asyncio.sleep(0.02)
    raise AssertionError("the guest never wrote")


async def test_create_makes_a_sparse_image_and_reports_it(make_vms: MakeVMs, state_dir: Path, writer: str) -> None:
    vms = make_vms()
    vm = await vms.create("d1", writer, 4 * MiB, {"n": "2"}, disk={"path": "d1.img", "size": 64 * GiB})
    path = state_dir / "disks" / "d1.img"
    assert vm.disk == disks.DiskConfig(str(path), 64 * GiB)
    info = await _written(vm, 2)
    assert (info["path"], info["size"], info["writes"], info["dirty-blocks"]) == (str(path), 64 * GiB, 2, 2)
    assert 2 * 65536 <= info["allocated"] < 4 * MiB  # sparse: 64 GiB, a few blocks on the file system
    assert path.stat().st_size == 64 * GiB


async def test_destroy_keeps_the_image_and_a_new_vm_reuses_it(make_vms: MakeVMs, state_dir: Path,
                                                               writer: str) -> None:
    vms = make_vms()
    await vms.create("d1", writer, 4 * MiB, {"n": "1"}, disk={"path": "d.img", "size": 8 * MiB})
    await _written(vms.get("d1"), 1)
    await vms.destroy("d1")
    path = state_dir / "disks" / "d.img"
    assert path.read_bytes()[:65536] == b"\1" * 65536  # kept, with what the guest wrote
    vm = await vms.create("d2", "idle", 4 * MiB, {}, disk={"path": str(path)})  # no size: the file's
    assert vm.disk is not None and vm.disk.size == 8 * MiB


async def test_refusals_leave_nothing_behind(make_vms: MakeVMs, state_dir: Path, writer: str,
                                             tmp_path: Path) -> None:
    vms = make_vms()
    cases: list[tuple[dict[str, Any], str]] = [
        ({"path": "missing.img"}, "does not exist (give size=SIZE to create it)"),
        ({"path": str(tmp_path / "out.img"), "size": MiB}, "outside the allowed directories"),
        ({"path": "../x.img", "size": MiB}, "outside the allowed directories"),
        ({"path": "bad.img", "size": 1000}, "multiple of 512"),
        ({"path": "a.img", "size": MiB, "colour": "red"}, "unknown disk key"),
    ]
    (state_dir / "disks" / "short.img").write_bytes(bytes(4096))
    cases.append(({"path": "short.img", "size": MiB}, "is truncated: 4096 bytes, its size is 1048576"))
    (state_dir / "disks" / "ro.img").write_bytes(bytes(4096))
    os.chmod(state_dir / "disks" / "ro.img", 0o400)
    if os.geteuid() != 0:  # root reads and writes whatever the mode says
        cases.append(({"path": "ro.img"}, "not readable and writable"))
    for disk, words in cases:
        with pytest.raises(VMError, match="cannot give VM 'd1' a disk") as e:
            await vms.create("d1", writer, 4 * MiB, {"n": "1"}, disk=disk)
        assert e.value.code == "bad-request" and words in e.value.message
    assert vms.list() == [] and vms.free_memory() == vms.max_mem
    assert sorted(os.listdir(state_dir / "disks")) == ["ro.img", "short.img"] and not (tmp_path / "out.img").exists()
    # an image created for a VM whose boot then fails is removed again (RAM below the machine's minimum)
    with pytest.raises(VMError, match="below the minimum"):
        await vms.create("d1", writer, 4096, {"n": "1"}, disk={"path": "new.img", "size": MiB})
    assert not (state_dir / "disks" / "new.img").exists() and vms.list() == []


async def test_an_image_in_use_is_refused_naming_it(make_vms: MakeVMs, state_dir: Path, writer: str) -> None:
    vms = make_vms()
    await vms.create("d1", writer, 4 * MiB, {"n": "1"}, disk={"path": "d.img", "size": MiB})
    with pytest.raises(VMError, match="disk image .*/d.img is in use by VM 'd1'"):
        await vms.create("d2", "idle", 4 * MiB, {}, disk={"path": str(state_dir / "disks" / "d.img")})
    # another agent (another manager, same host): the VM process's lock refuses it
    other = make_vms("U")
    with pytest.raises(VMError, match="disk image .*/d.img is in use by another VM"):
        await other.create("d2", "idle", 4 * MiB, {}, disk={"path": "d.img"})
    assert other.list() == [] and (state_dir / "disks" / "d.img").exists()


async def test_a_restarted_agent_readopts_the_vm_with_its_disk(make_vms: MakeVMs, state_dir: Path,
                                                               writer: str) -> None:
    first = make_vms(records=True)
    vm = await first.create("d1", writer, 4 * MiB, {"n": "3"}, disk={"path": "d.img", "size": MiB})
    await _written(vm, 3)
    [rec] = VMRecords(state_dir).read_all()
    assert rec["disk"] == {"path": str(state_dir / "disks" / "d.img"), "size": MiB, "block-size": 65536}
    await first.shutdown()  # the VM process runs on, its image open and locked
    second = make_vms(records=True)
    assert await second.adopt_previous() == 1
    again = second.get("d1")
    assert again.disk == disks.DiskConfig(str(state_dir / "disks" / "d.img"), MiB)
    info = again.info()["disks"][0]
    assert info["writes"] == 3 and info["dirty-blocks"] == 3
    with pytest.raises(VMError, match="in use by another VM"):  # still locked by the adopted process
        await make_vms("U").create("d2", "idle", 4 * MiB, {}, disk={"path": "d.img"})


async def test_the_control_api_takes_a_disk_as_a_map(make_vms: MakeVMs, tmp_path: Path, writer: str) -> None:
    vms = make_vms()

    async def peer_info(address: str) -> dict[str, Any]:
        raise AssertionError("no peer is asked")

    log = Log("debug", io.StringIO(), agent="T")
    ops = ControlOps(identity=AgentIdentity("T", ("127.0.0.1", 7700), ("127.0.0.1", 7701), tmp_path), vms=vms,
                     migrations=None, peer_info=peer_info, log=log)
    with pytest.raises(OpError, match="disk must be a map"):
        await ops.handle("vm-create", {"name": "x", "program": "idle", "mem": "4M", "disk": "a.img"})
    await ops.handle("vm-create", {"name": "d1", "program": writer, "mem": "4M", "args": {"n": "1"},
                                   "disk": {"path": "d.img", "size": MiB}})
    assert vms.get("d1").disk is not None


# -- end to end: real agents, the real CLI ----------------------------------------------------------------
def test_vm_with_a_disk_end_to_end(tmp_path: Path) -> None:
    key = make_key(tmp_path)
    extra = tmp_path / "extra"
    extra.mkdir()
    with start_agent(tmp_path, "A", key, disk_dirs=str(extra)) as a, start_agent(tmp_path, "B", key) as b:
        image = a.state_dir / "disks" / "db.img"
        a.cli("vm", "create", "d1", "--program", "dbverify", "--mem", "4M", "--arg", "ws=256K", "--arg",
              "steps=20000", "--disk", "db.img,size=1M")
        assert _wait_for(lambda: a.cli("vm", "info", "d1", json=True).json["state"] == "halted")
        info = a.cli("vm", "info", "d1", json=True).json
        [disk] = info["disks"]
        assert (disk["path"], disk["size"]) == (str(image), MiB) and disk["writes"] > 100 and disk["reads"] > 100
        assert 0 < disk["allocated"] <= MiB and disk["dirty-blocks"] > 0
        assert f"disk:           {image} size 1M" in a.cli("vm", "info", "d1").stdout
        digest = a.cli("vm", "console", "d1").stdout
        # the same guest run locally on a fresh image prints the same digest
        local = a.cli("run", "dbverify", "--mem", "4M", "--arg", "ws=256K", "--arg", "steps=20000", "--disk",
                      f"{tmp_path / 'ref.img'},size=1M")
        assert local.stdout == digest and digest.startswith("digest ")
        # refusals: outside the allowed directories, in use, missing without a size; nothing left behind
        for disk_arg, words in ((f"{tmp_path / 'x.img'},size=1M", "outside the allowed directories"),
                                ("db.img", "is in use by VM 'd1'"), ("none.img", "does not exist")):
            r = a.cli("vm", "create", "d2", "--program", "idle", "--disk", disk_arg, check=False)
            assert r.returncode == 1 and "(bad-request)" in r.stderr and words in r.stderr, r.stderr
        assert not (tmp_path / "x.img").exists() and not (a.state_dir / "disks" / "none.img").exists()
        a.cli("vm", "create", "d3", "--program", "diskstress", "--mem", "4M", "--arg", "rate=100",
              "--disk", f"{extra / 'e.img'},size=4M")
        # B does not see the image (not in its allowed directories): refused before anything moves
        mig = a.cli("migrate", "d3", "--to", b.control, check=False)
        assert mig.returncode == 1 and "outside the allowed directories" in mig.stderr, mig.stderr
        assert b.cli("vm", "list", json=True).json == []
        assert a.cli("vm", "info", "d3", json=True).json["state"] == "running"
        # C shares the directory (shared storage): the VM moves, its image's lock with it, and back
        with start_agent(tmp_path, "C", key, disk_dirs=str(extra)) as c:
            out = a.cli("migrate", "d3", "--to", c.control, json=True).json
            assert out["status"] == "completed", out
            moved = c.cli("vm", "info", "d3", json=True).json
            assert moved["state"] == "running" and moved["disks"][0]["path"] == str(extra / "e.img")
            writes = moved["disks"][0]["writes"]
            assert _wait_for(lambda: c.cli("vm", "info", "d3", json=True).json["disks"][0]["writes"] > writes)
            taken = a.cli("vm", "create", "d5", "--program", "idle", "--disk", str(extra / "e.img"), check=False)
            assert taken.returncode == 1 and "in use by another VM" in taken.stderr  # C's process holds it
            back = c.cli("migrate", "d3", "--to", a.control, json=True).json
            assert back["status"] == "completed", back
            assert c.cli("vm", "list", json=True).json == []
        # a restarted agent re-adopts it with its disk; destroy keeps the image
        assert a.stop(keep_vms=True) == 0
        with start_agent(tmp_path, "A", key, disk_dirs=str(extra)) as a2:
            again = a2.cli("vm", "info", "d3", json=True).json
            assert again["state"] == "running" and again["disks"][0]["path"] == str(extra / "e.img")
            assert _wait_for(lambda: a2.cli("vm", "info", "d3", json=True).json["disks"][0]["writes"] > 5)
            for name in ("d1", "d3"):
                a2.cli("vm", "destroy", name)
            assert image.stat().st_size == MiB and (extra / "e.img").stat().st_size == 4 * MiB
            a2.cli("vm", "create", "d4", "--program", "idle", "--disk", str(extra / "e.img"))  # unlocked


def _wait_for(check: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True
