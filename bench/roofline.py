"""Generation against the machine's roofline: greedy decode at batch 1 as a fraction of the measured memory
bandwidth, prefill as a fraction of the measured matmul peak, llava_jax next to transformers in the same run.

What is measured (each framework in a process of its own, `common.Peer`; the machine figures in the parent):

- Memory bandwidth: the best of a timed full reduction (`sum`) over a 1 GiB float32 array (far larger than any
  cache) in JAX, torch and NumPy (CPU only), median of `--reps`; bytes read / seconds. A copy (read + write) is
  reported alongside. On a GPU the array lives in device memory (4 GiB).
- Matmul peak: a square matmul (n = 4096 on CPU, 8192 on GPU), float32 and bfloat16, in JAX and torch; the
  larger per dtype.
- The model: a random LLaVA whose language model is a LLaMA big enough that weights dominate the KV cache
  (`--size`; "cpu": width 1024, 12 layers, MLP 2816, vocab 32,000, ~220M parameters; "gpu": width 2048,
  16 layers, MLP 5504, ~940M), with a tiny vision tower (text-only prompts: the roofline is the decoder's).
  The same weights go to transformers' `LlavaForConditionalGeneration` (exported by `convert`'s HF writer).
- Decode: s/token = (t(N new) - t(1 new)) / (N - 1) for one random `--prompt`-token prompt at batch 1, EOS
  disabled; bytes per token = every weight a decode step must read (decoder layers, final norm, LM head, one
  embedding row) + the live KV cache (keys and values of every layer at the mean cache length). Roofline
  fraction = (bytes / bandwidth) / (s/token).
- Prefill: t(1 new) (prompt forward + one LM-head row + one sampled token) against the prompt forward's FLOPs
  (2 x decoder weights x tokens + causal attention 2 T^2 D per layer + the head row) at the matmul peak.
- Precisions (`--dtypes`): float32, and bfloat16 weights and compute in both frameworks; token agreement of each
  with float32 greedy (same framework) and between the frameworks.

  nice -n 19 .venv/bin/python bench/roofline.py                     # CPU (this machine)
  .venv/bin/python bench/roofline.py --device gpu                    # an NVIDIA GPU (jax[cuda] + torch cuda)

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _device_arg(argv: list[str]) -> str:
    """--device before JAX starts: 'cpu' or 'gpu' ('auto': gpu when an NVIDIA device node is present)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"))
    dev = p.parse_known_args(argv)[0].device
    if dev == "auto":
        dev = "gpu" if os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi") else "cpu"
    return dev


DEVICE = _device_arg(sys.argv[1:])
# children (spawned) inherit the environment: set it before common imports JAX
os.environ["JAX_PLATFORMS"] = "cuda" if DEVICE == "gpu" else "cpu"
if DEVICE == "gpu":  # two frameworks share the GPU: JAX must not take 75% of its memory up front
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from llava_jax.generate import generate  # noqa: E402

SIZES = {  # name: (width, layers, MLP width)
    "tiny": (256, 2, 688),  # a smoke test of the script itself
    "cpu": (1024, 12, 2816),
    "gpu": (2048, 16, 5504),
}


def model_config(size: str):
    width, layers, mlp = SIZES[size]
    config = common.bench_config(width=width, layers=layers, image=28, patch=14, vision_width=64, vision_layers=1)
    return dataclasses.replace(config, text=dataclasses.replace(config.text, intermediate_size=mlp))


# ------------------------------------------------------------------------------------------ machine limits


def _sync_torch(device: str) -> None:
    import torch

    if device == "gpu":
        torch.cuda.synchronize()


def _median_time(fn, reps: int) -> float:
    fn()  # warm-up (compiles)
    return statistics.median(common.time_call(fn) for _ in range(reps))


def memory_bandwidth(device: str, reps: int = 7) -> dict[str, float]:
    """Measured read bandwidth (bytes/s): a full sum over a float32 array of 1 GiB (CPU) / 4 GiB (GPU), in JAX,
    torch and (CPU) NumPy; `read` is the best. `copy` (read + write bytes) is reported beside it."""
    import torch

    nbytes = (4 if device == "gpu" else 1) * 1024**3
    n = nbytes // 4
    out: dict[str, float] = {}
    x = jnp.ones((n,), jnp.float32)
    total = jax.jit(jnp.sum)
    out["jax_sum"] = nbytes / _median_time(lambda: total(x).block_until_ready(), reps)
    del x
    tdev = "cuda" if device == "gpu" else "cpu"
    xt = torch.ones(n, dtype=torch.float32, device=tdev)
    yt = torch.empty_like(xt)

    def tsum():
        xt.sum()
        _sync_torch(device)

    def tcopy():
        yt.copy_(xt)
        _sync_torch(device)

    out["torch_sum"] = nbytes / _median_time(tsum, reps)
    out["torch_copy"] = 2 * nbytes / _median_time(tcopy, reps)
    del xt, yt
    if device == "cpu":
        xn, yn = np.ones((n,), np.float32), np.zeros((n,), np.float32)
        out["numpy_sum"] = nbytes / _median_time(lambda: xn.sum(), reps)
        out["numpy_copy"] = 2 * nbytes / _median_time(lambda: np.copyto(yn, xn), reps)
        del xn, yn
    out["read"] = max(v for k, v in out.items() if k.endswith("_sum"))
    out["copy"] = max(v for k, v in out.items() if k.endswith("_copy"))
    return out


def matmul_peak(device: str, dtype: str, reps: int = 7) -> dict[str, float]:
    """Measured matmul FLOP/s for a square product in `dtype`, in JAX and torch; `peak` is the larger."""
    import torch

    n = 8192 if device == "gpu" else 4096
    jdt, tdt = {"float32": (jnp.float32, torch.float32), "bfloat16": (jnp.bfloat16, torch.bfloat16)}[dtype]
    x = jnp.ones((n, n), jdt)
    f = jax.jit(lambda a: a @ a)
    tj = _median_time(lambda: f(x).block_until_ready(), reps)
    xt = torch.ones(n, n, dtype=tdt, device="cuda" if device == "gpu" else "cpu")

    def tmm():
        torch.mm(xt, xt)
        _sync_torch(device)

    tt = _median_time(tmm, reps)
    flops = 2.0 * n**3
    out = {"jax": flops / tj, "torch": flops / tt}
    out["peak"] = max(out.values())
    return out


# ------------------------------------------------------------------------------------------ model figures


def decode_bytes(config, dtype_bytes: int, cache_len: float) -> dict[str, float]:
    """Bytes one batch-1 decode step must read: the weights it uses and the live KV cache."""
    t = config.text
    d, f, v, n = t.hidden_size, t.intermediate_size, t.vocab_size, t.num_hidden_layers
    qd, kd = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    per_layer = d * qd + 2 * d * kd + qd * d + 3 * d * f + 2 * d
    weights = (n * per_layer + d + d * v + d) * dtype_bytes  # layers, final norm, head, one embedding row
    cache = 2 * n * kd * cache_len * dtype_bytes
    return {"weights": float(weights), "cache": float(cache), "total": float(weights + cache)}


def prefill_flops(config, tokens: int) -> float:
    """Matmul FLOPs of the prompt forward at batch 1: dense layers, causal attention, one LM-head row."""
    t = config.text
    d, f, v, n = t.hidden_size, t.intermediate_size, t.vocab_size, t.num_hidden_layers
    qd, kd = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    dense = 2 * tokens * (d * qd + 2 * d * kd + qd * d + 3 * d * f)
    attention = 2 * tokens * tokens * qd  # QK^T and PV over the causal half: 2 x 2 x T^2/2 x D
    return float(n * (dense + attention) + 2 * d * v)


# ------------------------------------------------------------------------------------------ the two peers


def _ours_setup(size: str, dtype: str, allocator: str) -> dict:
    """(In the llava_jax process.) The model from its seed in `dtype`; gen(ids, n) -> n new token ids."""
    common.set_allocator(allocator)
    config = model_config(size)
    jdt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    model = common.build(config, dtype=jdt, param_dtype=jdt)

    def gen(ids, n):
        return generate(model, [list(ids)], None, max_new_tokens=n, eos_ids=[-1])[0]

    return {"gen": gen}


def _hf_setup(hf_dir: str, dtype: str, device: str, allocator: str) -> dict:
    """(In the transformers process.) The exported twin in `dtype` on `device`; gen(ids, n) -> new ids."""
    common.set_allocator(allocator)
    import torch

    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    dev = "cuda" if device == "gpu" else "cpu"
    hf = common.load_hf(hf_dir).to(device=dev, dtype=tdt).eval()

    def gen(ids, n):
        x = torch.tensor([list(ids)], dtype=torch.long, device=dev)
        with torch.no_grad():
            out = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0, eos_token_id=None)
        return out[0, x.shape[1]:].tolist()

    return {"gen": gen}


def _measure(peer, ids: list[int], new: int, rounds: int) -> tuple[list[int], list[float], list[float]]:
    """Tokens of an N-token greedy run, and the times of 1-token and N-token runs (alternating)."""
    tokens = peer("gen", ids, new)  # warm-up: compiles / allocates
    peer("gen", ids, 1)
    t1, tn = [], []
    for _ in range(rounds):
        t1.append(common.time_call(lambda: peer("gen", ids, 1)))
        tn.append(common.time_call(lambda: peer("gen", ids, new)))
    return tokens, t1, tn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"),
                   help="auto: gpu when an NVIDIA device is present")
    p.add_argument("--size", default=None, choices=tuple(SIZES), help="model size (default: the device's)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    p.add_argument("--new", type=int, default=64, help="new tokens per timed run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--hf", action=argparse.BooleanOptionalAction, default=True, help="run the transformers peer")
    common.add_allocator_flags(p)
    args = p.parse_args()
    size = args.size or DEVICE
    dtypes = [d for d in args.dtypes.split(",") if d]
    if "float32" not in dtypes:
        dtypes.insert(0, "float32")  # the reference for token agreement
    config = model_config(size)

    bw = memory_bandwidth(DEVICE)
    print(f"memory bandwidth: read {bw['read'] / 1e9:.1f} GB/s, copy {bw['copy'] / 1e9:.1f} GB/s  "
          + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in bw.items() if k not in ("read", "copy")), flush=True)
    peaks = {d: matmul_peak(DEVICE, d) for d in dtypes}
    for d, pk in peaks.items():
        print(f"matmul peak {d}: {pk['peak'] / 1e9:.1f} GFLOP/s (jax {pk['jax'] / 1e9:.1f}, torch "
              f"{pk['torch'] / 1e9:.1f})", flush=True)

    rng = np.random.default_rng(0)
    ids = [1] + rng.integers(3, config.text.vocab_size - 1, size=args.prompt - 1).tolist()
    mean_cache = args.prompt + args.new / 2
    flops = prefill_flops(config, args.prompt)
    results: dict[str, dict] = {}
    reference: dict[str, list[int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = common.build(config)
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model.language_model))
        common.export_twin(model, config, tmp)  # float32; the HF peer casts to each dtype
        del model
        print(f"model: language model {n_params / 1e6:.0f}M parameters (width {config.text.hidden_size}, "
              f"{config.text.num_hidden_layers} layers, vocab {config.text.vocab_size}); prompt {args.prompt}, "
              f"{args.new} new tokens, batch 1", flush=True)
        for dtype in dtypes:
            nbytes = decode_bytes(config, 4 if dtype == "float32" else 2, mean_cache)
            ideal = nbytes["total"] / bw["read"]
            peers = {"ours": common.Peer(_ours_setup, size, dtype, args.ours_allocator)}
            if args.hf:
                peers["hf"] = common.Peer(_hf_setup, tmp, dtype, DEVICE, args.hf_allocator)
            row: dict[str, object] = {"bytes_per_token": nbytes, "ideal_s_per_token": ideal,
                                      "prefill_flops": flops}
            toks = {}
            for name, peer in peers.items():
                tokens, t1, tn = _measure(peer, ids, args.new, args.rounds)
                peer.close()
                toks[name] = tokens
                s_tok = (common.median(tn) - common.median(t1)) / (args.new - 1)
                prefill = common.median(t1)
                row[name] = {"s_per_token": s_tok, "tokens_per_s": 1 / s_tok,
                             "bandwidth_fraction": ideal / s_tok, "achieved_bytes_per_s": nbytes["total"] / s_tok,
                             "prefill_s": prefill, "prefill_flops_per_s": flops / prefill,
                             "peak_fraction": flops / prefill / peaks[dtype]["peak"]}
                if dtype == "float32":
                    reference[name] = tokens
                else:
                    row[name]["agreement_with_float32"] = float(np.mean(np.asarray(tokens) ==
                                                                        np.asarray(reference[name])))
                r = row[name]
                print(f"{dtype} {name}: decode {s_tok * 1e3:.2f} ms/token = {r['bandwidth_fraction']:.0%} of the "
                      f"bandwidth roofline ({ideal * 1e3:.2f} ms for {nbytes['total'] / 1e6:.0f} MB); prefill "
                      f"{prefill * 1e3:.0f} ms = {r['peak_fraction']:.0%} of the {dtype} matmul peak"
                      + (f"; tokens equal to float32: {r['agreement_with_float32']:.0%}"
                         if "agreement_with_float32" in r else ""), flush=True)
            if "hf" in toks:
                row["agreement_ours_hf"] = float(np.mean(np.asarray(toks["ours"]) == np.asarray(toks["hf"])))
                row["decode_ratio"] = row["hf"]["s_per_token"] / row["ours"]["s_per_token"]
                print(f"{dtype}: decode ours/HF speed {row['decode_ratio']:.2f}x; tokens equal ours vs HF "
                      f"{row['agreement_ours_hf']:.0%}", flush=True)
            results[dtype] = row
    common.emit({"bench": "roofline", "device": DEVICE, "size": size, "language_model_params": n_params,
                 "prompt": args.prompt, "new_tokens": args.new, "bandwidth": bw,
                 "matmul_peak": {d: pk["peak"] for d, pk in peaks.items()}, **results,
                 "bandwidth_fraction": results["float32"]["ours"]["bandwidth_fraction"],
                 "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "machine": common.machine()})


if __name__ == "__main__":
    main()
