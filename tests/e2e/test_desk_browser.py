"""The desk's page in headless Chromium (Debian's, driven by Playwright): a
person logs in with a token, watches a manual-approval release of a real demo
site reach awaiting-approval live, and approves it from the page."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from playwright.async_api import Dialog, Page, async_playwright, expect

from changeover.demo.scenario import DemoOptions, DemoSite
from changeover.desk.auth import OPERATOR_ENV, VIEWER_ENV
from tests.e2e import support as S

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "img" / "desk.png"
OPERATOR, VIEWER = "operator-secret", "viewer-secret"


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[DemoSite]:
    demo = DemoSite(
        tmp_path, DemoOptions(members_per_cluster=2, startup_delay=0.1, approval="manual")
    )
    async with demo.running():
        yield demo


@contextlib.asynccontextmanager
async def desk(site: DemoSite) -> AsyncIterator[str]:
    """`changeover desk` as a user starts it, on a free loopback port."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "changeover.cli", "desk", "-c", str(site.config),
        "--listen", "127.0.0.1:0",
        env=dict(site.env) | {OPERATOR_ENV: OPERATOR, VIEWER_ENV: VIEWER},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        found = re.search(r"on (http://\S+)", line)
        assert found, line
        yield found.group(1)
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 30) == 0


async def approve_from_the_page(page: Page, step: str) -> None:
    waiting = page.locator("#steps li.running", has_text="waiting for you")
    await expect(waiting).to_contain_text(f"wait for approval of {step}", timeout=60_000)
    await page.focus("#approve")  # by keyboard: the button takes the focus and Enter
    await page.keyboard.press("Enter")
    await expect(page.locator("#notice")).to_contain_text(f"approved approve-{step}")


async def readable_when_narrow(page: Page) -> None:
    """In a phone-wide window nothing runs off the side and the clusters stack."""
    await page.set_viewport_size({"width": 360, "height": 800})
    assert await page.evaluate("document.documentElement.scrollWidth") <= 360
    first, second = [await c.bounding_box() for c in await page.locator(".cluster").all()]
    assert first and second and second["y"] >= first["y"] + first["height"]
    await page.set_viewport_size({"width": 1000, "height": 1200})


@contextlib.asynccontextmanager
async def logged_in(url: str, confirmed: list[str]) -> AsyncIterator[Page]:
    """Chromium on the desk's page, logged in as qa-anna with the operator
    token, accepting every confirmation (recorded in `confirmed`); the page's
    script must never throw."""
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = await browser.new_page(viewport={"width": 1000, "height": 1200})

        async def confirm(dialog: Dialog) -> None:
            confirmed.append(dialog.message)
            await dialog.accept()

        page.on("dialog", confirm)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        await page.goto(url)
        await page.fill("#name", "qa-anna")
        await page.fill("#token", OPERATOR)
        await page.press("#token", "Enter")
        await expect(page.locator("#whoami")).to_have_text("qa-anna (operator)")
        yield page
        assert errors == []
        await browser.close()


async def test_approve_a_release_from_the_page(site: DemoSite) -> None:
    confirmed: list[str] = []
    async with site.probe(50, sticky_users=10) as probe, desk(site) as url:
        release = await S.start_cli(site, "release", "2.0")
        async with logged_in(url, confirmed) as page:
            await expect(page.locator("#release-title")).to_contain_text(
                "awaiting-approval", timeout=60_000
            )
            qa_link = page.locator("#qa-link")
            await expect(qa_link).to_have_attribute("href", re.compile("^http://"))
            await expect(page.locator("#clusters tbody tr")).to_have_count(4)
            await page.screenshot(path=str(SCREENSHOT), full_page=True)
            await readable_when_narrow(page)

            await approve_from_the_page(page, "a")
            await approve_from_the_page(page, "b")
            assert len(confirmed) == 2 and confirmed[0].startswith("Approve release #1")
            done = await S.finish(release)
            assert done.code == 0, done.output
            await expect(page.locator("#release-title")).to_have_text("none", timeout=30_000)
            await expect(page.locator("#history tbody tr").first).to_contain_text("done")
            await expect(page.locator("#approve")).to_be_disabled()
        report = await probe.finish()
    assert report.failed == 0, (report.failure_examples, report.failure_log)
    assert set(report.versions_seen) == {"1.0", "2.0"}
    shown = await S.cli(site, "show", "1")
    assert "approved by qa-anna (desk)" in shown.text


async def test_abort_from_the_page_stops_at_a_safe_point(site: DemoSite) -> None:
    confirmed: list[str] = []
    async with desk(site) as url:
        release = await S.start_cli(site, "release", "2.0")
        async with logged_in(url, confirmed) as page:
            await expect(page.locator("#approve")).to_be_enabled(timeout=60_000)
            # A rollback asked by the API while another process runs the release.
            async with (
                aiohttp.ClientSession() as http,
                http.post(
                    url + "/api/rollback",
                    json={"name": "ops"},
                    headers={"Authorization": f"Bearer {OPERATOR}"},
                ) as refused,
            ):
                assert refused.status == 409
                reason = (await refused.json())["error"]
                assert reason.startswith("another release holds the lock: release #1 by ")
            await page.focus("#abort")
            await page.keyboard.press("Enter")
            await expect(page.locator("#notice")).to_contain_text("next safe point")
            assert confirmed == ["Abort release #1 at its next safe point?"]
            stopped = await S.finish(release)
            assert stopped.code == 4, stopped.output
            await expect(page.locator("#history tbody tr").first).to_contain_text("aborted")
            await expect(page.locator("#rollback")).to_be_enabled()
    # Stopped before the swap: the old release still serves the live pool.
    pool = await S.pool(site)
    assert {m.admission.value for m in pool.in_cluster("b")} == {"live"}
