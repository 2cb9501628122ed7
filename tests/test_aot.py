"""Ahead-of-time compile of the train step for a TPU topology on this CPU host (needs libtpu)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu is not installed (pip install -e '.[tpu]')")


def test_aot_compiles_tiny_config_for_v5e_4(tmp_path):
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    cmd = [sys.executable, "-m", "llava_jax.aot", f"--config={REPO / 'configs' / 'finetune.py'}:7b",
           "--config.model.arch=tiny", "--topology=v5e-4", "--config.batch_size=8", "--config.data.max_length=64",
           "--config.grad_accum_steps=2", f"--json={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "per-chip memory (GiB)" in proc.stdout and "estimated step" in proc.stdout
    r = json.loads(out.read_text())
    assert r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert r["fits"] is True
    assert r["xla_flops_per_chip"] > 0 and r["est_step_s"] > 0
    assert r["per_chip_gib"]["total"] > 0
    assert 0 < r["params_trainable"] < r["params_total"]


def test_aot_rejects_unknown_topology():
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    cmd = [sys.executable, "-m", "llava_jax.aot", f"--config={REPO / 'configs' / 'finetune.py'}:7b",
           "--topology=v99-3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 2
    assert "unknown topology 'v99-3'" in proc.stderr
