"""`ferry-agent`: the per-host daemon, asyncio on uvloop.

This module owns the agent's process lifecycle: read the configuration, build the VM manager, the
migration engine and the control API, listen (control TCP + unix socket, migration listener),
and on SIGTERM or SIGINT shut down in order: refuse new work, let the migration engine cancel or
finish what runs (it keeps a VM that is in doubt paused rather than running it twice), close the
control API, let go of the VMs (their processes run on, as QEMU guests outlive libvirtd; `vm destroy`
stops a VM), exit 0. On start it re-adopts the VMs a previous run left running (agent/vms/adopt.py,
docs/RELIABILITY.md "Agent restarts"). Under systemd (`Type=notify`) it says READY=1 once every
listener is up, sends watchdog keep-alives while it runs and STOPPING=1 when it begins to shut down
(agent/sdnotify.py); `--metrics` adds a Prometheus endpoint (agent/metrics.py); `--check-config`
checks a configuration without starting anything; `--tls-dir` puts mutual TLS on the control and
migration TCP connections, in and out (agent/tls.py); SIGHUP loads that directory again (new
connections use it, open ones keep theirs; a directory that does not load leaves the old contexts in
use) and the agent warns, in its log and in metrics, when its certificate or CA is near expiry.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import signal
import sys
from pathlib import Path
from typing import Any

import uvloop

from agent import ferry_version
from agent.client import ClientError, call_once
from agent.cluster.mode import ClusterMode
from agent.cluster.registry import ClusterError
from agent.config import (
    AgentConfig,
    ConfigError,
    build_parser,
    config_from_args,
    describe,
    format_hostport,
    host_problems,
)
from agent.control import ControlServer
from agent.disks import DISKS_SUBDIR, allowed_dirs
from agent.logs import Log
from agent.metrics import AgentMetrics, MetricsServer
from agent.migration import MigrationManager, postcopy_readopt
from agent.migration.common import LoopBridge
from agent.migration.ownership import TWO_AGENTS
from agent.migration.storage_copy import remove_partials
from agent.ops import AgentIdentity, ControlOps, Migrations, OpError
from agent.records import VMRecords
from agent.sdnotify import Notifier
from agent.tls import TLSContexts, TLSDir
from agent.tls import load as load_tls
from agent.tls_check import expiries, expiry_warnings, file_problems, usage_problems
from agent.vms import VMManager
from agent.web import console
from agent.web_state import PeerBook
from vmruntime import dirty

MIGRATION_SHUTDOWN_TIMEOUT = 60.0  # seconds the migration engine gets to wind down on SIGTERM
PEER_TIMEOUT = 10.0
EXPIRY_CHECK_INTERVAL = 24 * 3600.0  # seconds between expiry warnings of a long-running agent


class Agent:
    """One running agent: its parts, its listeners, and its orderly shutdown."""

    def __init__(self, config: AgentConfig, log: Log) -> None:
        self.config = config
        self.log = log
        self.records = VMRecords(config.state_dir)
        # spare: an idle VM process kept ready for the next incoming migration (vmruntime/spare.py).
        self.vms = VMManager(agent_name=config.name, max_mem=config.max_mem, dirty_tracker=config.dirty_tracker,
                             log=log, records=self.records, spare=config.spare_vm,
                             disk_dirs=allowed_dirs(config.state_dir, config.disk_dirs))
        # Mutual TLS (--tls-dir) on every TCP connection in and out; None: plaintext (HMAC auth only).
        self.tls: TLSDir | None = TLSDir(config.tls_dir) if config.tls_dir is not None else None
        self.tls_ends = expiries(config.tls_dir) if config.tls_dir is not None else {}
        self._reloading = asyncio.Lock()
        identity = AgentIdentity(config.name, config.control, config.migration, config.state_dir)
        # Cluster mode (--etcd): hosts, VM ownership at COMMIT and placement in etcd (agent/cluster/).
        self.cluster = None if config.cluster is None else ClusterMode(
            config.cluster, name=config.name, control=config.control, migration=config.migration, vms=self.vms,
            log=log, instance=identity.instance)
        self.migrations = MigrationManager(agent_name=config.name, key=config.key, vms=self.vms, log=log,
                                           tls=self.tls, stall_timeout=config.stall_timeout,
                                           max_outgoing=config.max_outgoing, postcopy_after=config.postcopy_after,
                                           ownership=TWO_AGENTS if self.cluster is None else self.cluster.ownership,
                                           streams=config.streams)
        self.peers = PeerBook()  # the agents this one asked for their agent-info: the console's hosts
        self.ops = ControlOps(identity=identity, vms=self.vms, migrations=self._as_migrations(),
                              peer_info=self.peers.remember(self._peer_info), log=log)
        if self.cluster is not None:
            self.cluster.install(self.ops, config.key, lambda: self.tls.client if self.tls is not None else None)
        self.control = ControlServer(ops=self.ops, key=config.key, name=config.name, log=log,
                                     tls=self.tls.acceptor if self.tls is not None else None)
        self.metrics = AgentMetrics(agent_name=config.name, version=ferry_version(), vms=self.vms,
                                    migrations=self.migrations,
                                    tls_expiries=(lambda: self.tls_ends) if self.tls is not None else None)
        self.migrations.on_finished = self.metrics.stats.record
        self.metrics_server = MetricsServer(self.metrics.collect, log) if config.metrics is not None else None
        self.web = None if config.web is None else console(config.web, tls_dir=config.tls_dir, ops=self.ops,
                                                            vms=self.vms, migrations=self.migrations,
                                                            peers=self.peers, log=log)
        self.stopping = asyncio.Event()
        self.failed = False  # a listener died: exit non-zero after the orderly shutdown
        self._migration_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def _as_migrations(self) -> Migrations:
        migrations: Migrations = self.migrations  # checks the engine against what the control API needs
        return migrations

    async def _peer_info(self, address: str) -> dict[str, Any]:
        """agent-info of another agent (the destination of a migration), over its control API."""
        try:
            result = await asyncio.wait_for(call_once(address, self.config.key, "agent-info", name=self.config.name,
                                                      tls=self.tls.client if self.tls is not None else None,
                                                      role="agent"), PEER_TIMEOUT)
        except ClientError as e:  # e.g. auth-failed: the destination has another cluster key
            raise OpError(e.code, f"destination agent {address}: {e.message}") from e
        return dict(result)

    async def start(self) -> None:
        cfg = self.config
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        (cfg.state_dir / DISKS_SUBDIR).mkdir(mode=0o700, exist_ok=True)
        for partial in await asyncio.to_thread(remove_partials, cfg.state_dir / DISKS_SUBDIR):
            self.log.info("removed a disk image copy an interrupted migration left", path=partial)
        await self._adopt_vms()
        control = await self.control.start_tcp(*cfg.control)
        try:
            await self.control.start_unix(cfg.control_socket)
        except OSError as e:  # e.g. a path over the 107-byte limit: TCP still serves every client
            self.log.warning("no unix control socket", path=str(cfg.control_socket), error=e.strerror or str(e))
        await self._start_migration_listener()
        for vm in self.vms.list():  # in doubt after COMMIT when the previous run stopped: ask the destination
            if vm.migration_phase == "commit-sent" and vm.migration_ref is not None:
                self.migrations.resume_in_doubt(vm, vm.migration_ref, vm.run_before)
        self.vms.keep_spare()
        if self.cluster is not None:
            await self.cluster.start()  # registered once its listeners serve; ClusterError stops the agent
        metrics = await self.metrics_server.start(*cfg.metrics) if self.metrics_server and cfg.metrics else None
        web = await self.web.start(*cfg.web.address) if self.web and cfg.web else None
        self.log.info("agent started", version=ferry_version(), control=format_hostport(*control),
                      migration=format_hostport(*cfg.migration), unix=str(cfg.control_socket),
                      max_mem=cfg.max_mem, dirty_tracker=cfg.dirty_tracker,
                      metrics=format_hostport(*metrics) if metrics else None,
                      http=format_hostport(*web) if web else None,
                      tls=str(cfg.tls_dir) if cfg.tls_dir is not None else None)
        if self.tls is not None:
            self._spawn(self._watch_expiry())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _warn_expiry(self) -> None:
        for text in expiry_warnings(self.tls_ends):
            self.log.warning(f"tls: {text}", tls=str(self.config.tls_dir))

    async def _watch_expiry(self) -> None:
        while True:
            self._warn_expiry()
            await asyncio.sleep(EXPIRY_CHECK_INTERVAL)

    def request_reload(self) -> None:
        """SIGHUP: load the TLS directory again, off the event loop."""
        self._spawn(self.reload_tls())

    async def reload_tls(self) -> bool:
        """Swap in the TLS directory's current files; on failure keep the contexts in use and say why."""
        if self.tls is None:
            self.log.info("reload: no --tls-dir, nothing to reload")
            return False
        tls = self.tls
        async with self._reloading:
            try:
                contexts, ends = await asyncio.to_thread(_load_checked, tls.directory)
            except ConfigError as e:
                self.log.error("tls reload failed; the certificates in use stay", tls=str(tls.directory),
                               error=str(e))
                return False
            tls.install(contexts)  # here, on the loop: the control listener's handshakes start here too
            self.tls_ends = ends
            if self.web is not None:  # the console's HTTPS certificate too (agent/web.py)
                await self.web.reload_tls(tls.directory)
        self.log.info("tls reloaded", tls=str(tls.directory), cert_expires=self.tls_ends["cert"].isoformat(),
                      ca_expires=self.tls_ends["ca"].isoformat())
        self._warn_expiry()
        return True

    def status_line(self) -> str:
        """systemd's STATUS= for a running agent (shown by `systemctl status`): VMs and addresses."""
        cfg = self.config
        vms = self.vms.list()
        migrating = sum(1 for vm in vms if vm.state == "migrating")
        metrics = f", metrics {format_hostport(*cfg.metrics)}" if cfg.metrics else ""
        return (f"agent {cfg.name}: {len(vms)} VM{'' if len(vms) == 1 else 's'} ({migrating} migrating); "
                f"control {format_hostport(*cfg.control)}, migration {format_hostport(*cfg.migration)}{metrics}")

    async def _adopt_vms(self) -> None:
        """VMs a previous run of this agent left running: take them over before serving anyone."""
        # A post-copy a previous run left in its phase first: its VM process may be blocked on a
        # missing page, and cannot answer the attach (agent/migration/postcopy_readopt.py).
        in_postcopy = await postcopy_readopt.take_up(self.vms, LoopBridge(asyncio.get_running_loop()))
        adopted = await self.vms.adopt_previous(skip=in_postcopy)
        if adopted:
            self.log.info("vms re-adopted from the previous agent run", count=adopted)

    async def _start_migration_listener(self) -> None:
        """Start the migration listener and return once it is bound; a bind error is raised here,
        before "agent started"."""
        self.migrations.bind(*self.config.migration)
        task = asyncio.create_task(self.migrations.serve())
        self._migration_task = task
        task.add_done_callback(self._listener_done)

    def _listener_done(self, task: asyncio.Task[None]) -> None:
        """serve() may return once bound or run forever; only its failure stops the agent."""
        if not task.cancelled() and task.exception() is not None:
            self.log.error("migration listener failed", error=repr(task.exception()))
            self.failed = True
            self.stopping.set()

    async def shutdown(self) -> None:
        """Refuse new work, wind migrations down, close the control API, let go of the VMs."""
        self.log.info("agent stopping")
        self.ops.accepting = False
        self.vms.accepting = False
        if self.cluster is not None:
            self.cluster.stopping()
        try:
            await asyncio.wait_for(self.migrations.shutdown(), MIGRATION_SHUTDOWN_TIMEOUT)
        except Exception as e:  # shutdown must go on: the VMs still need stopping
            self.log.error("migration shutdown failed", error=repr(e))
        try:
            await self.ops.moves.shutdown()
        except Exception as e:  # as for migrations: the VMs still need stopping
            self.log.error("storage move shutdown failed", error=repr(e))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._migration_task is not None:
            self._migration_task.cancel()
            await asyncio.gather(self._migration_task, return_exceptions=True)  # its end, whatever it was
        await self.control.close()
        if self.metrics_server is not None:
            await self.metrics_server.close()
        if self.web is not None:
            await self.web.close()
        await self.vms.shutdown()
        if self.cluster is not None:
            await self.cluster.stop()
        self.log.info("agent stopped")


def _load_checked(directory: Path) -> tuple[TLSContexts, dict[str, datetime.datetime]]:
    """A TLS directory's contexts and expiry dates, or ConfigError naming every problem of its files."""
    problems = file_problems(directory)
    if problems:
        raise ConfigError("; ".join(problems), problems)
    return load_tls(directory), expiries(directory)


async def serve(config: AgentConfig, log: Log) -> int:
    """Run the agent until SIGTERM/SIGINT; returns the exit status."""
    agent = Agent(config, log)
    notifier = Notifier.from_env(log=log)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stopping.set)
    loop.add_signal_handler(signal.SIGHUP, agent.request_reload)
    try:
        await agent.start()
    except OSError as e:
        log.error("cannot listen", error=e.strerror or str(e))
        notifier.status(f"cannot listen: {e.strerror or e}")
        await agent.shutdown()
        return 1
    except ClusterError as e:
        log.error("cluster mode cannot start", error=str(e))
        notifier.status(f"cluster mode cannot start: {e}")
        await agent.shutdown()
        return 1
    notifier.ready(agent.status_line())
    # Keep-alives (and STATUS= updates) run on the event loop until the very end: a shutdown that
    # hangs is noticed too.
    watchdog = asyncio.create_task(notifier.run(agent.status_line))
    await agent.stopping.wait()
    notifier.stopping(f"agent {config.name}: stopping (winding down migrations; VMs run on)")
    await agent.shutdown()
    watchdog.cancel()
    await asyncio.gather(watchdog, return_exceptions=True)
    notifier.close()
    return 1 if agent.failed else 0


def _check_backend(name: str) -> None:
    """A dirty-tracker this kernel cannot provide is a configuration error, found at start-up."""
    try:
        dirty.choose_backend(name)
    except ValueError as e:
        raise ConfigError(f"dirty-tracker: {e}") from e


def check_config(ns: argparse.Namespace) -> int:
    """--check-config: print the resolved settings (exit 0) or every problem found (exit 2)."""
    source = f"config file {ns.config}" if ns.config else "flags and defaults (no --config file)"
    try:
        config = config_from_args(ns)
        problems = host_problems(config)
        problems += _backend_problems(config.dirty_tracker)
        if config.tls_dir is not None:
            problems += usage_problems(config.tls_dir, [("control", config.control[0]),
                                                        ("migration", config.migration[0])])
    except ConfigError as e:
        problems = e.problems
    if problems:
        print(f"ferry-agent: {source}: {len(problems)} problem{'s' if len(problems) > 1 else ''}:", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 2
    print(f"# ferry-agent: {source}: OK\n{describe(config)}", end="")
    return 0


def _backend_problems(name: str) -> list[str]:
    try:
        _check_backend(name)
    except ConfigError as e:
        return [str(e)]
    return []


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.check_config:
        return check_config(ns)
    try:
        config = config_from_args(ns)
        _check_backend(config.dirty_tracker)
    except ConfigError as e:
        print(f"ferry-agent: error: {e}", file=sys.stderr)
        return 2
    log = Log(config.log_level, agent=config.name)
    return uvloop.run(serve(config, log))


if __name__ == "__main__":
    sys.exit(main())
