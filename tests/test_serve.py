"""`python -m llava_jax.serve` as a real server process on 127.0.0.1, with a tiny LLaVA built in the test.

One server (4 slots) serves the whole module: the openai SDK with an image (streaming and not) equal to
`python -m llava_jax.generate`; 40 requests from 8 concurrent clients with bad ones mixed in (every good one
answered as when alone, every bad one a 4xx with an OpenAI error body, no 5xx); a client that disconnects
mid-stream frees its slot; the web page in headless Chromium (selenium) uploads an image, asks, and shows the
same streamed answer as the API, with a screenshot saved under test-artifacts/; SIGTERM lets an in-flight
stream finish and the process exit 0. The API key check (401) runs in-process on the same app.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from PIL import Image  # noqa: E402

from llava_jax import tiny  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("LLAVA_JAX_TEST_ARTIFACTS", REPO / "test-artifacts"))
MAX_PIXELS = 200 * 200
QUESTION = "What is in the picture?"


def _png(path: Path | None, h: int, w: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    if path is not None:
        path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, tmp: Path):
        self.dir = tmp / "model"
        tok = tiny.build_tokenizer(["a red circle", "two blue squares on the left"], vocab_size=200)
        tiny.make_hf_llava(self.dir, tok, seed=11, text={"max_position_embeddings": 1024})
        self.root = tmp / "images"
        (self.root / "sub").mkdir(parents=True)
        self.image = self.root / "sub" / "cat.png"
        self.image_bytes = _png(self.image, 30, 44, 1)
        _png(tmp / "outside.png", 10, 10, 2)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "server.log"
        env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llava_jax.serve", "--model", str(self.dir), "--port", str(self.port),
             "--max-batch", "4", "--max-len", "512", "--image-root", str(self.root), "--name", "tiny-llava",
             "--max-image-pixels", str(MAX_PIXELS)],
            cwd=REPO, env=env, stdout=open(self.log, "w"), stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited:\n" + self.log.read_text()[-3000:])
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("server did not start:\n" + self.log.read_text()[-3000:])

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def chat(self, body: dict | bytes, timeout: float = 120) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.post(self.url + "/v1/chat/completions", content=content, timeout=timeout,
                          headers={"content-type": "application/json"})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve"))
    yield s
    if s.proc.poll() is None:
        s.proc.kill()
        s.proc.wait(30)


def _user(text: str, *urls: str) -> dict:
    parts = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"role": "user", "content": parts}


def test_openai_sdk_image_streaming_and_not_equal_generate(server, capsys):
    from llava_jax.generate import main as generate_main

    assert generate_main(["--model", str(server.dir), "--image", str(server.image), "--prompt", QUESTION,
                          "--max-new-tokens", "12", "--json"]) == 0
    ref = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny-llava"]
    messages = [_user(QUESTION, _data_url(server.image_bytes))]
    resp = client.chat.completions.create(model="tiny-llava", messages=messages, max_tokens=12,
                                          extra_body={"return_token_ids": True})
    choice = resp.choices[0]
    assert choice.message.content == ref["text"]
    assert choice.model_dump()["token_ids"] == ref["token_ids"]
    assert resp.usage.completion_tokens == len(ref["token_ids"])
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert choice.finish_reason in ("stop", "length")

    # the same image as a path under --image-root, streamed
    stream = client.chat.completions.create(model="tiny-llava", messages=[_user(QUESTION, "sub/cat.png")],
                                            max_tokens=12, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == len(ref["token_ids"])
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2  # streamed in pieces

    # multi-turn: the same encoding as training (a prefix of the trained ids)
    two = client.chat.completions.create(model="tiny-llava", max_tokens=5, messages=[
        messages[0], {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "And the colour?"}])
    assert two.usage.prompt_tokens > resp.usage.prompt_tokens


def _bad_requests(server: Server) -> list[tuple[str, bytes | dict, int]]:
    big = _png(None, 300, 300, 3)
    ok_img = _data_url(server.image_bytes)
    m = "tiny-llava"
    return [
        ("malformed JSON", b'{"model": "tiny-llava", "messages": [', 400),
        ("body not an object", b"[1, 2]", 400),
        ("max_tokens of the wrong type", {"model": m, "messages": [_user("hi")], "max_tokens": "ten"}, 400),
        ("temperature of the wrong type", {"model": m, "messages": [_user("hi")], "temperature": "hot"}, 400),
        ("messages not a list", {"model": m, "messages": "hi"}, 400),
        ("no user message", {"model": m, "messages": [{"role": "system", "content": "be brief"}]}, 400),
        ("missing image", {"model": m, "messages": [_user("hi", "sub/nope.png")]}, 400),
        ("undecodable image", {"model": m, "messages": [_user("hi", _data_url(b"not an image at all"))]}, 400),
        ("corrupt base64", {"model": m, "messages": [_user("hi", "data:image/png;base64,iVBOR@@w0K!!")]}, 400),
        ("image over the pixel limit", {"model": m, "messages": [_user("hi", _data_url(big))]}, 400),
        ("two images", {"model": m, "messages": [_user("hi", ok_img, ok_img)]}, 400),
        ("prompt longer than the context", {"model": m, "messages": [_user("red circle " * 400)]}, 400),
        ("max_tokens beyond the limit", {"model": m, "messages": [_user("hi")], "max_tokens": 100000}, 400),
        ("unknown model", {"model": "gpt-17", "messages": [_user("hi")]}, 404),
        ("remote URL", {"model": m, "messages": [_user("hi", "https://example.com/cat.png")]}, 400),
        ("path leaving the image root", {"model": m, "messages": [_user("hi", "../outside.png")]}, 403),
        ("n > 1", {"model": m, "messages": [_user("hi")], "n": 2}, 400),
    ]


def test_load_with_bad_requests_mixed_in(server):
    img = _data_url(server.image_bytes)
    good = [{"model": "tiny-llava", "messages": [_user(q, img) if k % 2 == 0 else _user(q)],
             "max_tokens": n, "return_token_ids": True}
            for k, (q, n) in enumerate([("What is it?", 9), ("Describe the picture in detail please", 17),
                                        ("two blue squares", 6), (QUESTION, 23)])]
    alone = []
    for body in good:
        r = server.chat(body)
        assert r.status_code == 200, r.text
        alone.append(r.json()["choices"][0])
    bad = _bad_requests(server)
    jobs = [("good", k % len(good)) if k % 5 not in (1, 3) else ("bad", k % len(bad)) for k in range(40)]
    assert sum(kind == "bad" for kind, _ in jobs) == 16

    def send(job):
        kind, k = job
        body = good[k] if kind == "good" else bad[k][1]
        return job, server.chat(body)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, jobs))
    for (kind, k), r in results:
        assert r.status_code < 500, r.text
        if kind == "good":
            assert r.status_code == 200, r.text
            got = r.json()["choices"][0]
            assert (got["message"]["content"], got["token_ids"]) == (alone[k]["message"]["content"],
                                                                   alone[k]["token_ids"])
        else:
            name, _, status = bad[k]
            assert r.status_code == status, (name, r.text)
            err = r.json()["error"]
            assert err["message"] and err["type"], name
    h = server.health()
    assert h["status"] == "ok" and h["active"] == 0 and server.proc.poll() is None


def _long_body(n: int = 300) -> dict:
    return {"model": "tiny-llava", "messages": [_user("Tell me a long story about the lazy dog")],
            "max_tokens": n, "stream": True}


def test_disconnect_mid_stream_frees_the_slot(server):
    probe = server.chat(dict(_long_body(), stream=False))
    assert probe.json()["choices"][0]["finish_reason"] == "length"  # it would run all 300 tokens
    before = server.health()["finished"].get("cancelled", 0)
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=_long_body(), timeout=60) as r:
        for line in r.iter_lines():
            if '"content"' in line and '"role"' not in line:
                break  # one token in: hang up
    deadline = time.time() + 60
    while time.time() < deadline:
        h = server.health()
        if h["finished"].get("cancelled", 0) > before and h["active"] == 0:
            break
        time.sleep(0.2)
    assert h["finished"].get("cancelled", 0) == before + 1 and h["active"] == 0


def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        msg = "headless Chromium needs the Debian packages chromium and chromium-driver (.ci/run installs them)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1280,1000"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(executable_path=driver), options=opts)


def test_web_page_in_headless_chromium(server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    expected = server.chat({"model": "tiny-llava", "max_tokens": 40,
                            "messages": [_user(QUESTION, _data_url(server.image_bytes))]}).json()
    answer = expected["choices"][0]["message"]["content"]
    assert answer
    browser = _browser()
    try:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 90)
        upload = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#image input[type=file]"))
        upload.send_keys(str(server.image))
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#image img"))
        slider = browser.find_element(By.CSS_SELECTOR, "#max-tokens input[type=number]")
        slider.clear()
        slider.send_keys("40", Keys.TAB)
        # record every text the answer bubble shows while it streams
        browser.execute_script("""
            window.seen = [];
            new MutationObserver(() => {
              const m = document.querySelectorAll("#chat .message.bot, #chat [data-testid='bot']");
              const t = m.length ? m[m.length - 1].innerText.trim() : "";
              if (t && window.seen[window.seen.length - 1] !== t) window.seen.push(t);
            }).observe(document.querySelector("#chat"), {subtree: true, childList: true, characterData: true});
        """)
        box = browser.find_element(By.CSS_SELECTOR, "#prompt textarea")
        box.send_keys(QUESTION, Keys.ENTER)

        def bot_text(b):
            msgs = b.find_elements(By.CSS_SELECTOR, "#chat .message.bot, #chat [data-testid='bot']")
            return msgs[-1].text.strip() if msgs else ""

        wait.until(lambda b: answer in bot_text(b))
        seen = browser.execute_script("return window.seen")
        partial = [t for t in seen if t and t != answer and answer.startswith(t)]
        assert partial, f"no partial answer was shown before the full one: {seen}"  # streamed
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "serve_web_page.png"))
        assert QUESTION in browser.find_element(By.ID, "chat").text
        assert (ARTIFACTS / "serve_web_page.png").stat().st_size > 1000
    finally:
        browser.quit()


def test_chat_cli_streams_the_same_multi_turn_answers(server, monkeypatch, capsys):
    from llava_jax.chat import main as chat_main

    first_q, second_q = QUESTION, "And what colour is it?"
    img = _data_url(server.image_bytes)
    one = server.chat({"model": "tiny-llava", "max_tokens": 20, "messages": [_user(first_q, img)]}).json()
    a1 = one["choices"][0]["message"]["content"]
    two = server.chat({"model": "tiny-llava", "max_tokens": 20, "messages": [
        _user(first_q, img), {"role": "assistant", "content": a1}, _user(second_q)]}).json()
    a2 = two["choices"][0]["message"]["content"]
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{first_q}\n{second_q}\n"))
    assert chat_main(["--model", str(server.dir), "--image", str(server.image), "--max-new-tokens", "20"]) == 0
    out = capsys.readouterr().out
    answers = [part.split("\n")[0] for part in out.split("ASSISTANT: ")[1:]]
    assert answers == [a1, a2]


def test_sigterm_finishes_in_flight_requests_and_exits_0(server):
    lines: list[str] = []

    def consume():
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=_long_body(), timeout=120) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)

    t = threading.Thread(target=consume)
    t.start()
    deadline = time.time() + 60
    while not any('"content"' in x and '"role"' not in x for x in lines) and time.time() < deadline:
        time.sleep(0.01)
    server.proc.send_signal(signal.SIGTERM)
    t.join(120)
    assert server.proc.wait(120) == 0, server.log.read_text()[-2000:]
    assert lines[-1] == "data: [DONE]"
    finish = json.loads(lines[-2][len("data: "):])["choices"][0]["finish_reason"]
    assert finish == "length"  # all 300 tokens, though the signal came after the first
    with pytest.raises(httpx.HTTPError):
        httpx.get(server.url + "/health", timeout=5)


def test_api_key_is_required_when_configured(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from llava_jax.convert.model_dir import load_model
    from llava_jax.serve.app import Service, create_app
    from llava_jax.serve.engine import Engine
    from llava_jax.serve.protocol import ImageSource

    tok = tiny.build_tokenizer(["a red circle"], vocab_size=150)
    tiny.make_hf_llava(tmp_path / "m", tok, seed=1)
    loaded = load_model(tmp_path / "m")
    engine = Engine(loaded, max_batch=1, max_len=64)  # never started: refused requests never reach it
    app = create_app(Service(engine, "m", ImageSource(loaded.image_config, None, 1000)), api_key="s3cret")
    with TestClient(app) as c:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = c.post("/v1/chat/completions", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).json()["data"][0]["id"] == "m"
        # with the key, the request reaches request checking (an unknown model is a 404, not a 401)
        r = c.post("/v1/chat/completions", json=dict(body, model="x"), headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 404
        assert c.get("/health").status_code == 200
