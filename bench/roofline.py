"""Generation against the machine's roofline: greedy decode at batch 1 as a fraction of the measured memory
bandwidth, prefill as a fraction of the measured matmul peak, llava_jax next to transformers in the same run.

What is measured (each framework in a process of its own, `common.Peer`; the machine figures in the parent):

- Memory bandwidth: the best of timed full reductions (`sum`) over a 1 GiB float32 array (far larger than any
  cache) in JAX, torch and NumPy (CPU only), each the median of samples taken before, between and after the
  decode runs (so they see the same load); bytes read / seconds. A copy (read + write) is reported alongside.
  On a GPU the arrays live in device memory (4 GiB).
- Matmul peak: a square matmul (n = 4096 on CPU, 8192 on GPU), float32 and bfloat16, in JAX and torch; the
  larger per dtype.
- The model: a random LLaVA whose language model is a LLaMA big enough that weights dominate the KV cache
  (`--size`; "cpu": width 1024, 12 layers, MLP 2816, vocab 32,000, 220M parameters; "gpu": width 2048,
  12 layers, MLP 5504, 735M), with a tiny vision tower (text-only prompts: the roofline is the decoder's):
  transformers' own random initialisation, saved once; both frameworks load that directory.
- Decode: s/token = (t(N new) - t(1 new)) / (N - 1) for one random `--prompt`-token prompt at batch 1, EOS
  disabled; bytes per token = every weight a decode step must read (decoder layers, final norm, LM head, one
  embedding row) + the live KV cache (keys and values of every layer at the mean cache length). Roofline
  fraction = (bytes / bandwidth) / (s/token).
- Prefill: t(1 new) (prompt forward + one LM-head row + one sampled token) against the prompt forward's FLOPs
  (2 x decoder weights x tokens + causal attention 2 T^2 D per layer + the head row) at the matmul peak.
- Precisions (`--dtypes`): float32, and bfloat16 weights and compute in both frameworks; token agreement of each
  with float32 greedy (same framework) and between the frameworks. On a GPU float32 products are true float32
  in both (JAX's default precision there would be TF32).
- llava_jax runs with `generate`'s default decode layout for the platform (`ours`: per-layer weight copies on
  CPU) and, with `--both-layouts`, the other one (`ours_scan` / `ours_split`).

  PYTHONPATH=. nice -n 19 .venv/bin/python bench/roofline.py --new 32 --rounds 2    # CPU (this machine)
  PYTHONPATH=. python bench/roofline.py --device gpu                                # an NVIDIA GPU

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
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
    "gpu": (2048, 12, 5504),
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


class Bandwidth:
    """Read bandwidth probes (bytes/s): a full sum over a float32 array of 1 GiB (CPU) / 4 GiB (GPU) in JAX, torch
    and (CPU) NumPy. `sample()` times each once; sampled between the decode runs, the probes see the same
    machine load as they do. `copy()` times a copy into a buffer allocated beforehand (read + write bytes; a
    fresh output would time page faults)."""

    def __init__(self, device: str):
        import torch

        self.device = device
        self.nbytes = (4 if device == "gpu" else 1) * 1024**3
        n = self.nbytes // 4
        self._jx = jnp.ones((n,), jnp.float32)
        self._jsum = jax.jit(jnp.sum)
        self._t = torch.ones(n, dtype=torch.float32, device="cuda" if device == "gpu" else "cpu")
        self._np = np.ones((n,), np.float32) if device == "cpu" else None
        self.samples: dict[str, list[float]] = {"jax_sum": [], "torch_sum": []}
        if self._np is not None:
            self.samples["numpy_sum"] = []
        self._jsum(self._jx).block_until_ready()  # compile

    def _time(self, name: str) -> float:
        if name == "jax_sum":
            return common.time_call(lambda: self._jsum(self._jx).block_until_ready())
        if name == "torch_sum":
            return common.time_call(lambda: (self._t.sum(), _sync_torch(self.device)))
        return common.time_call(lambda: self._np.sum())

    def sample(self, reps: int = 1) -> None:
        for _ in range(reps):
            for name in self.samples:
                self.samples[name].append(self.nbytes / self._time(name))

    def copy(self, reps: int = 5) -> float:
        out = self._t.clone()
        times = [common.time_call(lambda: (out.copy_(self._t), _sync_torch(self.device))) for _ in range(reps)]
        return 2 * self.nbytes / statistics.median(times)

    def summary(self) -> dict[str, float]:
        """Median per probe; `read`: the best of them (the roofline's bandwidth)."""
        out = {k: statistics.median(v) for k, v in self.samples.items()}
        out["read"] = max(out.values())
        out["samples"] = sum(len(v) for v in self.samples.values())
        return out


def _median_time(fn, reps: int) -> float:
    fn()  # warm-up (compiles)
    return statistics.median(common.time_call(fn) for _ in range(reps))


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


# ------------------------------------------------------------------------------------------ the peers


def _ours_setup(hf_dir: str, dtype: str, split: bool | None, device: str, allocator: str) -> dict:
    """(In a llava_jax process.) The HF directory's weights in `dtype`; gen(ids, n) -> n new token ids.
    split: `generate`'s split_layers (None: its default for the platform)."""
    common.set_allocator(allocator)
    if device == "gpu" and dtype == "float32":  # true float32 products, as torch does by default (not TF32)
        jax.config.update("jax_default_matmul_precision", "highest")
    from llava_jax.convert.model_dir import load_model

    jdt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    model = load_model(hf_dir, dtype=jdt, param_dtype=jdt).model

    def gen(ids, n):
        return generate(model, [list(ids)], None, max_new_tokens=n, eos_ids=[-1], split_layers=split)[0]

    return {"gen": gen}


def _hf_setup(hf_dir: str, dtype: str, device: str, allocator: str) -> dict:
    """(In the transformers process.) The same directory in `dtype` on `device`; gen(ids, n) -> new ids."""
    common.set_allocator(allocator)
    import torch
    from transformers import LlavaForConditionalGeneration

    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    dev = "cuda" if device == "gpu" else "cpu"
    hf = LlavaForConditionalGeneration.from_pretrained(hf_dir, dtype=tdt, attn_implementation="sdpa").to(dev).eval()

    def gen(ids, n):
        x = torch.tensor([list(ids)], dtype=torch.long, device=dev)
        with torch.no_grad():
            out = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0, eos_token_id=None)
        return out[0, x.shape[1]:].tolist()

    return {"gen": gen}


def write_model(config, directory: str, seed: int = 0) -> int:
    """A random transformers LLaVA of `config` (its own initialisation, float32) saved to `directory`, which
    both peers load; returns the language model's parameter count."""
    import torch
    from transformers import LlavaConfig as HFLlavaConfig
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(HFLlavaConfig.from_dict(config.to_hf())).eval()
    model.save_pretrained(directory)
    return sum(p.numel() for n, p in model.named_parameters()
               if "vision_tower" not in n and "multi_modal_projector" not in n)


def _agreement(a: list[int], b: list[int]) -> dict[str, float]:
    """Share of equal positions, and the length of the common prefix (greedy runs part after one change)."""
    same = np.asarray(a) == np.asarray(b)
    return {"equal_fraction": float(same.mean()), "common_prefix": int(np.argmin(same)) if not same.all()
            else len(a)}


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
    p.add_argument("--both-layouts", action=argparse.BooleanOptionalAction, default=True,
                   help="also time llava_jax with generate's other split_layers setting")
    common.add_allocator_flags(p)
    args = p.parse_args()
    size = args.size or DEVICE
    dtypes = [d for d in args.dtypes.split(",") if d]
    if "float32" not in dtypes:
        dtypes.insert(0, "float32")  # the reference for token agreement
    config = model_config(size)

    bw = Bandwidth(DEVICE)
    bw.sample(reps=5)
    copy_bw = bw.copy()
    s0 = bw.summary()
    print(f"memory bandwidth (before): read {s0['read'] / 1e9:.1f} GB/s ("
          + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in s0.items() if k.endswith("_sum"))
          + f"); copy {copy_bw / 1e9:.1f} GB/s", flush=True)
    peaks = {}
    for d in dtypes:
        if DEVICE == "gpu" and d == "float32":
            with jax.default_matmul_precision("highest"):
                peaks[d] = matmul_peak(DEVICE, d)
        else:
            peaks[d] = matmul_peak(DEVICE, d)
        print(f"matmul peak {d}: {peaks[d]['peak'] / 1e9:.1f} GFLOP/s (jax {peaks[d]['jax'] / 1e9:.1f}, torch "
              f"{peaks[d]['torch'] / 1e9:.1f})", flush=True)

    rng = np.random.default_rng(0)
    ids = [1] + rng.integers(3, config.text.vocab_size - 1, size=args.prompt - 1).tolist()
    mean_cache = args.prompt + args.new / 2
    flops = prefill_flops(config, args.prompt)
    default_split = DEVICE == "cpu"  # generate's split_layers=None
    variants = {"ours": None}
    if args.both_layouts:
        variants["ours_scan" if default_split else "ours_split"] = not default_split
    raw: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        n_params = write_model(config, tmp)
        print(f"model: language model {n_params / 1e6:.0f}M parameters (width {config.text.hidden_size}, "
              f"{config.text.num_hidden_layers} layers, MLP {config.text.intermediate_size}, vocab "
              f"{config.text.vocab_size}); prompt {args.prompt} tokens, {args.new} new, batch 1", flush=True)
        for dtype in dtypes:
            starts = {name: (_ours_setup, tmp, dtype, split, DEVICE, args.ours_allocator)
                      for name, split in variants.items()}
            if args.hf:
                starts["hf"] = (_hf_setup, tmp, dtype, DEVICE, args.hf_allocator)
            with concurrent.futures.ThreadPoolExecutor(len(starts)) as pool:  # the peers load side by side
                peers = dict(zip(starts, pool.map(lambda a: common.Peer(*a), starts.values()), strict=True))
            tokens = {name: peer("gen", ids, args.new) for name, peer in peers.items()}  # warm-up, compared
            for peer in peers.values():
                peer("gen", ids, 1)
            times = {name: ([], []) for name in peers}
            for _ in range(args.rounds):  # alternate: every peer and the bandwidth probes see the same load
                bw.sample()
                for name, peer in peers.items():
                    times[name][0].append(common.time_call(functools.partial(peer, "gen", ids, 1)))
                    times[name][1].append(common.time_call(functools.partial(peer, "gen", ids, args.new)))
            for peer in peers.values():
                peer.close()
            raw[dtype] = {"tokens": tokens, "times": times}
            print(f"{dtype}: timed " + ", ".join(peers), flush=True)
    bw.sample(reps=3)
    band = bw.summary()
    band["copy"] = copy_bw
    print(f"memory bandwidth (all {band['samples']} samples, medians): read {band['read'] / 1e9:.1f} GB/s ("
          + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in band.items() if k.endswith("_sum")) + ")", flush=True)

    results: dict[str, dict] = {}
    for dtype, r in raw.items():
        nbytes = decode_bytes(config, 4 if dtype == "float32" else 2, mean_cache)
        ideal = nbytes["total"] / band["read"]
        row: dict[str, object] = {"bytes_per_token": nbytes, "ideal_s_per_token": ideal, "prefill_flops": flops}
        for name, (t1, tn) in r["times"].items():
            s_tok = (common.median(tn) - common.median(t1)) / (args.new - 1)
            prefill = common.median(t1)
            row[name] = {"s_per_token": s_tok, "tokens_per_s": 1 / s_tok, "bandwidth_fraction": ideal / s_tok,
                         "achieved_bytes_per_s": nbytes["total"] / s_tok, "prefill_s": prefill,
                         "prefill_flops_per_s": flops / prefill, "peak_fraction": flops / prefill / peaks[dtype]["peak"]}
            if dtype != "float32":
                row[name]["agreement_with_float32"] = _agreement(r["tokens"][name], raw["float32"]["tokens"][name])
            e = row[name]
            print(f"{dtype} {name}: decode {s_tok * 1e3:.2f} ms/token = {e['bandwidth_fraction']:.1%} of the "
                  f"bandwidth roofline ({ideal * 1e3:.2f} ms for {nbytes['total'] / 1e6:.0f} MB); prefill "
                  f"{prefill * 1e3:.1f} ms = {e['peak_fraction']:.1%} of the {dtype} matmul peak"
                  + (f"; tokens equal to float32 {e['agreement_with_float32']['equal_fraction']:.0%} (common "
                     f"prefix {e['agreement_with_float32']['common_prefix']})" if dtype != "float32" else ""),
                  flush=True)
        if "hf" in r["tokens"]:
            row["ours_vs_hf"] = _agreement(r["tokens"]["ours"], r["tokens"]["hf"])
            row["decode_speed_ratio"] = row["hf"]["s_per_token"] / row["ours"]["s_per_token"]
            row["prefill_speed_ratio"] = row["hf"]["prefill_s"] / row["ours"]["prefill_s"]
            print(f"{dtype}: ours / HF decode speed {row['decode_speed_ratio']:.2f}x, prefill "
                  f"{row['prefill_speed_ratio']:.2f}x; tokens equal ours vs HF "
                  f"{row['ours_vs_hf']['equal_fraction']:.0%}", flush=True)
        results[dtype] = row
    common.emit({"bench": "roofline", "device": DEVICE, "size": size, "language_model_params": n_params,
                 "prompt": args.prompt, "new_tokens": args.new, "bandwidth": band,
                 "matmul_peak": {d: pk for d, pk in peaks.items()}, **results,
                 "bandwidth_fraction": results["float32"]["ours"]["bandwidth_fraction"],
                 "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "machine": common.machine()})


if __name__ == "__main__":
    main()
