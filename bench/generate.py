"""Greedy generation throughput: llava_jax `generate` vs transformers' `LlavaForConditionalGeneration.generate`.

Same weights (the bench geometry: 224 px / patch 14 vision, LLaMA width 512, 4 layers, vocab 32,000), an
image prompt (256 image tokens + a short question), 64 new tokens (EOS disabled so both produce all 64), batch 1
and batch 8, timed alternately after warm-up, each framework in a process of its own (`common.Peer`). Also
checks that both produce the same tokens.

  .venv/bin/python bench/generate.py [--rounds 3] [--new 64] [--ours-allocator auto] [--hf-allocator system]

(allocator flags: see bench/train_step.py)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from llava_jax.generate import generate, left_pad  # noqa: E402


def _make_inputs(config, batch: int, seed: int) -> tuple[list[list[int]], np.ndarray]:
    """`batch` prompts (BOS, the image tokens, a 12-23 token question: lengths differ, so left padding is
    exercised) and their pixels [batch, H, W, 3]."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(12, 24, size=batch)
    prompts = [[1] + [config.image_token_id] * config.num_image_tokens + rng.integers(3, 31000, size=int(n)).tolist()
               for n in lengths]
    size = config.vision.image_size
    return prompts, rng.normal(size=(batch, size, size, 3)).astype(np.float32)


def _ours_setup(unroll: int, new: int, allocator: str) -> dict:
    """(In the llava_jax process.) The bench model from its seed; gen(prompts, pixels) -> new token lists."""
    common.set_allocator(allocator)  # as llava_jax.generate's CLI does before JAX starts
    config = common.bench_config()
    model = common.build(config)
    common.set_unroll(model, unroll)

    inputs = {}

    def load(prompts, pixels):
        inputs.update(prompts=prompts, pixels=jnp.asarray(pixels))

    def gen():
        return generate(model, inputs["prompts"], inputs["pixels"], max_new_tokens=new, eos_ids=[-1])

    return {"load": load, "gen": gen}


def _hf_setup(hf_dir: str, new: int, allocator: str) -> dict:
    """(In the transformers process.) The exported twin; gen(prompts, pixels) -> new token lists."""
    common.set_allocator(allocator)
    import torch

    hf = common.load_hf(hf_dir).eval()
    inputs = {}

    def load(prompts, pixels):
        t = max(len(p) for p in prompts)
        ids, mask = left_pad(prompts, 0, t)
        inputs.update(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                      pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2).copy()))

    def gen():
        with torch.no_grad():
            out = hf.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                              eos_token_id=None)
        return out[:, inputs["input_ids"].shape[1]:].tolist()

    return {"load": load, "gen": gen}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--unroll", type=int, default=1, help="layers per scan iteration (0: fully unrolled)")
    common.add_allocator_flags(p)
    args = p.parse_args()

    config = common.bench_config()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        common.export_twin(common.build(config), config, tmp)  # the same seed's weights as the ours process
        ours = common.Peer(_ours_setup, args.unroll, args.new, args.ours_allocator)
        hf = common.Peer(_hf_setup, tmp, args.new, args.hf_allocator)
        for b in [int(x) for x in args.batches.split(",")]:
            prompts, pixels = _make_inputs(config, b, seed=b)
            ours("load", prompts, pixels)
            hf("load", prompts, pixels)
            a, h = ours("gen"), hf("gen")  # warm-up, and the outputs compared
            same = float(np.mean([a[i] == h[i] for i in range(b)]))
            ta, th = common.alternate(lambda: ours("gen"), lambda: hf("gen"), rounds=args.rounds, warmup=0)
            new_tokens = b * args.new
            results[f"batch{b}"] = {"ours_tokens_per_s": new_tokens / common.median(ta),
                                    "hf_tokens_per_s": new_tokens / common.median(th),
                                    "ratio": common.median(th) / common.median(ta), "same_tokens_fraction": same}
            r = results[f"batch{b}"]
            print(f"batch {b}: ours {r['ours_tokens_per_s']:.1f} tok/s, HF {r['hf_tokens_per_s']:.1f} tok/s, "
                  f"ratio {r['ratio']:.2f}, identical outputs {same:.0%}", flush=True)
        ours.close()
        hf.close()
    common.emit({"bench": "generate", "new_tokens": args.new, "ours_allocator": args.ours_allocator,
                 "hf_allocator": args.hf_allocator, **results,
                 "ratio": min(r["ratio"] for r in results.values()), "machine": common.machine()})


if __name__ == "__main__":
    main()
