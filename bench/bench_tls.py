"""TLS cost: the migration data path and whole migrations, plaintext against mutual TLS (--tls-dir).

Two parts, each measured plaintext and TLS back to back so the ratio is of the same moment:

* **Data path** (no agents): page batches of incompressible-looking data from one memfd to a fresh
  one over loopback TCP, sender and receiver threads, through the real ``Connection`` (sendmsg,
  recvmsg_into) and ``TLSConnection`` (sendall, recv_into; TLS 1.3 with AES-GCM) of
  agent/migration/. Contiguous ranges and every other page (scattered single pages).
* **Whole migrations**: two real agents on loopback, plaintext and then both with ``--tls-dir``
  (certificates from agent/certs.py), a random-filled paused guest migrated back and forth; the
  figures are ferry's own MigrationInfo (total time, downtime, ram.mbps).

    .venv/bin/python -m bench.bench_tls            # 1 GiB, 3 runs each
    .venv/bin/python -m bench.bench_tls --quick    # 256 MiB, 1 run each
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from agent import certs, tls
from agent.client import call_sync
from agent.migration.tls import TLSConnection
from agent.migration.transport import Connection, connect, prepare_socket
from bench.bench_migrate import FILL_PROGRAM, time_transfer, wait_filled
from tests.agents import AgentProc, make_key
from vmruntime.isa import DATA_ADDR

FINAL = ("completed", "failed", "cancelled")


def make_pki(root: Path) -> dict[str, Path]:
    certs.init_ca(root / "ca")
    return {name: Path(certs.issue(name, ca_dir=root / "ca", out=root / name, ips=["127.0.0.1"])).parent
            for name in ("A", "B", "cli")}


# --- the data path ---------------------------------------------------------------------------------
def _pair(mem: int, pki: dict[str, Path] | None) -> tuple[Connection, Connection]:
    lsock = socket.create_server(("127.0.0.1", 0))
    out = connect(lsock.getsockname()[:2])
    inc, _ = lsock.accept()
    lsock.close()
    inc = prepare_socket(inc)
    if pki is None:
        return Connection(out), Connection(inc, guest_size=mem)
    server = tls.load(pki["B"]).server.wrap_socket(inc, server_side=True, do_handshake_on_connect=False)
    hs = threading.Thread(target=server.do_handshake)
    hs.start()
    client = tls.load(pki["A"]).client.wrap_socket(out, server_hostname="127.0.0.1")
    hs.join()
    return TLSConnection(client), TLSConnection(server, guest_size=mem)


def transport_once(mem: int, scattered: bool, pki: dict[str, Path] | None) -> float:
    """Seconds to move the data through the data path alone (fresh destination memory each run)."""
    tx, rx = _pair(mem, pki)
    return time_transfer(tx, rx, mem, scattered)


def transport_table(mem: int, runs: int, pki: dict[str, Path]) -> str:
    lines = ["| ranges | MiB | plaintext ms | plaintext MiB/s | TLS ms | TLS MiB/s | TLS / plaintext |",
             "|---|--:|--:|--:|--:|--:|--:|"]
    for label, scattered in (("contiguous", False), ("every other page", True)):
        plain, secure = [], []
        for _ in range(runs):  # interleaved: the machine's load hits both alike
            plain.append(transport_once(mem, scattered, None))
            secure.append(transport_once(mem, scattered, pki))
        moved = (mem // 2 if scattered else mem) / 2**20
        p, s = statistics.median(plain), statistics.median(secure)
        lines.append(f"| {label} | {moved:.0f} | {p * 1000:.0f} | {moved / p:.0f} | {s * 1000:.0f} | "
                     f"{moved / s:.0f} | {p / s:.2f} |")
    return "\n".join(lines)


# --- whole migrations ---------------------------------------------------------------------------------
class Agent(AgentProc):
    """An agent the bench talks to over TCP, with the operator's TLS dir when the agent uses TLS."""

    def __init__(self, tmp: Path, name: str, key: Path, tls_dir: Path | None, cli_dir: Path | None) -> None:
        self.ctx: ssl.SSLContext | None = tls.load(cli_dir).client if cli_dir else None
        super().__init__(tmp, name, key, {"tls_dir": tls_dir} if tls_dir else {})

    def call(self, op: str, **args: Any) -> Any:
        key = self.key_path.read_bytes().strip()
        return call_sync(self.control, key, op, {k.replace("_", "-"): v for k, v in args.items()}, tls=self.ctx)


def _agents(tmp: Path, pki: dict[str, Path] | None) -> tuple[Agent, Agent]:
    key = make_key(tmp)
    agents = []
    for name in ("A", "B"):
        agent = Agent(tmp, name, key, pki[name] if pki else None, pki["cli"] if pki else None)
        agents.append(agent)
        agent.wait_ready()
    return agents[0], agents[1]


def migrate_once(src: Agent, dst: Agent, name: str) -> dict[str, Any]:
    src.call("migrate", name=name, to=dst.control, params={})
    while True:
        info: dict[str, Any] = src.call("migrate-status", name=name)
        if info["status"] in FINAL:
            return info
        time.sleep(0.02)


def migrations(tmp: Path, mem: int, runs: int, pki: dict[str, Path] | None) -> list[dict[str, Any]]:
    a, b = _agents(tmp, pki)
    try:
        a.call("vm-create", name="bench-tls", program=FILL_PROGRAM, mem=str(mem), args={"ws": str(mem - DATA_ADDR)})
        wait_filled(a, "bench-tls", timeout=300)
        a.call("vm-pause", name="bench-tls")
        results, src, dst = [], a, b
        for _ in range(runs):
            info = migrate_once(src, dst, "bench-tls")
            if info["status"] == "completed":
                results.append(info)
                src, dst = dst, src
            else:
                print(f"migration {info['status']}: {info.get('error-desc')}", file=sys.stderr)
        return results
    finally:
        with contextlib.redirect_stdout(sys.stderr):  # stop() prints the agent's log: not for the report
            for agent in (a, b):
                for vm in agent.call("vm-list")["vms"]:  # VMs may outlive their agent: leave none behind
                    agent.call("vm-destroy", name=vm["name"])
                agent.stop()


def migration_table(root: Path, mem: int, runs: int, pki: dict[str, Path]) -> str:
    lines = ["| connections | runs | total ms | downtime ms | MiB moved | MiB/s (ram.mbps) |",
             "|---|--:|--:|--:|--:|--:|"]
    for label, use in (("plaintext", None), ("mutual TLS", pki)):
        res = migrations(Path(tempfile.mkdtemp(dir=root)), mem, runs, use)
        if not res:
            lines.append(f"| {label} | 0 | - | - | - | - |")
            continue
        med = statistics.median
        mbps = med([r["ram"]["mbps"] for r in res]) * 1e6 / 8 / 2**20
        lines.append(f"| {label} | {len(res)} | {med([r['total-time'] for r in res]):.0f} | "
                     f"{med([r['downtime'] for r in res]):.0f} | "
                     f"{med([r['ram']['transferred'] for r in res]) / 2**20:.0f} | {mbps:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="256 MiB, 1 run each")
    a = ap.parse_args(argv)
    mem, runs = (256 << 20, 1) if a.quick else (1 << 30, 3)
    with tempfile.TemporaryDirectory(prefix="ferry-bench-tls-") as tmpdir:
        root = Path(tmpdir)
        pki = make_pki(root / "pki")
        print(f"TLS 1.3 ({ssl.OPENSSL_VERSION}), ECDSA P-256 certificates; medians of {runs} run(s).\n")
        print(f"### Data path, {mem >> 20} MiB, loopback\n")
        print(transport_table(mem, runs, pki))
        print(f"\n### Whole migrations: a paused {mem >> 20} MiB random-filled guest, two agents on loopback\n")
        print(migration_table(root, mem, runs, pki))
    return 0


if __name__ == "__main__":
    sys.exit(main())
