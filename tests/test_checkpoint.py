"""Orbax checkpoints: round trip of params / optimizer / data state, keep-K, skipping a corrupt latest."""

from __future__ import annotations

import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from llava_jax import checkpoint as ckpt


class Tiny(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.projector = nnx.Linear(3, 4, rngs=rngs)
        self.language_model = nnx.Linear(4, 2, rngs=rngs)


def _states(seed: int):
    model = Tiny(nnx.Rngs(seed))
    trainable = ckpt.trainable_filter(["^projector/"])
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=trainable)
    return nnx.state(model, trainable), nnx.state(opt)


def test_trainable_filter_matches_paths():
    model = Tiny(nnx.Rngs(0))
    params = nnx.state(model, ckpt.trainable_filter(["^projector/"]))
    keys = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(params)}
    assert keys == {"projector/kernel", "projector/bias"}


def test_round_trip_keep_and_corrupt_latest(tmp_path, caplog):
    c = ckpt.TrainCheckpointer(tmp_path / "ck", keep=2, every_steps=2, use_async=True)
    assert c.restore_latest(*_states(0)) is None
    saved = {}
    for step in range(1, 7):
        params, opt = _states(step)
        if c.save(step, params, opt, {"position": step, "epoch": 0}):
            saved[step] = nnx.to_pure_dict(params)
    c.wait()
    assert sorted(saved) == [2, 4, 6]
    assert c.all_steps() == [4, 6]  # keep 2

    target_params, target_opt = _states(100)
    r = c.restore_latest(target_params, target_opt)
    assert r.step == 6 and r.data_state == {"position": 6, "epoch": 0}
    np.testing.assert_array_equal(r.params["projector"]["kernel"], saved[6]["projector"]["kernel"])
    c.close()

    # corrupt the newest: its parameter files vanish -> a warning, and the previous one is used
    shutil.rmtree(tmp_path / "ck" / "6" / "params")
    c2 = ckpt.TrainCheckpointer(tmp_path / "ck", keep=2, every_steps=2, use_async=False)
    with caplog.at_level(logging.WARNING, logger="llava_jax.checkpoint"):
        r = c2.restore_latest(*_states(100))
    assert r.step == 4 and r.data_state["position"] == 4
    np.testing.assert_array_equal(r.params["projector"]["kernel"], saved[4]["projector"]["kernel"])
    assert any("checkpoint 6" in rec.message and "unreadable" in rec.message for rec in caplog.records)

    shutil.rmtree(tmp_path / "ck" / "4" / "params")
    with pytest.raises(ckpt.CheckpointError, match="no readable checkpoint"):
        c2.restore_latest(*_states(100))
    c2.close()


def test_force_save_and_bytes_state(tmp_path):
    c = ckpt.TrainCheckpointer(tmp_path / "ck", keep=3, every_steps=100, use_async=False)
    params, opt = _states(1)
    assert not c.save(3, params, opt, b"\x00state")
    assert c.save(3, params, opt, b"\x00state", force=True)
    r = c.restore_latest(*_states(2))
    assert r.step == 3 and r.data_state == b"\x00state"
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), r.params, nnx.to_pure_dict(params)))
    c.close()


def test_load_trained_model_needs_a_workdir(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="not a training workdir"):
        ckpt.load_trained_model(tmp_path)
