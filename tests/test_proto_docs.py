"""docs/protocol.md stays in step with the code: every message, code, limit and state is documented."""

from __future__ import annotations

import itertools
from enum import Enum
from pathlib import Path

import proto
from proto.state import Key

DOC = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()


def test_every_message_type_is_in_the_catalogue_table() -> None:
    for code, cls in proto.MESSAGE_TYPES.items():
        assert f"| {code} | {cls.__name__} |" in DOC, cls.__name__


def test_every_error_code_is_documented() -> None:
    for code in proto.ErrorCode:
        assert f"| `{code.value}` |" in DOC, code


def test_every_state_and_limit_is_documented() -> None:
    for state in [*proto.SourceState, *proto.DestinationState]:
        assert state.name in DOC, state
    for limit in ("MAX_BODY_SIZE", "MAX_HANDSHAKE_BODY", "MAX_PAYLOAD_SIZE", "MAX_RANGES", "MAX_ZERO_RANGES", "MAX_GUEST_SIZE"):
        assert f"`{limit}`" in DOC
    assert f"`HEADER_SIZE` = {proto.HEADER_SIZE}" in DOC


def _doc_table(title: str, states: type[Enum]) -> set[tuple[str, str, str, str]]:
    """The transition rows under ``title``, ranges (``A .. B``) and lists (``X, Y``) expanded."""
    lines = DOC[DOC.index(title) :].splitlines()[4:]
    names = [s.name for s in states]  # type: ignore[attr-defined]
    rows = set()
    for line in itertools.takewhile(lambda ln: ln.startswith("|"), lines):
        state, msgs, direction, nxt = (cell.strip() for cell in line.strip("|").split("|"))
        if " .. " in state:
            first, last = state.split(" .. ")
            sources = names[names.index(first) : names.index(last) + 1]
        else:
            sources = [state]
        for src, msg, d in itertools.product(sources, msgs.split(", "), direction.split("/")):
            rows.add((src, msg, d, nxt.split(" ")[0]))
    return rows


def _code_table(table: dict[Key, Enum]) -> set[tuple[str, str, str, str]]:
    return {(s.name, cls.__name__, d.value, n.name) for (s, cls, d), n in table.items()}


def test_transition_tables_in_the_doc_match_the_code() -> None:
    assert _doc_table("Source (`SOURCE_TRANSITIONS`)", proto.SourceState) == _code_table(proto.SOURCE_TRANSITIONS)
    assert _doc_table("Destination (`DESTINATION_TRANSITIONS`)", proto.DestinationState) == _code_table(
        proto.DESTINATION_TRANSITIONS
    )
