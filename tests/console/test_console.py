"""The console in a real browser: Debian's Chromium driven by Playwright, against a real
uvicorn and Celery worker. A person signs in with the mailed code, starts a run and
watches every node turn green as the events arrive; the page runs under its own strict
Content-Security-Policy (a violation fails the test)."""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

from tests.support.mail import Mailbox, code_in
from tests.support.paths import ROOT
from tests.support.target import http_target

pytestmark = [pytest.mark.xdist_group("crossprocess-b"), pytest.mark.usefixtures("worker_name")]

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# As the machine's notes say: without the background-networking flags Chromium keeps
# trying hosts this closed network refuses.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not (shutil.which(CHROMIUM) or Path(CHROMIUM).exists()):
        pytest.fail(
            f"no Chromium at {CHROMIUM}: run `make browser` (apt-get install chromium), "
            "or set CHROMIUM to its path"
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    problems: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        # CSP violations and script errors both land here.
        if message.type == "error":
            problems.append(message.text)

    page.on("console", on_console)
    page.on("pageerror", lambda error: problems.append(str(error)))
    yield page
    context.close()
    assert not problems, problems


def artifacts() -> Path:
    """Where screenshots go: $TEST_ARTIFACTS_DIR, else .data/test-artifacts/ in the
    checkout (git-ignored)."""
    path = Path(os.environ.get("TEST_ARTIFACTS_DIR") or ROOT / ".data" / "test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def sign_in(page: Page, api: str, mailbox: Mailbox) -> str:
    email = f"console-{uuid.uuid4().hex[:8]}@example.com"
    page.goto(f"{api}/console")
    page.fill("#email", email)
    before = mailbox.count()
    page.click("#email-form button")
    code = code_in(mailbox.wait_for(email, after=before))
    page.fill("#code", code)
    page.click("#code-form button")
    page.wait_for_selector("#home:not([hidden])")
    assert page.inner_text("#who-email") == email
    return email


def test_the_console_is_static_and_locked_down(api: str) -> None:
    page = httpx.get(f"{api}/console", timeout=10)
    assert page.status_code == 200
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "frame-ancestors 'none'" in csp
    assert page.headers.get_list("content-security-policy") == [csp]  # only its own policy
    # No inline code anywhere: no script bodies, no event-handler attributes.
    assert "<script>" not in page.text and not re.search(r"\son[a-z]+\s*=", page.text)
    script = httpx.get(f"{api}/console/console.js", timeout=10)
    assert script.headers["content-type"].startswith("text/javascript")
    assert "innerHTML" not in script.text  # server text goes in as text, never as markup
    cached = httpx.get(
        f"{api}/console/console.js", headers={"If-None-Match": script.headers["etag"]}, timeout=10
    )
    assert cached.status_code == 304
    for path in ("/console/../main.py", "/console/router.py", "/console/nope.js"):
        assert httpx.get(f"{api}{path}", timeout=10).status_code == 404


def test_sign_in_start_a_run_and_watch_every_node_turn_green(
    api: str, mailbox: Mailbox, page: Page
) -> None:
    sign_in(page, api, mailbox)
    token = page.evaluate("sessionStorage.getItem('studio.access')")
    workspace = page.evaluate("sessionStorage.getItem('studio.workspace')")
    assert token and workspace and token not in page.url
    headers = {"Authorization": f"Bearer {token}", "X-Workspace-ID": workspace}
    with http_target() as target:
        # start -> a -> (b, c) -> d, each a short HTTP call: slow enough to see live.
        def step(node_id: str) -> dict[str, object]:
            return {
                "id": node_id,
                "type": "action",
                "config": {"kind": "http_request", "url": f"{target.base}/slow/0.6"},
            }

        definition = {
            "name": "Console demo",
            "nodes": [
                {"id": "start", "type": "trigger", "config": {"kind": "manual"}},
                step("fetch"),
                step("left"),
                step("right"),
                step("join"),
            ],
            "connections": [
                {"source": "start", "target": "fetch"},
                {"source": "fetch", "target": "left"},
                {"source": "fetch", "target": "right"},
                {"source": "left", "target": "join"},
                {"source": "right", "target": "join"},
            ],
        }
        created = httpx.post(
            f"{api}/api/v1/workflows", headers=headers, json=definition, timeout=10
        )
        assert created.status_code == 201, created.text
        workflow_id = created.json()["id"]

        page.reload()
        row = page.locator(f'#workflows tr[data-workflow-id="{workflow_id}"]')
        row.locator("button.run-workflow").click()
        page.wait_for_selector("#run:not([hidden])")
        assert "/runs/" in page.url

        nodes = page.locator("#dag g.node")
        nodes.first.wait_for()
        assert nodes.count() == 5
        # Live: a node is drawn running while a later one is still pending ...
        page.wait_for_selector('#dag g.node[data-status="running"]', timeout=30_000)
        assert (
            page.locator('#dag g.node[data-node-id="join"][data-status="completed"]').count() == 0
        )
        # ... and every node turns green, as events arrive, without a reload.
        # (Playwright's expect polls from its own world: a string predicate evaluated in
        # the page would be refused by the page's CSP, as it should be.)
        expect(page.locator("#dag g.node.completed")).to_have_count(5, timeout=60_000)
        page.wait_for_selector('#run[data-status="completed"]')
        assert page.inner_text("#run-status") == "completed"
        assert page.inner_text("#live") in ("ended", "live")
        assert "ms" in (
            page.locator('#dag g.node[data-node-id="join"] text.meta').first.text_content() or ""
        )
        assert page.is_disabled("#cancel") and page.is_disabled("#retry")
        shot = artifacts() / "console-run.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000

        # A node's input and output on click.
        page.click('#dag g.node[data-node-id="fetch"]')
        expect(page.locator("#node-detail")).to_contain_text('"output"')
        assert '"status": "completed"' in page.inner_text("#node-detail")

        # A run that ended is replayed from its events: opened afresh, all green.
        run_url = page.url
        page.goto(f"{api}/console")
        page.goto(run_url)
        expect(page.locator("#dag g.node.completed")).to_have_count(5, timeout=30_000)

        # Cancel from the page: a run that would take long stops.
        slow = {
            "name": "Console slow",
            "nodes": [
                {"id": "start", "type": "trigger", "config": {"kind": "manual"}},
                {
                    "id": "wait",
                    "type": "action",
                    "config": {"kind": "http_request", "url": f"{target.base}/slow/20"},
                },
            ],
            "connections": [{"source": "start", "target": "wait"}],
        }
        r = httpx.post(f"{api}/api/v1/workflows", headers=headers, json=slow, timeout=10)
        run = httpx.post(
            f"{api}/api/v1/executions",
            headers=headers,
            json={"workflow_id": r.json()["id"]},
            timeout=10,
        ).json()
        page.goto(f"{api}/console#/runs/{run['id']}")
        page.wait_for_selector(
            '#dag g.node[data-node-id="wait"][data-status="running"]', timeout=30_000
        )
        page.click("#cancel")
        page.wait_for_selector('#run[data-status="cancelled"]', timeout=30_000)
        assert page.is_enabled("#retry")


def test_signing_out_forgets_the_tokens(api: str, mailbox: Mailbox, page: Page) -> None:
    sign_in(page, api, mailbox)
    page.click("#sign-out")
    page.wait_for_selector("#sign-in:not([hidden])")
    assert page.evaluate("sessionStorage.getItem('studio.access')") is None
