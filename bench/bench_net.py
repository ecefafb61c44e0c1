"""Network: what a client on the LAN sees while a `netd` guest migrates back and forth.

Two agents on this host plug their VMs into one host bridge; a client namespace on it
(tests/netlan.py) runs bench/net_client.py for the whole run: a UDP key-value request to the guest
every millisecond (20 ms timeout, up to 3 retries) and an ICMP echo every 10 ms, each logged. The
guest (`netd`, 16 MiB, one NIC) is migrated A->B->A while the client runs: by default (the code hint
and the announce, docs/cli.md), alternating with ``--no-code-hint`` (the same run's baseline), and then
with ``--announce-rounds 0``. Per migration: the
downtime the source reports, the blackout the client saw (the first request whose first try went
unanswered to the first answer on a first try after it), request latency (retries included) during
the migration, requests whose first try was lost and those lost after every retry, pings lost.

    .venv/bin/python -m bench.bench_net            # 10 default, 10 without the hint, 2 without the announce
    .venv/bin/python -m bench.bench_net --quick    # 4, 4 and 1
    .venv/bin/python -m bench.bench_net --json     # the figures as one JSON object instead

Needs root, `ip` and /dev/net/tun.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import markdown_table, module_argv, percentile

VM = "bench-net"
FINAL = ("completed", "failed", "cancelled")
SETTLE = 1.0  # s after a migration's end still counted as its own (late retries, the first answers)
GAP = 1.0  # s of undisturbed traffic between two migrations
BLACKOUT_CAP = 10.0  # s: a blackout longer than this is reported as "> 10 s" (a stale bridge FDB entry lives 300 s)
Req = Sequence[Any]  # [send, answer or None, retries], as bench/net_client.py logs it
# How each migration is asked for: its params, and the heading of its table.
MODES: dict[str, tuple[dict[str, Any], str]] = {
    "default": ({}, "**Default** (the code hint and the announce):"),
    "no-hint": ({"code-hint": False}, "**Without the code hint** (`--no-code-hint`, two by two with the default ones):"),
    "no-announce": ({"announce-rounds": 0}, "**Without the announce** (`--announce-rounds 0`; the wait for the client "
                                             f"to be answered again is capped at {BLACKOUT_CAP:g} s):"),
}


@dataclass
class Migration:
    """One migration as the agent reported it and the client saw it."""

    direction: str
    mode: str  # one of MODES
    status: str
    migration_ms: float  # from the migrate request to the final status, as the bench saw it
    downtime_ms: float | None
    dark_from_ms: float | None  # when the first unanswered first try was sent, from the migrate request
    blackout_ms: float | None  # None: longer than the cap
    requests: int
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    lost_first_try: int
    lost_after_retries: int
    pings: int
    pings_lost: int


# --- pure: what the client's log says about one migration ---------------------------------------


def first_failure(requests: Sequence[Req], start: float, end: float) -> float | None:
    """The send time of the first request in [start, end] whose first try went unanswered, if any."""
    for send, answer, retries in requests:
        if start <= send <= end and (answer is None or retries > 0):
            return float(send)
    return None


def blackout(requests: Sequence[Req], start: float, end: float) -> float | None:
    """Seconds from the send of the first request in [start, end] whose first try went unanswered to
    the answer of the first request sent after it that was answered on its first try; 0.0 when every
    first try in the window was answered; None when no first try was answered after the failure."""
    failed_at = first_failure(requests, start, end)
    if failed_at is None:
        return 0.0
    for send, answer, retries in requests:
        if send > failed_at and answer is not None and retries == 0:
            return float(answer) - failed_at
    return None


def window_stats(requests: Sequence[Req], start: float, end: float) -> dict[str, Any]:
    """Requests sent in [start, end]: count, latency p50/p99/max in ms (answered ones, retries
    included), how many had their first try lost and how many were lost after every retry."""
    inside = [r for r in requests if start <= r[0] <= end]
    lat = [(float(a) - float(s)) * 1000 for s, a, _ in inside if a is not None]
    return {
        "requests": len(inside),
        "p50_ms": percentile(lat, 0.5) if lat else None,
        "p99_ms": percentile(lat, 0.99) if lat else None,
        "max_ms": max(lat) if lat else None,
        "lost_first_try": sum(1 for _, a, n in inside if a is None or n > 0),
        "lost_after_retries": sum(1 for _, a, _ in inside if a is None),
    }


def pings_in(pings: Sequence[Sequence[Any]], start: float, end: float) -> tuple[int, int]:
    """(sent, lost) of the echoes sent in [start, end]."""
    inside = [p for p in pings if start <= p[0] <= end]
    return len(inside), sum(1 for p in inside if not p[1])


def _ms(value: float | None, fmt: str = ".1f") -> str:
    return "-" if value is None else format(value, fmt)


def blackout_text(ms: float | None) -> str:
    return f"> {BLACKOUT_CAP:g} s" if ms is None else f"{ms:.1f}"


# --- processes ----------------------------------------------------------------------------------


class Client:
    """bench/net_client.py in the client namespace; `last()` is the newest first-try answer's send."""

    def __init__(self, lan: Any, addr: str, rate: float) -> None:
        root = Path(__file__).resolve().parent.parent
        argv = module_argv("bench.net_client", [addr, "--rate", str(rate)])
        self.proc = subprocess.Popen(["ip", "netns", "exec", lan.client_ns, *argv],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=root)
        self._last = 0.0
        self._result: dict[str, Any] | None = None

    def last(self) -> float:
        """Read every status line there is, without waiting."""
        out = self.proc.stdout
        assert out is not None
        while select.select([out], [], [], 0)[0]:
            line = out.readline()
            if not line.startswith("last "):
                break
            self._last = float(line.split()[1])
        return self._last

    def stop(self) -> dict[str, Any]:
        """Close its stdin and read its log (the status lines before it are skipped)."""
        if self._result is not None:
            return self._result
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        for line in self.proc.stdout:
            if line.startswith("{"):
                self._result = json.loads(line)
        self.proc.wait(timeout=30)
        if self._result is None:
            raise RuntimeError(f"net client exited {self.proc.returncode} without its log")
        return self._result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # by its pid
            self.proc.wait()


def wait_answering(client: Client, after: float, cap: float) -> bool:
    """Wait until a request sent after ``after`` was answered on its first try, at most ``cap`` s."""
    deadline = time.monotonic() + cap
    while time.monotonic() < deadline:
        if client.last() > after:
            return True
        time.sleep(0.05)
    return False


def migrate(src: Any, dst: Any, params: dict[str, Any]) -> dict[str, Any]:
    src.call("migrate", name=VM, to=dst.control, params=params)
    while (info := src.call("migrate-status", name=VM))["status"] not in FINAL:
        time.sleep(0.005)
    result: dict[str, Any] = info
    return result


@contextlib.contextmanager
def setup() -> Iterator[tuple[Any, Any, Any]]:
    """Two agents, the LAN, the netd guest on A; all removed on the way out, whatever happened."""
    from tests.agents import make_key, start_agent, wait_for
    from tests.netlan import GUEST_IP, make_lan

    tmp = Path(tempfile.mkdtemp(prefix="ferry-net-"))
    try:
        key = make_key(tmp)
        with make_lan() as lan, start_agent(tmp, "A", key) as a, start_agent(tmp, "B", key) as b:
            a.cli("vm", "create", VM, "--program", "netd", "--mem", "16M", "--nic",
                  f"bridge={lan.bridge},ip={GUEST_IP}/24")
            wait_for(lambda: "netd: up" in str(a.cli("vm", "console", VM).stdout), timeout=20, what="netd up")
            yield lan, a, b
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def plan(default: int, no_hint: int, no_announce: int) -> list[str]:
    """The modes in run order: default and no-hint two by two (so each mode goes both ways, A->B and
    B->A, as the migrations alternate direction), then no-announce."""
    mixed: list[str] = []
    while default > 0 or no_hint > 0:
        take_d, take_n = min(2, default), min(2, no_hint)
        mixed += ["default"] * take_d + ["no-hint"] * take_n
        default, no_hint = default - take_d, no_hint - take_n
    return mixed + ["no-announce"] * no_announce


def measure(modes: list[str], rate: float = 1000.0) -> tuple[list[Migration], dict[str, Any]]:
    """The migrations, and the client's figures over the quiet gaps between them (for comparison)."""
    from tests.netlan import GUEST_IP

    migrations: list[tuple[str, str, dict[str, Any], float, float]] = []  # direction, mode, info, start, end
    with contextlib.redirect_stdout(sys.stderr), setup() as (lan, a, b):
        client = Client(lan, GUEST_IP, rate)
        try:
            if not wait_answering(client, time.monotonic(), 10.0):
                raise RuntimeError("netd does not answer the client")
            agents, where = {"A": a, "B": b}, "A"
            for mode in modes:
                time.sleep(GAP)
                to = "B" if where == "A" else "A"
                start = time.monotonic()
                info = migrate(agents[where], agents[to], MODES[mode][0])
                end = time.monotonic()
                migrations.append((f"{where}->{to}", mode, info, start, end))
                if info["status"] == "completed":
                    where = to
                if mode == "no-announce":  # may stay dark until the bridge relearns: cap the wait
                    wait_answering(client, end, BLACKOUT_CAP)
                time.sleep(SETTLE)
            time.sleep(0.2)
            log = client.stop()
        finally:
            client.kill()
        agents[where].cli("vm", "destroy", VM, check=False)
    quiet = [r for _, _, _, start, _ in migrations for r in log["requests"] if start - GAP + 0.1 <= r[0] < start]
    return ([summarize(d, mode, info, start, end, log) for d, mode, info, start, end in migrations],
            window_stats(quiet, float("-inf"), float("inf")))


def summarize(direction: str, mode: str, info: dict[str, Any], start: float, end: float,
              log: dict[str, Any]) -> Migration:
    reqs, pings = log["requests"], log["pings"]
    stats = window_stats(reqs, start, end + SETTLE)
    lat = window_stats(reqs, start, end)  # latency during the migration itself
    out = blackout(reqs, start, end + SETTLE)
    dark = first_failure(reqs, start, end + SETTLE)
    if out is not None and out > BLACKOUT_CAP:
        out = None
    sent, lost = pings_in(pings, start, end + SETTLE)
    downtime = info.get("downtime")
    return Migration(direction, mode, str(info["status"]), (end - start) * 1000,
                     None if downtime is None else float(downtime), None if dark is None else (dark - start) * 1000,
                     None if out is None else out * 1000, stats["requests"], lat["p50_ms"], lat["p99_ms"],
                     lat["max_ms"], stats["lost_first_try"], stats["lost_after_retries"], sent, lost)


# --- output -------------------------------------------------------------------------------------


def markdown(migrations: list[Migration], quiet: dict[str, Any]) -> str:
    def rows(mode: str) -> list[list[object]]:
        return [[i + 1, m.direction, m.status, _ms(m.migration_ms, ".0f"), _ms(m.downtime_ms),
                 _ms(m.dark_from_ms, ".0f"), blackout_text(m.blackout_ms), m.requests,
                 _ms(m.p50_ms, ".2f"), _ms(m.p99_ms, ".2f"), _ms(m.max_ms, ".1f"), m.lost_first_try,
                 m.lost_after_retries, f"{m.pings_lost} / {m.pings}"]
                for i, m in enumerate(x for x in migrations if x.mode == mode)]

    head = ["#", "direction", "status", "migration ms", "downtime ms", "dark from ms", "blackout ms", "requests",
            "p50 ms", "p99 ms", "max ms", "lost 1st try", "lost after retries", "pings lost"]
    align = "lllrrrrrrrrrrr"
    tables: list[str] = []
    for mode, (_, heading) in MODES.items():
        if any(m.mode == mode for m in migrations):
            tables += [heading, "", markdown_table(head, rows(mode), align), ""]
    return "\n".join([
        "A `netd` guest (16 MiB, one NIC on a host bridge) migrated A->B->A between two agents on this host while "
        "a client in a network namespace on the bridge (bench/net_client.py) sends a UDP key-value request every "
        "1 ms (20 ms timeout, up to 3 retries) and an ICMP echo every 10 ms. `downtime` is what the source "
        "reports; `migration` runs from the migrate request to the final status; `dark from` is when the first "
        "request whose first try went unanswered was sent, counted from the migrate request; `blackout` is what "
        "the client saw: from the first request whose first try went unanswered to the answer of the first "
        "request answered on its first try after it (0: none went unanswered). Latency (retries included) is "
        "over the requests sent during the migration; losses and pings over those sent from its start to "
        f"{SETTLE:g} s after its end. Lost after retries should be 0 (reported, not asserted).",
        "",
        *tables,
        f"Between migrations (the {GAP - 0.1:g} s before each, for comparison): {quiet['requests']} requests, "
        f"latency p50 {_ms(quiet['p50_ms'], '.2f')} ms, p99 {_ms(quiet['p99_ms'], '.2f')} ms, max "
        f"{_ms(quiet['max_ms'])} ms; first try lost {quiet['lost_first_try']}, lost after retries "
        f"{quiet['lost_after_retries']}.",
    ])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 default migrations, 4 without the hint, 1 without the announce")
    ap.add_argument("--runs", type=int, default=None, help="default migrations (default 10, 4 quick)")
    ap.add_argument("--no-hint-runs", type=int, default=None,
                    help="migrations with --no-code-hint, alternating with the default ones (default: --runs)")
    ap.add_argument("--silent-runs", type=int, default=None,
                    help="migrations with --announce-rounds 0 (default 2, 1 quick)")
    ap.add_argument("--rate", type=float, default=1000.0, help="client KV requests per second (default 1000)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON instead of Markdown")
    a = ap.parse_args(argv)
    from tests.netlan import net_unavailable

    if (why := net_unavailable()) is not None:
        print(f"Skipped: {why}.")
        return
    runs = a.runs if a.runs is not None else (4 if a.quick else 10)
    no_hint = a.no_hint_runs if a.no_hint_runs is not None else runs
    silent = a.silent_runs if a.silent_runs is not None else (1 if a.quick else 2)
    migrations, quiet = measure(plan(runs, no_hint, silent), a.rate)
    if a.json:
        print(json.dumps({"migrations": [asdict(m) for m in migrations], "between": quiet}, indent=1))
    else:
        print(markdown(migrations, quiet))


if __name__ == "__main__":
    main()
