"""Unit tests of the benchmark helpers: statistics, Markdown, parsing, the report layout.

Pure functions only; the benches themselves run under ``make bench``, never in the test suite.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bench import baseline_copy, run
from bench.common import (
    Machine,
    ModuleRun,
    bracketed,
    cpu_model_from_cpuinfo,
    format_size,
    markdown_table,
    median,
    mem_total_from_meminfo,
    parent_pid,
    percentile,
    rate_gib_s,
    tail,
)


def test_median_odd_even_and_empty() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5
    with pytest.raises(ValueError):
        median([])


def test_percentile_is_nearest_rank_observed_value() -> None:
    values = [float(v) for v in range(100, 0, -1)]  # 1..100, unsorted
    assert percentile(values, 0.0) == 1.0
    assert percentile(values, 1.0) == 100.0
    assert percentile([1.0, 2.0, 10.0, 11.0], 0.5) in (2.0, 10.0)  # observed, never the 6.0 blend
    assert percentile(values, 0.99) == 99.0
    with pytest.raises(ValueError):
        percentile(values, 1.5)
    with pytest.raises(ValueError):
        percentile([], 0.5)


def test_rate_and_size_formatting() -> None:
    assert rate_gib_s(4 << 30, 2.0) == 2.0
    assert rate_gib_s(1, 0.0) == float("inf")
    assert format_size(1 << 30) == "1 GiB"
    assert format_size(64 << 20) == "64 MiB"
    assert format_size(1536 << 20) == "1536 MiB"
    assert format_size(4097) == "4097 B"


def test_markdown_table_alignment_and_escaping() -> None:
    text = markdown_table(["a", "b"], [["x|y", 1.5]], "lr")
    assert text.splitlines() == ["| a | b |", "| --- | ---: |", "| x\\|y | 1.5 |"]
    with pytest.raises(ValueError):
        markdown_table(["a", "b"], [["only one"]])


def test_tail_keeps_last_lines() -> None:
    assert tail("1\n2\n3\n4\n\n", 2) == "3\n4"
    assert tail("", 5) == ""


def test_cpu_model_x86_arm_and_unknown() -> None:
    x86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n"
    assert cpu_model_from_cpuinfo(x86) == "AMD EPYC 7B13"
    arm = "processor\t: 0\nBogoMIPS\t: 50.00\nHardware\t: BCM2835\n"
    assert cpu_model_from_cpuinfo(arm) == "BCM2835"
    assert cpu_model_from_cpuinfo("processor\t: 0\n") == "unknown"


def test_sysfs_choice_and_meminfo() -> None:
    assert bracketed("always [madvise] never\n") == "madvise"
    assert bracketed("") == "unknown"
    assert mem_total_from_meminfo("MemTotal:       24576000 kB\nMemFree: 1 kB\n") == "23.4 GiB"
    assert mem_total_from_meminfo("MemFree: 1 kB\n") == "unknown"


def _run(returncode: int | None, timed_out: bool = False, stdout: str = "", stderr: str = "") -> ModuleRun:
    return ModuleRun("bench.x", ("py", "-m", "bench.x", "--quick"), returncode, timed_out, 12.0, stdout, stderr)


def test_module_run_status() -> None:
    assert _run(0).ok and _run(0).status() == "ok"
    assert _run(None, timed_out=True).status() == "timed out (limit 12 s)"
    limited = ModuleRun("bench.x", (), None, True, 16.0, "", "", 1.0)
    assert limited.status() == "timed out (limit 1 s)"
    assert _run(2).status() == "failed (exit 2)" and not _run(2).ok
    assert _run(-9).status() == "failed (signal 9)"


def test_failed_section_has_status_output_and_stderr_tail() -> None:
    stderr = "\n".join(f"line {i}" for i in range(100)) + "\nboom ```"
    result = run.BenchResult("bench_x", "X things", _run(1, stdout="| partial |", stderr=stderr), (1.0, 1.0, 1.0))
    text = run.render_section(result)
    assert "failed (exit 1)" in text and "`python -m bench.x --quick`" in text
    assert "| partial |" in text
    assert "boom ```" in text and "line 99" in text and "line 50" not in text
    assert "\n````\n" in text  # the fence outgrows the backticks inside stderr


def test_report_has_machine_load_note_and_sections() -> None:
    machine = Machine("CPU Z", 2, "6.18", "3.11.7", "2026-01-01 00:00:00 UTC")
    ok = run.BenchResult("bench_a", "A", _run(0, stdout="| t |\n|---|\n| 1 |\n"), (0.5, 0.5, 0.5))
    report = run.Report(machine, True, (1.0, 2.0, 3.0), (4.0, 5.0, 6.0), 30.0, (ok,), ("bench_migrate",))
    text = run.render(report)
    for needle in ("CPU Z", "6.18", "3.11.7", "2026-01-01", "1.00 / 2.00 / 3.00", "4.00 / 5.00 / 6.00",
                   "shared", "| 1 |", "`bench_migrate`", "## bench_a: A"):
        assert needle in text


def test_update_replaces_a_bench_s_section_and_row_and_adds_a_new_one() -> None:
    machine = Machine("CPU Z", 2, "6.18", "3.11.7", "2026-01-01 00:00:00 UTC")
    a = run.BenchResult("bench_a", "A", _run(0, stdout="old a"), (0.5, 0.5, 0.5))
    b = run.BenchResult("bench_b", "B", _run(0, stdout="old b"), (0.5, 0.5, 0.5))
    text = run.render(run.Report(machine, False, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), 30.0, (a, b), (), "# P\n\nold"))
    new_a = run.BenchResult("bench_a", "A", _run(0, stdout="new a"), (2.5, 2.5, 2.5))
    new_c = run.BenchResult("bench_c", "C", _run(0, stdout="new c"), (3.5, 3.5, 3.5))
    out = run.update(text, [new_a, new_c], "# P\n\nnew", "2026-01-02 10:00 UTC")
    assert "new a" in out and "old a" not in out and "old b" in out and "new c" in out
    assert out.index("new a") < out.index("old b") < out.index("new c")  # in place; a new one last
    rows = [ln for ln in out.splitlines() if ln.startswith("| [bench_")]
    assert [r.split("]")[0] for r in rows] == ["| [bench_a", "| [bench_b", "| [bench_c"]
    assert "2.50" in rows[0] and "3.50" in rows[2]
    assert "`bench_a` ran on its own at 2026-01-02 10:00 UTC" in out and "CPU Z" in out
    assert "new" in out.split("## What the optimisations bought")[1].split("<a id=")[0]
    again = run.update(out, [new_a], "# P\n\nnew", "2026-01-03 10:00 UTC")
    assert again.count("`bench_a` ran on its own") == 1 and "2026-01-03 10:00 UTC" in again


def test_discover_orders_known_first_then_extras(tmp_path: Path) -> None:
    for name in ("bench_proto", "baseline_copy", "bench_zzz", "common", "run"):
        (tmp_path / f"{name}.py").write_text('"""Title line.\n\nMore."""\n')
    names, missing = run.discover(tmp_path)
    assert names == ["baseline_copy", "bench_proto", "bench_zzz"]
    assert "bench_migrate" in missing and "bench_proto" not in missing
    assert run.title_of("bench_zzz", tmp_path) == "Title line"
    assert run.select(names, ["bench_zzz", "baseline_copy"]) == ["baseline_copy", "bench_zzz"]
    with pytest.raises(SystemExit):
        run.select(names, ["nope"])


def test_baseline_parsers() -> None:
    assert baseline_copy.shmem_thp_mode("always within_size advise [never] deny force\n") == "never"
    assert baseline_copy.shmem_thp_mode("garbage") == "unknown"
    assert baseline_copy.parse_size("64M") == 64 << 20 and baseline_copy.parse_size("8192") == 8192
    with pytest.raises(argparse.ArgumentTypeError):
        baseline_copy.parse_size("100")  # not a whole page
    smaps = (
        "7f0000000000-7f0040000000 rw-s 00000000 00:01 5 /memfd:ferry-baseline-recv (deleted)\n"
        "Rss:             1048576 kB\nShmemPmdMapped:   786432 kB\nVmFlags: rd wr sh\n"
        "7f0050000000-7f0050001000 rw-p 00000000 00:00 0\n"
        "Rss:                   4 kB\nShmemPmdMapped:        0 kB\n"
    )
    assert baseline_copy.huge_share_of(smaps, "ferry-baseline-recv") == 0.75
    assert baseline_copy.huge_share_of(smaps, "other") == 0.0


def test_parent_pid_survives_odd_process_names() -> None:
    assert parent_pid("1234 (python3) S 77 1234 1234 0 -1") == 77
    assert parent_pid("1234 (a) b (c) R 5 1 1 0 -1") == 5  # comm may contain ") "
