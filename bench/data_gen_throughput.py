"""Throughput of `python -m data_gen.instruct --max-rpm N` against a server that enforces N requests per minute.

    .venv/bin/python bench/data_gen_throughput.py [--limit 600] [--window-s 60] [--latency-s 0.05] [--images 200]

Starts the local OpenAI-compatible test server (tests/openai_server.py) with a sliding-window limit of --limit
requests per --window-s seconds (a request over the limit gets 429 with Retry-After) and --latency-s seconds of
latency per reply, writes a COCO-style captions/instances pair of --images images (3 requests each), and runs the
real CLI with --max-rpm set to the same rate (limit * 60 / window_s) and no TPM limit. The achieved rate is
measured at the server: (requests - 1) / (last arrival - first arrival). A pass stays within the limit (no 429,
never more than --limit arrivals in any window) and reaches at least 95% of it. The defaults (600 per 60 s, 50 ms,
600 requests) take about 65 s. The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from openai_server import LocalOpenAIServer, Reply, chat_completion, error_body  # noqa: E402


class SlidingWindowLimit:
    """Server-side limit: at most `limit` accepted requests in any `window_s` seconds; records arrivals."""

    def __init__(self, limit: int, window_s: float, latency_s: float):
        self.limit, self.window_s, self.latency_s = limit, window_s, latency_s
        self.window: deque[float] = deque()
        self.arrivals: list[float] = []
        self.rejected = 0
        self.max_in_window = 0
        self.lock = threading.Lock()

    def __call__(self, request_json: dict, n: int) -> Reply:
        with self.lock:
            now = time.monotonic()
            while self.window and self.window[0] <= now - self.window_s:
                self.window.popleft()
            if len(self.window) >= self.limit:
                self.rejected += 1
                retry_after = self.window[0] + self.window_s - now
                return Reply(status=429, body=error_body("rate limit reached", type_="requests"),
                             headers={"Retry-After": f"{retry_after:.3f}"})
            self.window.append(now)
            self.arrivals.append(now)
            self.max_in_window = max(self.max_in_window, len(self.window))
        text = "Q: What is shown?\nA: A few coloured shapes on a plain background."
        if "single rich paragraph" in request_json["messages"][0]["content"]:
            text = "A few brightly coloured shapes sit on a plain light background, spaced evenly across the frame."
        return Reply(body=chat_completion(text, prompt_tokens=900, completion_tokens=60), delay_s=self.latency_s)


def write_coco(directory: Path, n_images: int) -> tuple[Path, Path]:
    """A COCO captions/instances pair with 5 captions and 2 boxes per image."""
    images = [{"id": i, "file_name": f"bench_{i:06d}.jpg", "width": 640, "height": 480} for i in range(n_images)]
    captions = [{"id": 5 * i + k, "image_id": i, "caption": f"Picture {i}: a red circle and a blue square, view {k}."}
                for i in range(n_images) for k in range(5)]
    boxes = [{"id": 2 * i + k, "image_id": i, "category_id": k + 1, "bbox": [40 + 300 * k, 100, 200, 180]}
             for i in range(n_images) for k in range(2)]
    categories = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}]
    cap, ins = directory / "captions.json", directory / "instances.json"
    cap.write_text(json.dumps({"images": images, "annotations": captions}))
    ins.write_text(json.dumps({"images": images, "annotations": boxes, "categories": categories}))
    return cap, ins


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=600, help="requests allowed per window")
    parser.add_argument("--window-s", type=float, default=60.0)
    parser.add_argument("--latency-s", type=float, default=0.05)
    parser.add_argument("--images", type=int, default=200, help="3 requests per image")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    rpm = args.limit * 60.0 / args.window_s
    limiter = SlidingWindowLimit(args.limit, args.window_s, args.latency_s)
    with tempfile.TemporaryDirectory() as tmp, LocalOpenAIServer(limiter) as server:
        captions, instances = write_coco(Path(tmp), args.images)
        command = [sys.executable, "-m", "data_gen.instruct", "--captions", str(captions), "--instances",
                   str(instances), "--out", str(Path(tmp) / "out.json"), "--base-url", server.base_url,
                   "--max-rpm", str(rpm), "--max-tpm", "0", "--concurrency", str(args.concurrency),
                   "--config.client.progress=False"]
        env = {**os.environ, "OPENAI_API_KEY": "sk-bench-not-a-real-key"}
        started = time.monotonic()
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.monotonic() - started
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        summary = json.loads((Path(tmp) / "out.summary.json").read_text())
    arrivals = limiter.arrivals
    span = arrivals[-1] - arrivals[0] if len(arrivals) > 1 else float("nan")
    achieved = (len(arrivals) - 1) / span * 60.0 if len(arrivals) > 1 else 0.0
    result = {
        "bench": "data_gen_throughput",
        "limit_rpm": rpm,
        "client_max_rpm": rpm,
        "server_window": f"{args.limit} per {args.window_s:g}s sliding",
        "latency_s": args.latency_s,
        "requests": len(arrivals),
        "succeeded": summary["succeeded"],
        "rejected_429": limiter.rejected,
        "max_in_any_window": limiter.max_in_window,
        "achieved_rpm": round(achieved, 2),
        "ratio": round(achieved / rpm, 4),
        "within_limit": limiter.rejected == 0 and limiter.max_in_window <= args.limit,
        "pass": limiter.rejected == 0 and limiter.max_in_window <= args.limit and achieved / rpm >= 0.95,
        "span_s": round(span, 2),
        "wall_s": round(wall, 2),
    }
    print(json.dumps(result))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
