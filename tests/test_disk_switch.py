"""The VM process's `disk-switch` request (vmruntime/devices.py): the disk device moves to a copy of
its image while the vCPU is paused; a refusal changes nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import SpawnVM
from tests.test_vmproc_disk import MiB, boot_writer, image
from vmruntime.control import VMError
from vmruntime.diskimage import ImageError, ImageFile

pytestmark = pytest.mark.timeout(60)


def test_switch_moves_the_device_to_the_copy_and_unlocks_the_old_image(spawn_vm: SpawnVM, tmp_path: Path) -> None:
    disk = image(tmp_path)
    vm = boot_writer(spawn_vm, disk, n=2)
    vm.pause()
    new = str(tmp_path / "new.img")
    shutil.copyfile(str(disk["path"]), new)
    assert vm.request("disk-switch", path=new)["path"] == new
    st = vm.status()["disk"]
    assert st["path"] == new and st["writes"] == 2  # the device's counters go on
    ImageFile.open(str(disk["path"]), 4 * MiB).close()  # the old image is free
    with pytest.raises(ImageError, match="in use by another VM"):
        ImageFile.open(new, 4 * MiB)
    vm.resume()
    vm.request("disk-dirty", clear=True)
    assert vm.status()["status"] == "running"


def test_the_guest_writes_the_new_image_after_the_switch(spawn_vm: SpawnVM, tmp_path: Path) -> None:
    disk = image(tmp_path)
    vm = boot_writer(spawn_vm, disk, n=1)
    vm.pause()
    new = tmp_path / "new.img"
    shutil.copyfile(str(disk["path"]), new)
    vm.request("disk-switch", path=str(new))
    vm.stop()
    # a second writer (n=3) on the new image: its blocks land there, not in the old one
    again = boot_writer(spawn_vm, {"path": str(new), "size": 4 * MiB}, n=3)
    again.stop()
    assert new.read_bytes()[4 * 65536:5 * 65536] == b"\3" * 65536
    assert Path(str(disk["path"])).read_bytes()[4 * 65536:5 * 65536] == bytes(65536)


def test_switch_is_refused_while_running_and_keeps_the_old_image_on_failure(spawn_vm: SpawnVM,
                                                                             tmp_path: Path) -> None:
    disk = image(tmp_path)
    vm = boot_writer(spawn_vm, disk)
    new = str(tmp_path / "new.img")
    shutil.copyfile(str(disk["path"]), new)
    with pytest.raises(VMError, match="paused"):
        vm.request("disk-switch", path=new)
    vm.pause()
    held = ImageFile.open(new, 4 * MiB)  # another VM holds the copy: no switch
    try:
        with pytest.raises(VMError, match="in use by another VM"):
            vm.request("disk-switch", path=new)
    finally:
        held.close()
    for bad, words in ((str(tmp_path / "missing.img"), "No such file"), ("rel.img", "absolute"),
                       (str(disk["path"]), "already on")):
        with pytest.raises(VMError, match=words):
            vm.request("disk-switch", path=bad)
    short = tmp_path / "short.img"
    short.write_bytes(bytes(MiB))
    with pytest.raises(VMError, match="truncated"):
        vm.request("disk-switch", path=str(short))
    assert vm.status()["disk"]["path"] == disk["path"]
    with pytest.raises(ImageError, match="in use by another VM"):  # still held by the VM
        ImageFile.open(str(disk["path"]), 4 * MiB)
    vm.request("pause", **{"release-disk": True})
    with pytest.raises(VMError, match="released"):
        vm.request("disk-switch", path=new)
    vm.resume()


def test_switch_without_a_disk_is_refused(spawn_vm: SpawnVM) -> None:
    from vmruntime.asm import assemble

    vm = spawn_vm(4 * MiB)
    vm.boot(assemble("start: jmp start"), {})
    vm.pause()
    with pytest.raises(VMError, match="no disk"):
        vm.request("disk-switch", path="/tmp/x.img")
