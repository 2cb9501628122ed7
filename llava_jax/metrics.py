"""Training metrics: metrics.jsonl + TensorBoard writing, analytic model FLOPs and MFU, progress formatting."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

PEAK_TFLOPS = {"TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
               "TPU v6 lite": 918.0, "TPU v6e": 918.0, "NVIDIA H100": 989.0, "NVIDIA H200": 989.0,
               "NVIDIA A100": 312.0}


class MetricWriter:
    """metrics.jsonl (one object per logging interval) + TensorBoard (tb/), written by process 0 only.

    `workdir` may be local or gs://. Locally metrics.jsonl is appended to; an object store has no append, so
    there the writer keeps the file's lines and rewrites the whole object (one single-object write) each time.
    TensorBoard event files go through tensorboardX, which writes gs:// itself (google-cloud-storage).
    """

    def __init__(self, workdir: Any):
        from llava_jax.io import as_path, is_remote

        self.enabled = jax.process_index() == 0
        self.path = as_path(workdir) / "metrics.jsonl"
        self.remote = is_remote(self.path)
        self._lines: list[str] | None = None  # remote: the object's current lines
        self.tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(as_path(workdir) / "tb"))

    def _read_lines(self) -> list[str]:
        return [ln for ln in self.path.read_text().splitlines() if ln.strip()] if self.path.exists() else []

    def truncate_after(self, step: int) -> None:
        """Drops lines beyond `step` (written after the checkpoint a resume starts from)."""
        if not self.enabled:
            return
        if self.remote:
            self._lines = [ln for ln in self._read_lines() if json.loads(ln)["step"] <= step]
            self._flush_remote()
            return
        if not self.path.exists():
            return
        from llava_jax.io import atomic_write_text

        keep = [ln for ln in self._read_lines() if json.loads(ln)["step"] <= step]
        atomic_write_text(self.path, "".join(ln + "\n" for ln in keep))

    def _flush_remote(self) -> None:
        from llava_jax.io import atomic_write_text

        atomic_write_text(self.path, "".join(ln + "\n" for ln in self._lines or []))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        if self.remote:
            if self._lines is None:
                self._lines = self._read_lines()
            self._lines.append(json.dumps(row))
            self._flush_remote()
        else:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k != "step" and isinstance(v, int | float):
                self.tb.add_scalar(f"train/{k}", v, row["step"])
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def fmt_duration(seconds: float) -> str:
    """Seconds -> '1h02m', '3m20s' or '12s'."""
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def peak_flops(configured_tflops: float = 0.0) -> float:
    """Peak FLOP/s per device: the configured TFLOP/s when > 0, else the device-kind table; 0 when unknown."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    kind = jax.devices()[0].device_kind
    for name, tf in PEAK_TFLOPS.items():
        if kind.startswith(name):
            return tf * 1e12
    return 0.0


def model_flops_per_step(mcfg: Any, batch: int, length: int, trains: dict[str, bool],
                         images_per_row: int = 1) -> float:
    """Analytic matmul FLOPs of one training step (the MFU convention: no rematerialisation counted).

    images_per_row: image slots each row runs through the vision tower and projector (packed rows: M).

    Forward = 2 x (matmul parameters) per token + attention (QK^T and AV over `length` keys); a part
    whose weights train costs 3 x forward, a frozen part that gradients pass through 2 x, a frozen part
    below everything trainable 1 x. trains: {"vision_tower", "projector", "language_model"} -> bool.
    """
    t, v = mcfg.text, mcfg.vision
    qd, kd = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    llm_mm = t.num_hidden_layers * (2 * t.hidden_size * qd + 2 * t.hidden_size * kd + 3 * t.hidden_size
                                    * t.intermediate_size) + t.hidden_size * t.vocab_size
    llm_fwd = batch * length * (2 * llm_mm + 4 * t.num_hidden_layers * length * qd)
    patches = v.num_patches + 1
    vis_mm = v.num_hidden_layers * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
    vis_fwd = batch * images_per_row * patches * (2 * vis_mm + 4 * v.num_hidden_layers * patches * v.hidden_size)
    proj_in = v.hidden_size * len(mcfg.feature_layers)
    proj_mm = proj_in * t.hidden_size + (t.hidden_size**2 if mcfg.projector == "mlp2x_gelu" else 0)
    proj_fwd = batch * images_per_row * v.num_patches * 2 * proj_mm

    def factor(part: str, below_trainable: bool) -> int:
        return 3 if trains.get(part) else (2 if below_trainable else 1)

    vision_needs_grad = trains.get("vision_tower", False)
    proj_needs_grad = vision_needs_grad or trains.get("projector", False)
    return float(factor("language_model", proj_needs_grad) * llm_fwd
                 + factor("projector", vision_needs_grad) * proj_fwd
                 + factor("vision_tower", False) * vis_fwd)


def trained_parts(params: nnx.State) -> dict[str, bool]:
    """Which top-level parts (vision_tower, projector, language_model) have trainable parameters. LoRA adapters
    (`*_lora_a/b`) do not count: their part's weights get no gradient, its backward pass only carries one
    through (the adapters' own matmuls are left out of the count)."""
    tops = {str(p[0]) for p, _ in nnx.to_flat_state(params) if "_lora_" not in str(p[-1])}
    return {name: name in tops for name in ("vision_tower", "projector", "language_model")}


def metrics_row(step: int, host: list, schedule: Callable, dt: float, flops_per_step: float, peak: float) -> dict:
    """One metrics.jsonl row for the steps in `host` [(step, metrics, tokens in the batch)]."""
    n = len(host)
    row = {
        "step": step,
        "loss": float(np.mean([m["loss"] for _, m, _ in host])),
        "last_loss": float(host[-1][1]["loss"]),
        "lr": float(schedule(step - 1)),
        "grad_norm": float(host[-1][1]["grad_norm"]),
        "tokens_per_s": sum(t for _, _, t in host) / max(dt, 1e-9),
        "supervised_tokens_per_s": sum(float(m["tokens"]) for _, m, _ in host) / max(dt, 1e-9),
        "step_time_s": dt / max(n, 1),
        "losses": {str(s): float(m["loss"]) for s, m, _ in host},
    }
    if flops_per_step:
        achieved = flops_per_step / max(row["step_time_s"], 1e-9)
        row["flops_per_s"] = achieved
        if peak:
            row["mfu"] = achieved / (peak * jax.device_count())
    return row
