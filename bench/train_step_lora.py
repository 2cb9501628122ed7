"""LoRA vs full fine-tuning, train step on CPU: llava_jax and transformers (+ peft) side by side.

Stage-2 semantics on the bench model (`common.bench_config`: LLaMA width 512, 4 layers, vocab 32,000; CLIP 224 px /
patch 14, 4 layers), the vision tower frozen in all four:
  full: projector + the whole language model train (AdamW);
  LoRA: projector + adapters of rank r (alpha 2r, dropout 0.05) on q, k, v, o, gate, up, down; the LLM frozen.
llava_jax runs the trainer's own step (`llava_jax.train.make_step_fn`, LoRA added by `prepare_lora`); transformers
runs LlavaForConditionalGeneration (sdpa) with torch AdamW, LoRA through `peft.get_peft_model` (projector as a
module to save). Same weights and batch (4 x 512 tokens, 256 image tokens), fp32, each configuration in a process
of its own (all four alive), timed round-robin after a warm-up step. Peak host memory = each process's peak resident set
(`ru_maxrss`), model build and compile included.

  .venv/bin/python bench/train_step_lora.py [--rounds 3] [--rank 16] [--dropout 0.05] [--only ours_full,ours_lora]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from train_step import make_batch  # noqa: E402

from llava_jax import checkpoint as ckpt  # noqa: E402
from llava_jax import train as T  # noqa: E402
from llava_jax.train_config import base_config  # noqa: E402

FULL = ("^projector/", "^language_model/")
LORA = ("^projector/", "_lora_[ab]$")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _ours_setup(mode: str, rank: int, dropout: float, batch_path: str) -> dict:
    """(In a llava_jax process.) The bench model, the trainer's step for `mode` (full | lora), the batch."""
    common.set_allocator("auto")
    config = common.bench_config()
    model = common.build(config)
    c = base_config()
    c.trainable = LORA if mode == "lora" else FULL
    if mode == "lora":
        c.lora.rank, c.lora.alpha, c.lora.dropout = rank, 2.0 * rank, dropout
    c.optimizer.lr, c.optimizer.warmup_ratio, c.optimizer.grad_clip = 1e-4, 0.0, 0.0
    trainable = ckpt.trainable_filter(c.trainable)
    spec = T.prepare_lora(model, c, trainable)
    tx, _ = T.make_optimizer(c, 1000)
    parts = T.split_for_training(model, tx, trainable)
    inner = T.make_step_fn(parts, accum=1, dropout_seed=0 if spec is not None and spec.dropout > 0 else None)

    def step(state, batch):
        params, opt_state = state
        params, opt_state, metrics = inner(params, opt_state, parts.frozen, parts.rest, batch)
        return (params, opt_state), metrics["loss"]

    jitted = jax.jit(step, donate_argnums=(0,))
    with np.load(batch_path) as f:
        jb = {k: jnp.asarray(f[k]) for k in f.files}
    holder = {"state": (parts.params, parts.opt_state)}
    trainable_count = T.count_params(parts.params)

    def run() -> float:
        holder["state"], loss = jitted(holder["state"], jb)
        return float(loss)

    return {"step": run, "peak_rss_mb": _peak_rss_mb, "trainable": lambda: trainable_count}


def _hf_setup(mode: str, rank: int, dropout: float, hf_dir: str, batch_path: str) -> dict:
    """(In a transformers process.) The exported twin, full or peft LoRA, AdamW, the same batch."""
    common.set_allocator("system")
    import torch

    torch.manual_seed(0)
    model = common.load_hf(hf_dir)
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        from llava_jax.convert.peft_io import target_modules_regex
        from llava_jax.models.lora import TARGETS

        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout,
                                                 target_modules=target_modules_regex(TARGETS),
                                                 modules_to_save=["multi_modal_projector"]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    trainable_count = sum(p.numel() for p in params)
    run = common.hf_train_step(model, opt, batch_path)

    return {"step": run, "peak_rss_mb": _peak_rss_mb, "trainable": lambda: trainable_count}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (LLaVA's recipe: 0.05)")
    p.add_argument("--only", default="ours_full,ours_lora,hf_full,hf_lora", help="configurations to run")
    args = p.parse_args()
    config = common.bench_config()
    tokens = args.batch * args.seq
    names = tuple(n for n in ("ours_full", "ours_lora", "hf_full", "hf_lora") if n in args.only.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        batch_path, hf_dir = str(Path(tmp) / "batch.npz"), str(Path(tmp) / "hf")
        np.savez(batch_path, **make_batch(config, args.batch, args.seq))
        common.export_twin(common.build(config), config, hf_dir)
        result: dict = {"bench": "train_step_lora", "batch": args.batch, "seq": args.seq, "rank": args.rank,
                        "dropout": args.dropout,
                        "machine": common.machine()}
        peers = {}
        for name in names:
            fw, mode = name.split("_")
            peers[name] = common.Peer(_ours_setup, mode, args.rank, args.dropout, batch_path) if fw == "ours" else \
                common.Peer(_hf_setup, mode, args.rank, args.dropout, hf_dir, batch_path)
            result[f"{name}_first_loss"] = peers[name]("step")  # warm-up (compile)
        times: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(args.rounds):  # round-robin, so a change in the shared machine's load hits all four
            for name in names:
                times[name].append(common.time_call(lambda name=name: peers[name]("step")))
        for name in names:
            result[f"{name}_peak_rss_mb"] = peers[name]("peak_rss_mb")
            result[f"{name}_trainable"] = peers[name]("trainable")
            peers[name].close()
            s = common.median(times[name])
            result[f"{name}_step_s"] = s
            result[f"{name}_tokens_per_s"] = tokens / s
            print(f"{name}: {s:.2f} s/step ({tokens / s:.0f} tok/s), peak RSS {result[f'{name}_peak_rss_mb']:.0f} MB, "
                  f"{result[f'{name}_trainable']:,} trainable", flush=True)
    for fw in {n.split("_")[0] for n in names if f"{n.split('_')[0]}_full" in names and f"{n.split('_')[0]}_lora" in names}:
        result[f"{fw}_lora_speedup"] = result[f"{fw}_full_step_s"] / result[f"{fw}_lora_step_s"]
    common.emit(result)


if __name__ == "__main__":
    main()
