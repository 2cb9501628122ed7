"""Helpers shared by the benchmark scripts: the bench model geometry, HF twins of our models, timing and the
machine's measured matmul peak. Every bench prints one JSON object as its last line."""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from llava_jax.models.clip import CLIPVisionConfig  # noqa: E402
from llava_jax.models.llama import LlamaConfig  # noqa: E402
from llava_jax.models.llava import LlavaConfig, build_llava, set_scan_unroll  # noqa: E402


def bench_config(vocab: int = 32000, width: int = 512, layers: int = 4, image: int = 224, patch: int = 14,
                 vision_width: int = 512, vision_layers: int = 4) -> LlavaConfig:
    """The issue's bench geometry: CLIP-like 224 px / patch 14 (256 tokens), LLaMA width 512, vocab 32,000."""
    vision = CLIPVisionConfig(hidden_size=vision_width, intermediate_size=4 * vision_width,
                              num_hidden_layers=vision_layers, num_attention_heads=vision_width // 64,
                              image_size=image, patch_size=patch, projection_dim=vision_width)
    text = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=int(2.6875 * width),
                       num_hidden_layers=layers, num_attention_heads=width // 64,
                       num_key_value_heads=width // 64, max_position_embeddings=4096)
    return LlavaConfig(vision=vision, text=text, image_token_id=vocab - 1, projector="mlp2x_gelu")


def export_twin(model, config: LlavaConfig, directory: str) -> None:
    """Writes `model` as a Hugging Face LLaVA directory (float32), for `load_hf` in another process."""
    from llava_jax.convert.export import export_hf
    from llava_jax.convert.model_dir import LoadedModel

    export_hf(LoadedModel(model, config, None, None), directory, dtype="float32")


def load_hf(directory: str, attn: str = "sdpa"):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(directory, attn_implementation=attn)


def build(config: LlavaConfig, seed: int = 0, **kw):
    return build_llava(config, seed=seed, **kw)


def set_unroll(model, unroll: int) -> None:
    """--unroll N: layers per scan iteration on every stack (0: fully unrolled)."""
    set_scan_unroll(model, True if unroll == 0 else unroll)


class Peer:
    """One side of a comparison in its own (spawned) process, driven from the parent.

    Each framework gets a process of its own, as in real use: in one shared process the idle thread pool of
    one (XLA's Eigen threads, torch's OpenMP threads) competes with the other's work on a 2-core machine and
    slowed whichever ran second by 5-15%. `setup(*args)` runs in the child and returns {name: function};
    `peer(name, *args)` calls one there and returns its result. Callables and arguments must pickle (module
    level functions of the bench script, numpy arrays, paths).
    """

    def __init__(self, setup: Callable[..., dict[str, Callable]], *args):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, setup, args), daemon=True)
        self._proc.start()
        self._result()  # setup finished (or raised)

    def __call__(self, name: str, *args):
        self._conn.send((name, args))
        return self._result()

    def _result(self):
        status, value = self._conn.recv()
        if status == "error":
            raise RuntimeError(f"bench peer failed:\n{value}")
        return value

    def close(self) -> None:
        self._conn.send((None, ()))
        self._proc.join(timeout=30)


def _serve(conn, setup: Callable[..., dict[str, Callable]], args: tuple) -> None:
    import traceback

    try:
        fns = setup(*args)
        conn.send(("ok", None))
    except Exception:  # reported to the parent, which raises
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        name, call_args = conn.recv()
        if name is None:
            return
        try:
            conn.send(("ok", fns[name](*call_args)))
        except Exception:
            conn.send(("error", traceback.format_exc()))


def hf_train_step(model, optimizer, batch_path: str) -> Callable[[], float]:
    """(In the transformers process.) One forward + backward + optimizer step of `model` on the batch saved at
    `batch_path` (.npz: input_ids / labels / attention_mask [B, T], pixel_values [B, H, W, 3]); returns the loss."""
    import torch

    with np.load(batch_path) as f:
        tb = {"input_ids": torch.tensor(f["input_ids"], dtype=torch.long),
              "labels": torch.tensor(f["labels"], dtype=torch.long),
              "attention_mask": torch.tensor(f["attention_mask"]),
              "pixel_values": torch.tensor(f["pixel_values"].transpose(0, 3, 1, 2).copy())}

    def run() -> float:
        out = model(**tb)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    return run


def add_allocator_flags(parser) -> None:
    """--ours-allocator / --hf-allocator: each peer's host allocator mode (`llava_jax.host_memory`)."""
    parser.add_argument("--ours-allocator", default="auto", choices=("auto", "retain", "system"),
                        help="llava_jax's process (auto: as its CLIs do)")
    parser.add_argument("--hf-allocator", default="system", choices=("system", "retain"),
                        help="transformers' process (system: as it ships; retain: the same setting as ours)")


def set_allocator(mode: str) -> None:
    """In a peer, before its framework starts threads: `llava_jax.host_memory.retain_freed_memory(mode)`."""
    from llava_jax import host_memory

    host_memory.retain_freed_memory(mode)


def time_call(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def alternate(a: Callable[[], object], b: Callable[[], object], rounds: int, warmup: int = 1
              ) -> tuple[list[float], list[float]]:
    """Times a and b alternately (ABAB...) after `warmup` calls of each; returns both lists of seconds."""
    for _ in range(warmup):
        a()
        b()
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(time_call(a))
        tb.append(time_call(b))
    return ta, tb


def matmul_peak(n: int = 2048, reps: int = 8) -> dict[str, float]:
    """Measured fp32 matmul FLOP/s of this machine, in JAX (XLA) and torch; `peak` is the larger."""
    import torch

    x = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    tj = statistics.median(time_call(lambda: f(x).block_until_ready()) for _ in range(reps))
    xt = torch.ones(n, n)
    torch.mm(xt, xt)
    tt = statistics.median(time_call(lambda: torch.mm(xt, xt)) for _ in range(reps))
    flops = 2.0 * n**3
    out = {"jax_flops": flops / tj, "torch_flops": flops / tt}
    out["peak"] = max(out.values())
    return out


def machine() -> dict[str, object]:
    import torch

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "jax": jax.__version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def emit(obj: dict) -> None:
    """Prints the bench result as the last line (one JSON object)."""
    print(json.dumps(obj, default=lambda o: float(o) if isinstance(o, np.generic) else str(o)))
