"""`ferry migrate`'s convergence flags (auto-converge, post-copy) and the post-copy figures of
the progress line and the summary (docs/cli.md)."""

from __future__ import annotations

import argparse
from typing import Any

from agent.config import valid_postcopy_after


def _postcopy_after(text: str) -> str:
    if valid_postcopy_after(text):
        return text
    raise argparse.ArgumentTypeError(f"must be auto, never or a round number >= 1, got {text!r}")


def add_flags(m: argparse.ArgumentParser) -> None:
    ac = m.add_mutually_exclusive_group()
    ac.add_argument("--auto-converge", action="store_true",
                    help="throttle the vCPU when rounds do not converge (the default)")
    ac.add_argument("--no-auto-converge", action="store_true",
                    help="never throttle: a guest pre-copy cannot catch fails (or, with --postcopy-after, "
                         "switches to post-copy)")
    pc = m.add_mutually_exclusive_group()
    pc.add_argument("--postcopy", action="store_true",
                    help="switch to post-copy right after the first full round: the VM resumes on the "
                         "destination, which fetches the pages it still lacks from this host")
    pc.add_argument("--postcopy-after", type=_postcopy_after, metavar="auto|N|never",
                    help="hybrid: pre-copy, then post-copy after round N, or (auto) when the policy sees "
                         "that pre-copy will not converge; never: pre-copy only")


def params(ns: argparse.Namespace) -> dict[str, Any]:
    """The flags' migration parameters (unset flags left out)."""
    out: dict[str, Any] = {}
    if ns.auto_converge or ns.no_auto_converge:
        out["auto-converge"] = bool(ns.auto_converge)
    if ns.postcopy:
        out["postcopy-after"] = "1"
    elif ns.postcopy_after is not None:
        out["postcopy-after"] = ns.postcopy_after
    return out


def progress(info: dict[str, Any]) -> str:
    """The post-copy part of the progress line ('' before the switch to post-copy)."""
    if "postcopy-requests" not in info:
        return ""
    line = f"  postcopy requests {info['postcopy-requests']}"
    if info.get("postcopy-blocktime") is not None:
        line += f" blocktime {info['postcopy-blocktime']} ms"
    if info.get("postcopy-latency-p50") is not None:
        line += f" latency p50 {info['postcopy-latency-p50']} ms p99 {info.get('postcopy-latency-p99')} ms"
    return line


def summary(info: dict[str, Any]) -> list[str]:
    line = progress(info)
    return [f"  post-copy:{line.split(' postcopy', 1)[1]}"] if line else []
