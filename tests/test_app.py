"""The Space: the exported app.py served on localhost and driven by a real headless browser (Debian's chromium through
Playwright): the model's facts on the page, streamed text that appears and grows, a message for an empty prompt. Also,
without a browser, the input checks, the context capping, seeded reproducibility and `python -m smollm2.app`'s export."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from tiny import copy_run, free_port

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
SCREENSHOT_COPY = Path("/tmp/app_screenshot.png")  # a stable path to look at after a run
pytestmark = pytest.mark.e2e


def _need(ok: bool, why: str) -> None:
    """Skip without a browser, unless SMOLLM2_REQUIRE_BROWSER=1 (CI, where its absence is a broken image)."""
    if not ok:
        if os.environ.get("SMOLLM2_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{why} (SMOLLM2_REQUIRE_BROWSER=1)")
        pytest.skip(why)


@pytest.fixture(scope="module")
def trained(two_rank_run, space_export, tmp_path_factory) -> dict[str, Path]:
    """A copy of the session's run (the app writes its export into the run directory) and its `--format space` export."""
    return {"run": copy_run(two_rank_run, tmp_path_factory.mktemp("app") / "run"), "space": space_export}


def _space_app(space: Path):
    """The Space's own app.py (the copy the export wrote, not smollm2.serve.space_app), as a module."""
    spec = importlib.util.spec_from_file_location("exported_space_app", space / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checks_capping_and_seeds(trained):
    gen = _space_app(trained["space"]).Generator(trained["space"] / "model", device="cpu")
    context = json.loads((trained["space"] / "model" / "smollm2_export.json").read_text())["max_seq_len"]
    assert gen.context == context
    ok = ("hi", 1.0, 50, 0.95, 10, 0)  # prompt, temperature, top-k, top-p, max new tokens, seed
    for position, bad, message in [(0, "", "Type a prompt first"), (0, " \n\t", "Type a prompt first"), (0, None, "Type a"),
                                   (1, float("nan"), "Temperature must be a finite"), (1, -0.5, "Temperature must be between"),
                                   (1, 1e9, "Temperature must be between"), (2, -1, "Top-k must be between"),
                                   (2, 2.5, "Top-k must be a whole number"), (3, 0.0, "Top-p must be above 0"),
                                   (3, 1.5, "Top-p must be between"), (4, 0, "Max new tokens must be at least 1"),
                                   (4, float("inf"), "Max new tokens must be a finite"), (4, "many", "must be a number"),
                                   (5, -1, "Seed must be between"), (5, 1.5, "Seed must be a whole number")]:
        args = list(ok)
        args[position] = bad
        with pytest.raises(ValueError, match=message) as err:
            gen.check(*args)
        assert list(gen.stream(*args)) == [("", f"⚠️ {err.value}")]  # the page shows a message; nothing raises

    n_prompt = len(gen.tok("ROMEO:")["input_ids"])
    settings, notes = gen.check("ROMEO:", 1.0, 50, 0.95, 10**12, 0)  # huge: capped to what fits, with a note
    assert settings["max_new_tokens"] == context - n_prompt and f"capped at {context - n_prompt}" in notes[0]
    settings, notes = gen.check("ROMEO:", 1.0, 50, 0.95, 10, 0)
    assert settings["max_new_tokens"] == 10 and notes == []
    long = " ".join(f"w{i}" for i in range(300))  # longer than the context: its end is kept, one new token fits
    settings, notes = gen.check(long, 1.0, 50, 0.95, 100, 0)
    assert len(settings["input_ids"]) == context - 1 and settings["input_ids"] == gen.tok(long)["input_ids"][-(context - 1):]
    assert settings["shown_prompt"].endswith("w299") and not settings["shown_prompt"].startswith("w0 ")
    assert f"kept its last {context - 1}" in notes[0] and "capped at 1" in notes[1] and settings["max_new_tokens"] == 1
    *_, (text, message) = gen.stream(long, 1.0, 50, 0.95, 100, 0)
    assert "kept its last" in message and "Done: 1 new token " in message

    # streamed: the text grows yield by yield, each a prefix of the next; a seed fixes the text, another changes it
    steps = list(gen.stream("ROMEO:", 1.0, 50, 0.95, 40, 7))
    texts = [t for t, _ in steps]
    assert len(set(texts)) > 3 and all(b.startswith(a) for a, b in zip(texts, texts[1:])) and texts[0].startswith("ROMEO:")
    assert steps[-1][1].startswith("Done: ") and "seed 7" in steps[-1][1]
    assert list(gen.stream("ROMEO:", 1.0, 50, 0.95, 40, 7))[-1][0] == texts[-1]
    assert list(gen.stream("ROMEO:", 1.0, 50, 0.95, 40, 8))[-1][0] != texts[-1]
    greedy = [list(gen.stream("ROMEO:", 0.0, 50, 0.95, 20, s))[-1][0] for s in (1, 2)]
    assert greedy[0] == greedy[1]  # temperature 0 is greedy: the seed does not matter


def test_app_cli_exports_a_checkpoint_once(trained, capsys):
    from smollm2.errors import UserError
    from smollm2.serve.app import hf_folder

    run = trained["run"]
    out = hf_folder(str(run))
    assert out == run / "export" / "hf-step-000020" and (out / "config.json").is_file()
    assert "exporting" in capsys.readouterr().out
    assert hf_folder(str(run / "checkpoints" / "latest")) == out and "using the export" in capsys.readouterr().out
    assert hf_folder(str(trained["space"])) == trained["space"] / "model"  # a Space folder serves its model/
    assert hf_folder(str(out)) == out
    with pytest.raises(UserError, match="not found"):
        hf_folder(str(run / "nope"))


# Records every value the output textarea is given (gradio sets `.value`; a MutationObserver sees no property change):
# the page's own record of the stream, however fast it is.
RECORD_OUTPUT = """() => { window.seen = [];
    const d = Object.getOwnPropertyDescriptor(HTMLTextAreaElement.prototype, 'value');
    Object.defineProperty(HTMLTextAreaElement.prototype, 'value', { configurable: true, get() { return d.get.call(this); },
        set(v) { d.set.call(this, v); if (this.closest('#output')) window.seen.push(String(v)); } }); }"""


@pytest.mark.timeout(300)
def test_the_page_in_a_real_browser(trained, tmp_path):
    _need(Path(CHROMIUM).exists(), f"no {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need(False, "no playwright (pip install playwright; it drives the system chromium, no browser download)")
    space = trained["space"]
    info = json.loads((space / "model" / "smollm2_export.json").read_text())
    port = free_port()
    server = subprocess.Popen([sys.executable, "app.py", "--model", "model", "--port", str(port)], cwd=space,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "the app did not answer within 120 s"
                time.sleep(0.3)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                              "--disable-component-update", "--disable-sync", "--no-first-run"])
            try:
                page = browser.new_page(viewport={"width": 1100, "height": 1000})
                page.set_default_timeout(60_000)
                page.goto(f"http://127.0.0.1:{port}/")
                facts = page.locator("#info").inner_text()
                assert f"step {info['step']:,}" in facts and f"{info['n_params']:,} parameters" in facts, facts
                assert f"val loss {info['val_loss']:.4f}" in facts and f"context {info['max_seq_len']:,} tokens" in facts

                page.click("#generate")  # an empty prompt: a message in the page, no traceback
                page.wait_for_function("document.querySelector('#message').innerText.includes('Type a prompt first')")

                page.evaluate(RECORD_OUTPUT)
                page.fill("#prompt textarea", "ROMEO:")
                page.click("#generate")
                page.wait_for_function("document.querySelector('#message').innerText.includes('Done:')")
                seen = [v for v in page.evaluate("() => window.seen") if v]
                final = page.input_value("#output textarea")
                message = page.locator("#message").inner_text()
                page.screenshot(path=str(tmp_path / "space.png"), full_page=True)
            finally:
                browser.close()
        shutil.copyfile(tmp_path / "space.png", SCREENSHOT_COPY)
        assert final.startswith("ROMEO:") and len(final) > len("ROMEO:") + 20 and "seed 0)" in message
        lengths = [len(v) for v in dict.fromkeys(seen)]  # distinct values, in order
        assert len(lengths) >= 5 and lengths == sorted(lengths) and lengths[0] < len(final), lengths  # it grew: streamed
        assert all(final.startswith(v) for v in seen)
        assert (tmp_path / "space.png").stat().st_size > 10_000
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
