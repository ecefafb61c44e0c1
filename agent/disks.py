"""A VM's disk as the agent sees it: the `--disk` text, where images may live, its record and its info.

Pure functions and one value type, `DiskConfig`, plus `prepare` (blocking, for a worker thread) which
creates or checks the image before the VM process opens it (vmruntime/diskimage.py). One disk per VM.

- The `--disk` text is `PATH[,size=SIZE]` (`parse_disk_text`); the control API's `disk` argument is
  `{path, [size]}` (`disk_request`). SIZE takes K, M, G, T suffixes and must be whole 512-byte sectors.
- Images live in allowed directories: the agent's `STATE_DIR/disks/` always, plus its `disk-dirs`
  setting (agent/config.py). A relative PATH is taken in `STATE_DIR/disks/`; a path that resolves
  (symbolic links followed) outside every allowed directory is refused.
- A missing image is created sparse at SIZE (refused without one); an existing one is used as it is
  (SIZE, when given, must not exceed it); `prepare` says whether it created the file, and the
  manager removes an image it created for a VM whose creation then failed.
- The VM process holds an exclusive lock on the image while it runs, so a second VM (of this agent
  or another on a shared file system) is refused; among this agent's VMs `clash` refuses earlier,
  naming the VM that uses the image.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmruntime.disk import DEFAULT_BLOCK_SIZE
from vmruntime.diskimage import ImageError, check_size, prepare_image

DISK_KEYS = ("size",)
DISKS_SUBDIR = "disks"


class DiskError(ValueError):
    """A disk setting or image that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class DiskConfig:
    """One VM's disk: its image (an absolute, resolved path), its size, its dirty block size."""

    path: str
    size: int
    block_size: int = DEFAULT_BLOCK_SIZE

    def boot_field(self) -> dict[str, Any]:
        """The `disk` field of the VM process's boot (or restore) request."""
        return {"path": self.path, "size": self.size, "block-size": self.block_size}

    def to_record(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "block-size": self.block_size}

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> DiskConfig:
        """The disk of a VM record (agent/records.py); DiskError if the record's disk is unusable."""
        path, size, block = rec.get("path"), rec.get("size"), rec.get("block-size", DEFAULT_BLOCK_SIZE)
        if not (isinstance(path, str) and os.path.isabs(path) and isinstance(block, int)):
            raise DiskError(f"record's disk {dict(rec)!r} is malformed")
        try:
            return cls(path=path, size=check_size(size), block_size=block)  # type: ignore[arg-type]
        except ImageError as e:
            raise DiskError(str(e)) from e

    def info(self, status: Mapping[str, Any] | None) -> dict[str, Any]:
        """The VM's `disks` entry: the config and the counters of the VM process's last status."""
        status = status or {}
        return {"path": self.path, "size": self.size, "allocated": int(status.get("allocated", 0)),
                "reads": int(status.get("reads", 0)), "writes": int(status.get("writes", 0)),
                "dirty-blocks": int(status.get("dirty-blocks", 0))}


def parse_disk_text(text: str) -> dict[str, Any]:
    """`PATH[,size=SIZE]` -> the control API's `disk` map (path as given, size in bytes)."""
    path, *items = text.split(",")
    if not path.strip():
        raise DiskError(f"bad --disk {text!r}: expected PATH[,size=SIZE]")
    fields: dict[str, Any] = {"path": path.strip()}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in DISK_KEYS:
            raise DiskError(f"bad --disk {text!r}: expected PATH[,size=SIZE] (keys: {', '.join(DISK_KEYS)})")
        if key in fields:
            raise DiskError(f"bad --disk {text!r}: {key} given twice")
        try:
            fields[key] = _parse_size(value.strip())
        except ValueError as e:
            raise DiskError(f"bad --disk {text!r}: {e}") from e
    return disk_request(fields)


def disk_request(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Check the control API's `disk` map ({path, [size]}, size in bytes or size text); returns it
    normalised (size in bytes)."""
    unknown = sorted(set(fields) - {"path", *DISK_KEYS})
    if unknown:
        raise DiskError(f"unknown disk key(s) {', '.join(map(repr, unknown))} (keys: path, size)")
    path = fields.get("path")
    if not isinstance(path, str) or not path or "\0" in path:
        raise DiskError("a disk needs path=PATH (its image file)")
    out: dict[str, Any] = {"path": path}
    size = fields.get("size")
    if size is not None:
        try:
            out["size"] = check_size(_parse_size(size) if isinstance(size, str) else size)
        except (ImageError, ValueError) as e:
            raise DiskError(str(e)) from e
    return out


def _parse_size(text: str) -> int:
    from agent.config import parse_size  # agent.config is heavier than this module needs otherwise

    return parse_size(text)


def allowed_dirs(state_dir: Path, disk_dirs: Sequence[Path] = ()) -> tuple[Path, ...]:
    """Where this agent's images may live: STATE_DIR/disks first (where relative paths go), then disk-dirs."""
    return (state_dir / DISKS_SUBDIR, *disk_dirs)


def resolve_path(path: str, allowed: Sequence[Path]) -> str:
    """The image's absolute path, symbolic links resolved; DiskError outside every allowed directory."""
    if not allowed:
        raise DiskError("this agent allows no disk image directories")
    given = Path(path) if os.path.isabs(path) else allowed[0] / path
    real = os.path.realpath(given)
    for root in allowed:
        base = os.path.realpath(root)
        if real != base and os.path.commonpath([real, base]) == base:
            return real
    where = ", ".join(str(d) for d in allowed)
    raise DiskError(f"disk image {path} is outside the allowed directories ({where}; agent setting disk-dirs)")


def clash(path: str, others: Mapping[str, DiskConfig]) -> str | None:
    """Why image ``path`` cannot be used next to the disks of ``others`` (VM name -> disk), or None."""
    for name, other in sorted(others.items()):
        if other.path == path:
            return f"disk image {path} is in use by VM {name!r}"
    return None


def prepare(request: Mapping[str, Any], allowed: Sequence[Path],
            in_use: Mapping[str, DiskConfig]) -> tuple[DiskConfig, bool]:
    """(the disk of a new VM, whether its image was created now): the path resolved and allowed,
    not another VM's, the image created or checked. Blocking (file system): for a worker thread."""
    fields = disk_request(request)
    path = resolve_path(fields["path"], allowed)
    reason = clash(path, in_use)
    if reason is not None:
        raise DiskError(reason)
    try:
        size, created = prepare_image(path, fields.get("size"))
    except ImageError as e:
        raise DiskError(str(e)) from e
    return DiskConfig(path=path, size=size), created
