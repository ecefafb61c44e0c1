"""A VM process with a disk on a real image file: boot, status, disk-dirty, the lock, restore, `ferry run --disk`."""

from __future__ import annotations

import io
import os
import re
import socket
import time
from pathlib import Path

import pytest

from tests.conftest import SpawnVM
from vmruntime import control as vmctl
from vmruntime import runlocal
from vmruntime.asm import assemble
from vmruntime.control import VMError
from vmruntime.diskimage import ImageFile, prepare_image

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20

# Writes blocks 0..n-1 (r1 = n) of 64 KiB, at a stride of 2 blocks, block i full of byte i+1; flushes;
# prints "done"; then idles (a WAIT loop) so the process stays up with its image open.
WRITER = """
BLOCK = 65536
start:
    movi r2, 0                  ; i
    li r3, DATA_ADDR
    dskw r3, DISK_ADDR
    movi r4, BLOCK / DISK_SECTOR_SIZE
    dskw r4, DISK_COUNT
next:
    cmp r2, r1
    beq flush
    addi r5, r2, 1
    li r6, BLOCK
    fill r3, r6, r5
    muli r7, r2, 2 * BLOCK / DISK_SECTOR_SIZE
    dskw r7, DISK_SECTOR
    movi r8, DISK_WRITE
    dskw r8, DISK_CMD
    addi r2, r2, 1
    jmp next
flush:
    movi r8, DISK_FLUSH
    dskw r8, DISK_CMD
    li r9, msg
    movi r10, 5
    outs r9, r10
idle:
    clock r11
    li r12, 10000000
    add r11, r11, r12
    wait r11
    jmp idle
msg: .ascii "done\\n"
"""


def image(tmp_path: Path, size: int = 4 * MiB, name: str = "d.img") -> dict[str, object]:
    path = str(tmp_path / name)
    prepare_image(path, size)
    return {"path": path, "size": size}


def boot_writer(spawn_vm: SpawnVM, disk: dict[str, object], n: int = 3):  # type: ignore[no-untyped-def]
    vm = spawn_vm(4 * MiB)
    vm.boot(assemble(WRITER), {"n": n}, disk=disk)
    vm.wait_event(["console"], timeout=10)
    return vm


def test_guest_writes_reach_the_image_and_the_status(spawn_vm: SpawnVM, tmp_path: Path) -> None:
    disk = image(tmp_path)
    vm = boot_writer(spawn_vm, disk)
    st = vm.status()["disk"]
    assert (st["path"], st["size"], st["writes"], st["reads"], st["flushes"]) == (disk["path"], 4 * MiB, 3, 0, 1)
    assert st["dirty-blocks"] == 3 and st["block-size"] == 65536 and st["allocated"] >= 3 * 65536
    data = Path(str(disk["path"])).read_bytes()
    for i in range(3):
        assert data[2 * i * 65536:(2 * i + 1) * 65536] == bytes([i + 1]) * 65536
        assert data[(2 * i + 1) * 65536:(2 * i + 2) * 65536] == bytes(65536)


def test_disk_dirty_harvests_and_resets(spawn_vm: SpawnVM, tmp_path: Path) -> None:
    vm = boot_writer(spawn_vm, image(tmp_path), n=5)
    reply = vm.request("disk-dirty", **{"max-ranges": 2})
    assert reply["block-size"] == 65536 and reply["more"] is True
    assert reply["ranges"] == [[0, 65536], [2 * 65536, 65536]]
    reply = vm.request("disk-dirty")
    assert reply["ranges"] == [[4 * 65536, 65536], [6 * 65536, 65536], [8 * 65536, 65536]]
    assert reply["more"] is False
    assert vm.request("disk-dirty")["ranges"] == [] and vm.status()["disk"]["dirty-blocks"] == 0
    with pytest.raises(VMError, match="max-ranges"):
        vm.request("disk-dirty", **{"max-ranges": 0})


def test_disk_dirty_clear_and_without_a_disk(spawn_vm: SpawnVM, tmp_path: Path) -> None:
    vm = boot_writer(spawn_vm, image(tmp_path))
    assert vm.request("disk-dirty", clear=True)["ranges"] == []
    assert vm.status()["disk"]["dirty-blocks"] == 0
    plain = spawn_vm(4 * MiB)
    plain.boot(assemble("start: jmp start"), {})
    with pytest.raises(VMError, match="no disk"):
        plain.request("disk-dirty")
    assert "disk" not in plain.status()


def test_a_second_vm_on_the_image_is_refused_until_the_first_is_gone(spawn_vm: SpawnVM, tmp_path: Path) -> None:
    disk = image(tmp_path)
    first = boot_writer(spawn_vm, disk)
    second = spawn_vm(4 * MiB)
    with pytest.raises(VMError, match=f"disk image {disk['path']} is in use by another VM"):
        second.boot(assemble(WRITER), {"n": 1}, disk=disk)
    assert second.status()["status"] == "created"  # no machine without its disk
    first.stop()
    second.boot(assemble(WRITER), {"n": 1}, disk=disk)  # the lock went with the process
    second.wait_event(["console"], timeout=10)
    assert Path(str(disk["path"])).exists()


def test_refused_images(spawn_vm: SpawnVM, tmp_path: Path) -> None:
    vm = spawn_vm(4 * MiB)
    disk = image(tmp_path)
    for bad, words in (({"path": str(tmp_path / "none.img"), "size": 4 * MiB}, "No such file"),
                       ({**disk, "size": 8 * MiB}, "truncated"),
                       ({**disk, "path": "rel.img"}, "absolute path"),
                       ({**disk, "block-size": 1000}, "power of two")):
        with pytest.raises(VMError, match=words):
            vm.boot(assemble(WRITER), {"n": 1}, disk=bad)
    with pytest.raises(VMError, match="must be a map"):
        vm.request("boot", image=vmctl.image_fields(assemble(WRITER)), args={"n": 1}, disk="x")
    assert vm.status()["status"] == "created"
    held = ImageFile.open(str(disk["path"]), 4 * MiB)  # the lock is the file's, not only ferry's processes'
    try:
        with pytest.raises(VMError, match="in use by another VM"):
            vm.boot(assemble(WRITER), {"n": 1}, disk=disk)
    finally:
        held.close()


def test_a_pause_can_release_the_image_and_the_vm_takes_it_back_before_it_runs(spawn_vm: SpawnVM,
                                                                               tmp_path: Path) -> None:
    disk = image(tmp_path)
    vm = boot_writer(spawn_vm, disk)
    vm.request("pause", **{"release-disk": True})  # a VM leaving on shared storage
    assert vm.status()["disk"]["released"] is True
    other = ImageFile.open(str(disk["path"]), 4 * MiB)  # the destination's VM process could lock it now
    try:
        with pytest.raises(VMError, match="in use by another VM"):  # no resume on an image it does not own
            vm.resume()
        with pytest.raises(VMError, match="in use by another VM"):
            vm.request("disk-reopen")
        assert vm.status()["paused"] is True
    finally:
        other.close()
    vm.request("disk-reopen")  # the migration did not happen: taken back, still paused
    st = vm.status()
    assert st["paused"] is True and st["disk"]["released"] is False
    with pytest.raises(Exception, match="in use by another VM"):
        ImageFile.open(str(disk["path"]), 4 * MiB)
    vm.resume()
    reply = vm.request("disk-dirty", clear=True)  # the device writes through the image taken back
    assert reply["ranges"] == [] and vm.status()["disk"]["writes"] == 3
    vm.request("pause", **{"release-disk": True})
    vm.resume()  # resume takes it back by itself
    assert vm.status()["disk"]["released"] is False


def test_restore_continues_on_the_same_image(spawn_vm: SpawnVM, tmp_path: Path) -> None:
    disk = image(tmp_path)
    vm = boot_writer(spawn_vm, disk)
    state = vm.pause()
    assert state["devices"]["disk"]["writes"] == 3
    ram = os.pread(vm.ram_fd, 4 * MiB, 0)
    vm.stop()
    other = spawn_vm(4 * MiB)
    os.pwrite(other.ram_fd, ram, 0)
    with pytest.raises(VMError, match="no image was given"):
        other.restore(state)
    other.restore(state, disk=disk)
    st = other.status()
    assert st["status"] == "running" and st["disk"]["writes"] == 3 and st["disk"]["dirty-blocks"] == 0


def test_run_local_with_a_disk(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "w.fasm"
    src.write_text(WRITER.replace("jmp idle\n", "halt\n", 1).replace("    wait r11\n", ""))
    path = tmp_path / "run.img"
    assert runlocal.run_local(str(src), MiB, {"n": "2"}, io.BytesIO(), disk=(str(path), None)) == 2
    assert "does not exist" in capsys.readouterr().err and not path.exists()
    out = io.BytesIO()
    assert runlocal.run_local(str(src), MiB, {"n": "2"}, out, disk=(str(path), MiB)) == 0
    assert out.getvalue() == b"done\n"
    assert path.stat().st_size == MiB and path.read_bytes()[2 * 65536:3 * 65536] == b"\2" * 65536  # kept
    assert runlocal.run_local(str(src), MiB, {"n": "1"}, io.BytesIO(), disk=(str(path), None)) == 0  # reused
    # an image created for a guest that cannot boot is removed again
    new = tmp_path / "new.img"
    assert runlocal.run_local(str(src), 4096, {"n": "1"}, io.BytesIO(), disk=(str(new), MiB)) == 2
    assert not new.exists() and re.search("minimum", capsys.readouterr().err)


# Writes 64 KiB blocks 0..r1-1 round and round, forever (r2 counts the writes).
LOOPER = """
BLOCK = 65536
start:
    li r3, DATA_ADDR
    dskw r3, DISK_ADDR
    movi r4, BLOCK / DISK_SECTOR_SIZE
    dskw r4, DISK_COUNT
    movi r5, 0                  ; the block
again:
    muli r7, r5, BLOCK / DISK_SECTOR_SIZE
    dskw r7, DISK_SECTOR
    movi r8, DISK_WRITE
    dskw r8, DISK_CMD
    addi r2, r2, 1
    addi r5, r5, 1
    cmp r5, r1
    bne again
    movi r5, 0
    jmp again
"""


def _moving(vm, seconds: float = 0.3) -> bool:  # type: ignore[no-untyped-def]
    first = vm.status()["instructions"]
    time.sleep(seconds)
    return bool(vm.status()["instructions"] > first)


def test_a_dirty_cap_stops_the_vcpu_until_a_harvest_and_goes_with_its_lane(spawn_vm: SpawnVM,
                                                                          tmp_path: Path) -> None:
    """Write-blocking's cap (agent/migration/storage_copy.py): with the cap's worth of blocks dirty
    the vCPU waits; a harvest lets it run until the cap is reached again; the lane's end lifts it."""
    vm = spawn_vm(4 * MiB)
    vm.boot(assemble(LOOPER), {"n": 48}, disk=image(tmp_path))
    assert _moving(vm)
    _, fds = vm.request_fds("lane")
    lane = vmctl.Lane(socket.socket(fileno=fds[0]))
    assert lane.request("disk-dirty-cap", blocks=4)["blocks"] == 4
    wait = time.monotonic() + 5
    while vm.status()["disk"]["dirty-blocks"] < 4:
        assert time.monotonic() < wait, "the guest did not write up to the cap"
        time.sleep(0.02)
    assert not _moving(vm)  # held: the cap's worth of blocks is dirty
    assert vm.request("disk-dirty")["ranges"]  # a harvest takes them: the guest runs to the cap again
    wait = time.monotonic() + 5
    while vm.status()["disk"]["dirty-blocks"] < 4:
        assert time.monotonic() < wait, "the guest did not run after the harvest"
        time.sleep(0.02)
    assert not _moving(vm)
    with pytest.raises(VMError, match="non-negative"):
        lane.request("disk-dirty-cap", blocks=-1)
    lane.close()  # the copy's session ended: no cap outlives it
    wait = time.monotonic() + 5
    while not _moving(vm, 0.1):
        assert time.monotonic() < wait, "the cap outlived its lane"
