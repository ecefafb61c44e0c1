"""MigrationManager: migrations in and out of this agent, as the daemon and control API see them.

This module owns the migration listener (a dedicated socket, accepting many
connections at once), the session threads, and the MigrationInfo of every
VM's current or last migration. Each outgoing migration is a
``SourceSession`` and each accepted connection a ``DestinationSession``,
each in its own thread; they reach the VM manager on the event loop through
a ``LoopBridge``. Several migrations run at once (A to B while B to A).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.code_cache import CodeCache
from agent.migration import postcopy_adopt, postcopy_recover, tls
from agent.migration.common import LoopBridge, MigrationError, Signal, client_handshake
from agent.migration.destination import DestinationSession
from agent.migration.in_doubt import IN_DOUBT_TIMEOUT_S, AdoptedInDoubt, InDoubtAsker, owner_terms
from agent.migration.info import FINAL_STATUSES, MigrationInfo, MigrationParams, Status
from agent.migration.outcomes import Outcomes
from agent.migration.ownership import TWO_AGENTS, Ownership, resolve_refusal
from agent.migration.progress import ProgressWatch
from agent.migration.seams import LogLike, ManagedVM, VMHost
from agent.migration.slots import MAX_OUTGOING, Slots
from agent.migration.source import SourceSession
from agent.migration.transport import STALL_TIMEOUT_S, Connection, accepted
from agent.tls import TLSSource
from proto.errors import ErrorCode

# How long migrate() waits for the destination's accept or refusal before
# returning (the CLI gets a clear refusal as an error, not a failed status).
SETUP_WAIT_S = 15.0
# How long cancel() waits for the session to put the VM back.
CANCEL_WAIT_S = 30.0
# How long the operator's migrate-resolve waits for the destination's in-doubt answer: an honest
# destination answers within a few round trips; past this it counts as unreachable.
RESOLVE_ASK_S = 10.0
LISTEN_BACKLOG = 64
# Most peers at once that have not finished the handshake. Past it, each new connection drops
# the oldest unauthenticated one: an honest source authenticates within milliseconds, so a burst
# of idle connections ends up dropping itself while real migrations still get in.
MAX_UNAUTHENTICATED = 32


@dataclass
class _Outgoing:
    """An outgoing migration's session, and the loop future its end resolves."""

    session: SourceSession
    over: asyncio.Future[None]


class MigrationManager:
    """Outgoing and incoming migrations of one agent (docs/CONTRACTS.md).

    The dicts below are the loop's: session threads change them only through
    callbacks they schedule on the loop (``_on_loop``), and the loop awaits
    the threads through ``Signal``s and futures, never parking an executor
    worker on them.
    """

    def __init__(self, *, agent_name: str, key: bytes, vms: VMHost[Any, Any], log: LogLike,
                 in_doubt_timeout: float = IN_DOUBT_TIMEOUT_S, tls: TLSSource | None = None,
                 stall_timeout: float = STALL_TIMEOUT_S, max_outgoing: int = MAX_OUTGOING,
                 postcopy_after: str = "never", ownership: Ownership = TWO_AGENTS, streams: int = 1) -> None:
        self.agent_name = agent_name
        self.ownership = ownership  # who settles a VM's owner at COMMIT: the peer, or etcd in cluster mode
        self.tls = tls  # agent.tls.TLSDir: mutual TLS on the listener and outgoing connections, read at each one
        self.key = key
        self.vms = vms
        self.log = log
        self.in_doubt_timeout = in_doubt_timeout
        self.stall_timeout = stall_timeout  # each migration wait's progress deadline, in and out (transport.py)
        self.postcopy_after = postcopy_after  # a migration's postcopy-after when its params leave it out
        self.streams = streams  # a migration's streams when its params leave it out
        self.address: tuple[str, int] | None = None  # the listener's bound address, once serving
        self._lsock: socket.socket | None = None  # bound by bind(), not yet accepting
        self._infos: dict[str, MigrationInfo] = {}  # vm name -> current or last migration, in or out
        self._outgoing: dict[str, _Outgoing] = {}
        self._slots = Slots(max_outgoing)  # outgoing sessions past the limit wait their turn in their threads
        self._outcomes: Outcomes[DestinationSession] = Outcomes()
        self._threads: set[Signal] = set()  # one per session thread still running: set when it ends
        self._serve_task: asyncio.Task[Any] | None = None
        self._accepting = True
        # Called with each MigrationInfo once its session ended (in the session's thread): metrics.
        self.on_finished: Callable[[MigrationInfo], None] | None = None
        self._pending: dict[int, DestinationSession] = {}  # not yet authenticated, oldest first
        # vm name -> migration that ended in doubt (here, or in a previous run of the agent)
        self._in_doubt: dict[str, SourceSession | AdoptedInDoubt] = {}
        self._pending_lock = threading.Lock()
        self.code_cache = CodeCache()  # guest blocks translated here, for later incoming VMs

    # -- the listener ----------------------------------------------------------------------------------
    def bind(self, host: str, port: int) -> tuple[str, int]:
        """Bind the migration listener on (host, port) and return its address; a bind error is
        raised here, so the agent can report it before it says it started."""
        lsock = socket.create_server((host, port), backlog=LISTEN_BACKLOG, reuse_port=False)
        lsock.setblocking(False)
        self._lsock = lsock
        self.address = lsock.getsockname()[:2]
        self.log.info("migration listener ready", address=f"{self.address[0]}:{self.address[1]}")
        return self.address

    async def serve(self, host: str | None = None, port: int | None = None) -> None:
        """Accept migrations until cancelled or shut down, on the listener bind() made (or bind
        (host, port) first)."""
        if self._lsock is None:
            if host is None or port is None:
                raise ValueError("serve() needs host and port unless bind() was called")
            self.bind(host, port)
        lsock, self._lsock = self._lsock, None
        assert lsock is not None
        loop = asyncio.get_running_loop()
        self._serve_task = asyncio.current_task()
        bridge = LoopBridge(loop)
        try:
            while self._accepting:
                conn, peer = await loop.sock_accept(lsock)
                self._accept(conn, bridge)
        finally:
            self._serve_task = None
            lsock.close()

    def _accept(self, sock: socket.socket, bridge: LoopBridge) -> None:
        if not self._accepting:
            sock.close()
            return
        session = DestinationSession(conn=self._incoming_connection(sock), vms=self.vms, key=self.key,
                                     agent_name=self.agent_name, bridge=bridge, outcomes=self._outcomes,
                                     infos=self._infos, log=self.log, code_cache=self.code_cache,
                                     ownership=self.ownership)
        key = id(session)
        session.on_authenticated(lambda: self._authenticated(key))
        with self._pending_lock:
            self._pending[key] = session
            oldest = next(iter(self._pending.values())) if len(self._pending) > MAX_UNAUTHENTICATED else None
            if oldest is not None:
                oldest.conn.shutdown()  # under the lock: it cannot be leaving the list meanwhile
        if oldest is not None:
            self.log.warning("too many unauthenticated migration connections; dropped the oldest",
                             limit=MAX_UNAUTHENTICATED)
        self._start_thread(lambda: self._run_incoming(session), "ferry-migration-in")

    def _incoming_connection(self, sock: socket.socket) -> Connection:
        sock = accepted(sock, self.stall_timeout)  # its receive buffer sized for the path
        if self.tls is None:
            return Connection(sock)
        return tls.server_connection(sock, self.tls.server, self.stall_timeout)

    def _run_incoming(self, session: DestinationSession) -> None:
        try:
            session.run()
        finally:
            if session.info is not None:  # None: a refusal or an in-doubt query, no migration ran here
                self._finished(session.info)

    def _finished(self, info: MigrationInfo) -> None:
        if self.on_finished is not None:
            try:
                self.on_finished(info)
            except Exception as e:  # an observer's bug must not touch a migration's outcome
                self.log.error("on_finished hook failed", vm=info.vm, error=repr(e))

    def _authenticated(self, key: int) -> None:
        with self._pending_lock:
            self._pending.pop(key, None)

    def _start_thread(self, target: Callable[[], None], name: str) -> None:
        """Run ``target`` in a new session thread (called on the loop); shutdown waits for it."""
        loop = asyncio.get_running_loop()
        ended = Signal()
        self._threads.add(ended)

        def run() -> None:
            try:
                target()
            finally:
                ended.set()
                _on_loop(loop, self._threads.discard, ended)

        threading.Thread(target=run, name=name, daemon=True).start()

    # -- outgoing --------------------------------------------------------------------------------------
    async def migrate(self, vm_name: str, dest_migration: tuple[str, int], params: MigrationParams,
                      in_doubt_timeout: float | None = None) -> dict[str, Any]:
        """Start migrating ``vm_name``; returns once the destination accepted (or raises its refusal).

        ``in_doubt_timeout`` overrides the agent's for this migration (how long the source keeps
        asking a silent destination after COMMIT before it leaves the VM paused for the operator).
        """
        vm = self.vms.get(vm_name)
        self._check_can_start(vm_name, vm)
        if params.postcopy_after is None:
            params = dataclasses.replace(params, postcopy_after=self.postcopy_after)
        if params.streams is None:
            params = dataclasses.replace(params, streams=self.streams)
        stale = self._in_doubt.pop(vm_name, None)  # resolved meanwhile by hand (vm resume): not in doubt any more
        if isinstance(stale, AdoptedInDoubt):
            stale.stop()
        info = MigrationInfo(vm=vm_name, direction="out", peer=f"{dest_migration[0]}:{dest_migration[1]}",
                             params=params, dirty_tracker=vm.dirty_backend, mem=vm.mem)
        session = SourceSession(vm=vm, vms=self.vms, dest=dest_migration, params=params, key=self.key,
                                agent_name=self.agent_name, bridge=LoopBridge(asyncio.get_running_loop()),
                                info=info, log=self.log, tls=None if self.tls is None else self.tls.client,
                                in_doubt_timeout=self.in_doubt_timeout if in_doubt_timeout is None else in_doubt_timeout,
                                code_cache=self.code_cache, stall_timeout=self.stall_timeout,
                                ownership=self.ownership)
        loop = asyncio.get_running_loop()
        out = _Outgoing(session, loop.create_future())
        self._infos[vm_name] = info
        self._outgoing[vm_name] = out
        self.log.info("migration starting", vm=vm_name, to=info.peer, params=params.to_dict())
        self._start_thread(lambda: self._run_outgoing(out, loop), "ferry-migration-out")
        await session.setup_done.until_set(SETUP_WAIT_S)
        if info.status in (Status.FAILED, Status.CANCELLED) and not info.rounds:
            raise MigrationError(_setup_code(info), info.error or f"migration of {vm_name} {info.status.value}")
        return info.to_dict()

    def _check_can_start(self, vm_name: str, vm: ManagedVM) -> None:
        if not self._accepting:
            raise MigrationError(ErrorCode.BUSY, f"agent {self.agent_name} is shutting down")
        if vm_name in self._outgoing:
            raise MigrationError(ErrorCode.BUSY, f"VM {vm_name!r} is already migrating")
        if vm.state == "migrating":
            raise MigrationError(ErrorCode.BUSY, f"VM {vm_name!r} is busy with a migration")

    def _run_outgoing(self, out: _Outgoing, loop: asyncio.AbstractEventLoop) -> None:
        """The session thread's body: its turn, the session, then its end told to the loop and the hook."""
        session = out.session
        try:
            if not self._slots.take(session.cancel_requested, session.queued):
                session.cancelled_in_queue()
                return
            # The progress timeout counts from the session's start, not from its place in the queue.
            watch = None if session.params.progress_timeout_s is None else \
                ProgressWatch(session, session.params.progress_timeout_s)
            if watch is not None:
                watch.start()
            try:
                session.run()
            finally:
                self._slots.give()
                if watch is not None:
                    watch.stop()
        finally:
            _on_loop(loop, self._outgoing_over, out)
            self._finished(session.info)

    def _outgoing_over(self, out: _Outgoing) -> None:
        """On the loop, once an outgoing session ended: forget it, or keep it for the operator."""
        session = out.session
        self._outgoing.pop(session.vm.name, None)
        if session.in_doubt:
            self._in_doubt[session.vm.name] = session
        if not out.over.done():
            out.over.set_result(None)

    async def resolve(self, vm_name: str, resume_here: bool, force: bool = False) -> str:
        """The operator settles a migration that ended in doubt (the VM paused here).

        One more query first, so the operator cannot run the VM twice by mistake: resuming here is
        refused while the destination says it runs the VM, and destroying the copy here is refused
        while it says it does not (its "no" also fences the migration for good). When it cannot be
        reached, the operator's word decides; in cluster mode etcd must agree as well
        (ownership.resolve_refusal; ``force``: the operator vouches that a destination etcd names
        is gone for good). Returns what was done.
        """
        postcopy_recover.refuse_resolve(self._outgoing.get(vm_name), vm_name)
        session = self._in_doubt.get(vm_name)
        if session is None:
            raise MigrationError(ErrorCode.NOT_FOUND, f"no migration of VM {vm_name!r} is in doubt on {self.agent_name}")
        if vm_name not in {v.name for v in self.vms.list()}:
            del self._in_doubt[vm_name]  # destroyed by hand meanwhile: nothing left to resolve here
            raise MigrationError(ErrorCode.NO_SUCH_VM, f"VM {vm_name!r} is no longer on {self.agent_name}")
        vm = self.vms.get(vm_name)
        # A blocking exchange on a new connection: in a worker thread, for a bounded time.
        answer = await asyncio.to_thread(session.ask_once, RESOLVE_ASK_S)
        if resume_here and answer is True:
            raise MigrationError(ErrorCode.BUSY, f"the destination runs VM {vm_name!r}: destroy the copy here "
                                 "instead (--resumed-on-destination)")
        if not resume_here and answer is False:
            raise MigrationError(ErrorCode.BUSY, f"the destination says it did not resume VM {vm_name!r} and "
                                 "never will: resume it here instead (--resume-here)")
        if session.owner_terms:  # cluster mode: etcd must agree before either copy is touched
            try:
                refusal = await asyncio.wait_for(asyncio.to_thread(
                    resolve_refusal, self.ownership, vm_name, session.owner_terms, answer, resume_here, force),
                    RESOLVE_ASK_S)
            except TimeoutError as e:
                raise MigrationError(ErrorCode.BUSY, f"etcd did not answer who owns VM {vm_name!r}") from e
            if refusal is not None:
                raise MigrationError(ErrorCode.BUSY, refusal)
        if isinstance(session, AdoptedInDoubt):
            session.stop()
        async with vm.lock:
            if resume_here:
                await vm.resume()
                await vm.end_migration("running")  # (a restarted agent's in-doubt record goes with it)
            else:
                await self.vms.remove_migrated(vm_name)
        del self._in_doubt[vm_name]
        done = "resumed here" if resume_here else "copy here destroyed"
        how = "the destination could not be reached" if answer is None else "the destination confirmed"
        session.info.summary = f"in doubt, resolved by the operator: {done} ({how})"
        self.log.warning("in-doubt migration resolved by the operator", vm=vm_name, action=done, answer=answer)
        return f"{done} ({how})"

    async def recover(self, vm_name: str) -> str:
        """The operator's migrate-recover: a post-copy paused by a lost link reconnects at once."""
        out = self._outgoing.get(vm_name)
        return postcopy_recover.recover_op(None if out is None else out.session, self._infos.get(vm_name),
                                           vm_name, self.agent_name)

    def resume_in_doubt(self, vm: ManagedVM, ref: Mapping[str, str], run_before: str | None) -> None:
        """A VM a previous run of this agent left in doubt (re-adopted paused, COMMIT of migration
        ``ref`` {id, to} recorded as sent): ask the destination until it answers, then destroy the
        copy here (it resumed there) or run the VM here again as it ran before (``run_before``).
        A post-copy's is taken up again instead (postcopy_adopt), the query only if that fails."""
        if postcopy_adopt.is_postcopy(ref):
            self._resume_postcopy(vm, ref, run_before)
            return
        host, _, port = ref["to"].rpartition(":")
        dest = (host, int(port))
        info = MigrationInfo(vm=vm.name, direction="out", peer=ref["to"], mem=vm.mem, status=Status.FAILED)
        info.error = (f"in doubt: the agent restarted after COMMIT of migration {ref['id']}; the VM stays "
                      f"paused here while the agent asks {ref['to']} whether it resumed it")
        info.finished = info.started
        ctx = None if self.tls is None else self.tls.client
        asker = InDoubtAsker(connect=lambda: tls.dial(dest, ctx),
                             handshake=lambda conn: client_handshake(conn, self.key, self.agent_name),
                             vm_name=vm.name, migration_id=ref["id"], log=self.log)
        loop = asyncio.get_running_loop()

        def answered(resumed: bool) -> None:  # in the asking thread
            _on_loop(loop, lambda: loop.create_task(self._settle_adopted(vm, adopted, resumed, run_before)))

        terms = owner_terms(ref)
        settle = None if terms is None else (lambda says: self.ownership.settle(vm.name, terms, says))
        adopted = AdoptedInDoubt(asker, info, answered, settle, terms)
        self._infos[vm.name] = info
        self._in_doubt[vm.name] = adopted
        self.log.warning("asking the destination about a migration left in doubt", vm=vm.name,
                         migration_id=ref["id"], destination=ref["to"])
        self._start_thread(adopted.run, "ferry-in-doubt")

    def _resume_postcopy(self, vm: ManagedVM, ref: Mapping[str, str], run_before: str | None) -> None:
        loop = asyncio.get_running_loop()
        session = postcopy_adopt.session_for(vm, ref, run_before, vms=self.vms, key=self.key,
                                             agent_name=self.agent_name, bridge=LoopBridge(loop), log=self.log,
                                             tls=None if self.tls is None else self.tls.client,
                                             stall_timeout=self.stall_timeout)
        out = _Outgoing(session, loop.create_future())
        self._infos[vm.name] = session.info
        self._outgoing[vm.name] = out
        plain = {"id": ref["id"], "to": ref["to"]}
        self.log.warning("taking up a post-copy an agent restart cut", vm=vm.name, migration_id=ref["id"],
                         destination=ref["to"])

        def run() -> None:
            ask = False
            try:
                ask = postcopy_adopt.run(session)
            finally:
                _on_loop(loop, self._outgoing_over, out)
                self._finished(session.info)
            if ask:
                _on_loop(loop, self.resume_in_doubt, vm, plain, run_before)

        self._start_thread(run, "ferry-postcopy-adopted")

    async def _settle_adopted(self, vm: ManagedVM, adopted: AdoptedInDoubt, resumed: bool,
                              run_before: str | None) -> None:
        """The destination answered about a migration a restarted agent found in doubt."""
        if self._in_doubt.get(vm.name) is not adopted or vm.name not in {v.name for v in self.vms.list()}:
            return  # settled meanwhile (migrate-resolve, vm destroy, a new migration)
        del self._in_doubt[vm.name]
        async with vm.lock:
            if vm.state != "paused":  # the operator ran it by hand meanwhile: their decision stands
                self.log.error("in-doubt answer ignored: the VM was resumed by hand", vm=vm.name, resumed=resumed)
                return
            if resumed:
                await self.vms.remove_migrated(vm.name)
            else:
                if run_before != "paused":
                    await vm.resume()
                await vm.end_migration("paused" if run_before == "paused" else "running")
        done = "the destination runs the VM: the copy here is destroyed" if resumed else \
            "the destination did not resume the VM: it runs here again"
        adopted.info.summary = f"in doubt after an agent restart, settled: {done}"
        if resumed:
            adopted.info.status, adopted.info.error = Status.COMPLETED, None
        self.log.warning("in-doubt migration settled after an agent restart", vm=vm.name, resumed=resumed)

    def info(self, vm_name: str) -> dict[str, Any] | None:
        """The current or last migration of ``vm_name`` on this agent (in or out), QEMU names."""
        info = self._infos.get(vm_name)
        return None if info is None else info.to_dict()

    def infos(self) -> list[dict[str, Any]]:
        """Snapshots of every VM's current or last migration on this agent (for metrics)."""
        return [info.to_dict() for info in list(self._infos.values())]

    async def cancel(self, vm_name: str) -> None:
        """Cancel the outgoing migration of ``vm_name``; returns when the VM runs here again.

        After COMMIT a cancel cannot apply (the destination may already run
        the VM); the migration then completes or resolves as in doubt.
        """
        out = self._outgoing.get(vm_name)
        if out is None:
            self._cancel_incoming(vm_name)
            return
        if not out.session.cancel():
            self.log.info("cancel ignored: COMMIT already sent", vm=vm_name)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CANCEL_WAIT_S):
                await asyncio.shield(out.over)

    def _cancel_incoming(self, vm_name: str) -> None:
        """Cancel on the destination: drop the incoming copy (before COMMIT); the source resumes the VM."""
        for incoming in self._outcomes.live():
            if incoming.info is not None and incoming.info.vm == vm_name and self._outcomes.fence(incoming):
                return
        info = self._infos.get(vm_name)
        if info is not None and info.status in FINAL_STATUSES:
            return  # already over: nothing to cancel
        raise MigrationError(ErrorCode.NOT_FOUND, f"no migration of VM {vm_name!r} to cancel on {self.agent_name}")

    # -- shutdown --------------------------------------------------------------------------------------
    async def shutdown(self) -> None:
        """Stop accepting, cancel outgoing migrations (before COMMIT), fence incoming ones, wait for all."""
        self._accepting = False
        if self._serve_task is not None:
            self._serve_task.cancel()
        if self._lsock is not None:  # bound, and shut down before serve() took it over
            self._lsock.close()
            self._lsock = None
        for out in list(self._outgoing.values()):
            out.session.cancel()
        for incoming in self._outcomes.live():
            self._outcomes.fence(incoming)
        for doubt in self._in_doubt.values():
            if isinstance(doubt, AdoptedInDoubt):
                doubt.stop()  # the next run of the agent asks again
        for ended in list(self._threads):
            await ended.until_set(CANCEL_WAIT_S)
        self.log.info("migration engine stopped")


def _on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[..., object], *args: Any) -> None:
    """From a session thread: run ``fn(*args)`` on the loop (skipped once the loop is closed)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


def _setup_code(info: MigrationInfo) -> str:
    """The error code of a migration that failed during setup."""
    if info.status is Status.CANCELLED:
        return ErrorCode.CANCELLED
    return info.error_code or ErrorCode.MIGRATION_FAILED


