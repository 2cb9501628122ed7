"""The LLaVA trainer: one readable loop for stage 1 (projector) and stage 2 (projector + LLM).

    python -m llava_jax.train --config=configs/finetune.py:demo --workdir=runs/demo/stage2 \
        [--config.optimizer.lr=1e-4 ...]

Bannered sections, in the order they run: mesh -> model -> data -> shard -> step -> checkpoint -> loop -> eval.
The workdir receives metrics.jsonl, TensorBoard events (tb/), checkpoints/ (trainable parameters,
optimizer state, step and data-iterator state), run.json (where the frozen weights come from) and, for
configs with an eval file, eval.json. Rerunning the same command resumes from the latest checkpoint.
The workdir, init_from, data file and image root may be gs:// paths (llava_jax.io). On a multi-host TPU slice
every host runs the same command; jax.distributed starts by itself and the workdir must be one every host sees
(llava_jax.multihost).
With `lora.rank` > 0 (configs/finetune.py:*_lora) the language model gets LoRA adapters (llava_jax.models.lora)
before the split: they and the projector train, the base stays frozen (optionally in bf16, `lora.base_dtype`),
and run.json records the adapters' spec so the workdir rebuilds (and `convert to-hf` merges) them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from llava_jax import checkpoint as ckpt
from llava_jax import cli, host_memory, multihost, sharding
from llava_jax import metrics as train_metrics
from llava_jax.io import as_path
from llava_jax.loss import IGNORE_INDEX, llava_loss
from llava_jax.models import lora as lora_lib
from llava_jax.train_config import ConfigError, check_attention_impl, dtype_of

log = logging.getLogger("llava_jax.train")

BATCH_KEYS = ("input_ids", "labels", "attention_mask", "pixel_values", "has_image")
PACKED_KEYS = (*BATCH_KEYS, "segment_ids", "positions")  # data.packing: see llava_jax.data.pipeline


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def banner(title: str) -> None:
    """Prints a section banner (process 0 only)."""
    if jax.process_index() == 0:
        print(f"\n==== {title} " + "=" * max(0, 90 - len(title)), flush=True)


def info(msg: str) -> None:
    """Prints a line on process 0."""
    if jax.process_index() == 0:
        print(msg, flush=True)


# ===================================================================================================
# mesh
# ===================================================================================================


def maybe_initialize_distributed(cfg: ml_collections.ConfigDict) -> None:
    """Calls jax.distributed.initialize when configured (flags or the usual JAX_* environment) or on a multi-host
    TPU slice (llava_jax.multihost)."""
    multihost.maybe_initialize_distributed(cfg.distributed)


# ===================================================================================================
# data
# ===================================================================================================


class RandomBatches:
    """Fixed-shape random batches (token ids, labels, images) for ahead-of-time compiles and benchmarks.

    Deterministic per (seed, step); `get_state` / `set_state` hold the step, so resume is exact.
    Batch arrays: input_ids/labels/attention_mask [B, T] int32, pixel_values [B, S, S, 3] f32, has_image [B].
    """

    def __init__(self, batch: int, length: int, image_size: int, vocab: int, image_token_id: int,
                 num_image_tokens: int, seed: int):
        self.batch, self.length, self.image_size = batch, length, image_size
        self.vocab, self.image_token_id, self.num_image_tokens = vocab, image_token_id, num_image_tokens
        self.seed, self.step = seed, 0

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        # The global batch is drawn from (seed, step) and each process keeps rows p::P, so the global
        # batch holds the same examples whatever the process count.
        rng = np.random.default_rng([self.seed, self.step])
        self.step += 1
        procs, rows = jax.process_count(), slice(jax.process_index(), None, jax.process_count())
        b = self.batch * procs
        ids = rng.integers(3, self.vocab, size=(b, self.length), dtype=np.int32)
        ids[ids == self.image_token_id] = 3
        ids[:, 1 : 1 + self.num_image_tokens] = self.image_token_id
        labels = ids.copy()
        labels[:, : 1 + self.num_image_tokens] = IGNORE_INDEX
        batch = {
            "input_ids": ids,
            "labels": labels,
            "attention_mask": np.ones_like(ids),
            "pixel_values": rng.standard_normal((b, self.image_size, self.image_size, 3), dtype=np.float32),
            "has_image": np.ones((b,), dtype=bool),
        }
        return {k: v[rows] for k, v in batch.items()}

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])


def make_train_iterator(cfg: ml_collections.ConfigDict, loaded: Any, per_process_batch: int) -> tuple[Any, int]:
    """Returns (iterator with get_state/set_state, number of training examples or -1 when unbounded)."""
    if cfg.data.source == "random":
        if cfg.data.packing:
            raise ConfigError("data.packing needs data.source=llava_json (random batches are not packed)")
        mcfg = loaded.config
        it = RandomBatches(per_process_batch, cfg.data.max_length, mcfg.vision.image_size, mcfg.text.vocab_size,
                           mcfg.image_token_id, mcfg.num_image_tokens, cfg.seed)
        return it, -1
    if cfg.data.source != "llava_json":
        raise ConfigError(f"unknown data.source {cfg.data.source!r} (llava_json | random)")
    if not cfg.data.train_file:
        raise ConfigError("data.train_file is empty: set --config.data.train_file=FILE")
    from llava_jax.data import pipeline

    if cfg.data.packing and cfg.data.pack_rows % cfg.batch_size:
        raise ConfigError(f"data.pack_rows {cfg.data.pack_rows} is not a multiple of batch_size {cfg.batch_size}")
    data_cfg = {
        "data": cfg.data.train_file,
        "image_root": cfg.data.image_root,
        "template": cfg.data.template,
        "max_length": cfg.data.max_length,
        "buckets": list(cfg.data.bucket_lengths) or None,
        "shuffle": cfg.data.shuffle,
        "num_workers": cfg.data.num_workers,
        "max_skip_fraction": cfg.data.max_skip_fraction,
        "packing": bool(cfg.data.packing),
        "pack_rows": cfg.data.pack_rows * per_process_batch // cfg.batch_size if cfg.data.pack_rows else 0,
        "max_images_per_row": cfg.data.max_images_per_row,
    }
    num_examples = len(pipeline.build_dataset(dict(data_cfg, num_epochs=1), seed=cfg.seed))
    image_config = dataclasses.replace(loaded.image_config, aspect=cfg.data.aspect)
    it = pipeline.make_train_iterator(
        dict(data_cfg, num_epochs=None),
        loaded.tokenizer,
        image_config,
        loaded.config.num_image_tokens,
        loaded.config.image_token_id,
        per_process_batch * jax.process_count(),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        seed=cfg.seed,
    )
    return it, num_examples


def to_global_batch(batch: dict[str, np.ndarray], shardings: dict[str, Any]) -> dict[str, jax.Array]:
    """Per-process numpy slices -> global jax.Arrays laid out by `shardings` (batch axis over data); the keys
    are those of `shardings` (BATCH_KEYS, or PACKED_KEYS for packed batches)."""
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(batch[k])) for k in shardings}


# ===================================================================================================
# model
# ===================================================================================================


def load_model(cfg: ml_collections.ConfigDict) -> Any:
    """The starting model: a model dir, or an earlier workdir (its base plus its trained weights)."""
    if not cfg.init_from:
        raise ConfigError("init_from is empty: give a model dir (convert compose) or a stage-1 workdir")
    if not as_path(cfg.init_from).exists():
        raise ConfigError(f"init_from {cfg.init_from!r} does not exist")
    return ckpt.load_base_model(cfg.init_from, dtype=dtype_of(cfg.model.dtype),
                                param_dtype=dtype_of(cfg.model.param_dtype))


def prepare_lora(model: Any, cfg: ml_collections.ConfigDict, trainable: Any) -> lora_lib.LoraSpec | None:
    """Adds the config's LoRA adapters to the language model (seeded by cfg.seed; kept when the model already
    has the same ones) and, with `lora.base_dtype`, casts the frozen parameters to that dtype. Returns the
    model's LoraSpec (None without adapters). Works on concrete and abstract (eval_shape) models."""
    try:
        spec = lora_lib.spec_from_config(cfg.lora)
    except lora_lib.LoraConfigError as e:
        raise ConfigError(str(e)) from None
    if spec is not None:
        try:
            lora_lib.add_lora(model.language_model, spec, seed=cfg.seed)
        except lora_lib.LoraConfigError as e:
            raise ConfigError(f"init_from {cfg.init_from}: {e}") from None
        adapters = nnx.state(model, lambda path, v: isinstance(v, nnx.Param) and "_lora_" in str(path[-1]))
        untrained = [path_key(p) for p, v in nnx.to_flat_state(adapters) if not trainable(p, v)]
        if untrained:
            raise ConfigError(f"LoRA is on but the trainable patterns {list(cfg.trainable)} leave the adapters "
                              f"{untrained[:3]} frozen; add '_lora_[ab]$'")
    if cfg.lora.base_dtype:
        dtype = dtype_of(cfg.lora.base_dtype)
        frozen = nnx.state(model, nnx.All(nnx.Param, nnx.Not(trainable)))
        nnx.update(model, jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                       frozen))
    return lora_lib.lora_spec_of(model)


def count_params(state: nnx.State) -> int:
    """Number of scalars in a state."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))


# ===================================================================================================
# step
# ===================================================================================================


def path_key(path: tuple) -> str:
    """jax key path -> 'a/b/c'."""
    parts = []
    for p in path:
        for attr in ("key", "name", "idx"):
            if hasattr(p, attr):
                parts.append(str(getattr(p, attr)))
                break
        else:
            parts.append(str(p))
    return "/".join(parts)


def lr_schedule(cfg: ml_collections.ConfigDict, peak: float, total_steps: int) -> optax.Schedule:
    """Warmup (ceil(ratio * total) steps, linear from 0) then cosine / linear decay to 0, or constant."""
    o = cfg.optimizer
    warmup = int(math.ceil(o.warmup_ratio * total_steps))
    if o.schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.constant_schedule(peak)],
                                    [warmup]) if warmup else optax.constant_schedule(peak)
    decay = max(total_steps - warmup, 1)
    if o.schedule == "cosine":
        tail = optax.cosine_decay_schedule(peak, decay)
    elif o.schedule == "linear":
        tail = optax.linear_schedule(peak, 0.0, decay)
    else:
        raise ConfigError(f"unknown optimizer.schedule {o.schedule!r} (cosine | linear | constant)")
    if not warmup:
        return tail
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), tail], [warmup])


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation, Callable]:
    """AdamW with global-norm clipping; the projector may get its own peak learning rate.

    Returns (tx, schedule of the main group) - the schedule is for logging.
    """
    o = cfg.optimizer
    main = lr_schedule(cfg, o.lr, total_steps)

    def adamw(schedule: optax.Schedule) -> optax.GradientTransformation:
        return optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                           mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))

    if o.projector_lr and o.projector_lr > 0:
        pattern = re.compile(cfg.projector_pattern)

        def labels(params: Any) -> Any:
            return jax.tree_util.tree_map_with_path(
                lambda path, _: "projector" if pattern.search(path_key(path)) else "main", params)

        inner = optax.multi_transform(
            {"projector": adamw(lr_schedule(cfg, o.projector_lr, total_steps)), "main": adamw(main)}, labels)
    else:
        inner = adamw(main)
    parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip and o.grad_clip > 0 else []
    return optax.chain(*parts, inner), main


def set_runtime_options(model: Any, *, remat: str, attention_impl: str | None) -> None:
    """Sets the remat policy name and attention implementation on every submodule that has them."""
    for _, module in nnx.iter_modules(model):
        if hasattr(module, "remat"):
            module.remat = None if remat == "none" else remat
        if attention_impl and hasattr(module, "attention_impl"):
            module.attention_impl = attention_impl


@dataclasses.dataclass
class StepParts:
    """The split model / optimizer the jitted step works on."""

    graphdef: Any
    opt_graphdef: Any
    params: nnx.State  # trainable (donated, returned)
    frozen: nnx.State  # frozen parameters (read only)
    rest: nnx.State  # any non-parameter state of the model (read only)
    opt_state: nnx.State  # donated, returned


def split_for_training(model: Any, tx: optax.GradientTransformation, trainable: Any) -> StepParts:
    """Builds nnx.Optimizer(model, tx, wrt=trainable) and splits model and optimizer states."""
    return split_parts(model, nnx.Optimizer(model, tx, wrt=trainable), trainable)


def split_parts(model: Any, optimizer: nnx.Optimizer, trainable: Any) -> StepParts:
    """Splits a model (trainable / frozen params / other state) and its optimizer (also abstract ones)."""
    opt_graphdef, opt_state = nnx.split(optimizer)
    graphdef, params, frozen, rest = nnx.split(model, trainable, nnx.Param, ...)
    return StepParts(graphdef, opt_graphdef, params, frozen, rest, opt_state)


def make_step_fn(parts: StepParts, *, accum: int, batch_constraint: Callable | None = None,
                 loss_budget: float | None = 0.5, loss_chunk: int = 0, dropout_seed: int | None = None) -> Callable:
    """The pure train step: (params, opt_state, frozen, rest, batch) -> (params, opt_state, metrics).

    Gradients are summed over `accum` micro-batches (lax.scan) and divided by the total count of
    supervised tokens, so accum x micro-batch equals one batch of the same global size. The batch's
    leading axis B is split as [B / accum, accum] so every micro-batch spans all data shards.
    The loss is `llava_jax.loss.llava_loss` (supervised positions only; `loss_budget` / `loss_chunk`).
    With `dropout_seed` the LoRA dropout key of each step is fold_in(key(dropout_seed), optimizer step count)
    (split per micro-batch), so a resumed run draws the same masks.
    metrics: loss (mean per token), tokens, grad_norm, all scalars.
    """
    graphdef, opt_graphdef = parts.graphdef, parts.opt_graphdef

    def micro_loss(params: nnx.State, frozen: nnx.State, rest: nnx.State, micro: dict) -> tuple[jax.Array, jax.Array]:
        model = nnx.merge(graphdef, params, frozen, rest)
        return llava_loss(model, micro, budget_fraction=loss_budget, chunk=loss_chunk)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step(params, opt_state, frozen, rest, batch):
        key = None
        if dropout_seed is not None:
            count = nnx.merge(opt_graphdef, opt_state).step[...]
            key = jax.random.fold_in(jax.random.key(dropout_seed), count)
        if accum == 1:
            if key is not None:
                batch = dict(batch, lora_key=key)
            (loss_sum, count), grads = grad_fn(params, frozen, rest, batch)
        else:
            def split(x: jax.Array) -> jax.Array:
                y = x.reshape((x.shape[0] // accum, accum) + x.shape[1:])
                y = jnp.swapaxes(y, 0, 1)
                return batch_constraint(y) if batch_constraint is not None else y

            micro_batches = {k: split(v) for k, v in batch.items()}
            if key is not None:
                micro_batches["lora_key"] = jax.random.split(key, accum)

            def body(carry, micro):
                g_acc, l_acc, c_acc = carry
                (loss_i, count_i), g = grad_fn(params, frozen, rest, micro)
                return (jax.tree.map(jnp.add, g_acc, g), l_acc + loss_i, c_acc + count_i), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            (grads, loss_sum, count), _ = jax.lax.scan(body, (zeros, jnp.float32(0), jnp.float32(0)), micro_batches)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        model = nnx.merge(graphdef, params, frozen, rest)
        optimizer = nnx.merge(opt_graphdef, opt_state)
        optimizer.update(model, grads)
        new_params = nnx.state(model, _same_paths(params))
        metrics = {"loss": loss_sum / denom, "tokens": count, "grad_norm": optax.global_norm(grads)}
        return new_params, nnx.state(optimizer), metrics

    return step


def _same_paths(state: nnx.State) -> Callable:
    """nnx filter selecting exactly the paths present in `state`."""
    paths = {tuple(p) for p, _ in nnx.to_flat_state(state)}

    def f(path: tuple, value: Any) -> bool:
        return tuple(path) in paths

    return f


def jit_step(step: Callable, parts: StepParts, mesh: jax.sharding.Mesh, rules: sharding.Rules,
             batch_shardings: dict) -> tuple[Callable, Any, Any]:
    """jax.jit with explicit in/out shardings; params and optimizer state donated.

    Returns (jitted step, params shardings, opt-state shardings).
    """
    p_sh = sharding.state_shardings(parts.params, mesh, rules)
    o_sh = sharding.state_shardings(parts.opt_state, mesh, rules)
    f_sh = sharding.state_shardings(parts.frozen, mesh, rules)
    r_sh = sharding.state_shardings(parts.rest, mesh, rules)
    rep = sharding.replicated(mesh)
    metric_sh = {"loss": rep, "tokens": rep, "grad_norm": rep}

    def with_rules(*args):
        with sharding.axis_rules(rules):
            return step(*args)

    jitted = jax.jit(with_rules, in_shardings=(p_sh, o_sh, f_sh, r_sh, batch_shardings),
                     out_shardings=(p_sh, o_sh, metric_sh), donate_argnums=(0, 1))
    return jitted, p_sh, o_sh


def batch_shardings_for(mesh: jax.sharding.Mesh, rules: sharding.Rules, packed: bool = False) -> dict[str, Any]:
    """Shardings of the batch dict: the leading (batch) axis over the 'batch' rule. packed: the keys and
    ranks of packed batches (segment_ids, positions; image slots pixel_values [B, M, H, W, 3], has_image
    [B, M])."""
    ndims = {"pixel_values": 5, "has_image": 2} if packed else {"pixel_values": 4, "has_image": 1}
    return {k: sharding.data_sharding(mesh, ndims.get(k, 2), rules) for k in (PACKED_KEYS if packed else BATCH_KEYS)}


def images_per_row(cfg: ml_collections.ConfigDict, num_image_tokens: int) -> int:
    """Image slots per row of a batch: 1 unpacked; with data.packing, data.max_images_per_row or as many
    images as max_length holds (at least 1)."""
    if not cfg.data.packing:
        return 1
    return int(cfg.data.max_images_per_row) or max(1, cfg.data.max_length // int(num_image_tokens))


def micro_batch_constraint(mesh: jax.sharding.Mesh, rules: sharding.Rules) -> Callable:
    """Constraint for stacked micro-batches [accum, B / accum, ...]: the second axis over the 'batch' rule."""

    def constrain(y: jax.Array) -> jax.Array:
        spec = jax.sharding.PartitionSpec(None, *sharding.data_sharding(mesh, y.ndim - 1, rules).spec)
        return jax.lax.with_sharding_constraint(y, jax.sharding.NamedSharding(mesh, spec))

    return constrain


def place(state: nnx.State, shardings: Any) -> nnx.State:
    """device_put every leaf of `state` with its sharding."""
    return jax.device_put(state, shardings)


# ===================================================================================================
# eval
# ===================================================================================================


# ===================================================================================================
# the trainer
# ===================================================================================================


class _Preemption:
    """SIGTERM sets a flag; the loop saves a checkpoint and exits 0 at the next step boundary."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = None

    def install(self) -> None:
        def handler(signum, frame):
            self.requested = True

        self.previous = signal.signal(signal.SIGTERM, handler)

    def uninstall(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def total_steps_for(cfg: ml_collections.ConfigDict, num_examples: int) -> int:
    """Optimizer steps: max_steps when > 0, else num_epochs x examples / global batch (at least 1)."""
    if cfg.max_steps > 0:
        return int(cfg.max_steps)
    if num_examples <= 0:
        raise ConfigError("the data source has no length: set max_steps")
    return max(1, int(math.ceil(cfg.num_epochs * num_examples / cfg.batch_size)))


def train(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Runs (or resumes) training into `workdir` (local or gs://); returns a summary dict (steps, last loss,
    eval)."""
    workdir = as_path(workdir)
    if cfg.batch_size % cfg.grad_accum_steps:
        raise ConfigError(f"batch_size {cfg.batch_size} does not divide by grad_accum_steps {cfg.grad_accum_steps}")
    check_attention_impl(cfg)
    try:
        lora_lib.spec_from_config(cfg.lora)  # a bad LoRA setting fails before any model is loaded
    except lora_lib.LoraConfigError as e:
        raise ConfigError(str(e)) from None

    maybe_initialize_distributed(cfg)  # before anything touches the XLA backend (even jax.process_index)
    if cfg.model.attention_impl == "flash_tpu" and jax.default_backend() != "tpu":
        raise ConfigError(f"model.attention_impl 'flash_tpu' runs on TPU only (this backend: {jax.default_backend()}); "
                          f"pass --config.model.attention_impl=cudnn on GPU or xla elsewhere")
    banner("mesh")
    mesh = sharding.make_mesh(cfg.mesh)
    rules = sharding.rules_from_config(cfg.axis_rules)
    info(f"{sharding.describe(mesh)}; processes {jax.process_count()} (this is {jax.process_index()})")
    if jax.process_count() > 1:  # several processes write one checkpoint: all must see the workdir
        workdir.mkdir(parents=True, exist_ok=True)
        multihost.check_shared_workdir(workdir)
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = cfg.batch_size // cfg.grad_accum_steps
    if micro % batch_shards:
        raise ConfigError(f"micro-batch {micro} does not divide over data x fsdp = {batch_shards} shards")
    if cfg.batch_size % jax.process_count():
        raise ConfigError(f"batch_size {cfg.batch_size} does not divide over {jax.process_count()} processes")
    per_process_batch = cfg.batch_size // jax.process_count()

    banner("model")
    t0 = time.time()
    loaded = load_model(cfg)
    model = loaded.model
    set_runtime_options(model, remat=cfg.model.remat, attention_impl=cfg.model.attention_impl or None)
    trainable = ckpt.trainable_filter(cfg.trainable)
    lora_spec = prepare_lora(model, cfg, trainable)
    if lora_spec is not None:
        info(f"LoRA on {list(lora_spec.targets)}: rank {lora_spec.rank}, alpha {lora_spec.alpha:g}, dropout "
             f"{lora_spec.dropout:g}; base weights held in {cfg.lora.base_dtype or cfg.model.param_dtype}")
    n_total = count_params(nnx.state(model, nnx.Param))
    n_train = count_params(nnx.state(model, trainable))
    if n_train == 0:
        raise ConfigError(f"no parameter matches the trainable patterns {list(cfg.trainable)}")
    info(f"loaded {cfg.init_from} in {time.time() - t0:.1f}s: {n_total:,} parameters, {n_train:,} trainable "
         f"({list(cfg.trainable)}), compute {cfg.model.dtype}, params {cfg.model.param_dtype}, remat {cfg.model.remat}")

    banner("data")
    train_iter, num_examples = make_train_iterator(cfg, loaded, per_process_batch)
    total_steps = total_steps_for(cfg, num_examples)
    info(f"source {cfg.data.source} {cfg.data.train_file}: {num_examples if num_examples >= 0 else 'unbounded'} "
         f"examples; global batch {cfg.batch_size} = {cfg.grad_accum_steps} x {micro}; {total_steps} steps")

    banner("shard")
    tx, schedule = make_optimizer(cfg, total_steps)
    with jax.set_mesh(mesh):
        parts = split_for_training(model, tx, trainable)
    del model
    batch_shardings = batch_shardings_for(mesh, rules, packed=bool(cfg.data.packing))
    p_sh = sharding.state_shardings(parts.params, mesh, rules)
    params = place(parts.params, p_sh)
    opt_state = place(parts.opt_state, sharding.state_shardings(parts.opt_state, mesh, rules))
    frozen = place(parts.frozen, sharding.state_shardings(parts.frozen, mesh, rules))
    rest = place(parts.rest, sharding.state_shardings(parts.rest, mesh, rules))
    sharded = sum(1 for s in jax.tree.leaves(p_sh) if any(a is not None for a in s.spec))
    info(f"params {count_params(params):,} trainable ({sharded}/{len(jax.tree.leaves(p_sh))} arrays sharded) / "
         f"{count_params(frozen):,} frozen, placed by {len(rules)} rules")

    banner("step")
    step_fn = make_step_fn(parts, accum=cfg.grad_accum_steps, batch_constraint=micro_batch_constraint(mesh, rules),
                           loss_budget=cfg.model.loss_budget or None, loss_chunk=cfg.model.loss_chunk,
                           dropout_seed=cfg.seed if lora_spec is not None and lora_spec.dropout > 0 else None)
    jitted, _, _ = jit_step(step_fn, parts, mesh, rules, batch_shardings)
    with jax.set_mesh(mesh):
        flops_per_step = train_metrics.model_flops_per_step(
            loaded.config, cfg.batch_size, cfg.data.max_length, train_metrics.trained_parts(params),
            images_per_row=images_per_row(cfg, loaded.config.num_image_tokens))
    info(f"jit: donated params + optimizer state; grad accumulation {cfg.grad_accum_steps}; "
         f"{flops_per_step / 1e9:.2f} model GFLOP per step at length {cfg.data.max_length}")

    banner("checkpoint")
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        ckpt.write_run_info(workdir, init_from=cfg.init_from, trainable=list(cfg.trainable),
                            extra={"stage": cfg.stage, "config": json.loads(cfg.to_json_best_effort()),
                                   "lora": lora_spec.to_json() if lora_spec is not None else None})
    checkpointer = ckpt.TrainCheckpointer(workdir / ckpt.CHECKPOINT_SUBDIR, keep=cfg.checkpoint.keep,
                                          every_steps=cfg.checkpoint.every_steps, use_async=cfg.checkpoint.use_async)
    start_step = 0
    restored = checkpointer.restore_latest(params, opt_state)
    if restored is not None:
        nnx.replace_by_pure_dict(params, restored.params)
        nnx.replace_by_pure_dict(opt_state, restored.opt_state)
        train_iter.set_state(restored.data_state)
        start_step = restored.step
        info(f"resumed from step {start_step} in {checkpointer.directory}")
    else:
        info(f"no checkpoint in {checkpointer.directory}: starting at step 0")
    writer = train_metrics.MetricWriter(workdir)
    writer.truncate_after(start_step)

    banner("loop")
    preempt = _Preemption()
    preempt.install()
    peak = train_metrics.peak_flops(cfg.peak_tflops_per_device)
    pending: list[tuple[int, dict]] = []
    last_loss = float("nan")
    step = start_step
    t_interval = t_start = time.time()
    finished = False
    try:
        with jax.set_mesh(mesh):
            while step < total_steps:
                host_batch = next(train_iter)
                batch_tokens = float(np.sum(host_batch["attention_mask"])) * jax.process_count()
                batch = to_global_batch(host_batch, batch_shardings)
                params, opt_state, metrics = jitted(params, opt_state, frozen, rest, batch)
                step += 1
                if step == cfg.debug.fail_at_step:
                    metrics = dict(metrics, loss=jnp.float32(jnp.nan))
                pending.append((step, metrics, batch_tokens))
                if cfg.debug.step_sleep_s > 0:
                    time.sleep(cfg.debug.step_sleep_s)
                save_due = step % checkpointer.every_steps == 0 or step == total_steps or preempt.requested
                if step % cfg.log_every == 0 or save_due:
                    # Losses are checked before any checkpoint is written, so none ever holds NaN weights.
                    host = [(s, jax.device_get(m), n) for s, m, n in pending]
                    pending.clear()
                    for s, m, _ in host:
                        if not np.isfinite(m["loss"]):
                            raise TrainingDiverged(f"loss is {float(m['loss'])} at step {s}: stopping "
                                                   f"(last checkpoint: {checkpointer.all_steps()[-1:] or 'none'})")
                    now = time.time()
                    last_loss = float(host[-1][1]["loss"])
                    row = train_metrics.metrics_row(step, host, schedule, now - t_interval, flops_per_step, peak)
                    writer.write(row)
                    if cfg.progress:
                        eta = (now - t_start) / max(step - start_step, 1) * (total_steps - step)
                        info(f"step {step}/{total_steps} loss {last_loss:.4f} lr {row['lr']:.2e} "
                             f"gnorm {row['grad_norm']:.3f} {row['tokens_per_s']:.0f} tok/s "
                             f"{row['step_time_s']:.3f}s/step" + (f" MFU {row['mfu']:.1%}" if "mfu" in row else "")
                             + f" ETA {train_metrics.fmt_duration(eta)}")
                    t_interval = time.time()
                if save_due:
                    checkpointer.save(step, params, opt_state, train_iter.get_state(), force=True)
                if preempt.requested:
                    info(f"SIGTERM: saving step {step} and exiting")
                    return {"steps": step, "loss": last_loss, "preempted": True}
        finished = True
    finally:
        preempt.uninstall()
        checkpointer.close()
        writer.close()
        if not finished and hasattr(train_iter, "close"):
            train_iter.close()
    summary: dict[str, Any] = {"steps": step, "loss": last_loss, "preempted": False}

    banner("eval")
    if cfg.eval.file:
        model = nnx.merge(parts.graphdef, params, frozen, rest)
        from llava_jax.eval.heldout import evaluate_heldout

        result = evaluate_heldout(model, loaded, cfg.eval, template=cfg.data.template)
        if jax.process_index() == 0:
            from llava_jax.io import atomic_write_json

            atomic_write_json(workdir / "eval.json", result)
        info(f"eval on {cfg.eval.file}: {json.dumps(result)}")
        summary["eval"] = result
    else:
        info("no eval.file configured")
    return summary


# ===================================================================================================
# CLI
# ===================================================================================================


def main(argv: list[str]) -> None:
    from absl import flags

    cfg = flags.FLAGS.config
    workdir = flags.FLAGS.workdir
    logging.basicConfig(level=logging.INFO if flags.FLAGS.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    for name in ("absl", "orbax", "jax._src", "gcsfs", "fsspec"):  # Orbax's / gcsfs's informational lines
        logging.getLogger(name).setLevel(logging.ERROR)
    from llava_jax.data.pipeline import SkipCeilingExceededError
    from llava_jax.data.sources import DataFileError

    try:
        host_memory.retain_freed_memory(cfg.host_memory)  # before anything initialises JAX's backend
        summary = train(cfg, workdir)
    except (ConfigError, sharding.MeshConfigError, DataFileError, host_memory.HostMemoryError) as e:
        sys.exit(cli.report(e))  # a bad config or data argument: exit code 2
    except (TrainingDiverged, ckpt.CheckpointError, SkipCeilingExceededError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    info(f"done: {json.dumps(summary)}")


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "configs/finetune.py[:variant]", lock_config=True)
    flags.DEFINE_string("workdir", None, "output directory (metrics, checkpoints, eval)")
    flags.DEFINE_bool("verbose", False, "INFO logging")
    flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
    _define_flags()
    cli.absl_run(main)

