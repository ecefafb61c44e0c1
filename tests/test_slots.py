"""agent/migration/slots.py: outgoing migrations past the limit wait their turn, in order, and leave on cancel."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.migration.slots import Slots
from tests.agents import AgentProc, agent_pair, names, runs_on, wait_for


def test_turns_are_taken_in_order_and_never_past_the_limit() -> None:
    slots = Slots(2)
    holding: list[int] = []
    order: list[int] = []
    most = 0
    lock = threading.Lock()
    told: dict[int, list[int]] = {}

    def worker(i: int) -> None:
        nonlocal most
        assert slots.take(lambda: False, lambda ahead: told.setdefault(i, []).append(ahead))
        with lock:
            holding.append(i)
            order.append(i)
            most = max(most, len(holding))
        time.sleep(0.05)
        with lock:
            holding.remove(i)
        slots.give()

    threads = []
    for i in range(6):
        threads.append(threading.Thread(target=worker, args=(i,)))
        threads[-1].start()
        time.sleep(0.01)  # arrive in order
    for t in threads:
        t.join(10)
    assert most == 2 and order == list(range(6))
    assert 0 not in told and 1 not in told  # a free turn: never told to wait
    assert told[5][0] > 0 and told[5][-1] == 0  # moved up the queue as the others went


def test_a_cancel_leaves_the_queue_and_the_next_moves_up() -> None:
    slots = Slots(1)
    assert slots.take(lambda: False, lambda ahead: None)
    cancel = threading.Event()
    results: list[bool] = []
    waiter = threading.Thread(target=lambda: results.append(slots.take(cancel.is_set, lambda ahead: None)))
    waiter.start()
    wait_for(lambda: slots.waiting() == 1, what="the second in the queue")
    cancel.set()
    waiter.join(5)
    assert results == [False] and slots.waiting() == 0
    slots.give()
    assert slots.take(lambda: False, lambda ahead: None)  # the turn it never took is still there
    with pytest.raises(ValueError, match="at least 1"):
        Slots(0)


@pytest.fixture
def one_at_a_time(tmp_path: Path) -> Iterator[tuple[AgentProc, AgentProc]]:
    yield from agent_pair(tmp_path, a={"max_outgoing": "1"})


def test_past_the_limit_migrations_queue_complete_in_turn_and_cancel_cleanly(
        one_at_a_time: tuple[AgentProc, AgentProc]) -> None:
    a, b = one_at_a_time
    for n in ("q1", "q2", "q3"):
        a.call("vm-create", name=n, program="memstress", mem="32M", args={"ws": "16M", "rate": "500"})
    # 8 MB/s, raw: the first takes seconds, the others queue behind it
    first = a.call("migrate", name="q1", to=b.control, params={"bandwidth": 8 << 20, "compress": "none"})
    assert "queued" not in first
    second = a.call("migrate", name="q2", to=b.control, params={"bandwidth": 8 << 20, "compress": "none"})
    third = a.call("migrate", name="q3", to=b.control, params={"bandwidth": 8 << 20, "compress": "none"})
    assert (second["status"], second["queued"]) == ("setup", 0) and third["queued"] == 1
    assert a.call("vm-info", name="q3")["state"] == "running"  # untouched while it waits
    a.call("migrate-cancel", name="q3")
    cancelled = a.call("migrate-status", name="q3")
    assert cancelled["status"] == "cancelled" and "queued" not in cancelled
    for n in ("q1", "q2"):
        wait_for(lambda n=n: a.call("migrate-status", name=n)["status"] == "completed", timeout=60,
                 what=f"{n} completed")
    # q2's setup took its wait in the queue: it began once q1 had ended (both asked at once)
    s1, s2 = (a.call("migrate-status", name=n) for n in ("q1", "q2"))
    assert s2["setup-time"] >= s1["total-time"] - 1000
    assert names(b) == ["q1", "q2"] and names(a) == ["q3"]
    runs_on(b, "q1")
    runs_on(a, "q3")
