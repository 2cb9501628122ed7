"""Train-step throughput: llava_jax vs transformers' LlavaForConditionalGeneration (PyTorch, CPU, sdpa).

Same weights, same batch (4 x 512 tokens, 256 of them image tokens, the answer supervised), forward + backward +
AdamW on every parameter, fp32, timed alternately after warm-up, each framework in a process of its own
(`common.Peer`). Prints tokens/s of both, their ratio, and each path's achieved FLOP/s (the matmul FLOPs it must
do, `step_flops`) as a fraction of the machine's matmul peak measured in this run.

  .venv/bin/python bench/train_step.py [--rounds 5] [--budget 0.5] [--chunk 0] [--remat none]
      [--ours-allocator auto] [--hf-allocator system]

Host allocator (`llava_jax.host_memory`): llava_jax's process is set up as its trainer sets itself up (freed
memory retained on XLA:CPU); transformers' keeps the system allocator unless --hf-allocator=retain gives it the
same setting, which isolates the frameworks' own difference.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from llava_jax import loss as loss_lib  # noqa: E402
from llava_jax import metrics  # noqa: E402
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


def step_flops(config, batch: int, seq: int, budget: float) -> tuple[float, float]:
    """Matmul FLOPs of one training step (forward + backward, no recomputation counted):
    (the HF path's: every position through the vocabulary, every vision layer;
     ours: the vocabulary projection on the supervised-position budget only, the vision layers up to the
     feature layer). Each path's achieved fraction of peak is measured against the work it must do."""
    every = {"vision_tower": True, "projector": True, "language_model": True}
    hf = metrics.model_flops_per_step(config, batch, seq, every)
    vision_run = max(config.feature_layers)
    ours_cfg = dataclasses.replace(config, vision=dataclasses.replace(config.vision, num_hidden_layers=vision_run))
    k = loss_lib.supervised_budget(seq, budget) or seq
    skipped_head = 3 * 2 * config.text.hidden_size * config.text.vocab_size * batch * (seq - k)
    return hf, metrics.model_flops_per_step(ours_cfg, batch, seq, every) - skipped_head


def _ours_setup(opts: dict, batch_path: str) -> dict:
    """(In the llava_jax process.) The bench model from its seed, the trainer's step and the batch."""
    common.set_allocator(opts["ours_allocator"])  # as the trainer does before JAX starts (config.host_memory)
    config = common.bench_config()
    model = common.build(config, remat=opts["remat"])
    common.set_unroll(model, opts["unroll"])
    step, state = jax_step(model, opts["budget"] or None, opts["chunk"])
    with np.load(batch_path) as f:
        jb = {k: jnp.asarray(f[k]) for k in f.files}
    holder = {"state": state}

    def run() -> float:
        holder["state"], loss = step(holder["state"], jb)
        return float(loss)

    return {"step": run}


def _hf_setup(hf_dir: str, batch_path: str, allocator: str) -> dict:
    """(In the transformers process.) The exported twin, AdamW and the same batch as torch tensors."""
    common.set_allocator(allocator)
    import torch

    torch.manual_seed(0)
    hf = common.load_hf(hf_dir)
    hf.train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4)
    run = common.hf_train_step(hf, opt, batch_path)

    return {"step": run}


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
    common.add_allocator_flags(p)
    args = p.parse_args()
    opts = {k: getattr(args, k) for k in ("remat", "unroll", "budget", "chunk", "ours_allocator")}

    config = common.bench_config()
    batch = make_batch(config, args.batch, args.seq)
    tokens = args.batch * args.seq
    with tempfile.TemporaryDirectory() as tmp:
        batch_path, hf_dir = str(Path(tmp) / "batch.npz"), str(Path(tmp) / "hf")
        np.savez(batch_path, **batch)
        ours = common.Peer(_ours_setup, opts, batch_path)
        if args.ours_only:
            ours("step")
            ts = [common.time_call(lambda: ours("step")) for _ in range(args.rounds)]
            ours.close()
            print(f"ours {tokens / common.median(ts):.0f} tok/s ({common.median(ts):.2f} s/step)")
            common.emit({"bench": "train_step", "ours_step_s": common.median(ts),
                         "ours_tokens_per_s": tokens / common.median(ts)})
            return
        common.export_twin(common.build(config, remat=args.remat), config, hf_dir)  # the same seed's weights
        hf = common.Peer(_hf_setup, hf_dir, batch_path, args.hf_allocator)
        # same starting weights -> the first losses agree (a correctness check of the comparison itself)
        first_ours, first_hf = ours("step"), hf("step")
        ta, tb = common.alternate(lambda: ours("step"), lambda: hf("step"), rounds=args.rounds, warmup=1)
        ours.close()
        hf.close()
    peak = common.matmul_peak()
    ours_s, hf_s = common.median(ta), common.median(tb)
    hf_flops, ours_flops = step_flops(config, args.batch, args.seq, args.budget)
    result = {
        "bench": "train_step", "batch": args.batch, "seq": args.seq, "budget": args.budget, "chunk": args.chunk,
        "remat": args.remat, "ours_allocator": args.ours_allocator, "hf_allocator": args.hf_allocator,
        "first_loss_ours": first_ours, "first_loss_hf": first_hf,
        "ours_step_s": ours_s, "hf_step_s": hf_s, "ours_tokens_per_s": tokens / ours_s,
        "hf_tokens_per_s": tokens / hf_s, "ratio": hf_s / ours_s,
        "hf_model_flops_per_step": hf_flops, "ours_executed_flops_per_step": ours_flops,
        "matmul_peak_flops": peak["peak"], "peak_detail": peak, "machine": common.machine(),
    }
    result["fraction_of_peak"] = ours_flops / ours_s / peak["peak"]
    result["hf_fraction_of_peak"] = hf_flops / hf_s / peak["peak"]
    print(f"ours {tokens / ours_s:.0f} tok/s, HF {tokens / hf_s:.0f} tok/s, ratio {hf_s / ours_s:.2f}; "
          f"of the matmul peak: ours {result['fraction_of_peak']:.0%}, HF {result['hf_fraction_of_peak']:.0%}; "
          f"first losses {first_ours:.5f} / {first_hf:.5f}")
    common.emit(result)


if __name__ == "__main__":
    main()
