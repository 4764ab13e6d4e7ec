"""The playground page at `/` in a real headless Chromium (Debian's `chromium`), driven by
playwright, against a real `tether serve` on the scripted engine."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, Request, expect, sync_playwright

from tether.engines.scripted import scripted_text

from conftest import Server, raw_events, wait_for

CHROMIUM = Path("/usr/bin/chromium")
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
ARTIFACTS = Path(os.environ.get("TETHER_TEST_ARTIFACTS", Path(__file__).parent / "artifacts"))
SLOW = ("--scripted-rate", "20", "--scripted-length", "2000")  # 100 s unless stopped
WAIT_MS = 30_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing (scripts/install installs Debian's chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Page]:
    """A fresh browser context (empty storage) per test; its final screen is saved."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    yield page
    if page.url.startswith("http"):
        shot(page, f"{request.node.name}-final")
    context.close()


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"playground-{name}.png"), full_page=True)


def open_page(page: Page, server: Server) -> None:
    page.goto(f"{server.url}/")
    expect(page.locator("#model option[value='scripted']")).to_have_count(1)
    page.select_option("#model", "scripted")


def configure(page: Page, *, stream: bool, background: bool, max_tokens: int | None) -> None:
    page.set_checked("#stream", stream)
    page.set_checked("#background", background)
    page.fill("#max-tokens", "" if max_tokens is None else str(max_tokens))


def timeline(page: Page) -> list[tuple[int, str]]:
    rows: list[list[Any]] = page.eval_on_selector_all(
        "#timeline tr", "rows => rows.map(r => [Number(r.dataset.seq), r.dataset.type])"
    )
    return [(int(seq), str(kind)) for seq, kind in rows]


def server_log(server: Server, rid: str) -> list[tuple[int, str]]:
    return [
        (int(e["sequence_number"]), str(e["type"]))  # type: ignore[call-overload]
        for e in raw_events(server, rid)
    ]


def number(page: Page, selector: str) -> int:
    return int(page.text_content(selector) or "")


def wait_tokens(page: Page, n: int) -> None:
    page.wait_for_function(
        f"Number(document.querySelector('#tokens').textContent) >= {n}", timeout=WAIT_MS
    )


def retrieve(server: Server, rid: str) -> dict[str, Any]:
    r = httpx.get(f"{server.base_url}/responses/{rid}", timeout=5)
    r.raise_for_status()
    data: dict[str, Any] = r.json()
    return data


def test_page_and_assets_need_no_auth(server: Server) -> None:
    page = httpx.get(f"{server.url}/", timeout=5)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/playground/app.js"' in page.text
    for asset, kind in [("app.js", "javascript"), ("style.css", "text/css")]:
        r = httpx.get(f"{server.url}/playground/{asset}", timeout=5)
        assert r.status_code == 200 and kind in r.headers["content-type"]
        assert r.headers["cache-control"] == "no-cache"
    missing = httpx.get(f"{server.url}/playground/nope.js", timeout=5)
    assert missing.status_code == 404
    assert set(missing.json()["error"]) == {"message", "type", "param", "code"}


def test_stop_cancels_a_background_stream(make_server: Any, page: Page) -> None:
    # contract §3.2-§3.4, §3.9: Stop → cancel by id; the stream still shows its terminal event
    server: Server = make_server(*SLOW)
    auth: list[str | None] = []
    page.on(
        "request",
        lambda r: auth.append(r.headers.get("authorization")) if "/v1/" in r.url else None,
    )
    open_page(page, server)
    configure(page, stream=True, background=True, max_tokens=None)
    page.click("#start")
    wait_tokens(page, 5)
    shot(page, "stop-midstream")
    page.click("#stop")
    expect(page.locator("#status")).to_have_text("cancelled")
    expect(page.locator("#conn")).to_have_attribute("data-conn", "closed")  # [DONE] read
    rid = page.text_content("#response-id") or ""
    rows = timeline(page)
    assert rows[-1][1] == "response.failed"
    # The engine stopped; the page's count is what it produced, what the server stored and
    # what the terminal event reported, and it no longer moves.
    trace = wait_for(
        lambda: (t := server.trace(rid))["aborted_at"] is not None and t, what="the engine to stop"
    )
    counted = number(page, "#tokens")
    stored = retrieve(server, rid)
    assert stored["status"] == "cancelled"
    assert counted == trace["produced"] == stored["usage"]["output_tokens"]
    assert number(page, "#usage-output") == counted
    assert counted < 2000
    assert rows == server_log(server, rid)
    assert number(page, "#tokens") == counted and timeline(page) == rows
    assert auth and set(auth) == {"Bearer unused"}


def test_stop_closes_a_foreground_stream(make_server: Any, page: Page) -> None:
    # contract §4.7: Stop closes a non-background stream, which cancels it; the page reads
    # the ending from the log (a resume), each event once
    server: Server = make_server(*SLOW)
    open_page(page, server)
    configure(page, stream=True, background=False, max_tokens=None)
    page.click("#start")
    wait_tokens(page, 5)
    page.click("#stop")
    expect(page.locator("#status")).to_have_text("cancelled")
    expect(page.locator("#conn")).to_have_attribute("data-conn", "closed")
    rid = page.text_content("#response-id") or ""
    rows = timeline(page)
    assert rows[-1][1] == "response.failed"
    assert rows == server_log(server, rid)
    stored = retrieve(server, rid)
    assert stored["status"] == "cancelled" and stored["background"] is False
    assert number(page, "#tokens") == stored["usage"]["output_tokens"] < 2000
    assert number(page, "#usage-output") == stored["usage"]["output_tokens"]


def test_reload_resumes_without_gap_or_duplicate(make_server: Any, page: Page) -> None:
    # contract §4.4: the reloaded page resumes after the last event it had kept
    server: Server = make_server(*SLOW)
    resumes: list[str] = []

    def note(request: Request) -> None:
        if "stream=true" in request.url:
            resumes.append(request.url)

    open_page(page, server)
    configure(page, stream=True, background=True, max_tokens=100)  # 5 s at 20 tokens/s
    page.click("#start")
    wait_tokens(page, 10)
    rid = page.text_content("#response-id") or ""
    before = timeline(page)
    shot(page, "reload-midstream")
    page.on("request", note)
    page.reload()
    page.wait_for_selector("#timeline tr[data-type='response.incomplete']", timeout=WAIT_MS)
    expect(page.locator("#conn")).to_have_attribute("data-conn", "closed")
    rows = timeline(page)
    assert [seq for seq, _ in rows] == list(range(len(rows)))
    assert rows == server_log(server, rid)
    assert rows[: len(before)] == before
    # One resume, after a kept event, while the run was still producing tokens.
    assert len(resumes) == 1 and f"/v1/responses/{rid}?" in resumes[0]
    after = int(resumes[0].rsplit("starting_after=", 1)[1])
    assert after >= 0
    assert any(kind == "response.output_text.delta" for seq, kind in rows if seq > after)
    assert number(page, "#tokens") == 100 == number(page, "#usage-output")
    assert page.text_content("#status") == "incomplete"


def test_recent_list_shows_status_and_cancels(make_server: Any, page: Page) -> None:
    # contract §3.2, §3.8: the list's cancel stops a response this page started
    server: Server = make_server(*SLOW)
    open_page(page, server)
    configure(page, stream=True, background=False, max_tokens=3)
    page.click("#start")
    expect(page.locator("#status")).to_have_text("incomplete")
    first = page.text_content("#response-id") or ""
    row = page.locator(f"#recent tr[data-id='{first}']")
    expect(row.locator(".badge")).to_have_text("incomplete")
    expect(row.locator(".tokens")).to_have_text("3")

    configure(page, stream=False, background=True, max_tokens=None)  # JSON create, polled
    page.click("#start")
    # Start clears the id ("–") before the create answers: wait for the new one.
    expect(page.locator("#response-id")).to_have_text(re.compile(r"^resp_"))
    expect(page.locator("#response-id")).not_to_have_text(first)
    second = page.text_content("#response-id") or ""
    running = page.locator(f"#recent tr[data-id='{second}']")
    expect(running.locator(".badge")).to_have_text("in_progress")
    running.locator("[data-testid=recent-cancel]").click()
    expect(running.locator(".badge")).to_have_text("cancelled")
    expect(page.locator("#status")).to_have_text("cancelled")
    stored = retrieve(server, second)
    assert stored["status"] == "cancelled"
    assert 0 < stored["usage"]["output_tokens"] < 2000
    expect(running.locator(".tokens")).to_have_text(str(stored["usage"]["output_tokens"]))
    expect(row.locator(".badge")).to_have_text("incomplete")  # the first one is untouched
    expect(page.locator("#conn")).to_have_attribute("data-conn", "closed")  # polling ended

    # Resume replays a finished response's whole log into the view.
    row.locator("[data-testid=recent-resume]").click()
    expect(page.locator("#response-id")).to_have_text(first)
    page.wait_for_selector("#timeline tr[data-type='response.incomplete']")
    expect(page.locator("#conn")).to_have_attribute("data-conn", "closed")
    assert timeline(page) == server_log(server, first)
    assert page.text_content("#output") == scripted_text(3)


def test_the_page_needs_no_key_and_sends_the_typed_one(
    make_server: Any, page: Page, monkeypatch: pytest.MonkeyPatch
) -> None:
    # contract §6.3, §7.1: the page loads without a key; its API calls carry the one typed in
    monkeypatch.setenv("TETHER_API_KEYS", "acme:sk-acme-secret")
    server: Server = make_server("--scripted-rate", "0")
    sent: list[str | None] = []
    page.on(
        "request",
        lambda r: sent.append(r.headers.get("authorization")) if "/v1/" in r.url else None,
    )
    page.goto(f"{server.url}/")
    expect(page.locator("#error")).to_contain_text("API key")  # GET /v1/models: 401
    assert sent and set(sent) == {"Bearer unused"}
    sent.clear()
    page.fill("#api-key", "sk-acme-secret")
    page.press("#api-key", "Tab")  # a change event: the key is kept and the models reload
    expect(page.locator("#error")).to_be_hidden()
    open_page(page, server)  # the key survives a reload (local storage)
    expect(page.locator("#api-key")).to_have_value("sk-acme-secret")
    configure(page, stream=True, background=False, max_tokens=3)
    page.click("#start")
    expect(page.locator("#status")).to_have_text("incomplete")
    assert sent and set(sent) == {"Bearer sk-acme-secret"}


def reasoning_count(page: Page) -> int:
    """The count on the reasoning panel ("· 12 tokens")."""
    return int((page.text_content("#reasoning-tokens") or "").split()[1])


def test_reasoning_streams_apart_from_the_answer(make_server: Any, page: Page) -> None:
    # issue 16: the thinking streams live into a panel of its own, collapsed by default,
    # with its token count; the answer's box holds only the answer
    server: Server = make_server(*SLOW)
    open_page(page, server)
    expect(page.locator("#reasoning")).to_be_hidden()  # nothing thought yet
    page.fill("#prompt", "THINK=2000 think first")
    configure(page, stream=True, background=True, max_tokens=None)
    page.click("#start")
    page.wait_for_function(
        "document.querySelector('#reasoning-text').textContent.split(' ').length >= 4"
    )
    expect(page.locator("#reasoning")).to_be_visible()
    assert page.eval_on_selector("#reasoning", "d => d.open") is False  # collapsed
    assert page.text_content("#output") == ""
    live = reasoning_count(page)
    assert live >= 4 and (page.text_content("#reasoning-text") or "").startswith(scripted_text(4))
    page.click("#reasoning summary")  # opens on request, and keeps streaming while open
    expect(page.locator("#reasoning-text")).to_be_visible()
    page.wait_for_function(
        f"Number(document.querySelector('#reasoning-tokens').textContent.split(' ')[1]) > {live}"
    )
    shot(page, "reasoning-live")
    page.click("#stop")  # cancelled while thinking
    expect(page.locator("#status")).to_have_text("cancelled")
    rid = page.text_content("#response-id") or ""
    stored = retrieve(server, rid)
    thought = stored["usage"]["output_tokens_details"]["reasoning_tokens"]
    assert thought == stored["usage"]["output_tokens"] == number(page, "#tokens")
    assert reasoning_count(page) == thought  # the usage's exact count
    assert page.text_content("#reasoning-text") == scripted_text(thought)
    assert page.text_content("#output") == ""

    # Thinking then answering, within the budget: the next response starts collapsed.
    page.fill("#prompt", "THINK=4 go")
    configure(page, stream=True, background=False, max_tokens=10)
    page.click("#start")
    expect(page.locator("#status")).to_have_text("incomplete")
    assert page.eval_on_selector("#reasoning", "d => d.open") is False
    assert page.text_content("#reasoning-text") == scripted_text(4)
    assert page.text_content("#output") == scripted_text(6)
    assert page.text_content("#reasoning-tokens") == "· 4 tokens"
    assert number(page, "#usage-output") == 10 == number(page, "#tokens")

    # Without streaming, the same split from the response's output items.
    page.fill("#prompt", "THINK=3 go")
    configure(page, stream=False, background=False, max_tokens=5)
    page.click("#start")
    expect(page.locator("#status")).to_have_text("incomplete")
    expect(page.locator("#output")).to_have_text(scripted_text(2))
    assert page.text_content("#reasoning-text") == scripted_text(3)
    assert page.text_content("#reasoning-tokens") == "· 3 tokens"
    shot(page, "reasoning-done")


def test_conversation_picker_shows_its_turns(make_server: Any, page: Page) -> None:
    # issue 18: a new conversation, two turns of it (the second stopped mid-stream); its
    # items on the page are the server's, the stopped turn's answer marked incomplete.
    server: Server = make_server("--scripted-rate", "20", "--scripted-length", "2000")
    open_page(page, server)
    page.click("#conversation-new")
    expect(page.locator("#conversation")).to_have_value(re.compile(r"^conv_"))
    cid = page.input_value("#conversation")
    expect(page.locator("#conversation-panel")).to_be_visible()
    configure(page, stream=True, background=True, max_tokens=3)
    page.fill("#prompt", "first")
    page.click("#start")
    expect(page.locator("#status")).to_have_text("incomplete")
    expect(page.locator("#conversation-items li")).to_have_count(2)
    configure(page, stream=True, background=True, max_tokens=None)
    page.fill("#prompt", "second")
    page.click("#start")
    wait_tokens(page, 3)
    page.click("#stop")
    expect(page.locator("#status")).to_have_text("cancelled")
    expect(page.locator("#conversation-items li")).to_have_count(4)
    shot(page, "conversation")
    items = httpx.get(
        f"{server.base_url}/conversations/{cid}/items", params={"order": "asc"}, timeout=5
    ).json()["data"]
    shown = page.eval_on_selector_all("#conversation-items li", "lis => lis.map(l => l.dataset.id)")
    assert shown == [i["id"] for i in items]
    assert items[3]["status"] == "incomplete"
    expect(page.locator("#conversation-items li").nth(3)).to_contain_text("(incomplete)")
    expect(page.locator("#conversation-items li").nth(2)).to_contain_text("second")
    # The picker is remembered across a reload.
    page.reload()
    expect(page.locator("#conversation")).to_have_value(cid)
    expect(page.locator("#conversation-items li")).to_have_count(4)
