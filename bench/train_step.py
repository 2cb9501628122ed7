"""Train-step throughput: llava_jax vs transformers' LlavaForConditionalGeneration (PyTorch, CPU, sdpa).

Same weights, same batch (4 x 512 tokens, 256 of them image tokens, the answer supervised), forward + backward +
AdamW on every parameter, fp32, timed alternately after warm-up. Prints tokens/s of both, their ratio, and
achieved FLOP/s (XLA's count of our step) as a fraction of the machine's matmul peak measured in this run.

  .venv/bin/python bench/train_step.py [--rounds 5] [--budget 0.5] [--chunk 0] [--remat none]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from llava_jax import train as T  # noqa: E402


def make_batch(config, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """BOS, the image tokens, a 30-token prompt, then an answer filling the row (supervised)."""
    rng = np.random.default_rng(seed)
    n_img = config.num_image_tokens
    vocab = config.text.vocab_size
    ids = rng.integers(3, vocab - 2, size=(batch, seq)).astype(np.int32)
    ids[:, 0] = 1
    ids[:, 1:1 + n_img] = config.image_token_id
    labels = np.full_like(ids, -100)
    start = 1 + n_img + 30
    labels[:, start:] = ids[:, start:]
    size = config.vision.image_size
    return {"input_ids": ids, "labels": labels, "attention_mask": np.ones_like(ids),
            "pixel_values": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
            "has_image": np.ones((batch,), bool)}


def jax_step(model, budget: float | None, chunk: int, lr: float = 1e-4):
    """The trainer's own step (llava_jax.train.make_step_fn), every parameter trainable, jitted with donation.

    Returns (step(state, batch) -> (state, loss), state)."""
    parts = T.split_for_training(model, optax.adamw(lr), nnx.Param)
    inner = T.make_step_fn(parts, accum=1, loss_budget=budget, loss_chunk=chunk)

    def step(state, batch):
        params, opt_state = state
        params, opt_state, metrics = inner(params, opt_state, parts.frozen, parts.rest, batch)
        return (params, opt_state), metrics["loss"]

    return jax.jit(step, donate_argnums=(0,)), (parts.params, parts.opt_state)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--budget", type=float, default=0.5, help="supervised-position budget (0: project all)")
    p.add_argument("--chunk", type=int, default=0, help="vocabulary chunk in positions (0: none)")
    p.add_argument("--remat", default="none")
    p.add_argument("--unroll", type=int, default=1, help="layers per scan iteration (0: fully unrolled)")
    p.add_argument("--ours-only", action="store_true", help="time llava_jax alone (for trying settings)")
    args = p.parse_args()

    import torch

    torch.manual_seed(0)
    config = common.bench_config()
    model = common.build(config, remat=args.remat)
    common.set_unroll(model, args.unroll)
    hf = None if args.ours_only else common.hf_twin(model, config)
    batch = make_batch(config, args.batch, args.seq)
    tokens = args.batch * args.seq

    # ---- ours
    step, state = jax_step(model, args.budget or None, args.chunk)
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    holder = {"state": state}

    def run_ours():
        holder["state"], loss = step(holder["state"], jb)
        loss.block_until_ready()
        return loss

    if args.ours_only:
        run_ours()
        ts = [common.time_call(run_ours) for _ in range(args.rounds)]
        print(f"ours {tokens / common.median(ts):.0f} tok/s ({common.median(ts):.2f} s/step)")
        common.emit({"bench": "train_step", "ours_step_s": common.median(ts), "ours_tokens_per_s": tokens / common.median(ts)})
        return

    # ---- transformers
    hf.train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4)
    tb = {"input_ids": torch.tensor(batch["input_ids"], dtype=torch.long),
          "labels": torch.tensor(batch["labels"], dtype=torch.long),
          "attention_mask": torch.tensor(batch["attention_mask"]),
          "pixel_values": torch.tensor(batch["pixel_values"].transpose(0, 3, 1, 2).copy())}

    def run_hf():
        out = hf(**tb)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    # same starting weights -> the first losses agree (a correctness check of the comparison itself)
    first_ours, first_hf = float(run_ours()), float(run_hf())
    ta, tb_ = common.alternate(run_ours, run_hf, rounds=args.rounds, warmup=1)
    flops = step.lower(holder["state"], jb).compile().cost_analysis()
    flops = float((flops[0] if isinstance(flops, list | tuple) else flops).get("flops", 0.0))
    peak = common.matmul_peak()
    ours_s, hf_s = common.median(ta), common.median(tb_)
    result = {
        "bench": "train_step", "batch": args.batch, "seq": args.seq, "budget": args.budget, "chunk": args.chunk,
        "remat": args.remat, "first_loss_ours": first_ours, "first_loss_hf": first_hf,
        "ours_step_s": ours_s, "hf_step_s": hf_s, "ours_tokens_per_s": tokens / ours_s,
        "hf_tokens_per_s": tokens / hf_s, "ratio": hf_s / ours_s, "xla_flops_per_step": flops,
        "ours_flops_per_s": flops / ours_s, "matmul_peak_flops": peak["peak"],
        "fraction_of_peak": flops / ours_s / peak["peak"], "peak_detail": peak, "machine": common.machine(),
    }
    print(f"ours {tokens / ours_s:.0f} tok/s, HF {tokens / hf_s:.0f} tok/s, ratio {hf_s / ours_s:.2f}, "
          f"{result['fraction_of_peak']:.0%} of matmul peak")
    common.emit(result)


if __name__ == "__main__":
    main()
