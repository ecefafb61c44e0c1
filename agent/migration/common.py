"""What both migration sessions share: errors, the bridge to the event loop, the handshake.

Sessions run in their own threads (the data path blocks in the kernel with
the GIL released); the VM manager lives on the agent's asyncio loop. The
``LoopBridge`` is the one way a session reaches it: run a coroutine or a
plain function on the loop and wait for the result, with a timeout. The way
back is a ``Signal``: a session thread sets it, the loop awaits it without
parking a worker thread (docs/ARCHITECTURE.md, threads and the loop).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from agent.migration.transport import Connection
from agent.vms import VMError
from proto.auth import ClientHandshake, ServerHandshake, error_response
from proto.errors import ErrorCode, ProtocolError
from proto.messages import ErrorResponse

# The VM's run state travels beside its CPU and device state in DeviceState, as QEMU's runstate
# does: a VM the operator paused before migrating stays paused on the destination. The key is the
# agent's; the destination takes it out before the state reaches the VM process.
RUN_STATE_KEY = "agent-run-state"

T = TypeVar("T")

# How long a session waits for one VM-manager call on the loop (pause, resume,
# spawning the VM process on the destination, ...).
LOOP_CALL_TIMEOUT_S = 30.0


class MigrationError(VMError):
    """A migration refused or failed; ``code`` is a stable proto ErrorCode value."""


class Cancelled(Exception):
    """The operator (or agent shutdown) cancelled the migration."""


def map_items(raw: object, flag: str, form: str) -> list[tuple[str, str]]:
    """A ``--x-map`` param's items: a map {SRC: DST} or a list of "SRC=DST" texts (``form`` names
    them in errors), none for None; ValueError when it is neither, or an item has no "="."""
    if raw is None:
        return []
    if isinstance(raw, Mapping):
        return [(str(k), str(v)) for k, v in raw.items()]
    if not isinstance(raw, list | tuple):
        raise ValueError(f"{flag} must be {form} items")
    items = []
    for text in raw:
        src, sep, dst = str(text).partition("=")
        if not sep:
            raise ValueError(f"bad --{flag} {text!r}: expected {form}")
        items.append((src.strip(), dst.strip()))
    return items


def error_code(exc: BaseException) -> str:
    """The stable error code that best describes ``exc``."""
    code = getattr(exc, "code", None)
    if isinstance(code, str):
        return code
    if isinstance(exc, Cancelled):
        return ErrorCode.CANCELLED
    if isinstance(exc, TimeoutError):
        return ErrorCode.TIMEOUT
    return ErrorCode.MIGRATION_FAILED


def describe(exc: BaseException) -> str:
    """A one-line human description of ``exc`` for error-desc and logs."""
    text = getattr(exc, "message", None) or str(exc)
    if isinstance(exc, ConnectionError | OSError) and not isinstance(exc, TimeoutError):
        return f"connection to the peer failed: {text or type(exc).__name__}"
    return text or type(exc).__name__


class LoopBridge:
    """Runs work on the agent's event loop on behalf of a session thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def call(self, coro: Awaitable[T], timeout: float = LOOP_CALL_TIMEOUT_S) -> T:
        """Await ``coro`` on the loop; blocks this thread until it is done."""
        fut = asyncio.run_coroutine_threadsafe(_as_coro(coro), self.loop)
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise

    def run(self, fn: Callable[..., T], *args: Any, timeout: float = LOOP_CALL_TIMEOUT_S) -> T:
        """Call plain ``fn(*args)`` on the loop (where the VM manager's state lives)."""
        fut = self.submit(fn, *args)
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """Start plain ``fn(*args)`` on the loop and return at once (calls from one thread run in
        the order submitted); the future has its result or exception."""

        async def wrapper() -> T:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop)


async def _as_coro(aw: Awaitable[T]) -> T:
    return await aw


class Signal:
    """A one-shot event that any thread sets and the event loop (or another thread) waits for.

    The loop's waiters are woken through ``loop.call_soon_threadsafe``
    (``asyncio.wrap_future``), so awaiting it holds no executor worker, as a
    ``threading.Event.wait`` sent to a thread would.
    """

    def __init__(self) -> None:
        self._done: concurrent.futures.Future[None] = concurrent.futures.Future()

    def set(self) -> None:
        """Set it (idempotent, from any thread)."""
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            self._done.set_result(None)

    def is_set(self) -> bool:
        return self._done.done()

    def wait(self, timeout: float | None = None) -> bool:
        """Block this thread (never the loop's) until set or ``timeout``; True when set."""
        try:
            self._done.result(timeout)
        except TimeoutError:
            return False
        return True

    async def until_set(self, seconds: float) -> bool:
        """On the loop: wait until set, for at most ``seconds``; True when set."""
        try:
            async with asyncio.timeout(seconds):
                # shield: the timeout cancels the wait, never the future a thread will set
                await asyncio.shield(asyncio.wrap_future(self._done))
        except TimeoutError:
            return False
        return True


def client_handshake(conn: Connection, key: bytes, name: str) -> str:
    """Authenticate to the destination's migration listener; returns the peer's name."""
    return timed_client_handshake(conn, key, name)[0]


def timed_client_handshake(conn: Connection, key: bytes, name: str) -> tuple[str, float]:
    """``client_handshake``, also returning the seconds its second exchange took (Auth until
    AuthOk: small messages, an HMAC at the far end): one round trip of the path as the protocol
    sees it. Not the first exchange: behind a relay it includes the relay's own connect."""
    hs = ClientHandshake(key, name, "migration")
    conn.send(hs.hello())
    reply = conn.recv()
    auth = hs.receive(reply)
    t = time.monotonic()
    if auth is not None:
        conn.send(auth)
    hs.receive(conn.recv())
    assert hs.version is not None  # set by the reply the handshake accepted
    conn.channel.speak(hs.version)
    return hs.peer_name or "?", time.monotonic() - t


def server_handshake(conn: Connection, key: bytes, name: str) -> str:
    """Authenticate an incoming migration connection; tells the peer why when it fails."""
    hs = ServerHandshake(key, name)
    try:
        conn.send(hs.receive(conn.recv()))
        conn.send(hs.receive(conn.recv()))
    except ProtocolError as e:  # a bad frame or a failed MAC: say why before closing
        tell(conn, error_response(e))
        raise
    assert hs.version is not None  # chosen on Hello
    conn.channel.speak(hs.version)
    return hs.peer_name or "?"


def tell(conn: Connection, msg: ErrorResponse) -> None:
    """Best effort: the peer may already be gone."""
    try:
        conn.send_error(msg)
    except (OSError, ProtocolError):
        pass
