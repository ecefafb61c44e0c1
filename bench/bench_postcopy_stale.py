"""Post-copy's downtime with the stale pages punched against MINOR mode, in one run.

Results: docs/PERFORMANCE.md, sections 17 and 20.

The section 17 scenario: a ``verify`` guest of ``--mem`` writing a ``--ws`` working set flat out,
migrated back and forth on loopback with ``--postcopy`` (``postcopy-after 1``). First with agents
that punch the stale pages (started with ``FERRY_POSTCOPY_MINOR=0``), then with agents that use
userfaultfd MINOR mode where the kernel has it (``minor`` is skipped, with the reason, where it
does not), ``--runs`` migrations each. Reported: the downtime (median and worst), its parts as
the source measures them (pause, state: the last harvest, discards and device state; verify: up
to the destination's READY; commit: COMMIT to RESUMED), and the destination's
``postcopy-register`` (its registration and fault server's start, inside commit).

    .venv/bin/python -m bench.bench_postcopy_stale [--quick] [--runs 3] [--mem 512M] [--ws 256M] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.bench_migrate import migrate_once
from bench.common import markdown_table, median
from tests.agents import make_key, start_agent
from vmruntime import postcopy
from vmruntime.programs import parse_size

PARTS = ("pause", "state", "verify", "commit")


@contextlib.contextmanager
def _env(name: str, value: str | None) -> Any:
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def runs_with(setting: str, mem: int, ws: int, runs: int) -> list[dict[str, Any]]:
    """``runs`` post-copy migrations between two fresh agents whose MINOR mode is ``setting``."""
    tmp = Path(tempfile.mkdtemp(prefix=f"ferry-bench-stale-{setting}-"))
    key = make_key(tmp)
    out: list[dict[str, Any]] = []
    with _env(postcopy.MINOR_ENV, "0" if setting == "punch" else None), contextlib.redirect_stdout(sys.stderr), \
            start_agent(tmp, "A", key) as a, start_agent(tmp, "B", key) as b:
        a.call("vm-create", name="stale", program="verify", mem=str(mem), args={"ws": str(ws), "steps": str(10**12)})
        time.sleep(3.0)  # the working set written once, flat out since
        src, dst = a, b
        for _ in range(runs):
            info = migrate_once(src, dst, "stale", {"postcopy-after": "1"})
            incoming = dst.call("migrate-status", name="stale")
            out.append({"status": info["status"], "downtime": info.get("downtime"),
                        "breakdown": info.get("downtime-breakdown", {}), "error": info.get("error-desc"),
                        "register": incoming.get("downtime-breakdown", {}).get("postcopy-register"),
                        "mode": incoming.get("postcopy-mode"), "stale": incoming.get("pages-placed")})
            print(f"{setting}: {out[-1]}", file=sys.stderr)
            if info["status"] == "completed":
                src, dst = dst, src
            time.sleep(2.0)
        src.call("vm-destroy", name="stale")
    return out


def cell(values: list[float]) -> str:
    return f"{median(values):.1f} ({max(values):.1f})" if values else "-"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="256M guest, ws=128M, 2 runs per setting")
    ap.add_argument("--mem", help="guest RAM (default 512M)")
    ap.add_argument("--ws", help="the verify guest's working set (default 256M)")
    ap.add_argument("--runs", type=int, help="migrations per setting (default 3)")
    ap.add_argument("--json", action="store_true", help="print every migration as JSON")
    a = ap.parse_args(argv)
    a.mem = a.mem or ("256M" if a.quick else "512M")
    a.ws = a.ws or ("128M" if a.quick else "256M")
    a.runs = a.runs or (2 if a.quick else 3)
    mem, ws = parse_size(a.mem), parse_size(a.ws)
    if a.runs < 1 or ws >= mem:
        ap.error("--runs must be at least 1 and --ws below --mem")
    settings = ["punch"] + (["minor"] if postcopy.minor_available() else [])
    if "minor" not in settings:
        print("minor: skipped: this kernel offers no userfaultfd MINOR mode on shmem", file=sys.stderr)
    results = {s: runs_with(s, mem, ws, a.runs) for s in settings}
    if a.json:
        print(json.dumps(results, indent=1))
        return
    rows = []
    for setting, runs in results.items():
        done = [r for r in runs if r["status"] == "completed"]
        rows.append([setting, f"{len(done)}/{len(runs)}", cell([float(r["downtime"]) for r in done]),
                     *[cell([float(r["breakdown"].get(p, 0.0)) for r in done]) for p in PARTS],
                     cell([float(r["register"]) for r in done if r["register"] is not None]),
                     cell([float(r["stale"] or 0) for r in done])])
    print(f"verify {a.mem}, ws={a.ws}, --postcopy, {a.runs} runs per setting; ms, median (worst)\n")
    print(markdown_table(["stale pages", "completed", "downtime", *PARTS, "postcopy-register", "pages placed"],
                         rows, "lrrrrrrrr"))


if __name__ == "__main__":
    main()
