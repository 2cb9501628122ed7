"""Training checkpoints with Orbax: trainable parameters, optimizer state, step and data-iterator state.

Frozen weights are never copied into a checkpoint: a workdir records in `run.json` where its starting
model came from (a model directory or an earlier workdir), and `load_trained_model` rebuilds the full
model from that base plus the latest checkpoint's trainable parameters.

Layout of DIR/checkpoints/<step>/: `params/` and `opt_state/` (Orbax PyTree, written collectively
by all processes), `data/process_<i>-of-<n>.json` (each process's iterator state), `meta/` (JSON).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from llava_jax.io import as_path, atomic_write_json, path_str, read_json

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
CHECKPOINT_SUBDIR = "checkpoints"


class CheckpointError(RuntimeError):
    """No usable checkpoint could be restored, or a workdir is not a training workdir."""


# ---------------------------------------------------------------------------------------------------
# Data-iterator state: one JSON file per process (Grain's own handler only knows Grain iterator types).
# ---------------------------------------------------------------------------------------------------


class DataStateHandler(ocp.CheckpointHandler):
    """Writes a JSON-serialisable iterator state per JAX process."""

    def save(self, directory: epath.Path, args: DataStateSave) -> None:
        state = args.state
        if isinstance(state, bytes):
            state = {"__bytes__": state.decode("latin-1")}
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(json.dumps(state))

    def restore(self, directory: epath.Path, args: DataStateRestore | None = None) -> Any:
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        path = directory / name
        if not path.exists():
            raise CheckpointError(f"{path} is missing (was the checkpoint written by another process count?)")
        state = json.loads(path.read_text())
        if isinstance(state, dict) and set(state) == {"__bytes__"}:
            state = state["__bytes__"].encode("latin-1")
        return state

    def metadata(self, directory: epath.Path) -> None:
        return None

    def finalize(self, directory: epath.Path) -> None:
        return None

    def close(self) -> None:
        return None


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


# ---------------------------------------------------------------------------------------------------
# The manager.
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Restored:
    """What `TrainCheckpointer.restore` returns: pure-dict trees ready for `nnx.replace_by_pure_dict`."""

    step: int
    params: Any
    opt_state: Any
    data_state: Any


def pure(state: nnx.State) -> dict:
    """nnx.State -> nested dict of arrays (the form Orbax stores)."""
    return nnx.to_pure_dict(state)


def abstract_pure(state: nnx.State) -> dict:
    """nnx.State -> nested dict of ShapeDtypeStruct carrying each array's sharding (restore target)."""

    def one(x: Any) -> Any:
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(one, nnx.to_pure_dict(state))


class TrainCheckpointer:
    """Orbax CheckpointManager for the trainer: async, keeps `keep` checkpoints, one every `every_steps`."""

    def __init__(self, directory: str | Path, *, keep: int, every_steps: int, use_async: bool = True):
        self.directory = as_path(directory)  # local or gs:// (Orbax writes through TensorStore / epath)
        self.every_steps = max(1, int(every_steps))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=max(1, int(every_steps)),
            enable_async_checkpointing=use_async,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=("params", "opt_state", "data", "meta"), options=options
        )

    def all_steps(self) -> list[int]:
        """Finished checkpoint steps, oldest first."""
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def save(self, step: int, params: nnx.State, opt_state: nnx.State, data_state: Any, *, force: bool = False) -> bool:
        """Saves when `step` is on the interval (or `force`); returns whether a save started."""
        if not force and step % self.every_steps:
            return False
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(pure(params)),
            opt_state=ocp.args.StandardSave(pure(opt_state)),
            data=DataStateSave(data_state),
            meta=ocp.args.JsonSave({"step": int(step)}),
        )
        return bool(self.manager.save(step, args=args, force=True))

    def restore_latest(self, params: nnx.State, opt_state: nnx.State) -> Restored | None:
        """Restores the newest readable checkpoint into the shardings of `params` / `opt_state`.

        A checkpoint that fails to read (incomplete or corrupt) is skipped with a warning in favour of
        the previous one. Returns None when the directory holds no checkpoint; raises CheckpointError
        when checkpoints exist but none can be read.
        """
        steps = self.all_steps()
        if not steps:
            return None
        target_params, target_opt = abstract_pure(params), abstract_pure(opt_state)
        errors = []
        for step in reversed(steps):
            try:
                out = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        params=ocp.args.StandardRestore(target_params),
                        opt_state=ocp.args.StandardRestore(target_opt),
                        data=DataStateRestore(),
                        meta=ocp.args.JsonRestore(),
                    ),
                )
                if int(out["meta"]["step"]) != step:
                    raise CheckpointError(f"meta says step {out['meta']['step']}, directory says {step}")
                return Restored(step=step, params=out["params"], opt_state=out["opt_state"], data_state=out["data"])
            except Exception as e:  # noqa: BLE001 - any read failure means "try the previous one"
                log.warning("checkpoint %d in %s is unreadable (%s: %s); trying the previous one",
                            step, self.directory, type(e).__name__, str(e)[:300])
                errors.append(f"{step}: {type(e).__name__}")
        raise CheckpointError(f"no readable checkpoint in {self.directory} (tried {', '.join(errors)})")

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


# ---------------------------------------------------------------------------------------------------
# Workdirs: where the frozen weights come from, and rebuilding the trained model.
# ---------------------------------------------------------------------------------------------------


def write_run_info(workdir: str | Path, *, init_from: str, trainable: Sequence[str], extra: dict | None = None) -> None:
    """Records a workdir's base model (absolute path) and trainable patterns in DIR/run.json."""
    info = {"init_from": path_str(init_from), "trainable": list(trainable)}
    info.update(extra or {})
    atomic_write_json(as_path(workdir) / RUN_FILE, info)


def is_workdir(path: str | Path) -> bool:
    """True when `path` is a training workdir (has run.json)."""
    return (as_path(path) / RUN_FILE).is_file()


def trainable_filter(patterns: Sequence[str]) -> Any:
    """nnx filter: a Param whose '/'-joined path matches one of the regexes (re.search)."""
    compiled = [re.compile(p) for p in patterns]

    def matches(path: tuple, value: Any) -> bool:
        if not isinstance(value, nnx.Param):
            return False
        key = "/".join(str(k) for k in path)
        return any(c.search(key) for c in compiled)

    return matches


def load_base_model(path: str | Path, *, dtype: Any, param_dtype: Any) -> Any:
    """A model dir, an HF LLaVA dir or a workdir -> LoadedModel (workdirs: base + latest trainable weights)."""
    if is_workdir(path):
        return load_trained_model(path, dtype=dtype, param_dtype=param_dtype)
    from llava_jax.convert.model_dir import load_model

    return load_model(path, dtype=dtype, param_dtype=param_dtype)


def load_trained_model(workdir: str | Path, *, dtype: Any = None, param_dtype: Any = None, step: int | None = None) -> Any:
    """Rebuilds the trained model of a workdir: its base model plus the checkpoint's trainable weights.

    Returns the same LoadedModel(model, config, tokenizer, image_config) as `load_model_dir`. `step`
    picks a checkpoint (default: the newest readable one). Raises CheckpointError when the workdir has
    no run.json or no checkpoint.
    """
    import jax.numpy as jnp

    workdir = as_path(workdir)
    if not is_workdir(workdir):
        raise CheckpointError(f"{workdir} is not a training workdir (no {RUN_FILE})")
    info = read_json(workdir / RUN_FILE)
    dtype = dtype or jnp.float32
    param_dtype = param_dtype or jnp.float32
    loaded = load_base_model(info["init_from"], dtype=dtype, param_dtype=param_dtype)
    if info.get("lora"):  # a LoRA run: the adapters are in the checkpoint, the base has none (or the same ones)
        from llava_jax.models import lora

        lora.add_lora(loaded.model.language_model, lora.LoraSpec.from_json(info["lora"]))
    params = nnx.state(loaded.model, trainable_filter(info["trainable"]))
    _, restored = restore_params(workdir / CHECKPOINT_SUBDIR, params, step=step)
    nnx.replace_by_pure_dict(params, restored)
    nnx.update(loaded.model, params)
    return loaded


load_workdir_model = load_trained_model


def restore_params(ckpt_dir: str | Path, params: nnx.State, step: int | None = None) -> tuple[int, Any]:
    """Reads only the parameters of the newest readable checkpoint (or of `step`) in `ckpt_dir`.

    `params` gives the tree, shapes, dtypes and shardings. Returns (step, pure dict of arrays cast to the
    target dtypes) for `nnx.replace_by_pure_dict`; raises CheckpointError when no checkpoint can be read.
    """
    import jax.numpy as jnp

    ckpt_dir = as_path(ckpt_dir)
    manager = ocp.CheckpointManager(ckpt_dir, item_names=("params", "meta"),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        steps = sorted(manager.all_steps(), reverse=True)
        if step is not None:
            steps = [s for s in steps if s == step]
        if not steps:
            raise CheckpointError(f"no checkpoint in {ckpt_dir}" + (f" at step {step}" if step is not None else ""))
        target = abstract_pure(params)
        for s in steps:
            try:
                out = manager.restore(s, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
                break
            except Exception as e:  # noqa: BLE001
                log.warning("checkpoint %d in %s is unreadable (%s); trying the previous one", s, ckpt_dir, e)
        else:
            raise CheckpointError(f"no readable checkpoint in {ckpt_dir}")
    finally:
        manager.close()
    return s, jax.tree.map(lambda a, t: jnp.asarray(a, dtype=t.dtype), out["params"], target)
