"""bench/bench_soak.py's report: what it counts and when it says something went wrong."""

from __future__ import annotations

from collections import Counter

from bench.bench_soak import Soak, report


def test_report_counts_outcomes_samples_and_problems() -> None:
    soak = Soak(outcomes=Counter({"completed": 40, "cancelled": 3}), cancels=5, restarts=["A kill -9 at 60 s"],
                digests_ok=7, digests_bad=["s1g2"], samples=[(0.0, "A", 30000, 20), (10.0, "A", 40960, 24)],
                taps=[(0.0, 2), (10.0, 3), (20.0, 2)], taps_ok=2)
    text = report(soak, 1800, 180, ["s0", "s1"], Counter({"completed, VM in the right place": 50}))
    assert "| completed | 40 |" in text and "| cancelled | 3 |" in text
    assert "| verify digests different | 1 |" in text and "| agent restarts | 1 |" in text
    assert "RSS first 29.3 MiB" in text and "max 40.0" in text and "open fds first 20" in text
    assert "| NIC VMs at the end with their TAP on the bridge | 2 |" in text
    assert "TAP devices on the host: first 2, max 3, last 2 (3 samples" in text
    assert "50 completed, VM in the right place" in text and "Problems found: none." in text
    soak.problems.append("s3 listed on ['A', 'B']")
    assert "Problems found: s3 listed on ['A', 'B']" in report(soak, 60, 60, [], Counter())
