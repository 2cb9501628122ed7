"""GPU check (issue 20): cuDNN attention on packed rows equals the XLA path, forward and backward.

    python bench/gpu_attention_check.py [--batch 2] [--length 1024] [--heads 8] [--kv-heads 8] [--head-dim 64]

Needs only jax (with CUDA), flax, numpy and this repository; no network. Builds packed rows (several samples
per row with their own segment ids, padding at the end), the causal segment mask the decoder builds
(`attention.segment_mask`), and compares `attention_fn("cudnn")` (jax.nn.dot_product_attention's cuDNN kernel
on that mask) with `attention_fn("xla")` (the hand-written XLA path and its custom backward) in bfloat16 and
float16 (cuDNN's fused attention takes no float32): outputs at real tokens and the gradients of q, k, v, each
also against the XLA path in float32. Also checks that no attention crosses a segment: perturbing one sample's
keys / values by 3.0 leaves the other samples' cuDNN outputs unchanged (<= 1e-3).
Prints one JSON line: {"ok": bool, "device": ..., "cases": [{dtype, max_rel_out, max_rel_dq, ...}]}; exit 0
when every case is within tolerance (largest difference / largest magnitude: bfloat16 3e-2, float16 1e-2).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from llava_jax.models import attention as A  # noqa: E402

TOLERANCE = {"bfloat16": 3e-2, "float16": 1e-2}


def packed_segments(batch: int, length: int, seed: int = 0) -> np.ndarray:
    """[B, T] segment ids: each row cut into 2-5 samples of random lengths, then some padding (0)."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((batch, length), np.int32)
    for b in range(batch):
        used = length - int(rng.integers(0, length // 8))
        cuts = np.sort(rng.choice(np.arange(16, used - 16), size=int(rng.integers(1, 5)), replace=False))
        edges = [0, *cuts.tolist(), used]
        for s in range(len(edges) - 1):
            seg[b, edges[s]:edges[s + 1]] = s + 1
    return seg


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-6))


def run_case(args, dtype) -> dict:
    seg = packed_segments(args.batch, args.length)
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(args.batch, args.length, args.heads, args.head_dim)), dtype)
    k, v = (jnp.asarray(rng.normal(size=(args.batch, args.length, args.kv_heads, args.head_dim)), dtype)
            for _ in range(2))
    mask = A.segment_mask(jnp.asarray(seg))
    real = jnp.asarray(seg > 0)[:, :, None, None]
    w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

    def make(impl):
        attend = A.attention_fn(impl, causal=True)

        def loss(q, k, v):
            out = attend(q, k, v, mask, segment_ids=jnp.asarray(seg))
            return jnp.sum(jnp.where(real, out.astype(jnp.float32) * w, 0.0)), out

        return jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))

    (_, out_c), g_c = make("cudnn")(q, k, v)
    (_, out_x), g_x = make("xla")(q, k, v)
    (_, out_f), g_f = make("xla")(*(x.astype(jnp.float32) for x in (q, k, v)))
    keep = np.asarray(seg > 0)
    case = {"dtype": str(jnp.dtype(dtype))}
    for ref_name, out_r, g_r in (("", out_x, g_x), ("_vs_f32", out_f, g_f)):
        case[f"max_rel_out{ref_name}"] = rel_err(np.asarray(out_c, np.float32)[keep],
                                                  np.asarray(out_r, np.float32)[keep])
        for name, a, b in zip(("dq", "dk", "dv"), g_c, g_r, strict=True):
            case[f"max_rel_{name}{ref_name}"] = rel_err(a, b)
    # isolation: change sample 1 of row 0; the other samples' cuDNN outputs must not move
    other = np.asarray(seg[0] != 1)
    k2 = k.at[0, np.flatnonzero(seg[0] == 1)].add(jnp.asarray(3.0, dtype))
    v2 = v.at[0, np.flatnonzero(seg[0] == 1)].add(jnp.asarray(3.0, dtype))
    (_, out_c2), _ = make("cudnn")(q, k2, v2)
    case["isolation_max_abs"] = float(np.max(np.abs(np.asarray(out_c2, np.float32)[0][other & keep[0]]
                                                    - np.asarray(out_c, np.float32)[0][other & keep[0]])))
    case["ok"] = bool(max(case[x] for x in case if x.startswith("max_rel")) <= TOLERANCE[case["dtype"]]
                      and case["isolation_max_abs"] <= 1e-3)
    return case


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    args = p.parse_args()
    if args.length < 128 or args.heads % args.kv_heads:
        print("error: --length must be >= 128 and --heads a multiple of --kv-heads", file=sys.stderr)
        sys.exit(2)
    t0 = time.time()
    device = jax.devices()[0]
    result = {"check": "gpu_attention_packing", "device": f"{device.platform}:{getattr(device, 'device_kind', '')}",
              "jax": jax.__version__, "shape": [args.batch, args.length, args.heads, args.kv_heads, args.head_dim]}
    if device.platform != "gpu":
        result.update(ok=False, error="no GPU: cuDNN attention needs one")
        print(json.dumps(result))
        sys.exit(1)
    cases = []
    for dtype in (jnp.bfloat16, jnp.float16):
        try:
            cases.append(run_case(args, dtype))
        except Exception as e:  # a cuDNN refusal (dtype, layout, mask) is a result too
            cases.append({"dtype": str(jnp.dtype(dtype)), "ok": False, "error": f"{type(e).__name__}: {e}"[:500]})
    result.update(cases=cases, ok=all(c["ok"] for c in cases), wall_s=round(time.time() - t0, 1))
    print(json.dumps(result))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
