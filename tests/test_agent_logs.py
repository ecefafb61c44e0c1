"""Unit tests of agent.logs: one logfmt line per call, quoting, levels, bound fields."""

from __future__ import annotations

import io
import re

from agent.logs import Log, format_line


def test_line_has_timestamp_level_fixed_fields_and_message() -> None:
    line = format_line("info", "vm created", {"agent": "A"}, {"vm": "c1", "mem": 67108864}, 0.0)
    assert line == 'ts=1970-01-01T00:00:00.000Z level=info agent=A msg="vm created" vm=c1 mem=67108864'


def test_values_with_spaces_quotes_and_newlines_are_quoted() -> None:
    line = format_line("error", "x", {}, {"reason": 'bad "frame"\nnext', "empty": "", "under_score": 1}, 0.0)
    assert 'reason="bad \\"frame\\"\\nnext"' in line
    assert 'empty=""' in line
    assert "under-score=1" in line
    assert "\n" not in line


def test_levels_filter_and_bind_adds_fields() -> None:
    out = io.StringIO()
    log = Log("info", out, agent="A")
    log.debug("hidden")
    log.bind(vm="c1").warning("vm faulted", reason="div0")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert re.match(r"ts=\S+ level=warning agent=A msg=\"vm faulted\" vm=c1 reason=div0$", lines[0])


def test_none_fields_are_left_out() -> None:
    out = io.StringIO()
    Log("debug", out).info("m", a=None, b=2)
    assert out.getvalue().rstrip().endswith("msg=m b=2")
