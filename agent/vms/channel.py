"""The agent's end of one VM process's control socket, and the VM's console output.

`VMChannel` is an asyncio client over vmruntime.control's codec (SEQPACKET, fds by SCM_RIGHTS):
requests and their replies matched by id, events (console output, halted, faulted) handed to a
callback. The socket is non-blocking and read by the loop's reader callback: nothing here blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable
from typing import Any

from agent.vms.errors import VMError
from proto.errors import ErrorCode
from vmruntime import control as vmctl

CONSOLE_BUFFER = 1 << 20  # console bytes kept per VM; older output is dropped, the total keeps counting
REQUEST_TIMEOUT = 30.0  # seconds for one VM-process request; a VM that does not answer is broken

Reply = tuple[dict[str, Any], list[int]]


class ConsoleBuffer:
    """A bounded ring of console output with a running byte count, so readers can resume at an offset."""

    def __init__(self, limit: int = CONSOLE_BUFFER) -> None:
        self._buf = bytearray()
        self._limit = limit
        self.total = 0  # bytes ever written; offsets handed to readers count from the VM's first byte

    def write(self, data: bytes) -> None:
        self._buf += data
        self.total += len(data)
        excess = len(self._buf) - self._limit
        if excess > 0:
            del self._buf[:excess]

    def seed(self, tail: bytes, total: int) -> None:
        """Continue from output kept elsewhere (the VM process's tail after an agent restart, or a
        migration's source): ``tail`` is the newest output, ``total`` the count it ends at, so readers'
        offsets go on from where they were."""
        self._buf = bytearray(tail[-self._limit:])
        self.total = max(total, len(self._buf))

    def read(self, offset: int) -> tuple[bytes, int, int]:
        """Bytes from `offset` on, the offset to ask for next, and how many requested bytes were dropped."""
        first = self.total - len(self._buf)
        start = max(offset, first)
        if start >= self.total:
            return b"", self.total, 0
        return bytes(self._buf[start - first :]), self.total, max(0, first - offset)


class VMChannel:
    """An asyncio client of one VM process's control socket: request/reply by id, events to a callback."""

    def __init__(self, sock: socket.socket, on_event: Callable[[dict[str, Any]], None],
                 on_close: Callable[[], None]) -> None:
        self._sock = sock
        self._on_event = on_event
        self._on_close = on_close
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._next_id = 1
        self._loop = asyncio.get_running_loop()
        self.closed = False
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._on_readable)

    async def request(self, op: str, fds: tuple[int, ...] = (), timeout_s: float = REQUEST_TIMEOUT,
                      **fields: Any) -> Reply:
        """Send one request and wait up to `timeout_s` for its reply; VMError when the process
        refuses, is gone or is silent. `fields` are the request's own fields."""
        if self.closed:
            raise VMError(ErrorCode.INTERNAL, "the VM process has exited")
        rid = self._next_id
        self._next_id += 1
        fut: asyncio.Future[Reply] = self._loop.create_future()
        self._pending[rid] = fut
        try:
            async with asyncio.timeout(timeout_s):
                await self._send({"op": op, "id": rid, **fields}, fds)
                reply, got_fds = await fut
        except TimeoutError as e:
            raise VMError(ErrorCode.TIMEOUT, f"the VM process did not answer {op!r} within {timeout_s:g} s") from e
        finally:
            self._pending.pop(rid, None)
        if not reply.get("ok", False):
            for fd in got_fds:
                os.close(fd)
            raise VMError(ErrorCode.INTERNAL, f"VM process refused {op!r}: {reply.get('error', 'no reason given')}")
        return reply, got_fds

    async def _send(self, msg: dict[str, Any], fds: tuple[int, ...]) -> None:
        # The socket is non-blocking (it shares the loop with the reader); a full buffer waits for writability.
        while True:
            try:
                vmctl.send_msg(self._sock, msg, fds)
                return
            except BlockingIOError:
                await self._writable()
            except OSError as e:
                raise VMError(ErrorCode.INTERNAL, f"the VM process control socket failed: {e}") from e

    async def _writable(self) -> None:
        fut: asyncio.Future[None] = self._loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        fileno = self._sock.fileno()
        self._loop.add_writer(fileno, ready)
        try:
            await fut
        finally:
            with contextlib.suppress(Exception):  # the channel may have closed meanwhile
                self._loop.remove_writer(fileno)

    def _on_readable(self) -> None:
        while not self.closed:
            try:
                msg, fds = vmctl.recv_msg(self._sock)
            except (BlockingIOError, InterruptedError):
                return
            except (EOFError, OSError, vmctl.ControlError):
                self.close()  # EOF (the process exited) or a broken packet: the channel is unusable
                return
            self._dispatch(msg, list(fds))

    def _dispatch(self, msg: dict[str, Any], fds: list[int]) -> None:
        if "ev" in msg:
            self._on_event(msg)
            return
        fut = self._pending.get(msg.get("id", -1))
        if fut is not None and not fut.done():
            fut.set_result((msg, fds))
        else:
            for fd in fds:
                os.close(fd)  # a reply nobody waits for any more (timed out): do not leak its fds

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(VMError(ErrorCode.INTERNAL, "the VM process has exited"))
        self._on_close()
