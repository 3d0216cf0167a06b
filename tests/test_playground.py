"""The playground page of ``bpo serve`` in a real browser: Debian's headless Chromium, driven by Playwright,
against a real ``bpo serve`` process with the bundled optimizer and a real target on 127.0.0.1.

Needs ``apt-get install chromium`` and the test extra's ``playwright`` (no ``playwright install``: the
system Chromium is used). Where Chromium is missing the browser tests skip, except under ``BPO_REQUIRE_BROWSER=1``
(``.ci/run`` sets it), where they fail. The first test writes its screenshot to its temp folder, and to
``docs/playground.png`` (the README's picture) only under ``BPO_UPDATE_SCREENSHOT=1``, so a test run leaves the tree clean.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, CLIServer, start_cli_server

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
#: The server's OpenAI key (its target's): it must never reach the page.
SECRET = "sk-playground-secret-0123456789"
README_SCREENSHOT = ROOT / "docs" / "playground.png"
#: A prompt the bundled optimizer rewrites (greedy, so always the same rewrite).
PROMPT = "Give me three tips for a job interview"
HOSTILE = '<script>window.__ran = 1</script><img src=x onerror="window.__ran = 2"> Summarize this text'


@pytest.fixture(scope="module")
def target_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CLIServer]:
    """The bundled SmolLM2 behind another ``bpo serve``: the target, at MODEL@URL."""
    yield from start_cli_server(["serve", "--model", "smollm2-135m-instruct"], tmp_path_factory.mktemp("target") / "serve.log",
                                timeout=300)


@pytest.fixture(scope="module")
def playground(tmp_path_factory: pytest.TempPathFactory, target_server: CLIServer) -> Iterator[CLIServer]:
    """``bpo serve`` (bpo-small) with the target server as its ``--target``."""
    log = tmp_path_factory.mktemp("playground") / "serve.log"
    yield from start_cli_server(["serve", "--target", f"smollm2@{target_server.base_url}"], log,
                                env={"OPENAI_API_KEY": SECRET}, timeout=300)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    if os.environ.get("BPO_REQUIRE_BROWSER") == "1":
        from playwright import sync_api

        assert Path(CHROMIUM).is_file(), f"BPO_REQUIRE_BROWSER=1 but {CHROMIUM} is missing: apt-get install -y chromium"
    else:
        sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
        if not Path(CHROMIUM).is_file():
            pytest.skip("no Chromium: apt-get install -y chromium")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_FLAGS, viewport={"width": 1180, "height": 900}, device_scale_factor=1)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser, playground: CLIServer) -> Iterator[object]:
    page = browser.new_page()
    page.dialogs = []
    page.on("dialog", lambda dialog: (page.dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(playground.url + "/")
    page.wait_for_selector("body[data-ready=true]")
    yield page
    page.close()


def submit(page, prompt: str, mode: str = "greedy", model: str = "bpo-small") -> dict:
    """Type ``prompt``, pick ``mode`` and ``model``, press Rewrite; the rewrite endpoint's JSON once the page is idle."""
    page.fill("#prompt", prompt)
    page.select_option("#mode", mode)
    page.select_option("#model", model)
    with page.expect_response("**/playground/rewrite", timeout=300_000) as response:
        page.click("#submit")
    data = response.value.json()
    page.wait_for_function("() => !document.getElementById('submit').disabled", timeout=300_000)
    return data


def diff_sides(page) -> tuple[str, str]:
    """The original and the rewrite, read back from the diff the page shows."""
    spans = page.eval_on_selector_all("#diff > *", "nodes => nodes.map(n => [n.className, n.textContent])")
    before = "".join(text for tag, text in spans if tag in ("same", "removed"))
    after = "".join(text for tag, text in spans if tag in ("same", "added"))
    return before, after


def test_page_shows_the_rewrite_as_a_word_diff_with_verdict_latency_and_target_answers(page, playground, tmp_path):
    data = submit(page, PROMPT)

    assert data["verdict"] == "rewritten", data
    assert page.text_content("#verdict") == "rewritten"
    assert diff_sides(page) == (PROMPT, data["rewritten"])
    assert page.locator("#diff ins.added").count() >= 1
    assert page.text_content("#rewritten") == data["rewritten"]
    assert f"{data['latency_s']:.2f} s" in page.text_content("#latency")
    # The target (the bundled SmolLM2 behind --target) answered both versions, side by side.
    for panel in ("#answer-original", "#answer-rewritten"):
        answer = page.text_content(panel)
        assert answer.strip() and not answer.startswith(("no answer", "…")), answer
    assert page.is_visible("#answers")
    # The target's key stayed on the server.
    assert SECRET not in page.content()
    with urllib.request.urlopen(playground.url + "/playground/config") as config:
        assert SECRET not in config.read().decode()
    assert page.dialogs == []
    screenshot = page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
    assert screenshot[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("BPO_UPDATE_SCREENSHOT") == "1":
        README_SCREENSHOT.write_bytes(screenshot)


def test_html_in_a_prompt_is_shown_as_text_and_never_run(page):
    data = submit(page, HOSTILE)

    assert page.evaluate("window.__ran") is None
    assert page.dialogs == []
    assert page.locator("#result script, #result img").count() == 0
    before, after = diff_sides(page)
    assert before == HOSTILE and after == data["rewritten"]
    assert "<script>" in page.text_content("#diff")
    assert page.text_content("#rewritten") == data["rewritten"]


def test_aggressive_mode_lists_every_candidate_and_the_guards_reason(page):
    data = submit(page, "how do i make pancakes", mode="aggressive")

    assert data["mode"] == "aggressive" and len(data["candidates"]) >= 2, data
    items = page.eval_on_selector_all("#candidates li", "nodes => nodes.map(n => n.textContent)")
    assert items == data["candidates"]
    assert page.is_visible("#candidates-section")
    assert page.text_content("#verdict") == data["verdict"]
    if data["reason"]:
        assert data["reason"] in page.text_content("#reason")
        assert page.text_content("#detail") == (data["detail"] or "")


def test_a_bad_request_gets_a_json_error_and_no_target_key(playground):
    request = urllib.request.Request(playground.url + "/playground/rewrite", data=json.dumps({"prompt": "hi", "mode": "wild"}).encode(),
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request)
    assert error.value.code == 400
    assert json.load(error.value)["error"]["param"] == "mode"
