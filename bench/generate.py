"""Greedy generation throughput: llava_jax `generate` vs transformers' `LlavaForConditionalGeneration.generate`.

Same weights (the bench geometry: 224 px / patch 14 vision, LLaMA width 512, 4 layers, vocab 32,000), an
image prompt (256 image tokens + a short question), 64 new tokens (EOS disabled so both produce all 64), batch 1
and batch 8, timed alternately after warm-up. Also checks that both produce the same tokens.

  .venv/bin/python bench/generate.py [--rounds 3] [--new 64]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from llava_jax.generate import generate, left_pad  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--unroll", type=int, default=1, help="layers per scan iteration (0: fully unrolled)")
    args = p.parse_args()

    import torch

    config = common.bench_config()
    model = common.build(config)
    common.set_unroll(model, args.unroll)
    hf = common.hf_twin(model, config).eval()
    rng = np.random.default_rng(0)
    n_img, size = config.num_image_tokens, config.vision.image_size
    results: dict[str, dict] = {}
    for b in [int(x) for x in args.batches.split(",")]:
        lengths = rng.integers(12, 24, size=b)  # question lengths differ: left padding is exercised
        prompts = [[1] + [config.image_token_id] * n_img + rng.integers(3, 31000, size=int(n)).tolist()
                   for n in lengths]
        pixels = rng.normal(size=(b, size, size, 3)).astype(np.float32)
        jp = jnp.asarray(pixels)
        t = max(len(s) for s in prompts)
        ids, mask = left_pad(prompts, 0, t)
        tb = dict(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                  pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2).copy()))

        def ours(prompts=prompts, jp=jp):
            return generate(model, prompts, jp, max_new_tokens=args.new, eos_ids=[-1])

        def theirs(tb=tb):
            with torch.no_grad():
                return hf.generate(**tb, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                                   pad_token_id=0, eos_token_id=None)

        a, h = ours(), theirs()
        same = float(np.mean([a[i] == h[i, t:].tolist() for i in range(b)]))
        ta, th = common.alternate(ours, theirs, rounds=args.rounds, warmup=0)
        new_tokens = b * args.new
        results[f"batch{b}"] = {"ours_tokens_per_s": new_tokens / common.median(ta),
                                "hf_tokens_per_s": new_tokens / common.median(th),
                                "ratio": common.median(th) / common.median(ta), "same_tokens_fraction": same}
        r = results[f"batch{b}"]
        print(f"batch {b}: ours {r['ours_tokens_per_s']:.1f} tok/s, HF {r['hf_tokens_per_s']:.1f} tok/s, "
              f"ratio {r['ratio']:.2f}, identical outputs {same:.0%}")
    common.emit({"bench": "generate", "new_tokens": args.new, **results,
                 "ratio": min(r["ratio"] for r in results.values()), "machine": common.machine()})


if __name__ == "__main__":
    main()
