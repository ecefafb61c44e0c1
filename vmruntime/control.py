"""The control channel between a VM process and its parent, and a blocking client for it.

This module owns the codec of the control socket and :class:`VMHandle`, the
blocking client used by tests, ``ferry run`` and benchmarks (the agent has
its own asyncio client over the same codec).

Wire format (see docs/CONTRACTS.md): an ``AF_UNIX`` ``SOCK_SEQPACKET``
socketpair; every packet is exactly one msgpack map; file descriptors ride
along in ``SCM_RIGHTS``. Requests carry ``"op"`` and ``"id"`` and get exactly
one reply ``{"id", "ok", "error"?, ...}``; unsolicited events carry ``"ev"``.
A zero-length packet never carries a message: reading one means the peer
closed its end.
"""

from __future__ import annotations

import array
import collections
import contextlib
import os
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from vmruntime import guestram

# Largest packet either side sends or accepts. Machine state and program
# images are a few KiB; the bound protects a reader from a runaway peer.
MAX_MSG = 1 << 20
MAX_FDS = 4
# Socket buffers must hold one MAX_MSG packet (SEQPACKET never splits one).
_SOCK_BUF = 2 * MAX_MSG

ON_EOF_CHOICES = ("exit", "stay")
# sun_path holds 108 bytes; a longer socket path is reached through /proc/self/fd/DIRFD/NAME instead.
_SUN_PATH_MAX = 100


class ControlError(Exception):
    """The control channel broke its rules: oversized, truncated or malformed packet."""


class VMError(Exception):
    """The VM process refused a request (reply ``ok: false``); the message is its error."""


class VMGone(Exception):
    """The VM process closed the control socket (it exited or was killed)."""


# --- codec -----------------------------------------------------------------


def encode(msg: Mapping[str, Any]) -> bytes:
    """Pack one control message (a map with str keys; bytes stay bytes)."""
    data: bytes = msgpack.packb(msg, use_bin_type=True)
    if len(data) > MAX_MSG:
        raise ControlError(f"message of {len(data)} bytes exceeds the {MAX_MSG}-byte limit")
    return data


def decode(data: bytes) -> dict[str, Any]:
    """Unpack one control message; anything but a map is a ControlError.

    Arrays decode as lists (msgpack has no tuples); map keys may be any scalar.
    """
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types
        raise ControlError(f"undecodable control packet: {e}") from e
    if not isinstance(msg, dict):
        raise ControlError(f"control packet is a {type(msg).__name__}, not a map")
    return msg


def send_msg(sock: socket.socket, msg: Mapping[str, Any], fds: Iterable[int] = ()) -> None:
    """Send one message as one packet, with ``fds`` attached by SCM_RIGHTS."""
    data = encode(msg)
    fd_list = list(fds)
    if fd_list:
        socket.send_fds(sock, [data], fd_list)
    else:
        sock.sendall(data)


def recv_msg(sock: socket.socket, flags: int = 0) -> tuple[dict[str, Any], list[int]]:
    """Receive one packet: the decoded message and any fds that came with it.

    Raises EOFError when the peer has closed, ControlError on a truncated or
    malformed packet (received fds are closed first, so none leak), and
    BlockingIOError with ``flags=MSG_DONTWAIT`` when nothing is waiting.
    """
    data, ancdata, msg_flags, _ = sock.recvmsg(MAX_MSG, socket.CMSG_SPACE(MAX_FDS * 4), flags)
    fds = _fds_from(ancdata)
    if not data:
        _close_all(fds)
        raise EOFError("control socket closed by peer")
    if msg_flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        _close_all(fds)
        raise ControlError("control packet truncated")
    try:
        return decode(data), fds
    except ControlError:
        _close_all(fds)
        raise


def _fds_from(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    return fds


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        os.close(fd)


def listener(path: str) -> socket.socket:
    """A listening SOCK_SEQPACKET socket at ``path``, mode 0600 (a stale file there is replaced)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        _size_buffers(sock)  # accepted sockets inherit the buffer sizes
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by a VM process that was killed: nobody listens there
        old = os.umask(0o177)  # created 0600: whoever connects controls the guest
        try:
            with reachable_path(path) as short:
                sock.bind(short)
        finally:
            os.umask(old)
        sock.listen(1)
    except BaseException:
        sock.close()
        raise
    return sock


def socketpair() -> tuple[socket.socket, socket.socket]:
    """A control socketpair (parent end, child end) with buffers sized for MAX_MSG packets."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (parent, child):
        _size_buffers(s)
    return parent, child


@contextlib.contextmanager
def reachable_path(path: str) -> Iterator[str]:
    """A form of ``path`` short enough for bind/connect of a unix socket.

    State dirs can be deep (a test's tmp dir); the kernel resolves a path
    through /proc/self/fd/N, so the directory is opened and named by its fd.
    """
    if len(os.fsencode(path)) < _SUN_PATH_MAX:
        yield path
        return
    dirfd = os.open(os.path.dirname(path) or ".", os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{dirfd}/{os.path.basename(path)}"
    finally:
        os.close(dirfd)


def _size_buffers(s: socket.socket) -> None:
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        s.setsockopt(socket.SOL_SOCKET, opt, _SOCK_BUF)


def connect(path: str, timeout: float = 5.0) -> socket.socket:
    """Connect to the attach socket of a running VM process (``op listen``); a blocking socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        _size_buffers(sock)
        sock.settimeout(timeout)
        with reachable_path(path) as short:
            sock.connect(short)
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return sock


def peer_pid(sock: socket.socket) -> int:
    """The pid of the process at the other end of a unix socket (SO_PEERCRED)."""
    cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid: int = struct.unpack("3i", cred)[0]
    return pid


def vmproc_argv(ram_fd: int, ram_size: int, ctl_fd: int, on_eof: str = "exit") -> list[str]:
    """The command line that starts a VM process over inherited fds."""
    return [
        sys.executable, "-m", "vmruntime.vmproc",
        "--ram-fd", str(ram_fd), "--ram-size", str(ram_size),
        "--ctl-fd", str(ctl_fd), "--on-eof", on_eof,
    ]  # fmt: skip


# --- blocking client -------------------------------------------------------


@dataclass(frozen=True)
class TrackInfo:
    """What ``track-start`` returns: the backend and the VM process's guest RAM mapping.

    ``uffd`` is our copy of the VM process's userfaultfd (None for "hash");
    the caller owns it and closes it when tracking ends.
    """

    backend: str
    addr: int
    length: int
    uffd: int | None


def image_fields(image: Any) -> dict[str, Any]:
    """The wire form of an Image (or a map that already has its fields)."""
    if isinstance(image, Mapping):
        return dict(image)
    return {k: getattr(image, k) for k in ("isa_version", "code", "entry", "load_addr")}


def _devices(nic: Mapping[str, str] | None, disk: Mapping[str, Any] | None) -> dict[str, Any]:
    """The device fields of a boot or restore request."""
    fields: dict[str, Any] = {}
    if nic is not None:
        fields["nic"] = dict(nic)
    if disk is not None:
        fields["disk"] = dict(disk)
    return fields


class Lane:
    """A blocking client of one lane of a VM process (op ``lane``), for one thread.

    No events arrive on a lane, only replies, so a request is one send and
    one receive. A reply to an earlier request that timed out is skipped.
    """

    def __init__(self, sock: socket.socket, timeout: float = 10.0) -> None:
        self.sock = sock
        self.timeout = timeout
        self._last_id = 0

    def request(self, op: str, *, timeout: float | None = None, **fields: Any) -> dict[str, Any]:
        """Send one request and return its reply; VMError if refused, VMGone if the process is gone,
        TimeoutError if it does not answer in time."""
        msg, fds = self.request_fds(op, timeout=timeout, **fields)
        _close_all(fds)
        return msg

    def request_fds(self, op: str, *, timeout: float | None = None,
                    **fields: Any) -> tuple[dict[str, Any], list[int]]:  # fmt: skip
        """Like :meth:`request`, also returning the fds attached to the reply (the caller's)."""
        rid = self._last_id = self._last_id + 1
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        try:
            send_msg(self.sock, {"op": op, "id": rid, **fields})
            while True:
                msg, fds = recv_msg(self.sock)
                if msg.get("id") == rid:
                    break
                _close_all(fds)
        except (EOFError, BrokenPipeError, ConnectionResetError) as e:
            raise VMGone(f"the VM process closed its lane ({op})") from e
        if not msg.get("ok"):
            _close_all(fds)
            raise VMError(f"{op}: {msg.get('error', 'failed')}")
        return msg, fds

    def close(self) -> None:
        self.sock.close()


class VMHandle:
    """A VM process and the parent's end of its control socket.

    Every call blocks until the VM process replies (or ``timeout`` seconds
    pass: TimeoutError). Events that arrive meanwhile are queued in
    ``events``; console data is also appended to ``console``.
    """

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket, ram_fd: int,
                 ram_size: int, name: str, owns_ram: bool) -> None:  # fmt: skip
        self.proc = proc
        self.sock = sock
        self.ram_fd = ram_fd
        self.ram_size = ram_size
        self.name = name
        self.events: collections.deque[dict[str, Any]] = collections.deque()
        self.console = bytearray()
        self.timeout = 10.0
        self._owns_ram = owns_ram
        self._last_id = 0  # ids of requests sent so far are 1.._last_id
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN)

    @classmethod
    def spawn(cls, ram_size: int, name: str = "vm", ram_fd: int | None = None, *,
              on_eof: str = "exit") -> VMHandle:  # fmt: skip
        """Start a VM process over guest RAM (a new memfd unless ``ram_fd`` is given).

        A given ``ram_fd`` stays the caller's: closing the handle leaves it open.
        """
        if on_eof not in ON_EOF_CHOICES:
            raise ValueError(f"on_eof must be one of {ON_EOF_CHOICES}, got {on_eof!r}")
        owns = ram_fd is None
        fd = guestram.create_memfd(ram_size, name) if ram_fd is None else ram_fd
        parent, child = socketpair()
        try:
            argv = vmproc_argv(fd, ram_size, child.fileno(), on_eof)
            proc = subprocess.Popen(argv, pass_fds=(fd, child.fileno()), stdin=subprocess.DEVNULL)
        except BaseException:
            parent.close()
            if owns:
                os.close(fd)
            raise
        finally:
            child.close()
        return cls(proc, parent, fd, ram_size, name, owns)

    @property
    def pid(self) -> int:
        return self.proc.pid

    # -- requests --

    def request(self, op: str, *, timeout: float | None = None, **fields: Any) -> dict[str, Any]:
        """Send one request and return its reply; VMError if the VM process refused it."""
        reply, fds = self.request_fds(op, timeout=timeout, **fields)
        _close_all(fds)
        return reply

    def request_fds(self, op: str, *, timeout: float | None = None,
                    **fields: Any) -> tuple[dict[str, Any], list[int]]:  # fmt: skip
        """Like :meth:`request`, also returning fds attached to the reply (the caller owns them)."""
        rid = self._last_id = self._last_id + 1
        try:
            send_msg(self.sock, {"op": op, "id": rid, **fields})
        except (BrokenPipeError, ConnectionResetError) as e:
            raise self._gone() from e
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            msg, fds = self._recv(deadline)
            if "ev" in msg or msg.get("id") != rid:
                self._absorb(msg, fds)
            elif not msg.get("ok"):
                _close_all(fds)
                raise VMError(f"{op}: {msg.get('error', 'failed')}")
            else:
                return msg, fds

    def boot(self, image: Any, args: Mapping[str, int], *, paused: bool = False,
             nic: Mapping[str, str] | None = None, disk: Mapping[str, Any] | None = None) -> None:
        """nic: {"tap", "bridge", "mac"} gives the VM a NIC on a new TAP attached to that bridge;
        disk: {"path", "size", ["block-size"]} a disk on that image (vmruntime/devices.py)."""
        self.request("boot", image=image_fields(image), args=dict(args), paused=paused, **_devices(nic, disk))

    def restore(self, state: Mapping[str, Any], *, paused: bool = False,
                nic: Mapping[str, str] | None = None, disk: Mapping[str, Any] | None = None) -> None:
        """nic, disk: as for boot; the NIC's MAC and the disk's size must be the saved state's."""
        self.request("restore", state=dict(state), paused=paused, **_devices(nic, disk))

    def pause(self) -> dict[str, Any]:
        """Stop the vCPU at an instruction boundary; return its CPU and device state."""
        state: dict[str, Any] = self.request("pause")["state"]
        return state

    def resume(self) -> None:
        self.request("resume")

    def throttle(self, percent: int) -> None:
        self.request("throttle", percent=percent)

    def status(self) -> dict[str, Any]:
        return self.request("status")

    def track_start(self, backend: str) -> TrackInfo:
        reply, fds = self.request_fds("track-start", backend=backend)
        uffd = fds[0] if fds else None
        _close_all(fds[1:])
        return TrackInfo(reply["backend"], reply["addr"], reply["length"], uffd)

    def track_stop(self) -> None:
        self.request("track-stop")

    def stop(self, timeout: float | None = None) -> int:
        """Ask the VM process to exit; return its exit status."""
        wait = self.timeout if timeout is None else timeout
        try:
            self.request("stop", timeout=wait)
        except VMGone:
            pass  # it exited before replying: already what we asked for
        return self.proc.wait(wait)

    # -- events --

    def poll_events(self, timeout: float = 0.0) -> list[dict[str, Any]]:
        """Return and clear the queued events, first waiting up to ``timeout`` s if none are queued.

        Whatever else has already arrived is read too, without waiting.
        """
        got = self._read_one(0.0 if self.events else timeout)
        while got is not None:
            self._absorb(*got)
            got = self._read_one(0.0)
        events = list(self.events)
        self.events.clear()
        return events

    def wait_event(self, kinds: Iterable[str], timeout: float | None = None) -> dict[str, Any]:
        """Wait for the first event of one of ``kinds`` (others stay queued); TimeoutError if none."""
        wanted = set(kinds)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            for ev in self.events:
                if ev["ev"] in wanted:
                    self.events.remove(ev)
                    return ev
            self._absorb(*self._recv(deadline))

    def take_console(self) -> bytes:
        """Console output received so far and not yet taken."""
        data = bytes(self.console)
        self.console.clear()
        return data

    # -- plumbing --

    def _absorb(self, msg: dict[str, Any], fds: list[int]) -> None:
        """Take in a packet that answers no waiting request: queue an event, drop a late reply."""
        _close_all(fds)
        if "ev" in msg:
            if msg["ev"] == "console":
                self.console += msg["data"]
            self.events.append(msg)
            return
        rid = msg.get("id")
        if isinstance(rid, int) and rid <= self._last_id:
            return  # the reply to a request that timed out: nobody waits for it any more
        raise ControlError(f"reply for request id {rid!r}, which was never sent")

    def _read_one(self, timeout: float) -> tuple[dict[str, Any], list[int]] | None:
        """One packet if one arrives within ``timeout`` seconds, else None."""
        # poll, not select: a test or tool may hold more than FD_SETSIZE fds.
        if not self._poller.poll(max(timeout, 0.0) * 1000):
            return None
        try:
            return recv_msg(self.sock)
        except EOFError as e:
            raise self._gone() from e

    def _gone(self) -> VMGone:
        return VMGone(f"VM {self.name} (pid {self.pid}) closed its control socket")

    def _recv(self, deadline: float) -> tuple[dict[str, Any], list[int]]:
        got = self._read_one(deadline - time.monotonic())
        if got is None:
            raise TimeoutError(f"VM {self.name} (pid {self.pid}) did not answer in time")
        return got

    def close(self) -> None:
        """Kill the VM process if still running and release the socket (and memfd, if ours)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.sock.close()
        if self._owns_ram and self.ram_fd >= 0:
            os.close(self.ram_fd)
            self.ram_fd = -1

    def __enter__(self) -> VMHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
