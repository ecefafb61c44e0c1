"""The benchmark runner behind ``make bench``: every bench module, one report, docs/BENCHMARKS.md.

This module owns the layout of docs/BENCHMARKS.md. It runs each bench
module that exists (the raw copy baseline first, so ferry's figures can be
read as ratios to a baseline of the same run), each in its own subprocess
under a time limit, and writes: a header with the machine, the date and the
load average before and after; a summary table; then one section per bench
with its Markdown output verbatim; docs/PERFORMANCE.md (hand-written, by topic: what limits
each phase, what was tried and kept) goes in after the summary. A bench that fails or overruns its limit
gets a section saying so, with whatever it printed and the tail of its
stderr: the runner itself never fails because a bench did.

    .venv/bin/python -m bench.run [--quick] [--only NAME[,NAME...]] [--timeout SECONDS]
        [--out docs/BENCHMARKS.md] [--update]

``--update`` runs the named benches (``--only``) and puts their sections into the existing report
in place of the ones it had, with their own date and load in the header, and the hand-written
section from docs/PERFORMANCE.md as it is now; every other section stays from its own run.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    Machine,
    ModuleRun,
    become_subreaper,
    describe_machine,
    format_load,
    load_average,
    markdown_table,
    run_module,
    tail,
)

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"
DEFAULT_OUT = ROOT / "docs" / "BENCHMARKS.md"
# Hand-written, by topic: what limits each phase, what was tried and kept. Included in the report, never generated.
NARRATIVE = ROOT / "docs" / "PERFORMANCE.md"
# The order of the report: the baseline first, then bottom-up through ferry's parts to whole migrations.
KNOWN = ("baseline_copy", "bench_interp", "bench_pause", "bench_dirty", "bench_vec", "bench_slowdown", "bench_proto",
         "bench_migrate", "bench_downtime", "bench_sweep", "bench_scaling", "bench_distance", "bench_compress",
         "bench_net",
         "bench_storage", "bench_soak")
TIMEOUT_FULL = 1200.0  # s per bench; a full bench_migrate moves tens of GiB on a loaded machine
# Benches that need longer in full mode: bench_migrate runs QEMU's pre-copy and iperf3 next to
# every data-path migration (8-11 min of its own under load, before its cases).
TIMEOUT_FULL_OF = {"bench_migrate": 2700.0, "bench_soak": 3000.0, "bench_streams": 2700.0}  # the soak runs 30 minutes on its own
TIMEOUT_QUICK = 300.0
TIMEOUT_QUICK_OF = {"bench_soak": 900.0}  # 3 minutes of ping-pong, then 50 migrations at once
STDERR_TAIL = 30  # lines of a failed bench's stderr kept in the report

NOISE_NOTE = (
    "> These machines are shared (several people build and test on the same cores at once) and noisy. "
    "Every figure is a median of several runs, several benches report CPU time rather than wall time, "
    "and ferry's throughput figures are meant to be read as ratios to the baselines measured in the "
    "same run (section `baseline_copy`), not compared as absolute numbers across runs or machines. "
    "The load average before and after the run says how busy the machine was."
)


@dataclass(frozen=True, slots=True)
class BenchResult:
    """One bench in the report: its module run plus what the runner saw around it."""

    name: str
    title: str  # first line of the module's docstring
    run: ModuleRun
    load_before: tuple[float, float, float]


@dataclass(frozen=True, slots=True)
class Report:
    machine: Machine
    quick: bool
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    seconds: float
    results: tuple[BenchResult, ...]
    missing: tuple[str, ...]  # known benches whose module does not exist (yet)
    narrative: str = ""  # docs/PERFORMANCE.md, included after the summary


# --- what to run ------------------------------------------------------------------------------


def discover(bench_dir: Path = BENCH_DIR) -> tuple[list[str], list[str]]:
    """(benches to run in report order, known benches that are missing).

    Any other ``bench_*.py`` found is run after the known ones, so a new
    bench shows up in the report without touching the runner.
    """
    present = {p.stem for p in bench_dir.glob("*.py")}
    extra = sorted(n for n in present if n.startswith("bench_") and n not in KNOWN)
    return [n for n in KNOWN if n in present] + extra, [n for n in KNOWN if n not in present]


def select(names: list[str], only: Sequence[str]) -> list[str]:
    """The benches named in ``only`` (all when empty), in report order; unknown names are an error."""
    if not only:
        return names
    unknown = sorted(set(only) - set(names))
    if unknown:
        raise SystemExit(f"no such bench: {', '.join(unknown)} (have: {', '.join(names)})")
    return [n for n in names if n in only]


def title_of(name: str, bench_dir: Path = BENCH_DIR) -> str:
    """First line of the module's docstring, read without importing it (an import could fail or be slow)."""
    try:
        doc = ast.get_docstring(ast.parse((bench_dir / f"{name}.py").read_text()))
    except (OSError, SyntaxError, ValueError):
        doc = None
    return doc.strip().splitlines()[0].rstrip(".") if doc and doc.strip() else name


# --- rendering (pure) -------------------------------------------------------------------------

SUMMARY_HEADERS = ["bench", "status", "time s", "load at start"]


def render(report: Report) -> str:
    """The whole of docs/BENCHMARKS.md."""
    parts = [render_header(report), render_summary(report)]
    if report.narrative.strip():
        parts.append(render_narrative(report.narrative))
    parts += [render_section(r) for r in report.results]
    return "\n\n".join(parts) + "\n"


def render_header(report: Report) -> str:
    m = report.machine
    mode = "quick (`--quick`: smaller sizes, fewer runs)" if report.quick else "full"
    rows: list[list[object]] = [
        ["CPU", m.cpu_model], ["cores", m.cores], ["memory", m.memory], ["kernel", m.kernel],
        ["transparent huge pages", m.thp], ["Python", m.python], ["date", m.date], ["mode", mode],
        ["load average before (1/5/15 min)", format_load(report.load_before)],
        ["load average after (1/5/15 min)", format_load(report.load_after)],
        ["total time", f"{report.seconds:.0f} s"],
    ]
    return "\n\n".join([
        "# ferry benchmarks",
        "Generated by `make bench` (`python -m bench.run`); rerun it rather than editing this file. "
        "Each section is one `bench/` module's output, verbatim.",
        markdown_table(["machine", ""], rows),
        NOISE_NOTE,
    ])


def summary_row(r: BenchResult) -> list[object]:
    return [f"[{r.name}](#{r.name})", r.run.status(), f"{r.run.seconds:.1f}", f"{r.load_before[0]:.2f}"]


def render_summary(report: Report) -> str:
    rows = [summary_row(r) for r in report.results]
    text = "## Summary\n\n" + markdown_table(SUMMARY_HEADERS, rows, "llrr")
    if report.missing:
        text += "\n\nNot present, so not run: " + ", ".join(f"`{n}`" for n in report.missing) + "."
    return text


def render_narrative(text: str) -> str:
    """docs/PERFORMANCE.md as a section: its headings pushed one level down, under one of ours."""
    lines = text.strip().splitlines()
    if lines and lines[0].startswith(("# ", "## ")):
        lines = lines[1:]  # its own title: ours replaces it
    in_code = False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            in_code = not in_code
        elif line.startswith("#") and not in_code:  # a heading, not a shell comment in a code block
            lines[i] = "#" + line
    return ("## What the optimisations bought\n\nFrom [docs/PERFORMANCE.md](PERFORMANCE.md) (hand-written, "
            "figures from the runs it names; the tables below are this run's).\n\n" + "\n".join(lines).strip())


def render_section(r: BenchResult) -> str:
    run = r.run
    command = " ".join(["python", "-m", run.module, *run.argv[3:]])
    head = f'<a id="{r.name}"></a>\n## {r.name}: {r.title}\n\n`{command}`: {run.status()}, {run.seconds:.1f} s.'
    if run.ok:
        return head + "\n\n" + (run.stdout.strip() or "(no output)")
    body = [head]
    if run.stdout.strip():
        body.append("Output before it stopped:\n\n" + run.stdout.strip())
    err = tail(run.stderr, STDERR_TAIL)
    body.append(f"Last {STDERR_TAIL} lines of stderr:\n\n" + fenced(err) if err else "(nothing on stderr)")
    return "\n\n".join(body)


def update(text: str, results: Sequence[BenchResult], narrative: str, when: str) -> str:
    """The report ``text`` with the sections of ``results`` (run on their own at ``when``) put in
    place of the ones it had (a new bench's after the last section), their summary rows likewise,
    a header line saying when they ran, and the hand-written section replaced by ``narrative``."""
    rows = dict(line.split(" | ", 1) for line in text.splitlines() if line.startswith("| [bench_")
                or line.startswith("| [baseline_"))
    for r in results:
        section = render_section(r)
        start = text.find(f'<a id="{r.name}"></a>')
        if start < 0:
            text = text.rstrip("\n") + "\n\n" + section + "\n"
        else:
            end = text.find('<a id="', start + 1)
            text = text[:start] + section + ("\n\n" + text[end:] if end >= 0 else "\n")
        row = markdown_table(SUMMARY_HEADERS, [summary_row(r)], "llrr").splitlines()[-1]
        key = f"| [{r.name}](#{r.name})"
        if key in rows:
            text = text.replace(f"{key} | {rows[key]}", row)
        else:
            last = max(text.rfind("\n| [bench_"), text.rfind("\n| [baseline_"))
            eol = text.index("\n", last + 1)
            text = text[:eol + 1] + row + text[eol:]
        note = f"> `{r.name}` ran on its own at {when}, load at its start {r.load_before[0]:.2f}; the rest is the run above."
        text = "".join(ln for ln in text.splitlines(keepends=True) if not ln.startswith(f"> `{r.name}` ran on its own"))
        anchor = text.index("## Summary")
        text = text[:anchor] + note + "\n\n" + text[anchor:]
    if narrative.strip():
        start = text.find("## What the optimisations bought")
        end = text.find("<a id=", start)
        if start >= 0 and end >= 0:
            text = text[:start] + render_narrative(narrative) + "\n\n" + text[end:]
    return text


def fenced(text: str) -> str:
    """A code block whose fence is longer than any backtick run inside, so ``text`` cannot end it."""
    longest = run_len = 0
    for ch in text:
        run_len = run_len + 1 if ch == "`" else 0
        longest = max(longest, run_len)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text}\n{fence}"


# --- running ----------------------------------------------------------------------------------


def run_all(names: list[str], quick: bool, timeout: float) -> list[BenchResult]:
    """Run the benches one after another (never two at once: they would measure each other)."""
    results = []
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] bench.{name} ...", file=sys.stderr, flush=True)
        load = load_average()
        limit = max(timeout, (TIMEOUT_QUICK_OF if quick else TIMEOUT_FULL_OF).get(name, 0.0))
        run = run_module(f"bench.{name}", ["--quick"] if quick else [], timeout=limit, cwd=str(ROOT))
        print(f"[{i}/{len(names)}] bench.{name}: {run.status()}, {run.seconds:.1f} s", file=sys.stderr,
              flush=True)
        results.append(BenchResult(name, title_of(name), run, load))
    return results


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` in one step, so an interrupted run never leaves half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="pass --quick to every bench")
    ap.add_argument("--only", type=lambda s: [x.strip() for x in s.split(",") if x.strip()], default=[],
                    help="comma-separated bench names (default: all that exist)")
    ap.add_argument("--timeout", type=float, help=f"seconds per bench (default {TIMEOUT_FULL:.0f}, "
                                                  f"{TIMEOUT_QUICK:.0f} with --quick)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="report file (default docs/BENCHMARKS.md)")
    ap.add_argument("--update", action="store_true",
                    help="put the --only benches' sections into the existing report instead of writing a new one")
    a = ap.parse_args(argv)
    if a.update and not (a.only and a.out.is_file()):
        ap.error("--update needs --only NAME[,NAME...] and an existing report to update")
    become_subreaper()  # agents a bench starts in their own session come back to us if it dies
    # Ctrl-C works even when started in the background (which ignores SIGINT and would pass the
    # ignoring on to every bench, defeating the SIGINT a bench gets at its time limit)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    names, missing = discover()
    names = select(names, a.only)
    timeout = a.timeout or (TIMEOUT_QUICK if a.quick else TIMEOUT_FULL)
    machine, load_before = describe_machine(), load_average()
    start = datetime.datetime.now(datetime.UTC)
    try:
        results = run_all(names, a.quick, timeout)
    except KeyboardInterrupt:  # the running bench was stopped by run_module; keep the last full report
        print(f"interrupted: {a.out} left as it was", file=sys.stderr)
        raise SystemExit(130) from None
    seconds = (datetime.datetime.now(datetime.UTC) - start).total_seconds()
    narrative = NARRATIVE.read_text() if NARRATIVE.is_file() else ""
    if a.update:
        when = start.strftime("%Y-%m-%d %H:%M UTC")
        write_atomically(a.out, update(a.out.read_text(), results, narrative, when))
        print(f"updated {a.out}", file=sys.stderr)
        return
    report = Report(machine, a.quick, load_before, load_average(), seconds, tuple(results), tuple(missing),
                    narrative)
    write_atomically(a.out, render(report))
    print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
