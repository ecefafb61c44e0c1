"""The web console in a real browser: Debian's Chromium driven by Playwright, against real agents.

Chromium comes from the Debian package (`chromium`), installed here when missing (root with apt-get;
otherwise these tests skip, saying why): Playwright's own browser download is not reachable. Set
FERRY_SCREENSHOTS=DIR to keep the pages' screenshots there (docs/console.png is one).
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import debs
from tests.agents import AgentProc, agent_pair, free_port, make_key, start_agent, wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "browser-test-operator-token-42"
FILL_PROGRAM = str(Path(__file__).resolve().parent.parent / "bench" / "fill_random.fasm")
WAIT_MS = 60_000
# The first test's setup may install chromium (apt-get): longer than the suite's per-test timeout.
pytestmark = pytest.mark.timeout(1200)


@pytest.fixture(scope="session")
def chromium() -> str:
    return debs.ensure(CHROMIUM, "chromium")


@pytest.fixture
def browser(chromium: str, tmp_path: Path) -> Iterator[Any]:
    """A fresh headless Chromium profile; yields a Playwright page factory's context."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=chromium,
                                                       headless=True, args=CHROMIUM_ARGS,
                                                       viewport={"width": 1280, "height": 900})
        try:
            yield context
        finally:
            context.close()


def _off_loop(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """fn() in a thread of its own: Playwright's sync API keeps an event loop running in this one, and
    the control API client runs one of its own."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def _call(agent: AgentProc, op: str, **args: Any) -> Any:
    return _off_loop(agent.call, op, **args)


def _token_file(tmp_path: Path) -> Path:
    path = tmp_path / "http.token"
    path.write_text(TOKEN + "\n")
    return path


def _shot(page: Any, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    keep = os.environ.get("FERRY_SCREENSHOTS")
    if keep:
        shutil.copyfile(path, Path(keep) / name)


def _live(page: Any) -> None:
    page.wait_for_selector("#conn[data-state=live]", timeout=WAIT_MS)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[AgentProc, AgentProc, str]]:
    """A with its console (and a token), B without one; yields them and A's console URL."""
    port = free_port()
    for a, b in agent_pair(tmp_path, a={"http": f"127.0.0.1:{port}", "http_token": _token_file(tmp_path)}):
        yield a, b, f"http://127.0.0.1:{port}/"


def test_the_page_starts_a_migration_and_shows_its_rounds_and_completion(
        pair: tuple[AgentProc, AgentProc, str], browser: Any, tmp_path: Path) -> None:
    a, b, url = pair
    # 16 MiB of data no compression shrinks, sent at 8 MB/s: a first round of about 2 s, long enough to be
    # seen live (memstress's pages, one word each, compress so well that the migration could end unseen).
    _call(a, "vm-create", name="web1", program=FILL_PROGRAM, mem="32M", args={"ws": "16M"})
    wait_for(lambda: _call(a, "vm-info", name="web1").get("console-bytes", 0) >= 1, what="the fill done")
    page = browser.new_page()
    page.goto(url)
    _live(page)
    page.wait_for_selector("#vms tr[data-vm=web1][data-state=running]", timeout=WAIT_MS)
    page.fill("#token", TOKEN)
    page.click("#token-form button")
    page.select_option("#migrate-vm", "web1")
    page.fill("#migrate-to", b.control)
    page.fill("#migrate-bandwidth", "8")
    page.click("#migrate-go")
    card = ".migration[data-vm=web1]"
    page.wait_for_selector(f"{card}[data-status=active]", timeout=WAIT_MS)  # live, while it runs
    page.wait_for_function(
        "() => { const c = document.querySelector('.migration[data-vm=web1]');"
        " return c && (c.dataset.status === 'active' && Number(c.dataset.rounds) >= 1"
        " || c.dataset.status === 'completed'); }", timeout=WAIT_MS)
    _shot(page, tmp_path, "console-live.png")
    page.wait_for_selector(f"{card}[data-status=completed]", timeout=WAIT_MS)
    assert page.get_attribute("#notice", "data-status") == "ok"
    rounds = int(page.get_attribute(card, "data-rounds") or 0)
    assert rounds >= 2
    assert page.locator(f"{card} .chart rect.bar").count() == rounds  # one bar per round
    assert page.locator(f"{card} .chart rect.final").count() == 1  # the stop-and-copy pass
    assert "downtime" in page.inner_text(f"{card} .breakdown")
    page.wait_for_selector("#vms tr[data-vm=web1]", state="detached", timeout=WAIT_MS)  # gone from A
    page.wait_for_selector("#hosts tr[data-host=B]", timeout=WAIT_MS)  # the destination: a known peer from the migrate on
    _shot(page, tmp_path, "console.png")
    assert _call(b, "vm-info", name="web1")["state"] == "running"
    assert _call(a, "migrate-status", name="web1")["status"] == "completed"


@pytest.mark.slow
def test_a_page_without_the_token_cannot_act(pair: tuple[AgentProc, AgentProc, str], browser: Any,
                                              tmp_path: Path) -> None:
    a, b, url = pair
    _call(a, "vm-create", name="idle1", program="idle", mem="4M")
    page = browser.new_page()
    page.goto(url)
    _live(page)
    page.click("#vms tr[data-vm=idle1] button[data-action=pause]")
    page.wait_for_selector("#notice[data-status=error]", timeout=WAIT_MS)
    assert "403" in page.inner_text("#notice")
    page.select_option("#migrate-vm", "idle1")
    page.fill("#migrate-to", b.control)
    page.click("#migrate-go")
    page.wait_for_function("() => document.querySelector('#notice').textContent.startsWith('migrate')",
                           timeout=WAIT_MS)
    assert "403" in page.inner_text("#notice")
    _shot(page, tmp_path, "console-403.png")
    assert _call(a, "vm-info", name="idle1")["state"] == "running"
    assert _call(b, "vm-list")["vms"] == []


@pytest.mark.slow
def test_a_read_only_page_reconnects_by_itself_after_an_agent_restart(browser: Any, tmp_path: Path) -> None:
    key = make_key(tmp_path)
    port = free_port()
    a = _off_loop(start_agent, tmp_path, "A", key, http=f"127.0.0.1:{port}")
    try:
        _call(a, "vm-create", name="stay", program="idle", mem="4M")
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        _live(page)
        page.wait_for_selector("#vms tr[data-vm=stay]", timeout=WAIT_MS)
        assert "readonly" in (page.get_attribute("body", "class") or "")  # no token: no action buttons
        assert not page.locator("#vms button[data-action=pause]").is_visible()
        assert not page.locator("#migrate-form").is_visible()
        first = page.inner_text("#hosts")
        a.stop(keep_vms=True)
        page.wait_for_selector("#conn[data-state=reconnecting]", timeout=WAIT_MS)
        a = _off_loop(start_agent, tmp_path, "A", key, http=f"127.0.0.1:{port}")
        _live(page)  # the same page, not reloaded
        page.wait_for_selector("#vms tr[data-vm=stay][data-state=running]", timeout=WAIT_MS)
        wait_for(lambda: page.inner_text("#hosts") != first, what="the restarted agent's figures")
        _call(a, "vm-pause", name="stay")
        page.wait_for_selector("#vms tr[data-vm=stay][data-state=paused]", timeout=WAIT_MS)  # live again
    finally:
        a.stop()


@pytest.mark.slow
def test_with_the_token_the_page_pauses_resumes_and_cancels(pair: tuple[AgentProc, AgentProc, str], browser: Any,
                                                            tmp_path: Path) -> None:
    a, b, url = pair
    _call(a, "vm-create", name="slow1", program=FILL_PROGRAM, mem="32M", args={"ws": "16M"})
    wait_for(lambda: _call(a, "vm-info", name="slow1").get("console-bytes", 0) >= 1, what="the fill done")
    page = browser.new_page()
    page.goto(url)
    _live(page)
    page.fill("#token", TOKEN)
    page.click("#token-form button")
    row = "#vms tr[data-vm=slow1]"
    page.click(f"{row} button[data-action=pause]")
    page.wait_for_selector(f"{row}[data-state=paused]", timeout=WAIT_MS)
    page.click(f"{row} button[data-action=resume]")
    page.wait_for_selector(f"{row}[data-state=running]", timeout=WAIT_MS)
    # 16 MiB that no compression shrinks, sent at 1 MB/s: it stays in pre-copy until cancelled.
    page.select_option("#migrate-vm", "slow1")
    page.fill("#migrate-to", b.control)
    page.fill("#migrate-bandwidth", "1")
    page.click("#migrate-go")
    card = ".migration[data-vm=slow1]"
    page.wait_for_selector(f"{card}[data-status=active] button[data-action=cancel]", timeout=WAIT_MS)
    page.click(f"{card} button[data-action=cancel]")
    page.wait_for_selector(f"{card}[data-status=cancelled]", timeout=WAIT_MS)
    page.wait_for_selector(f"{row}[data-state=running]", timeout=WAIT_MS)
    assert _call(a, "vm-info", name="slow1")["state"] == "running"
    assert _call(b, "vm-list")["vms"] == []
