"""The demo page in a real browser: headless Chromium (Debian's package) driven by Playwright.

`relay demo` runs as a subprocess against the test Redis; the test reports batches through the
SDK like a worker would and watches the page's DOM: bars move and complete, the user switch
shows only that user's batches, and after the relay restarts on the same port the page's
client (relay/static/client.js) reconnects by itself and shows live bars again.

Skipped when /usr/bin/chromium (`apt-get install chromium`) or playwright is missing; CI
installs both (.ci/run, pyproject's dev extra). Playwright never downloads a browser here.
With DEMO_SCREENSHOT=path set, the test saves a screenshot of the page there (`make screenshot`).
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from relay.emitter import Emitter

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(
        f"{CHROMIUM} not found: the browser test needs Debian's chromium package "
        "(apt-get install chromium)",
        allow_module_level=True,
    )
try:
    from playwright.sync_api import Browser, Page, sync_playwright
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
except ImportError:
    pytest.skip("playwright is not installed (pip install -e '.[dev]')", allow_module_level=True)

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
START_TIMEOUT_S = 20.0
EXIT_TIMEOUT_S = 15.0
WAIT_MS = 10_000  # every DOM condition below is met in well under a second or two
RECONNECT_MS = 20_000  # demo restart (~1-2 s) plus the client's backoff
STATUS_RE = re.compile(r"running on port (\d+); .*; key prefix (\S+);")


class DemoProcess:
    """`relay demo` as a subprocess; restartable on the same port."""

    def __init__(self, redis_url: str, log_dir: Path) -> None:
        self.redis_url = redis_url
        self.log_dir = log_dir
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.prefix = ""
        self.prefixes: list[str] = []
        self.runs = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        env["RELAY_REDIS_URL"] = self.redis_url
        self.runs += 1
        self.stderr = self.log_dir / f"demo-{self.runs}.stderr"
        with self.stderr.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "relay.cli", "demo", "--port", str(self.port)],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=env,
            )
        lines: queue.Queue[str] = queue.Queue()
        stdout = self.proc.stdout

        def pump() -> None:
            for line in stdout or ():
                lines.put(line)

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"relay demo did not start:\n{self.stderr.read_text()}")
            if m := STATUS_RE.search(line):
                self.port, self.prefix = int(m.group(1)), m.group(2)
                self.prefixes.append(self.prefix)
                return

    def stop(self) -> None:
        """SIGTERM: the relay closes every connection with 1012 and the process exits 0."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(EXIT_TIMEOUT_S) == 0, self.stderr.read_text()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(EXIT_TIMEOUT_S)


@pytest.fixture
def demo(redis_url: str, tmp_path: Path) -> Iterator[DemoProcess]:
    process = DemoProcess(redis_url, tmp_path)
    process.start()
    try:
        yield process
    finally:
        process.kill()
        client = redis.Redis.from_url(redis_url)
        try:  # the demo's keys expire on their own; leave the test Redis as it was anyway
            for prefix in process.prefixes:
                keys = list(client.scan_iter(match=f"*{{{prefix}:*", count=500))
                if keys:
                    client.unlink(*keys)
        finally:
            client.close()


@pytest.fixture
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            instance.close()


# -- DOM conditions -----------------------------------------------------------------------------


def wait_status(page: Page, text: str, timeout: int = WAIT_MS) -> None:
    page.wait_for_function(
        "text => document.getElementById('status').textContent === text", arg=text, timeout=timeout
    )


def wait_card(page: Page, batch_id: str, percent: str, status: str) -> None:
    """The batch's card shows `percent` (as rendered, e.g. "25.0 %") and `status`."""
    try:
        page.wait_for_function(
            """([id, percent, status]) => {
                const card = document.querySelector(`.card[data-batch="${id}"]`);
                return card !== null && card.classList.contains(status)
                    && card.querySelector(".v-percent").textContent === percent
                    && card.querySelector(".badge").textContent === status;
            }""",
            arg=[batch_id, percent, status],
            timeout=WAIT_MS,
        )
    except PlaywrightTimeout:
        card = page.locator(f'.card[data-batch="{batch_id}"]')
        shown = card.inner_text() if card.count() else "no card"
        raise AssertionError(f"{batch_id}: want {percent} {status}, page shows: {shown}") from None


def processed_by_card(page: Page) -> dict[str, int]:
    result: dict[str, int] = page.evaluate(
        """() => Object.fromEntries([...document.querySelectorAll(".card.processing")].map(
            (c) => [c.dataset.batch, Number(c.querySelector(".v-processed").textContent
                                             .replace(/,/g, ""))]))"""
    )
    return result


def wait_simulated_bars_move(page: Page, timeout: int = WAIT_MS) -> None:
    """A batch of the simulated workers shows more processed items than a moment ago."""
    page.wait_for_function("() => document.querySelectorAll('.card.processing').length > 0")
    before = processed_by_card(page)
    page.wait_for_function(
        """before => [...document.querySelectorAll(".card.processing")].some((c) => {
            const now = Number(c.querySelector(".v-processed").textContent.replace(/,/g, ""));
            const width = parseFloat(c.querySelector(".ok").style.width);
            return now > (before[c.dataset.batch] ?? 0) && width > 0;  // or a new one started
        })""",
        arg=before,
        timeout=timeout,
    )


def record_statuses(page: Page) -> None:
    """Keep every status line the page shows, so a short-lived one is not missed."""
    page.evaluate(
        """() => {
            const el = document.getElementById("status");
            window.seenStatuses = [el.textContent];
            new MutationObserver(() => window.seenStatuses.push(el.textContent))
                .observe(el, { childList: true, characterData: true, subtree: true });
        }"""
    )


def report(emitter: Emitter, user: str, total: int, done: int, *, label: str, **finish: Any) -> str:
    """A batch as a worker reports it: start, `done` items (every 9th fails), maybe finish."""
    batch_id = str(uuid.uuid4())
    emitter.start(batch_id, user, total, label=label)
    for i in range(done):
        emitter.item(batch_id, user, f"item-{i}", ok=i % 9 != 8)
    if finish:
        emitter.finish(batch_id, user, finish["status"])
    return batch_id


# -- the test -----------------------------------------------------------------------------------


def test_live_bars_user_switch_and_reconnect_after_restart(
    demo: DemoProcess, browser: Browser, redis_url: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    page = browser.new_page(viewport={"width": 1200, "height": 620})
    page.set_default_timeout(WAIT_MS)
    try:
        page.goto(demo.url)
        wait_status(page, "connected as alice")  # the first user by default

        # a worker's batch: the bar follows it to 100 % and "completed"
        worker = Emitter(client, prefix=demo.prefix)
        mine = report(worker, "alice", 40, 10, label="Photo upload · 40 files")
        wait_card(page, mine, "25.0 %", "processing")
        for i in range(10, 40):
            worker.item(mine, "alice", f"item-{i}", ok=i % 9 != 8)
        wait_card(page, mine, "100.0 %", "completed")
        failed = report(worker, "alice", 300, 130, label="Video transcode · 300 files")
        worker.finish(failed, "alice", "failed")  # terminal states arrive and show as such
        wait_card(page, failed, "43.3 %", "failed")
        cancelled = report(worker, "alice", 120, 72, label="CSV import · 120 files")
        worker.finish(cancelled, "alice", "cancelled")
        wait_card(page, cancelled, "60.0 %", "cancelled")
        wait_simulated_bars_move(page)  # the demo's own workers, through the same relay
        if path := os.environ.get("DEMO_SCREENSHOT"):
            screenshot(page, Path(path))

        # another user: only that user's batches
        page.click("#users button[data-user=bob]")
        wait_status(page, "connected as bob")
        assert page.evaluate("location.hash") == "#bob"
        not_bobs = report(worker, "alice", 10, 3, label="not for bob")
        bobs = report(worker, "bob", 10, 3, label="Backup · 10 files")
        wait_card(page, bobs, "30.0 %", "processing")  # one stream: alice's came first
        for batch_id in (mine, failed, cancelled, not_bobs):
            assert page.locator(f'.card[data-batch="{batch_id}"]').count() == 0

        # the relay restarts on the same port: the page reconnects by itself
        page.evaluate("window.sameDocument = true")
        record_statuses(page)
        demo.stop()
        page.wait_for_function(
            "() => window.seenStatuses.some((s) => s.startsWith('reconnecting'))"
        )
        demo.start()  # same port, same Redis, a fresh key prefix (a new demo)
        wait_status(page, "connected as bob", timeout=RECONNECT_MS)
        assert page.evaluate("window.sameDocument") is True, "the page was reloaded"
        worker = Emitter(client, prefix=demo.prefix)
        after = report(worker, "bob", 20, 5, label="CSV import · 20 files")
        wait_card(page, after, "25.0 %", "processing")
        for i in range(5, 20):
            worker.item(after, "bob", f"item-{i}")
        wait_card(page, after, "100.0 %", "completed")
        wait_simulated_bars_move(page)
    finally:
        page.close()
        client.close()


def screenshot(page: Page, path: Path) -> None:
    """The header and the cards, cropped below the last card."""
    page.wait_for_function(
        """() => document.querySelectorAll(".card.processing .v-speed").length >= 2
            && [...document.querySelectorAll(".card.processing .v-speed")]
                .every((s) => s.textContent.includes("/s"))"""
    )
    page.wait_for_timeout(400)  # let the CSS width transition (250 ms) finish
    bottom = page.evaluate(
        "Math.ceil(document.getElementById('grid').getBoundingClientRect().bottom)"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), clip={"x": 0, "y": 0, "width": 1200, "height": bottom + 28})
