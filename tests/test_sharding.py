"""Mesh and sharding: a (data 2, fsdp 2, tensor 2) mesh on 8 CPU devices trains exactly like one device,
gradient accumulation equals one larger batch, and stage-2 freezing keeps the vision tower bit-identical.

The 8-device checks run in a subprocess (this file run as a script) so other tests keep one CPU device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llava_jax import sharding

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ unit


def test_resolve_mesh_shape_fills_the_rest():
    assert sharding.resolve_mesh_shape([-1, 2, 1], 8) == (4, 2, 1)
    assert sharding.resolve_mesh_shape([1, 1, 1], 1) == (1, 1, 1)
    with pytest.raises(sharding.MeshConfigError, match="at most one"):
        sharding.resolve_mesh_shape([-1, -1, 1], 8)
    with pytest.raises(sharding.MeshConfigError, match="do not divide"):
        sharding.resolve_mesh_shape([-1, 3, 1], 8)
    with pytest.raises(sharding.MeshConfigError, match="needs 4 devices"):
        sharding.resolve_mesh_shape([2, 2, 1], 8)


def test_logical_to_spec_rules_and_divisibility():
    class FakeMesh:
        shape = {"data": 2, "fsdp": 2, "tensor": 2}

    spec = sharding.logical_to_spec(("layers", "embed", "mlp"), sharding.DEFAULT_RULES)
    assert tuple(spec) == (None, "fsdp", "tensor")
    # 'embed' and 'vocab' both want their axes; a size that does not divide falls back to replicated.
    spec = sharding.logical_to_spec(("vocab", "embed"), sharding.DEFAULT_RULES, shape=(33, 8), mesh=FakeMesh())
    assert tuple(spec) == (None, "fsdp")
    assert tuple(sharding.logical_to_spec(("unknown_name",), sharding.DEFAULT_RULES)) == (None,)
    rules = sharding.rules_from_config([["batch", ["data", "fsdp"]], ["embed", None]])
    assert rules == (("batch", ("data", "fsdp")), ("embed", None))
    assert sharding.rules_from_config(("batch:data,fsdp", "embed:", "mlp:tensor")) == (
        ("batch", ("data", "fsdp")), ("embed", None), ("mlp", "tensor"))
    assert sharding.rules_from_config(sharding.rules_to_config(sharding.DEFAULT_RULES)) == sharding.DEFAULT_RULES
    with pytest.raises(sharding.MeshConfigError, match="not one of the mesh axes"):
        sharding.rules_from_config(("embed:model",))


# ------------------------------------------------------------------------------------------------ 8 devices


@pytest.fixture(scope="module")
def multi_device_results():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_mesh_2x2x2_equals_one_device(multi_device_results):
    r = multi_device_results
    assert r["mesh_devices"] == 8
    assert r["sharded_spec"] != "PartitionSpec()", "the big kernels must really be sharded on the mesh"
    assert len(r["losses_mesh"]) == 3
    for a, b in zip(r["losses_mesh"], r["losses_single"], strict=True):
        assert abs(a - b) <= 1e-5
    assert r["losses_mesh"][0] != r["losses_mesh"][2], "training must change the loss"
    assert r["param_max_diff_mesh_vs_single"] <= 1e-5


def test_grad_accumulation_equals_one_batch(multi_device_results):
    r = multi_device_results
    for a, b in zip(r["losses_accum4x1"], r["losses_batch4"], strict=True):
        assert abs(a - b) <= 1e-5
    assert r["param_max_diff_accum_vs_batch"] <= 1e-5
    assert r["param_change_batch4"] > 1e-4


def test_stage2_keeps_the_vision_tower_bit_identical(multi_device_results):
    r = multi_device_results
    # stage 2: projector and language model move, the vision tower does not (stage 1: tests/test_train_cli.py)
    assert any(k.startswith("projector/") for k in r["stage2_changed"])
    assert any(k.startswith("language_model/") for k in r["stage2_changed"])
    assert not any(k.startswith("vision_tower/") for k in r["stage2_changed"])


# ------------------------------------------------------------------------------------------------ child


def _child() -> None:
    import jax
    import numpy as np
    from flax import nnx

    from llava_jax import checkpoint as ckpt
    from llava_jax import train as T
    from llava_jax.models.clip import CLIPVisionConfig
    from llava_jax.models.llama import LlamaConfig
    from llava_jax.models.llava import LlavaConfig, build_llava
    from llava_jax.train_config import base_config

    cfg = LlavaConfig(
        vision=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                image_size=16, patch_size=8),
        text=LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2),
        image_token_id=63)
    stage2 = ["^projector/", "^language_model/"]

    def flat(model) -> dict[str, np.ndarray]:
        return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}

    def run(sizes, devices, *, batch, accum, trainable, steps=3):
        model = build_llava(cfg, seed=0)
        c = base_config()
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = sizes
        c.optimizer.lr, c.optimizer.warmup_ratio = 1e-2, 0.0
        tx, _ = T.make_optimizer(c, steps)
        mesh = T.sharding.make_mesh(c.mesh, devices=devices)
        rules = T.sharding.DEFAULT_RULES
        with jax.set_mesh(mesh):
            parts = T.split_for_training(model, tx, ckpt.trainable_filter(trainable))
        bs = {k: T.sharding.data_sharding(mesh, {"pixel_values": 4, "has_image": 1}.get(k, 2)) for k in T.BATCH_KEYS}

        def constrain(y):
            spec = jax.sharding.PartitionSpec(None, *T.sharding.data_sharding(mesh, y.ndim - 1).spec)
            return jax.lax.with_sharding_constraint(y, jax.sharding.NamedSharding(mesh, spec))

        step = T.make_step_fn(parts, accum=accum, batch_constraint=constrain)
        jitted, psh, osh = T.jit_step(step, parts, mesh, rules, bs)
        p, o = T.place(parts.params, psh), T.place(parts.opt_state, osh)
        fr = T.place(parts.frozen, T.sharding.state_shardings(parts.frozen, mesh))
        rs = T.place(parts.rest, T.sharding.state_shardings(parts.rest, mesh))
        it = T.RandomBatches(batch, 12, 16, 64, 63, cfg.num_image_tokens, seed=1)
        losses = []
        with jax.set_mesh(mesh):
            for _ in range(steps):
                p, o, m = jitted(p, o, fr, rs, T.to_global_batch(next(it), bs))
                losses.append(float(m["loss"]))
        spec = str(p["language_model"]["gate_kernel"].get_value().sharding.spec) if "language_model" in p else ""
        return losses, flat(nnx.merge(parts.graphdef, p, fr, rs)), spec

    devs = jax.devices()
    init = flat(build_llava(cfg, seed=0))
    lm, pm, spec = run((2, 2, 2), devs, batch=8, accum=1, trainable=stage2)
    ls, ps, _ = run((1, 1, 1), devs[:1], batch=8, accum=1, trainable=stage2)
    la, pa, _ = run((1, 1, 1), devs[:1], batch=4, accum=4, trainable=stage2)
    lb, pb, _ = run((1, 1, 1), devs[:1], batch=4, accum=1, trainable=stage2)

    def maxdiff(x, y):
        return max(float(np.max(np.abs(x[k] - y[k]))) for k in x)

    changed2 = sorted(k for k in init if not np.array_equal(init[k], pm[k]))
    result = {
        "mesh_devices": len(devs), "sharded_spec": spec,
        "losses_mesh": lm, "losses_single": ls, "param_max_diff_mesh_vs_single": maxdiff(pm, ps),
        "losses_accum4x1": la, "losses_batch4": lb, "param_max_diff_accum_vs_batch": maxdiff(pa, pb),
        "param_change_batch4": maxdiff(pb, init),
        "stage2_changed": changed2,
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _child()
