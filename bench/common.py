"""Shared helpers of ferry's benchmarks: statistics, the machine description, Markdown, subprocess runs.

This module owns what every benchmark script and the runner (``bench.run``)
share: the median and nearest-rank percentiles every table reports, the
description of the machine a run happened on (CPU model, cores, kernel,
Python, date, load average), Markdown table formatting, and running one
bench module in a subprocess under a time limit, collecting its output
(Markdown on stdout, or JSON with ``--json``) without ever raising because
the bench failed, and stopping whatever a bench left running.

The parsing and formatting functions are pure and unit-tested without
processes (tests/test_bench_common.py); ``describe_machine``,
``run_module`` and the orphan handling read /proc or start processes and
are exercised by the runner itself.
"""

from __future__ import annotations

import ctypes
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

GiB = 1 << 30
MiB = 1 << 20


# --- statistics -------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    """The median; ValueError on no values (a bench with no samples is a bug, not a zero)."""
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) by nearest rank: always an observed value, never interpolated.

    Nearest rank because a p99 over 100 samples should be a latency that
    actually happened, not a blend of the two largest.
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be within 0..1, got {q}")
    ordered = sorted(values)
    return float(ordered[round(q * (len(ordered) - 1))])


def rate_gib_s(nbytes: int, seconds: float) -> float:
    """Throughput in GiB/s; infinite for a zero duration rather than a ZeroDivisionError."""
    return nbytes / GiB / seconds if seconds > 0 else float("inf")


def format_size(nbytes: int) -> str:
    """A power-of-two size the way the tables print it: ``1 GiB``, ``64 MiB``, ``4096 B``."""
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", 1 << 10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale} {unit}"
    return f"{nbytes} B"


# --- Markdown ---------------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]],
                   align: str | None = None) -> str:
    """A GitHub Markdown table; ``align`` has one letter per column, ``l`` or ``r`` (default all ``l``).

    Pipes inside cells are escaped so a cell never splits the row.
    """
    align = align or "l" * len(headers)
    if len(align) != len(headers) or any(len(r) != len(headers) for r in rows):
        raise ValueError("every row and the alignment need one entry per header")
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = [_md_row(headers), _md_row(rule)]
    lines += [_md_row(r) for r in rows]
    return "\n".join(lines)


def _md_row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def tail(text: str, lines: int = 20) -> str:
    """The last ``lines`` non-blank-trailing lines of ``text`` (a failed bench's stderr)."""
    kept = text.rstrip().splitlines()[-lines:] if lines > 0 else []
    return "\n".join(kept)


# --- the machine ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Machine:
    """Where a run happened: enough to tell whether two runs are comparable."""

    cpu_model: str
    cores: int
    kernel: str
    python: str
    date: str  # UTC, ISO 8601 to the second
    memory: str = "unknown"  # MemTotal, e.g. "23.4 GiB"
    thp: str = "unknown"  # transparent huge pages, anonymous and shared: they decide fresh-memory speed

    def as_dict(self) -> dict[str, object]:
        return {"cpu_model": self.cpu_model, "cores": self.cores, "kernel": self.kernel,
                "python": self.python, "date": self.date, "memory": self.memory, "thp": self.thp}


def cpu_model_from_cpuinfo(text: str) -> str:
    """The first ``model name`` (x86) or ``Hardware``/``Processor`` line (Arm) of /proc/cpuinfo."""
    for key in ("model name", "hardware", "processor"):
        for line in text.splitlines():
            name, sep, value = line.partition(":")
            # "processor : 0" on x86 is an index, not a model: only accept a non-numeric value
            if sep and name.strip().lower() == key and value.strip() and not value.strip().isdigit():
                return value.strip()
    return "unknown"


def bracketed(text: str) -> str:
    """The selected choice of a sysfs setting such as ``always [madvise] never``, or ``unknown``."""
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else "unknown"


def mem_total_from_meminfo(text: str) -> str:
    """``MemTotal`` of /proc/meminfo in GiB, or ``unknown``."""
    for line in text.splitlines():
        fields = line.split()
        if fields[:1] == ["MemTotal:"] and len(fields) >= 2 and fields[1].isdigit():
            return f"{int(fields[1]) / (1 << 20):.1f} GiB"
    return "unknown"


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def describe_machine(now: datetime.datetime | None = None) -> Machine:
    """This machine, now (UTC)."""
    model = cpu_model_from_cpuinfo(_read("/proc/cpuinfo"))
    thp_dir = "/sys/kernel/mm/transparent_hugepage"
    thp = (f"anonymous {bracketed(_read(thp_dir + '/enabled'))}, "
           f"shared memory {bracketed(_read(thp_dir + '/shmem_enabled'))}")
    now = now or datetime.datetime.now(datetime.UTC)
    return Machine(cpu_model=model, cores=os.cpu_count() or 0, kernel=platform.release(),
                   python=platform.python_version(), date=now.strftime("%Y-%m-%d %H:%M:%S UTC"),
                   memory=mem_total_from_meminfo(_read("/proc/meminfo")), thp=thp)


def load_average() -> tuple[float, float, float]:
    """1, 5 and 15 minute load averages: how busy the shared machine was."""
    return os.getloadavg()


def format_load(load: tuple[float, float, float]) -> str:
    return " / ".join(f"{x:.2f}" for x in load)


# --- running a bench module -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModuleRun:
    """What one ``python -m bench.<name>`` run produced. Never raised: a failure is data."""

    module: str
    argv: tuple[str, ...]
    returncode: int | None  # None when it was killed for overrunning its time limit
    timed_out: bool
    seconds: float
    stdout: str
    stderr: str
    limit: float | None = None  # the time limit it ran under

    @property
    def ok(self) -> bool:
        return not self.timed_out and self.returncode == 0

    def json(self) -> Any:
        """The stdout parsed as JSON (for a run with ``--json``); ValueError if it is not JSON."""
        return json.loads(self.stdout)

    def status(self) -> str:
        """One phrase for the summary table: ``ok``, ``timed out (limit 60 s)``, ``failed (exit 1)``."""
        if self.timed_out:
            return f"timed out (limit {self.limit if self.limit is not None else self.seconds:.0f} s)"
        if self.returncode == 0:
            return "ok"
        if self.returncode is not None and self.returncode < 0:
            return f"failed (signal {-self.returncode})"
        return f"failed (exit {self.returncode})"


def module_argv(module: str, args: Sequence[str] = ()) -> list[str]:
    """The command line that runs ``module`` with this interpreter (the venv's, under ``make bench``)."""
    return [sys.executable, "-m", module, *args]


def run_module(module: str, args: Sequence[str] = (), *, timeout: float,
               cwd: str | None = None) -> ModuleRun:
    """Run ``python -m module args`` with a time limit; collect stdout and stderr. Never raises
    because of the bench (a failure or a timeout is in the result).

    Output goes to temporary files rather than pipes, unbuffered, so a bench
    killed at its limit still shows what it printed, and a grandchild that
    keeps a pipe open cannot hang the runner. At the limit the bench gets
    SIGINT first (its ``finally`` blocks stop the agents and VM processes it
    started), then SIGKILL for its whole process group after a grace period.
    Processes it started in sessions of their own (agents) and left behind
    are stopped too when this process is a subreaper (:func:`become_subreaper`).
    """
    argv = module_argv(module, args)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=cwd,
                                    env=env, start_new_session=True)
        except OSError as exc:
            return ModuleRun(module, tuple(argv), 127, False, 0.0, "", f"could not start: {exc}", timeout)
        exited = False
        try:
            exited = _wait_unreaped(proc.pid, timeout)
        finally:  # also on Ctrl-C in the runner: the bench is in its own session and would live on
            if not exited:
                _interrupt(proc.pid)
            # still unreaped, so its pid (= the group id) cannot have been reused: this kills the
            # bench if it is still running, and whatever it left behind in its group
            _signal_group(proc.pid, signal.SIGKILL)
            returncode = proc.wait()
            if _subreaper:
                stop_orphans()
        seconds = time.monotonic() - start
        return ModuleRun(module, tuple(argv), returncode if exited else None, not exited, seconds,
                         _read_text(out), _read_text(err), timeout)


GRACE_SECONDS = 15.0  # after SIGINT, before SIGKILL: enough to stop two agents and their VMs


def _interrupt(pid: int) -> None:
    """SIGINT the bench's group, like Ctrl-C, so its ``finally`` blocks stop what it started;
    wait a grace period for it to exit (a second Ctrl-C cuts the wait short)."""
    _signal_group(pid, signal.SIGINT)
    try:
        _wait_unreaped(pid, GRACE_SECONDS)
    except KeyboardInterrupt:
        pass


def _wait_unreaped(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` s for child ``pid`` to exit, leaving it a zombie; True if it exited."""
    deadline = time.monotonic() + timeout
    while True:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
        if info is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _signal_group(pgid: int, sig: int) -> None:
    """Signal the process group this module started (by its id); gone already is fine."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _read_text(f: IO[bytes]) -> str:
    f.seek(0)
    return f.read().decode("utf-8", errors="replace")


# --- orphans of a bench -----------------------------------------------------------------------

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
_subreaper = False  # set by become_subreaper(): only then are this process's other children orphans


def become_subreaper() -> bool:
    """Make this process adopt its orphaned descendants (prctl PR_SET_CHILD_SUBREAPER).

    Benches start agents with ``start_new_session``, outside their process
    group; should a bench die without stopping them, they become children of
    the runner instead of init, and :func:`stop_orphans` can stop them.
    """
    global _subreaper
    libc = ctypes.CDLL(None, use_errno=True)
    _subreaper = libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    return _subreaper


def parent_pid(stat: str) -> int:
    """The ppid field of a /proc/PID/stat line (the comm field may hold spaces and parentheses)."""
    return int(stat[stat.rindex(")") + 2:].split()[1])


def child_pids(parent: int) -> list[int]:
    """Live children of ``parent`` (zombies included), from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                if parent_pid(f.read()) == parent:
                    found.append(int(entry))
        except (OSError, ValueError):
            continue  # exited while we looked
    return found


def stop_orphans(grace: float = 5.0) -> list[int]:
    """SIGTERM, then SIGKILL after ``grace`` s, every child of this process, and reap them.

    Only for the runner (a subreaper whose one child at a time is the bench,
    already reaped when this runs): any child left is an orphan that bench
    started. Elsewhere it would stop and reap children that are not orphans. Returns
    the pids stopped (empty in the normal case).
    """
    stopped: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = child_pids(os.getpid())
        for pid in pids:
            _signal_pid(pid, sig)
        stopped += [p for p in pids if p not in stopped]
        deadline = time.monotonic() + grace
        while _reap_children() and time.monotonic() < deadline:
            time.sleep(0.05)
    _reap_children()
    return stopped


def _signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _reap_children() -> bool:
    """Reap every exited child without blocking; True while some child is still alive."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False  # no children at all
        if pid == 0:
            return True


NO_PLOT = "(No plot: matplotlib is not installed; `pip install -e '.[bench]'`.)"


def pyplot() -> Any:
    """matplotlib's pyplot, drawing into files (no display), or None without matplotlib (the
    ``bench`` extra): the benches then say so in place of a plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(plt: Any, fig: Any, path: Path, alt: str, dpi: int = 90) -> str:
    """Write ``fig`` to ``path`` and close it; returns the Markdown image line for the report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return f"![{alt}]({path.name})"
