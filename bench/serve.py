"""Serving throughput: N concurrent `openai` SDK clients against `python -m llava_jax.serve` on 127.0.0.1, and
the same workload through transformers' `LlavaForConditionalGeneration.generate` one request at a time, in one run.

The model: the bench geometry of bench/common.py (CLIP-like 224 px / patch 14 = 256 image tokens, 4 x 512 vision
layers, LLaMA 4 x 512) with a BPE tokenizer trained here (so its vocabulary is small); random weights, the same in
both paths (the HF directory is what the server loads). The workload: `--requests` chat requests with mixed
prompt lengths (4-80 words, half with an image sent as a base64 data URL) and 32-96 new tokens each
(`ignore_eos`: every request decodes exactly its max_tokens, and HF runs with min_new_tokens = max_new_tokens).
Before timing, one untimed pass compiles every prompt bucket. Printed: aggregate generated tokens/s, p50/p99
latency and time to first token per concurrency, HF's tokens/s and latency, the ratio, and the fraction of
requests whose tokens equal HF's. Bounded: `--requests` requests per pass and `--time-limit` seconds per phase.

  .venv/bin/python bench/serve.py [--requests 48] [--concurrency 1,16] [--time-limit 600]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's llava_jax, as the server uses

import common  # noqa: E402
import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the a red blue green circle square triangle left right top bottom small large what where how many is "
         "are there in on of picture image shape colour describe detail please tell me about").split()


def _model_dir(directory: Path) -> None:
    """Writes the bench model (weights, tokenizer, processor) as an HF LLaVA directory."""
    from llava_jax import tiny

    tok = tiny.build_tokenizer([" ".join(WORDS)], vocab_size=1024)
    config = common.bench_config(vocab=len(tok))
    config = config.replace(image_token_id=tok.convert_tokens_to_ids(tiny.IMAGE_TOKEN),
                            pad_token_id=tok.pad_token_id)
    common.export_twin(common.build(config), config, str(directory))
    tok.save_pretrained(str(directory))
    tiny.make_hf_processor(tok, config.vision.image_size, config.vision.patch_size).save_pretrained(str(directory))


def _workload(n: int, seed: int) -> list[dict]:
    """n requests: {question, image (PNG bytes or None), max_tokens}."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        words = rng.choice(WORDS, size=int(rng.integers(4, 81))).tolist()
        image = None
        if i % 2 == 0:
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (int(rng.integers(100, 300)), 224, 3), dtype=np.uint8)).save(
                buf, "PNG")
            image = buf.getvalue()
        out.append({"question": " ".join(words) + "?", "image": image, "max_tokens": int(rng.integers(32, 97))})
    return out


def _messages(req: dict) -> list[dict]:
    parts = [{"type": "text", "text": req["question"]}]
    if req["image"] is not None:
        url = "data:image/png;base64," + base64.b64encode(req["image"]).decode()
        parts.append({"type": "image_url", "image_url": {"url": url}})
    return [{"role": "user", "content": parts}]


async def _run_clients(base_url: str, work: list[dict], concurrency: int, time_limit: float,
                       max_tokens: int | None = None) -> dict:
    """Sends every request with `concurrency` clients; returns timings and token ids."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=time_limit)
    sem = asyncio.Semaphore(concurrency)
    results: list[dict | None] = [None] * len(work)

    async def one(i: int) -> None:
        async with sem:
            t0 = time.perf_counter()
            first, tokens, ids = None, 0, None
            stream = await client.chat.completions.create(
                model="bench", messages=_messages(work[i]), stream=True, stream_options={"include_usage": True},
                max_tokens=max_tokens or work[i]["max_tokens"],
                extra_body={"ignore_eos": True, "return_token_ids": True})
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content and first is None:
                    first = time.perf_counter() - t0
                if chunk.choices and chunk.choices[0].finish_reason:
                    ids = chunk.choices[0].model_dump().get("token_ids")
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            results[i] = {"latency": time.perf_counter() - t0, "ttft": first, "tokens": tokens, "ids": ids}

    t0 = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(len(work)))), time_limit)
    wall = time.perf_counter() - t0
    await client.close()
    return {"wall": wall, "results": results}


def _summary(wall: float, results: list[dict]) -> dict:
    lat = [r["latency"] for r in results]
    ttft = [r["ttft"] for r in results if r.get("ttft") is not None]
    tokens = sum(r["tokens"] for r in results)
    q = lambda xs, p: float(np.percentile(xs, p)) if xs else None  # noqa: E731
    return {"requests": len(results), "generated_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "latency_p50_s": q(lat, 50), "latency_p99_s": q(lat, 99), "ttft_p50_s": q(ttft, 50),
            "ttft_p99_s": q(ttft, 99)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_phase(model_dir: Path, work: list[dict], levels: list[int], max_batch: int, time_limit: float
                 ) -> tuple[dict, list]:
    import httpx

    port = _free_port()
    log = open(model_dir.parent / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "llava_jax.serve", "--model", str(model_dir), "--port",
                             str(port), "--max-batch", str(max_batch), "--max-len", "768", "--name", "bench",
                             "--no-web", "--log-level", "warning"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + time_limit
        while True:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("server did not start: " + (model_dir.parent / "server.log").read_text()[-2000:])
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        t = time.perf_counter()
        asyncio.run(_run_clients(base + "/v1", work, max_batch, time_limit, max_tokens=2))  # compile buckets
        print(f"server warm-up (prompt buckets compiled) {time.perf_counter() - t:.1f}s", flush=True)
        out, ids = {}, None
        for c in levels:
            run = asyncio.run(_run_clients(base + "/v1", work, c, time_limit))
            out[f"clients{c}"] = s = _summary(run["wall"], run["results"])
            ids = [r["ids"] for r in run["results"]]
            print(f"server, {c:2d} clients: {s['tokens_per_s']:7.1f} tok/s  latency p50 {s['latency_p50_s']:.2f}s "
                  f"p99 {s['latency_p99_s']:.2f}s  TTFT p50 {s['ttft_p50_s']:.2f}s p99 {s['ttft_p99_s']:.2f}s",
                  flush=True)
        return out, ids
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)


def _hf_phase(model_dir: Path, work: list[dict], time_limit: float) -> tuple[dict, list]:
    import torch

    from llava_jax.convert.model_dir import load_model
    from llava_jax.data import images
    from llava_jax.serve.protocol import conversation_of, prompt_ids_of

    loaded = load_model(model_dir)  # for the prompt encoding and image preprocessing the server uses
    hf = common.load_hf(str(model_dir)).eval()
    inputs = []
    for req in work:
        turns, _ = conversation_of([{"role": "user", "content": req["question"]}])
        ids = prompt_ids_of(loaded, turns, req["image"] is not None)
        pix = None
        if req["image"] is not None:
            arr = images.preprocess(images.load_rgb(req["image"]), loaded.image_config)
            pix = torch.tensor(arr.transpose(2, 0, 1)[None].copy())
        inputs.append((torch.tensor([ids]), pix, req["max_tokens"]))

    def gen(ids, pix, n):
        kw = {"pixel_values": pix} if pix is not None else {}
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None, **kw)
        return out[0, ids.shape[1]:].tolist()

    gen(*inputs[0][:2], 2)  # warm-up
    results, got = [], []
    t0 = time.perf_counter()
    for ids, pix, n in inputs:
        t = time.perf_counter()
        got.append(gen(ids, pix, n))
        results.append({"latency": time.perf_counter() - t, "ttft": None, "tokens": len(got[-1])})
        if time.perf_counter() - t0 > time_limit:
            break
    s = _summary(time.perf_counter() - t0, results)
    print(f"HF generate, one at a time: {s['tokens_per_s']:7.1f} tok/s  latency p50 {s['latency_p50_s']:.2f}s "
          f"p99 {s['latency_p99_s']:.2f}s ({len(results)} requests)", flush=True)
    return s, got


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--concurrency", default="1,16", help="client counts to run (comma-separated)")
    p.add_argument("--max-batch", type=int, default=16, help="the server's slots")
    p.add_argument("--time-limit", type=float, default=600.0, help="seconds per phase at most")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    work = _workload(args.requests, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        _model_dir(model_dir)
        served, served_ids = _serve_phase(model_dir, work, levels, args.max_batch, args.time_limit)
        hf, hf_ids = _hf_phase(model_dir, work, args.time_limit)
    same = statistics.mean(a == b for a, b in zip(served_ids, hf_ids, strict=False))
    top = served[f"clients{max(levels)}"]
    ratio = top["tokens_per_s"] / hf["tokens_per_s"]
    print(f"{max(levels)} clients vs HF one at a time: {ratio:.2f}x aggregate tokens/s; "
          f"identical tokens in {same:.0%} of requests", flush=True)
    common.emit({"bench": "serve", "requests": args.requests, "max_batch": args.max_batch, **served,
                 "hf_one_at_a_time": hf, "ratio": ratio, "same_tokens_fraction": same, "machine": common.machine()})


if __name__ == "__main__":
    main()
