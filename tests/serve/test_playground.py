"""The playground page in real headless Chromium (Debian's `chromium`, driven by `playwright`)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from aigc.config import ServeConfig
from aigc.fsutil import append_jsonl
from aigc.models import load_run
from aigc.serve import create_app

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# Records, for every change to the generated text, when it happened and how many tokens were shown,
# so the test can tell streamed text (many updates) from text that appeared all at once.
WATCH_TOKENS = """
window.tokenUpdates = [];
new MutationObserver(() => {
  window.tokenUpdates.push(document.querySelectorAll('#generated .tok').length);
}).observe(document.getElementById('generated'), {childList: true});
"""


@pytest.fixture
def browser():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing; .ci/run installs Debian's chromium")
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


def test_playground_streams_coloured_tokens_in_chromium(make_run, live_server, browser):
    run_dir = make_run()
    append_jsonl(run_dir / "metrics.jsonl", {"step": 500, "tokens": 512000, "val_bpb": 2.345})
    server = live_server(app=create_app(load_run(run_dir), ServeConfig(model_name="tiny-demo")))
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server.url + "/")

    summary = page.locator("#summary")
    summary.get_by_text("2.345 bits/byte at step 500").wait_for()
    assert "tiny-demo" in summary.inner_text() and "GPT" in summary.inner_text()
    assert page.locator("#label option").all_inner_texts() == ["(none)", "pos", "neg"]
    assert not page.locator("#key-row").is_visible()  # no key needed, so none asked for

    page.fill("#prompt", "a wonderful film")
    page.select_option("#label", "pos")
    page.fill("#seed", "7")
    set_slider(page, "#max-tokens", 300)
    set_slider(page, "#temperature", 0.9)
    assert page.inner_text("#max-tokens-value") == "300"
    page.evaluate(WATCH_TOKENS)
    page.click("#generate")
    page.locator("#status").get_by_text("Done:").wait_for(timeout=60_000)

    shown = page.locator("#generated .tok")
    assert shown.count() > 10 and page.inner_text("#generated").strip()
    assert page.inner_text("#shown-prompt") == "a wonderful film"
    updates = page.evaluate("window.tokenUpdates")
    assert len(updates) > 3 and updates == sorted(updates)  # the text grew over many separate updates

    page.check("#colour")
    assert "coloured" in page.get_attribute("#output", "class")
    first = shown.first
    colour = float(first.evaluate("el => el.style.getPropertyValue('--c')"))  # log-scale probability
    assert 0 <= colour <= 1 and page.locator("#legend").is_visible()
    first.hover()
    tooltip = page.locator("#tooltip")
    tooltip.wait_for(state="visible")
    rows = tooltip.locator("tr")
    assert rows.count() >= 5 and "%" in rows.first.inner_text()
    assert tooltip.locator("tr.chosen").count() == 1

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)
    assert errors == []


def test_playground_sends_guidance_and_shows_why_a_negative_label_needs_it(make_run, live_server, browser):
    server = live_server(app=create_app(load_run(make_run()), ServeConfig()))
    page = browser.new_page()
    bodies: list[dict] = []
    page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/v1/completions") else None)
    page.goto(server.url + "/")
    page.locator("#summary").get_by_text("no evaluation recorded").wait_for()
    assert page.locator("#negative-label option").all_inner_texts() == ["(none)", "pos", "neg"]

    page.fill("#prompt", "a film")
    page.fill("#seed", "1")  # unseeded, the random tiny model's sample is sometimes only white space
    page.select_option("#label", "pos")
    page.select_option("#negative-label", "neg")
    page.click("#generate")  # guidance still at 1: the server says what is missing
    page.locator("#status").get_by_text("only acts with guidance").wait_for(timeout=60_000)

    set_slider(page, "#guidance", 3)
    assert page.inner_text("#guidance-value") == "3"
    page.click("#generate")
    page.locator("#status").get_by_text("Done:").wait_for(timeout=60_000)
    assert page.inner_text("#generated").strip()
    assert "guidance_scale" not in bodies[0]
    assert bodies[-1]["guidance_scale"] == 3 and bodies[-1]["negative_label"] == "neg" and bodies[-1]["label"] == "pos"
    assert bodies[-1]["seed"] == 1


def test_playground_asks_for_the_key_and_shows_api_errors(live_server, browser):
    server = live_server(api_key="k", max_prompt_tokens=4)
    page = browser.new_page()
    page.goto(server.url + "/")
    page.locator("#summary").get_by_text("needs an API key").wait_for()
    page.locator("#key-row").wait_for(state="visible")
    page.fill("#api-key", "k")
    page.dispatch_event("#api-key", "change")
    page.locator("#summary").get_by_text("no evaluation recorded").wait_for()
    page.fill("#prompt", "a prompt longer than this server's four-token limit")
    page.click("#generate")
    page.locator("#status.error").get_by_text("this server takes at most 4").wait_for()


def set_slider(page, selector: str, value: float) -> None:
    page.eval_on_selector(selector, "(el, v) => { el.value = String(v); el.dispatchEvent(new Event('input')); }", value)


def test_playground_chat_tab_streams_keeps_history_and_resets(make_chat_run, live_server, browser):
    # Two turns of the tiny byte-level tokenizer need more than the tiny preset's 64 positions.
    run = load_run(make_chat_run(block_size=256))
    server = live_server(app=create_app(run, ServeConfig(model_name="tiny-chat")))
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server.url + "/")
    page.locator("#summary").get_by_text("tiny-chat").wait_for()
    page.click("#tab-chat")
    assert page.locator("#chat").is_visible() and not page.locator("#prompt").is_visible()
    page.fill("#chat-system", "be kind")
    page.fill("#seed", "3")
    set_slider(page, "#max-tokens", 20)
    for text in ("a wonderful film", "another one"):
        page.fill("#chat-input", text)
        page.click("#chat-send")
        page.locator("#chat-status").get_by_text("Done:").wait_for(timeout=60_000)
    roles = page.locator("#chat-history .msg .role").all_inner_texts()
    assert roles == ["user", "assistant", "user", "assistant"]
    answers = page.locator("#chat-history .msg.assistant .content").all_inner_texts()
    assert all(answer for answer in answers)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground-chat.png"), full_page=True)
    page.click("#chat-reset")
    assert page.locator("#chat-history .msg").count() == 0
    page.click("#tab-completion")
    assert page.locator("#prompt").is_visible()
    assert errors == []


def test_playground_header_names_the_family_and_the_trained_share_of_a_llama_run(make_run, live_server, browser):
    from aigc.artifacts.run import read_run_config, save_config
    from aigc.config import LLAMA_STYLE

    run_dir = make_run(**LLAMA_STYLE)
    config = read_run_config(run_dir)
    extra = {"parameters": {"total": 1_500_000, "trainable": 40_000}}  # as a LoRA fine-tune records them
    save_config(run_dir, dataclasses.replace(config, extra=extra))
    server = live_server(app=create_app(load_run(run_dir), ServeConfig()))
    page = browser.new_page()
    page.goto(server.url + "/")
    summary = page.locator("#summary")
    summary.get_by_text("no evaluation recorded").wait_for()
    text = summary.inner_text()
    assert "Llama" in text and "GPT" not in text and "40.0 k trained" in text
    assert summary.get_attribute("title").startswith("Llama: 1.50 M parameters (0.04 M trainable); 2 layers × 64")
