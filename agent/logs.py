"""One-line structured logs on stderr: `ts=... level=info agent=A msg="vm created" vm=c1 mem=67108864`.

This module owns the agent's log format. A `Log` carries fixed fields (the agent name, and through
`bind()` e.g. a VM or peer name) and writes one logfmt line per call, so logs grep and parse
without a schema. The migration engine receives a `Log` as its `log` argument.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


def _quote(value: object) -> str:
    """Render one logfmt value: bare when it is a simple token, else double-quoted with escapes."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "backslashreplace")
    if isinstance(value, float):
        text = f"{value:.6g}"
    else:
        text = str(value)
    if text and not any(c in text for c in ' "=\\\n\t') and text.isprintable():
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{escaped}"'


def _timestamp(now: float) -> str:
    """UTC with milliseconds, e.g. 2026-11-22T00:04:04.123Z."""
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
    return f"{whole}.{int(now * 1000) % 1000:03d}Z"


def format_line(level: str, msg: str, fixed: dict[str, Any], fields: dict[str, Any], now: float) -> str:
    """One log line, without the newline: ts, level, agent, msg, then the bound and the call's fields."""
    parts = [f"ts={_timestamp(now)}", f"level={level}"]
    if "agent" in fixed:
        parts.append(f"agent={_quote(fixed['agent'])}")
    parts.append(f"msg={_quote(msg)}")
    rest = {**{k: v for k, v in fixed.items() if k != "agent"}, **fields}
    parts += [f"{k.replace('_', '-')}={_quote(v)}" for k, v in rest.items() if v is not None]
    return " ".join(parts)


class Log:
    """A structured logger: `log.info("vm created", vm="c1", mem=67108864)`."""

    def __init__(self, level: str = "info", stream: TextIO | None = None, **fixed: Any) -> None:
        self.level = level
        self._threshold = LEVELS[level]
        self._stream = stream
        self._fixed = fixed

    def bind(self, **fields: Any) -> Log:
        """A logger with more fixed fields (e.g. vm=NAME), writing to the same stream."""
        return Log(self.level, self._stream, **{**self._fixed, **fields})

    def log(self, level: str, msg: str, **fields: Any) -> None:
        if LEVELS.get(level, 20) < self._threshold:
            return
        line = format_line(level, msg, self._fixed, fields, time.time())
        stream = self._stream or sys.stderr  # looked up late so tests capturing stderr see the lines
        try:
            stream.write(line + "\n")
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken stderr must never take the agent down

    def debug(self, msg: str, **fields: Any) -> None:
        self.log("debug", msg, **fields)

    def info(self, msg: str, **fields: Any) -> None:
        self.log("info", msg, **fields)

    def warning(self, msg: str, **fields: Any) -> None:
        self.log("warning", msg, **fields)

    def error(self, msg: str, **fields: Any) -> None:
        self.log("error", msg, **fields)

    # stdlib-logging spelling, for callers written against logging.Logger
    warn = warning
    exception = error
