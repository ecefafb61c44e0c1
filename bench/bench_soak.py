"""Soak: VMs ping-ponged between two agents for a long time, with cancels and agent restarts, then 50 at once.

What an operator fears from a migration tool over hours rather than one migration: a VM lost or
run twice, a guest's memory changed, and the slow leak (processes, descriptors, memory) that only
shows after hundreds of migrations. Two agents on loopback, and two parts:

1. **Ping-pong.** 8 VMs (3 `verify` guests among them, the rest `memstress` and `counter`, two of
   those with a NIC on a bridge of the soak's own) go back and forth between A and B, up to 4 migrations at once, for ``--minutes`` (30 in full mode, 3
   with ``--quick``). Every few seconds one migration in flight is cancelled at random; every
   ``--restart-every`` seconds one agent (alternately) is killed (SIGKILL) or stopped (SIGTERM)
   and started again on its state dir: it re-adopts its VMs, and a migration it left in doubt
   after COMMIT is settled by asking the other side. A `verify` guest that halts has its digest
   compared with an unmigrated run's and is replaced by a fresh one. The agents' RSS and open
   descriptors, and the host's TAP devices, are sampled every 10 s; with matplotlib (the ``bench``
   extra) they are drawn over time into docs/soak.png.
2. **50 at once.** 50 small `counter` VMs migrated A->B at the same time: each completes, or fails
   with the VM running on A.

At the end every VM must be listed exactly once, on one agent, running (or halted), with a live
VM process of its own and no other VM process left over, each NIC's TAP device on the bridge and
no other TAP device left (none at all once the VMs are destroyed); the report says what was checked.

    .venv/bin/python -m bench.bench_soak                  # 30 minutes of ping-pong, then 50 at once
    .venv/bin/python -m bench.bench_soak --quick          # 3 minutes
    .venv/bin/python -m bench.bench_soak --minutes 10 --restart-every 60
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from agent.client import ClientError, call_sync
from agent.nics import TAP_PREFIX
from bench.common import NO_PLOT, markdown_table, median, pyplot, save_figure
from tests.agents import AgentProc, make_key, run_ip, start_agent, wait_for

VMS = 8
VERIFY_VMS = 3
IN_FLIGHT = 4
CANCEL_EVERY_S = 3.0  # mean seconds between two random cancels
SAMPLE_EVERY_S = 10.0
VERIFY_ARGS = {"ws": "2M", "steps": "3000000"}
NIC_SLOTS = (3, 4)  # a memstress and a counter VM with a NIC on the soak's bridge
PLOT = Path(__file__).resolve().parent.parent / "docs" / "soak.png"
CONCURRENT = 50
SLOW_CALL_S = 300.0
FINAL = ("completed", "failed", "cancelled")


@dataclass
class Soak:
    """What the ping-pong saw."""

    started: float = field(default_factory=time.monotonic)
    outcomes: Counter[str] = field(default_factory=Counter)  # migration statuses (and errors of the call)
    cancels: int = 0
    restarts: list[str] = field(default_factory=list)
    restart_at: list[float] = field(default_factory=list)  # seconds from the start
    digests_ok: int = 0
    digests_bad: list[str] = field(default_factory=list)
    digests_unread: int = 0
    samples: list[tuple[float, str, int, int]] = field(default_factory=list)  # (s, agent, rss KiB, fds)
    taps: list[tuple[float, int]] = field(default_factory=list)  # (s, the host's TAP devices of ferry's)
    taps_ok: int = 0  # final checks: a NIC VM's TAP on the bridge
    problems: list[str] = field(default_factory=list)


class Pair:
    """Agents A and B on one state dir each, restartable."""

    def __init__(self, tmp: Path, bridge: str | None) -> None:
        self.tmp = tmp
        self.bridge = bridge  # None: no NICs (no bridge could be made)
        self.key = make_key(tmp)
        self.agents = {n: start_agent(tmp, n, self.key) for n in ("A", "B")}

    def other(self, name: str) -> str:
        return "B" if name == "A" else "A"

    def restart(self, name: str, sig: int) -> None:
        self.agents[name].stop(sig, keep_vms=True)
        self.agents[name] = start_agent(self.tmp, name, self.key)

    def owner(self, vm: str) -> list[str]:
        return [n for n, a in self.agents.items() if vm in {v["name"] for v in a.call("vm-list")["vms"]}]

    def stop(self) -> None:
        for a in self.agents.values():
            a.stop()


def unmigrated_digest() -> bytes:
    """The `digest` line a `verify` guest with VERIFY_ARGS prints when it is never migrated."""
    from vmruntime.runlocal import run_local

    out = io.BytesIO()
    assert run_local("verify", 4 << 20, dict(VERIFY_ARGS), out, max_seconds=300) == 0
    return next(ln for ln in out.getvalue().splitlines() if ln.startswith(b"digest "))


def create(agent: AgentProc, i: int, generation: int = 0, bridge: str | None = None) -> str:
    name = f"s{i}" if generation == 0 else f"s{i}g{generation}"
    nic = {"nic": {"bridge": bridge}} if bridge and i in NIC_SLOTS else {}
    if i < VERIFY_VMS:
        agent.call("vm-create", name=name, program="verify", mem="4M", args=VERIFY_ARGS)
    elif i % 2:
        agent.call("vm-create", name=name, program="memstress", mem="16M", args={"ws": "4M", "rate": "2000"}, **nic)
    else:
        agent.call("vm-create", name=name, program="counter", mem="8M", args={}, **nic)
    return name


def ferry_taps() -> list[str]:
    """The host's TAP devices named like ferry's (agent/nics.py): the soak's own, since the bench owns the host."""
    net = Path("/sys/class/net")
    return sorted(d.name for d in net.iterdir() if d.name.startswith(TAP_PREFIX) and (d / "tun_flags").exists())


def make_bridge() -> str | None:
    """A bridge for the NIC VMs, or None (with the reason on stderr) where none can be made."""
    name = f"fysoak{os.getpid() % 10000}"
    try:
        run_ip("link", "add", name, "type", "bridge")
        run_ip("link", "set", name, "up")
    except Exception as e:  # not root, no bridge support: the soak runs without NICs
        print(f"soak: no bridge ({e}); VMs without NICs", file=sys.stderr)
        return None
    return name


def sample(pair: Pair, soak: Soak) -> None:
    for name, agent in pair.agents.items():
        with contextlib.suppress(OSError, ValueError):
            status = Path(f"/proc/{agent.proc.pid}/status").read_text()
            rss = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmRSS:")))
            fds = len(os.listdir(f"/proc/{agent.proc.pid}/fd"))
            soak.samples.append((round(time.monotonic() - soak.started, 1), name, rss, fds))
    soak.taps.append((round(time.monotonic() - soak.started, 1), len(ferry_taps())))


def ping_pong(pair: Pair, seconds: float, restart_every: float, reference: bytes, seed: int) -> Soak:
    rnd = random.Random(seed)
    soak = Soak()
    vms: dict[str, int] = {}  # name -> slot (for verify replacement)
    generation = Counter[int]()
    for i in range(VMS):
        vms[create(pair.agents["A" if i % 2 else "B"], i, bridge=pair.bridge)] = i
    flying: dict[str, str] = {}  # vm -> the agent it leaves
    next_restart = time.monotonic() + restart_every
    next_sample = time.monotonic()
    restart_kind = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline or flying:
        now = time.monotonic()
        if now >= next_sample:
            sample(pair, soak)
            next_sample = now + SAMPLE_EVERY_S
        _collect(pair, flying, soak)
        _check_verify(pair, vms, set(flying), generation, reference, soak)
        if now < deadline and now >= next_restart:  # migrations in flight or not: that is the point
            victim = "AB"[restart_kind % 2]
            sig = signal.SIGKILL if restart_kind % 4 < 2 else signal.SIGTERM
            pair.restart(victim, sig)
            soak.restarts.append(f"{victim} {'kill -9' if sig == signal.SIGKILL else 'SIGTERM'} at "
                                 f"{now - soak.started:.0f} s")
            soak.restart_at.append(now - soak.started)
            restart_kind += 1
            next_restart = now + restart_every
            continue
        if now < deadline and len(flying) < IN_FLIGHT:
            _start_one(pair, vms, flying, soak, rnd)
        if flying and rnd.random() < 0.1 / CANCEL_EVERY_S:
            vm = rnd.choice(sorted(flying))
            soak.cancels += 1
            with contextlib.suppress(Exception):  # over already, or its agent restarting: a no-op
                pair.agents[flying[vm]].call("migrate-cancel", name=vm)
        time.sleep(0.1)
    sample(pair, soak)
    settled = _settle_all(pair)
    if settled:
        soak.problems.append(f"not running 60 s after the last migration: {settled}")
    return soak


def _settle_all(pair: Pair, seconds: float = 60.0) -> list[str]:
    """Wait until no VM is paused (a migration in doubt after a restart settles by itself); returns
    those still paused after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        paused = sorted(f"{v['name']}@{n}" for n, a in pair.agents.items() for v in a.call("vm-list")["vms"]
                        if v["state"] not in ("running", "halted"))
        if not paused or time.monotonic() > deadline:
            return paused
        time.sleep(0.5)


def _start_one(pair: Pair, vms: dict[str, int], flying: dict[str, str], soak: Soak, rnd: random.Random) -> None:
    idle = sorted(set(vms) - set(flying))
    if not idle:
        return
    vm = rnd.choice(idle)
    where = pair.owner(vm)
    if len(where) != 1:
        soak.problems.append(f"{vm} listed on {where or 'no agent'}")
        return
    src = pair.agents[where[0]]
    dst = pair.agents[pair.other(where[0])]
    try:
        src.call("migrate", name=vm, to=dst.control, params={}, **{"in-doubt-timeout": 10})
        flying[vm] = where[0]
    except Exception as e:  # refused at setup (busy, a name still reserved there): counted, tried later
        soak.outcomes[f"refused: {str(e)[:60]}"] += 1


def _collect(pair: Pair, flying: dict[str, str], soak: Soak) -> None:
    for vm, src in list(flying.items()):
        try:
            info = pair.agents[src].call("migrate-status", name=vm)
        except Exception:
            info = {"status": "failed (its source restarted)"}  # the restarted source knows nothing of it
        status = str(info.get("status"))
        if status in FINAL or status.startswith("failed ("):
            in_doubt = "in doubt" in str(info.get("error-desc", "")) or "in doubt" in str(info.get("summary", ""))
            soak.outcomes[status + (" (in doubt, settled)" if in_doubt else "")] += 1
            del flying[vm]


def _check_verify(pair: Pair, vms: dict[str, int], flying: set[str], generation: Counter[int], reference: bytes,
                  soak: Soak) -> None:
    """A `verify` guest that halted (not migrating): its digest checked, a fresh one in its place."""
    for vm, slot in list(vms.items()):
        if slot >= VERIFY_VMS or vm in flying:
            continue
        try:
            _check_one(pair, vm, slot, vms, generation, reference, soak)
        except (ClientError, OSError):  # it started migrating, its agent is restarting or overloaded: next time
            continue


def _check_one(pair: Pair, vm: str, slot: int, vms: dict[str, int], generation: Counter[int], reference: bytes,
               soak: Soak) -> None:
    where = pair.owner(vm)
    if len(where) == 1:
        agent = pair.agents[where[0]]
        if agent.call("vm-info", name=vm)["state"] != "halted":
            return
        console = agent.call("vm-console", name=vm).get("data", b"")
        agent.call("vm-destroy", name=vm)
        lines = [ln for ln in bytes(console).splitlines() if ln.startswith(b"digest ")]
        if not lines:
            soak.digests_unread += 1
        elif lines[-1] == reference:
            soak.digests_ok += 1
        else:
            soak.digests_bad.append(vm)
        del vms[vm]
        generation[slot] += 1
        vms[create(agent, slot, generation[slot])] = slot


def final_check(pair: Pair, soak: Soak) -> list[str]:
    """Every VM once, on one agent, running or halted, with its own live process, its NIC's TAP on
    the bridge; no other VM process, no other TAP device left."""
    seen: Counter[str] = Counter()
    taps: list[str] = []
    for name, agent in pair.agents.items():
        listed = agent.call("vm-list")["vms"]
        for v in listed:
            seen[v["name"]] += 1
            if v["state"] not in ("running", "halted"):
                soak.problems.append(f"{v['name']} is {v['state']} on {name}")
            for nic in agent.call("vm-info", name=v["name"]).get("nics", []):
                taps.append(nic["tap"])
                if Path(f"/sys/class/net/{pair.bridge}/brif/{nic['tap']}").exists():
                    soak.taps_ok += 1
                else:
                    soak.problems.append(f"{v['name']}'s TAP {nic['tap']} is not on {pair.bridge}")
        pids = {v["pid"] for v in listed}
        extra = [p for p in agent.group_processes() if p != agent.proc.pid and p not in pids]
        if extra:
            soak.problems.append(f"agent {name}: VM processes no VM owns: {extra}")
    twice = sorted(n for n, c in seen.items() if c > 1)
    if twice:
        soak.problems.append(f"listed on both agents: {twice}")
    left = sorted(set(ferry_taps()) - set(taps))
    if left:
        soak.problems.append(f"TAP devices no VM owns: {left}")
    return sorted(seen)


def taps_after_destroy(pair: Pair, soak: Soak) -> None:
    """Every VM destroyed on both agents: no TAP device of ferry's may be left on the host."""
    for agent in pair.agents.values():
        agent.destroy_all_vms()
    try:
        wait_for(lambda: not ferry_taps(), timeout=10, what="TAP devices removed")
    except AssertionError:
        soak.problems.append(f"TAP devices left after every VM was destroyed: {ferry_taps()}")


def fifty_at_once(pair: Pair) -> Counter[str]:
    a, b = pair.agents["A"], pair.agents["B"]
    names = [f"c{i}" for i in range(CONCURRENT)]
    key = a.key_path.read_bytes().strip()
    for n in names:  # a VM process start each: on an overloaded host one can take more than the usual 30 s
        call_sync(a.address, key, "vm-create", {"name": n, "program": "counter", "mem": "1M", "args": {}},
                  reply_within=SLOW_CALL_S)
    refusals: dict[str, str] = {}

    def start(n: str) -> None:
        try:
            a.call("migrate", name=n, to=b.control)
        except Exception as e:  # refused before it started: the VM must still run on A
            refusals[n] = str(e)[:80]

    threads = [threading.Thread(target=start, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    outcome: Counter[str] = Counter()
    for n in names:
        status = "refused" if n in refusals else wait_for(lambda n=n: _final(a, n), timeout=300,
                                                           what=f"migration of {n}")
        on_a = n in {v["name"] for v in a.call("vm-list")["vms"]}
        on_b = n in {v["name"] for v in b.call("vm-list")["vms"]}
        ok = (status == "completed" and on_b and not on_a) or (status != "completed" and on_a and not on_b)
        outcome[f"{status}, {'VM in the right place' if ok else 'VM MISPLACED'}"] += 1
    for why, count in Counter(refusals.values()).items():
        outcome[f"refused ({why})"] += count
    return outcome


def _final(agent: AgentProc, name: str) -> str | None:
    status = agent.call("migrate-status", name=name)["status"]
    return str(status) if status in FINAL else None


def report(soak: Soak, seconds: float, restart_every: float, vms: list[str], fifty: Counter[str]) -> str:
    out = [f"Ping-pong for {seconds / 60:.0f} min: {VMS} VMs ({VERIFY_VMS} `verify`), up to {IN_FLIGHT} "
           f"migrations at once, a random cancel every ~{CANCEL_EVERY_S:.0f} s, an agent restart every "
           f"{restart_every:.0f} s (kill -9 and SIGTERM in turn, A and B in turn)."]
    rows = [[k, v] for k, v in sorted(soak.outcomes.items())]
    rows += [["cancels sent (a no-op when the migration was over already)", soak.cancels], ["agent restarts", len(soak.restarts)],
             ["verify digests equal to the unmigrated run", soak.digests_ok],
             ["verify digests different", len(soak.digests_bad)],
             ["verify digests not readable (console lost)", soak.digests_unread],
             ["VMs at the end (each listed once, running or halted)", len(vms)],
             ["NIC VMs at the end with their TAP on the bridge", soak.taps_ok]]
    out.append(markdown_table(["what", "count"], rows, "lr"))
    for agent in ("A", "B"):
        s = [x for x in soak.samples if x[1] == agent]
        if s:
            rss, fds = [x[2] for x in s], [x[3] for x in s]
            out.append(f"Agent {agent} (restarted agents start afresh): RSS first {rss[0] / 1024:.1f} MiB, "
                       f"median {median(rss) / 1024:.1f}, max {max(rss) / 1024:.1f}, last {rss[-1] / 1024:.1f}; "
                       f"open fds first {fds[0]}, median {median(fds):.0f}, max {max(fds)}, last {fds[-1]} "
                       f"({len(s)} samples).")
    if soak.taps:
        counts = [n for _, n in soak.taps]
        out.append(f"TAP devices on the host: first {counts[0]}, max {max(counts)}, last {counts[-1]} "
                   f"({len(counts)} samples; {len(NIC_SLOTS)} VMs have a NIC).")
    out.append(f"{CONCURRENT} small migrations at once, A->B: "
               + ", ".join(f"{v} {k}" for k, v in sorted(fifty.items())) + ".")
    out.append("Problems found: " + ("none." if not soak.problems else "; ".join(soak.problems[:20])))
    return "\n\n".join(out)


def plot(soak: Soak, path: Path) -> str:
    """Draw the agents' RSS and open fds, and the host's TAP devices, over time; a line for the report."""
    plt = pyplot()
    if plt is None:
        return NO_PLOT
    fig, (rss_ax, fd_ax) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for agent in ("A", "B"):
        s = [x for x in soak.samples if x[1] == agent]
        minutes = [x[0] / 60 for x in s]
        rss_ax.plot(minutes, [x[2] / 1024 for x in s], label=f"agent {agent}")
        fd_ax.plot(minutes, [x[3] for x in s], label=f"agent {agent} fds")
    if soak.taps:
        fd_ax.step([t / 60 for t, _ in soak.taps], [n for _, n in soak.taps], where="post", label="TAP devices")
    for ax in (rss_ax, fd_ax):
        for t in soak.restart_at:
            ax.axvline(t / 60, linestyle=":", color="grey")
        ax.legend(fontsize="small")
    rss_ax.set(ylabel="RSS (MiB)", title="Soak: agent memory and descriptors (dotted: an agent restart)")
    fd_ax.set(xlabel="minutes", ylabel="count")
    fig.tight_layout()
    return save_figure(plt, fig, path, "agent RSS, fds and TAP devices over the soak", dpi=80)


@contextlib.contextmanager
def pair_in_tmp() -> Iterator[Pair]:
    tmp = Path(tempfile.mkdtemp(prefix="ferry-soak-", dir="/tmp"))
    bridge = make_bridge()
    pair = Pair(tmp, bridge)
    try:
        yield pair
    finally:
        pair.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        if bridge:
            with contextlib.suppress(Exception):
                run_ip("link", "del", bridge)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 minutes of ping-pong")
    ap.add_argument("--minutes", type=float, help="minutes of ping-pong (default 30, 3 with --quick)")
    ap.add_argument("--restart-every", type=float, help="seconds between agent restarts (default 180, 60 quick)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--plot", type=Path, help=f"draw RSS, fds and TAPs over time here (default {PLOT.name} "
                    "in docs/ in full mode, none with --quick)")
    a = ap.parse_args(argv)
    seconds = 60 * (a.minutes or (3 if a.quick else 30))
    restart_every = a.restart_every or (60 if a.quick else 180)
    reference = unmigrated_digest()
    with contextlib.redirect_stdout(sys.stderr), pair_in_tmp() as pair:  # agents' logs to stderr
        soak = ping_pong(pair, seconds, restart_every, reference, a.seed)
        vms = final_check(pair, soak)
        taps_after_destroy(pair, soak)
        try:
            fifty = fifty_at_once(pair)
        except Exception as e:  # still report the ping-pong: half an hour of it is worth the report
            soak.problems.append(f"{CONCURRENT} at once did not run to the end: {type(e).__name__}: {e}")
            fifty = Counter()
    text = report(soak, seconds, restart_every, vms, fifty)
    where = a.plot or (None if a.quick else PLOT)
    print(text + ("\n\n" + plot(soak, where) if where else ""))


if __name__ == "__main__":
    main()
