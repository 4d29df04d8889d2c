"""The web chat page in real headless Chromium (Debian's, via scripts/install_browser.sh):
type a message, watch the reply stream in, and check it is the model's answer."""
import shutil
from pathlib import Path

import pytest

from spikingbrain.serve.generation import TextStreamer, chat_prompt_ids
from spikingbrain.serve.sampling import SamplingParams

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed: run scripts/install_browser.sh")
if not (Path(CHROMIUM).exists() or shutil.which("chromium")):
    pytest.skip("Debian chromium not installed: run scripts/install_browser.sh", allow_module_level=True)


@pytest.fixture(scope="module")
def page():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"),
                                    headless=True, args=ARGS)
        pg = browser.new_page()
        yield pg
        browser.close()


def test_type_a_message_and_see_a_streamed_reply(page, server, sb_model, tokenizer):
    page.goto(server.url + "/")
    page.fill("#api-key", server.api_key)
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("document.getElementById('title').textContent.includes('tiny-sb')", timeout=20000)
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "40")
    # record every visible state of the reply bubble, to see that it grew in several steps
    page.evaluate("""() => {
        window.__seen = [];
        new MutationObserver(() => {
            const b = document.querySelector('.msg.assistant');
            if (b) window.__seen.push(b.firstChild ? b.firstChild.nodeValue : '');
        }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
    }""")
    page.fill("#input", "Tell me about rivers.")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant[data-state=done]", timeout=60000)

    reply = page.evaluate("document.querySelector('.msg.assistant').firstChild.nodeValue")
    ref = TextStreamer(sb_model, tokenizer, chat_prompt_ids(tokenizer, [{"role": "user", "content": "Tell me about rivers."}]),
                       SamplingParams(max_new_tokens=40))
    list(ref)
    assert reply == ref.sequence.text and reply
    seen = [s for s in page.evaluate("window.__seen") if s]
    assert len(set(seen)) > 2, "the reply should appear piece by piece"
    assert page.inner_text(".msg.user") == "Tell me about rivers."
    assert float(page.inner_text("#tps")) > 0
    assert "tok/s" in page.inner_text(".msg.assistant .meta")
    assert page.is_hidden("#sparsity-box")  # the tiny model is not spiking
