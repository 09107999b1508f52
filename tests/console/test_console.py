"""The web console in a real browser: Playwright driving Debian's Chromium against a real `tuneworks up` (its own
Redis, the API, a worker and vLLM) on SmolLM2.

One walk through the product as a new user would take it: sign in with a key, upload a good file and a bad one
(the report names the line), create a job, watch it finish with the loss curve drawn, open the fine-tuned model
in the playground and get two streamed answers (base and fine-tuned) side by side, see that prompt in the
model's drift history, sign out. The browser log must hold no error, and the test writes a screenshot of each
page into `docs/console/`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.settings import SMOLLM2, Settings
from tests.conftest import REPO, free_port, settings_env
from tuneworks import demo

playwright_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = REPO / "docs" / "console"
VIEWPORT = {"width": 880, "height": 760}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1200),
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make system-deps)"),
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[tuple[str, str]]:
    """`tuneworks up` on a fresh FT_HOME: (the API's root URL, a key of project `console`)."""
    root = tmp_path_factory.mktemp("console")
    home = root / "home"
    home.mkdir()
    (home / "models").symlink_to(models_dir, target_is_directory=True)
    settings = Settings(home=home, api_port=free_port(), vllm_base_port=free_port(), worker_metrics_port=0,
                        api_metrics_port=0, serve_metrics_port=0, vllm_max_model_len=1024)  # fmt: skip
    env = settings_env(settings)
    env.pop("FT_REDIS_URL", None)  # `up` starts its own Redis
    log = (root / "up.log").open("w")
    proc = subprocess.Popen([str(REPO / ".venv" / "bin" / "tuneworks"), "up"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    base = f"http://127.0.0.1:{settings.api_port}"
    try:
        _wait(lambda: httpx.get(f"{base}/ready", timeout=2).status_code == 200, proc, 120)
        key = subprocess.run([str(REPO / ".venv" / "bin" / "tuneworks"), "keys", "create", "--project", "console"],
                             env=env, capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        yield base, key
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _wait(check: Any, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "tuneworks up exited early"
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError("the stack did not come up")


def _inference_ready(base: str, key: str, timeout: float) -> None:
    """Wait for vLLM behind the gateway (it starts with the stack, beside the training)."""
    deadline = time.monotonic() + timeout
    body = {"model": SMOLLM2, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    while time.monotonic() < deadline:
        try:
            if httpx.post(f"{base}/v1/chat/completions", json=body, timeout=30,
                          headers={"Authorization": f"Bearer {key}"}).status_code == 200:  # fmt: skip
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError("vLLM did not come up")


@pytest.fixture
def browser_page(tmp_path: Path) -> Iterator[tuple[Any, list[str]]]:
    """A Chromium page (narrow viewport) and the list its console errors and page errors are collected in."""
    errors: list[str] = []
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport=VIEWPORT)
        page.on(
            "console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None
        )
        page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
        page.set_default_timeout(30_000)
        yield page, errors
        browser.close()


def shot(page: Any, name: str) -> None:
    """A full-page PNG of `page` in docs/console/, reduced to a 64-colour palette (they are committed)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    try:
        from PIL import Image
    except ImportError:  # Pillow comes with the training stack; without it the PNG stays as taken
        return
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=64)
    small.save(path, optimize=True)


def test_a_new_user_fine_tunes_and_compares_models_from_the_browser(
    stack: tuple[str, str], browser_page: tuple[Any, list[str]], tmp_path: Path
) -> None:
    base, key = stack
    page, errors = browser_page
    expect = playwright_api.expect
    good, bad = tmp_path / "tickets.jsonl", tmp_path / "broken.jsonl"
    good.write_bytes(demo.training_jsonl(demo.tickets(12, seed=1)))
    lines = demo.training_jsonl(demo.tickets(12, seed=2)).splitlines(keepends=True)
    bad.write_bytes(
        b"".join(lines[:7])
        + b'{"messages": [{"role": "user", "content": "no answer"}]}\n'
        + b"".join(lines[7:])
    )

    # Sign in: `/` redirects to the console; the key goes to sessionStorage, never to a cookie.
    response = httpx.get(base + "/", follow_redirects=True)
    assert str(response.url) == f"{base}/console/" and "content-security-policy" in response.headers
    page.goto(base + "/")
    expect(page.locator("input[name=api_key]")).to_be_visible()
    shot(page, "sign-in")
    page.fill("input[name=api_key]", key)
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Your files")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('tuneworks.api_key')") == key
    assert page.context.cookies() == []

    # Files: a good file is processed; the bad one's report names its line and field.
    page.set_input_files("input[type=file]", str(good))
    expect(page.locator(".report.good")).to_contain_text("processed")
    page.set_input_files("input[type=file]", str(bad))
    expect(page.locator(".report.bad").first).to_contain_text("line 8")
    expect(page.locator(".report.bad").first).to_contain_text("example_missing_assistant_message")
    expect(page.locator("tr[data-file]")).to_have_count(2)
    page.locator("tr[data-file]", has_text="tickets.jsonl").get_by_role("button", name="First lines").click()
    expect(page.locator(".lines li")).to_have_count(5)
    shot(page, "files")

    # Jobs: create one from the form, then follow it live on its page.
    page.get_by_role("link", name="Jobs").click()
    page.get_by_role("button", name="New job").click()
    page.get_by_label("Training file").select_option(_file_id(page, "tickets.jsonl"))
    page.get_by_label("Epochs").fill("1")
    page.get_by_label("Batch size").fill("4")
    page.get_by_label("Suffix").fill("console")
    page.get_by_label("Seed").fill("7")
    page.get_by_role("button", name="Create job").click()
    expect(page.get_by_role("heading", name="Fine-tuning job", exact=True)).to_be_visible()
    expect(page.locator("body[data-job-done]")).to_have_attribute(
        "data-job-done", "succeeded", timeout=600_000
    )
    loss = page.locator("figure.chart", has_text="Loss")
    assert int(loss.get_attribute("data-points") or 0) == 3  # 12 examples / batch 4, one epoch
    expect(loss.locator("canvas")).to_have_count(1)
    expect(page.locator(".events li")).not_to_have_count(0)
    expect(page.get_by_role("link", name="Open in playground")).not_to_have_count(0)
    shot(page, "job")
    page.get_by_role("link", name="Jobs").click()
    expect(page.locator("tr[data-job]")).to_have_count(1)
    shot(page, "jobs")
    page.get_by_role("link", name="Models").click()
    expect(page.locator("tr[data-model]", has_text=":console:")).to_have_count(2)  # the model, its checkpoint

    # Playground: the default pair is the base model and the fine-tuned one; both answers stream in.
    _inference_ready(base, key, 300)
    page.go_back()
    page.go_back()
    page.locator("dd").get_by_role("link", name="Open in playground").click()
    tuned = page.get_by_label("Model B").input_value()
    assert tuned.startswith(f"ft:{SMOLLM2}:console:console:")
    assert page.get_by_label("Model A").input_value() == SMOLLM2
    page.get_by_label("System message").fill(demo.SYSTEM)
    page.get_by_label("Prompt").fill(demo.tickets(1, seed=99)[0][0])
    page.get_by_label("Prompt").press("Control+Enter")
    for pane in ("A", "B"):
        answer = page.locator(f"[data-answer={pane}]")
        expect(answer).to_have_attribute("data-done", "true", timeout=120_000)
        assert int(answer.get_attribute("data-chunks") or 0) > 1  # streamed, not one block
        assert answer.inner_text().strip()
    expect(page.locator(".stats").first).to_contain_text("tokens/s")
    shot(page, "playground")

    # Models: the fine-tuned model's prompt just now is in its drift history (score and OOD share).
    page.get_by_role("link", name="Models").click()
    drift = page.locator(".drift figure.chart", has_text=tuned)
    expect(drift).to_have_attribute("data-points", "2")
    expect(drift.locator("canvas")).to_have_count(1)
    shot(page, "models")

    page.get_by_role("button", name="Sign out").click()
    expect(page.locator("input[name=api_key]")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('tuneworks.api_key')") is None
    assert errors == []


def _file_id(page: Any, filename: str) -> str:
    option = page.get_by_label("Training file").locator("option", has_text=filename)
    return option.get_attribute("value")
