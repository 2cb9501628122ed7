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
           "--config.model.arch=tiny", "--config.model.attention_impl=xla", "--topology=v5e-4", "--config.batch_size=8",
           "--config.data.max_length=128",
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


def test_aot_compiles_for_a_multi_host_v5p_64_slice(tmp_path):
    """v5p-64 is 32 chips on 8 hosts: the step compiles as one program for the whole slice from this CPU host."""
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    cmd = [sys.executable, "-m", "llava_jax.aot", f"--config={REPO / 'configs' / 'finetune.py'}:7b",
           "--config.model.arch=tiny", "--config.model.attention_impl=xla", "--topology=v5p-64",
           "--config.batch_size=32", "--config.grad_accum_steps=1", "--config.data.max_length=64", f"--json={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["hosts"] == 8 and r["mesh"] == {"data": 1, "fsdp": 32, "tensor": 1}
    assert "8 host(s)" in proc.stdout and "per-chip memory (GiB)" in proc.stdout
    assert r["fits"] is True and 0 < r["per_chip_gib"]["total"] < r["per_chip_gib"]["hbm"]


def test_aot_refuses_a_micro_batch_smaller_than_the_slice():
    """13b's grad_accum_steps=8 gives micro-batches of 16 rows: too few for v5p-64's 32 chips (named, not a
    shard_map traceback)."""
    import importlib

    os.environ.pop("JAX_PLATFORMS", None)
    from llava_jax import aot
    from llava_jax.train_config import ConfigError

    spec = importlib.util.spec_from_file_location("finetune_cfg", REPO / "configs" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config("13b")
    with cfg.unlocked():
        cfg.model.arch, cfg.model.attention_impl = "tiny", "xla"
    devices, _ = aot.topology_devices("v5p-64")
    with pytest.raises(ConfigError, match=r"micro-batch 16 .* does not divide over data x fsdp = 32 chips"):
        aot.compile_step(cfg, devices)


def test_aot_rejects_unknown_topology():
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    cmd = [sys.executable, "-m", "llava_jax.aot", f"--config={REPO / 'configs' / 'finetune.py'}:7b",
           "--topology=v99-3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 2
    assert "unknown topology 'v99-3'" in proc.stderr



@pytest.mark.slow  # ~60 s: compiles the deeper model unrolled to check the extrapolation (suite time budget)
def test_mfu_estimate_extrapolates_a_deeper_unrolled_compile(monkeypatch):
    """XLA's roofline for a deeper model, extrapolated from three shallow unrolled compiles, equals what
    compiling that deeper model unrolled gives; and XLA's count of the scanned step misses most of it."""
    import dataclasses
    import importlib

    os.environ.pop("JAX_PLATFORMS", None)
    from llava_jax import aot

    spec = importlib.util.spec_from_file_location("finetune_cfg", REPO / "configs" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config("7b")
    with cfg.unlocked():
        cfg.model.arch, cfg.batch_size, cfg.grad_accum_steps, cfg.data.max_length = "tiny", 8, 2, 128
        cfg.model.attention_impl = "xla"  # the tiny preset's 16-wide heads are below the TPU kernel's tiles
    tiny = aot.arch_config("tiny")
    deep = dataclasses.replace(tiny, text=dataclasses.replace(tiny.text, num_hidden_layers=6),
                               vision=dataclasses.replace(tiny.vision, num_hidden_layers=5))  # runs 4
    monkeypatch.setattr(aot, "arch_config", lambda arch: deep)
    devices, topo = aot.topology_devices("v5e-4")
    est = aot.estimate_mfu(cfg, devices, topo)
    assert [(r["text_layers"], r["vision_layers_run"]) for r in est["fits_rows"]] == [(2, 2), (3, 2), (2, 3)]

    micro = cfg.copy_and_resolve_references()
    with micro.unlocked():
        micro.batch_size, micro.grad_accum_steps = 4, 1
    unrolled, _ = aot.compile_step(micro, devices, mcfg=deep, unroll_layers=True)
    scanned, _ = aot.compile_step(micro, devices, mcfg=deep)

    def cost(c):
        c = c.cost_analysis()
        return c[0] if isinstance(c, list | tuple) else c

    direct = cost(unrolled)["optimal_seconds"]
    assert abs(est["micro_batch_s"] - direct) < 0.03 * direct
    assert est["est_step_s"] == pytest.approx(2 * est["micro_batch_s"])
    assert cost(scanned)["flops"] < 0.6 * cost(unrolled)["flops"]  # why the estimate unrolls
    assert 0 < est["est_mfu"] < 1
