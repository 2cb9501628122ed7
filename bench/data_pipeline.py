"""Samples per second from JPEG files to model-ready arrays: llava_jax.data vs Hugging Face's LlavaProcessor.

    .venv/bin/python bench/data_pipeline.py [--num 256] [--batch 8] [--image-size 336] [--patch 14]

All paths run in this process over the same JPEG files (COCO-like 640x480 and 480x640 scenes written to a
temporary directory) and the same two-turn conversations in the vicuna_v1 layout, with a tiny offline BPE
tokenizer and LLaVA-1.5 geometry (336 px, patch 14 -> 576 image tokens), CLIP "crop" preprocessing:
  ours:         the Grain pipeline a training run uses (make_train_iterator: JSON + image folder -> padded
                batches with labels), `--read-threads` reader threads, no worker processes;
  ours_1thread: the same per-record work on one thread (ExampleMaker + collate);
  hf:           PIL.Image.open + LlavaProcessor(images=..., text=...) with padding (one thread, no labels).
Each path runs twice, interleaved; the faster wall-clock run counts. CPU milliseconds per sample are reported
too (robust to a busy machine). The last line printed is one JSON object:
{"ours": samples/s, "hf": samples/s, "ratio": ours / hf, "ratio_1thread": ..., ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings

import numpy as np
from PIL import Image

from llava_jax.data import conversation, images, pipeline, synthetic
from llava_jax.tiny import IMAGE_TOKEN, build_tokenizer, make_hf_processor


def _write_images(root: str, num: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(num):
        w, h = (640, 480) if i % 2 == 0 else (480, 640)
        canvas = Image.fromarray(rng.integers(90, 200, (h, w, 3), dtype=np.uint8))
        scene = synthetic.render(synthetic.make_scene(rng, 400), 400)
        canvas.paste(scene, ((w - 400) // 2, (h - 400) // 2))
        path = os.path.join(root, f"img_{i:05d}.jpg")
        canvas.save(path, quality=90)
        paths.append(path)
    return paths


def _records(paths: list[str], rng: np.random.Generator) -> list[dict]:
    recs = []
    for i, p in enumerate(paths):
        q1, a1 = "What is in the picture? Describe the colours and the shapes.", f"I see {i % 3 + 1} shapes."
        q2, a2 = "Which one is on the left?", ["The red circle.", "A blue square.", "The green cross."][i % 3]
        recs.append({"id": str(i), "image": os.path.basename(p), "conversations": [
            {"from": "human", "value": f"<image>\n{q1}"}, {"from": "gpt", "value": a1},
            {"from": "human", "value": q2}, {"from": "gpt", "value": a2}]})
    return recs


def _flat_text(rec: dict, template: conversation.Template) -> str:
    """The same conversation as one string (vicuna_v1 layout) for the HF processor."""
    out = template.system_format.format(system=template.system)
    for q, a in zip(rec["conversations"][::2], rec["conversations"][1::2], strict=True):
        out += template.user_format.format(content=q["value"]) + template.answer_format.format(content=a["value"])
    return out


def run(num: int, batch: int, image_size: int, patch: int, read_threads: int = 4, seed: int = 0) -> dict:
    """Times both paths and returns the result dict (see module docstring)."""
    template = conversation.get_template("vicuna_v1")
    with tempfile.TemporaryDirectory() as root:
        paths = _write_images(root, num, seed)
        recs = _records(paths, np.random.default_rng(seed))
        texts = [t["value"] for r in recs for t in r["conversations"]] + [template.system]
        tok = build_tokenizer(texts, vocab_size=1000)
        img_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
        n_tokens = (image_size // patch) ** 2
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            processor = make_hf_processor(tok, image_size, patch)
        cfg = images.ImageConfig(size=image_size, crop_size=image_size, aspect="crop")
        maker = pipeline.ExampleMaker(tok, cfg, template, n_tokens, img_id, 2048)
        elements = [{"record": r, "roots": (root,), "image_bytes": None} for r in recs]
        flat = [_flat_text(r, template) for r in recs]

        data_file = os.path.join(root, "data.json")
        with open(data_file, "w") as f:
            json.dump(recs, f)
        data_cfg = {"data": data_file, "image_root": root, "template": "vicuna_v1", "max_length": 2048,
                    "num_epochs": 1, "shuffle": False, "read_threads": read_threads, "read_buffer": 4 * batch}

        def ours_pipeline():
            it = pipeline.make_train_iterator(data_cfg, tok, cfg, n_tokens, img_id, batch)
            out = None
            for batch_out in it:
                out = batch_out
            return out

        def ours():
            out = None
            for s in range(0, num - batch + 1, batch):
                out = pipeline.collate([maker.make(e) for e in elements[s:s + batch]], (2048,), tok.pad_token_id)
            return out

        def hf():
            out = None
            for s in range(0, num - batch + 1, batch):
                imgs = [Image.open(p) for p in paths[s:s + batch]]
                out = processor(images=imgs, text=flat[s:s + batch], padding="longest", return_tensors="np")
            return out

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours()
            hf()  # warm-up: imports, caches
            wall: dict[str, float] = {}
            cpu: dict[str, float] = {}
            outputs = {}
            for _ in range(2):
                for name, fn in (("ours", ours_pipeline), ("ours_1thread", ours), ("hf", hf)):
                    t0, c0 = time.perf_counter(), time.process_time()
                    outputs[name] = fn()
                    wall[name] = min(wall.get(name, float("inf")), time.perf_counter() - t0)
                    cpu[name] = min(cpu.get(name, float("inf")), time.process_time() - c0)
        ours_out, hf_out = outputs["ours_1thread"], outputs["hf"]
        done = (num // batch) * batch
        # both paths produce the same pixels and the same image token count
        pix_ours = ours_out["pixel_values"]
        pix_hf = np.transpose(hf_out["pixel_values"], (0, 2, 3, 1))
        max_diff = float(np.abs(pix_ours - pix_hf).max())
        sps = {k: done / v for k, v in wall.items()}
        return {
            "ours": round(sps["ours"], 1),
            "hf": round(sps["hf"], 1),
            "ratio": round(sps["ours"] / sps["hf"], 2),
            "ours_1thread": round(sps["ours_1thread"], 1),
            "ratio_1thread": round(sps["ours_1thread"] / sps["hf"], 2),
            "cpu_ms_per_sample": {k: round(1000 * v / done, 2) for k, v in cpu.items()},
            "ratio_cpu": round(cpu["hf"] / cpu["ours_1thread"], 2),
            "read_threads": read_threads,
            "cores": os.cpu_count(),
            "samples": done,
            "batch": batch,
            "image_tokens": n_tokens,
            "pixel_max_abs_diff": max_diff,
            "image_tokens_match": bool(((ours_out["input_ids"] == img_id).sum(1) ==
                                        (hf_out["input_ids"] == img_id).sum(1)).all()),
        }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=336)
    p.add_argument("--patch", type=int, default=14)
    p.add_argument("--read-threads", type=int, default=4)
    args = p.parse_args(argv)
    result = run(args.num, args.batch, args.image_size, args.patch, args.read_threads)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
