"""Contrastive CLIP training: both towers of our Flax CLIPModel on image-caption pairs.

    python -m llava_jax.clip_train --config=configs/clip.py:synthetic --workdir=runs/clip \
        [--config.data.captions=FILE --config.data.image_root=DIR --config.init_from=HF_CLIP_DIR ...]
    python -m llava_jax.convert clip-to-hf runs/clip OUT_DIR     # an HF CLIPModel dir for selection / compose

Bannered sections, in the order they run: mesh -> model -> data -> shard -> step -> checkpoint -> loop -> eval.
The loss is CLIP's symmetric InfoNCE over the global batch: cross-entropy of each image against every caption
and of each caption against every image, logits = exp(logit_scale) x cosine, with the learned logit scale
clamped to [0, log 100] after every step. AdamW (matrices decayed) with warmup + cosine, from a random init
(a CLIP-style BPE is trained on the training captions) or from an HF CLIP directory (`init_from`).

The workdir receives init/ (the starting model as an HF CLIP directory, for a random init), run.json,
checkpoints/ (parameters, optimizer state, step and the data position), metrics.jsonl, TensorBoard events (tb/)
and eval.json: image-to-caption and caption-to-image retrieval over the held-out images
{"i2t_top1", "t2i_top1", "i2t_top5", "t2i_top5", "chance", "n", "step"}. Rerunning resumes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from llava_jax import checkpoint as ckpt
from llava_jax import cli, host_memory, sharding
from llava_jax import metrics as train_metrics
from llava_jax.convert.clip_export import CLIP_RUN_KIND, save_hf_clip
from llava_jax.data import clip_pairs
from llava_jax.models.clip import CLIPModel, CLIPTextConfig, CLIPVisionConfig
from llava_jax.train import (
    StepParts,
    _Preemption,
    banner,
    count_params,
    info,
    make_optimizer,
    maybe_initialize_distributed,
    place,
    split_for_training,
)
from llava_jax.train_config import ConfigError, dtype_of

log = logging.getLogger("llava_jax.clip_train")

BATCH_KEYS = ("input_ids", "attention_mask", "pixel_values")
INIT_SUBDIR = "init"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


# ===================================================================================================
# loss
# ===================================================================================================


def contrastive_loss(logits_per_text: jax.Array) -> jax.Array:
    """CLIP's symmetric InfoNCE: logits_per_text [B, B] (caption i vs image j, matches on the diagonal) ->
    mean of the caption->image and image->caption cross-entropies, a scalar."""
    labels = jnp.arange(logits_per_text.shape[0])
    logits = logits_per_text.astype(jnp.float32)
    per_text = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    per_image = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
    return 0.5 * (per_text + per_image)


def clip_loss(model: CLIPModel, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(loss scalar, logits_per_text [B, B]) of a batch {input_ids [B, T], attention_mask [B, T],
    pixel_values [B, S, S, 3]}."""
    _, per_text = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
    return contrastive_loss(per_text), per_text


# ===================================================================================================
# model
# ===================================================================================================


def _captions_for_tokenizer(pairs: Sequence[clip_pairs.ImageCaptions]) -> list[str]:
    return [c for p in pairs for c in p.captions]


def build_or_load_model(cfg: ml_collections.ConfigDict, workdir: Path,
                        train_pairs: Sequence[clip_pairs.ImageCaptions]) -> tuple[CLIPModel, Any, Any, Path]:
    """The starting model: `init_from` (an HF CLIP dir), or a random init written once to WORKDIR/init
    (reused on resume, so the tokenizer never changes under a checkpoint).

    Returns (model, tokenizer, ImageConfig, the directory the starting model lives in)."""
    from llava_jax.convert.model_dir import load_clip
    from llava_jax.convert.safetensors_io import CheckpointFormatError
    from llava_jax.data.images import ImageConfig
    from llava_jax.tiny import build_clip_tokenizer

    dtype, param_dtype = dtype_of(cfg.model.dtype), dtype_of(cfg.model.param_dtype)
    init_dir = Path(cfg.init_from).absolute() if cfg.init_from else workdir / INIT_SUBDIR
    if cfg.init_from and not (init_dir / "config.json").is_file():
        raise ConfigError(f"init_from {cfg.init_from!r} is not a Hugging Face CLIP directory (no config.json)")
    if (init_dir / "config.json").is_file():
        try:
            model, tokenizer, image_config = load_clip(init_dir, dtype=dtype, param_dtype=param_dtype)
        except CheckpointFormatError as e:
            raise ConfigError(f"cannot load {init_dir} as a CLIP model: {e}") from e
        if tokenizer is None:
            raise ConfigError(f"{init_dir} holds no tokenizer; CLIP training needs the text tower's tokenizer")
        if image_config is None:
            side = model.vision_model.config.image_size
            image_config = ImageConfig(size=side, crop_size=side)
        return model, tokenizer, image_config, init_dir
    tokenizer = build_clip_tokenizer(_captions_for_tokenizer(train_pairs), vocab_size=cfg.model.tokenizer_vocab)
    proj = int(cfg.model.projection_dim)
    try:
        vision = CLIPVisionConfig(**cfg.model.vision.to_dict(), projection_dim=proj)
        text = CLIPTextConfig(**cfg.model.text.to_dict(), vocab_size=len(tokenizer), projection_dim=proj,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    except TypeError as e:
        raise ConfigError(f"model.vision / model.text: {e}") from e
    if vision.image_size % vision.patch_size or vision.hidden_size % vision.num_attention_heads \
            or text.hidden_size % text.num_attention_heads:
        raise ConfigError("model: image_size must divide by patch_size and hidden sizes by their head counts")
    model = CLIPModel(vision, text, proj, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(params=cfg.seed),
                      logit_scale_init=float(cfg.model.logit_scale_init))
    image_config = ImageConfig(size=vision.image_size, crop_size=vision.image_size)
    if jax.process_index() == 0:
        save_hf_clip(init_dir, model, tokenizer, image_config)
    return model, tokenizer, image_config, init_dir


# ===================================================================================================
# step
# ===================================================================================================


def make_step_fn(parts: StepParts, max_logit_scale: float) -> Callable:
    """The pure step: (params, opt_state, frozen, rest, batch) -> (params, opt_state, metrics).

    metrics: loss, grad_norm, logit_scale (exp of the clamped scale: the inverse temperature) and batch_acc
    (share of images whose own caption scores highest in the batch), all scalars.
    """
    graphdef, opt_graphdef = parts.graphdef, parts.opt_graphdef

    def loss_fn(params, frozen, rest, batch):
        return clip_loss(nnx.merge(graphdef, params, frozen, rest), batch)

    def step(params, opt_state, frozen, rest, batch):
        (loss, per_text), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, frozen, rest, batch)
        model = nnx.merge(graphdef, params, frozen, rest)
        optimizer = nnx.merge(opt_graphdef, opt_state)
        optimizer.update(model, grads)
        model.logit_scale.set_value(jnp.clip(model.logit_scale.get_value(), 0.0, max_logit_scale))
        acc = jnp.mean(jnp.argmax(per_text, axis=0) == jnp.arange(per_text.shape[0]))
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
                   "logit_scale": jnp.exp(model.logit_scale.get_value()), "batch_acc": acc}
        return nnx.state(model, nnx.Param), nnx.state(optimizer), metrics

    return step


def jit_step(step: Callable, parts: StepParts, mesh: jax.sharding.Mesh, rules: sharding.Rules) -> tuple[Callable, dict]:
    """jax.jit with explicit shardings (batch over data x fsdp); params and optimizer state donated.

    Returns (jitted step, batch shardings)."""
    p_sh = sharding.state_shardings(parts.params, mesh, rules)
    o_sh = sharding.state_shardings(parts.opt_state, mesh, rules)
    f_sh = sharding.state_shardings(parts.frozen, mesh, rules)
    r_sh = sharding.state_shardings(parts.rest, mesh, rules)
    b_sh = {k: sharding.data_sharding(mesh, 4 if k == "pixel_values" else 2, rules) for k in BATCH_KEYS}
    rep = sharding.replicated(mesh)
    m_sh = {k: rep for k in ("loss", "grad_norm", "logit_scale", "batch_acc")}

    def with_rules(*args):
        with sharding.axis_rules(rules):
            return step(*args)

    jitted = jax.jit(with_rules, in_shardings=(p_sh, o_sh, f_sh, r_sh, b_sh), out_shardings=(p_sh, o_sh, m_sh),
                     donate_argnums=(0, 1))
    return jitted, b_sh


# ===================================================================================================
# eval
# ===================================================================================================


def embed_pairs(model: CLIPModel, tokenizer: Any, loader: clip_pairs.ImageLoader, images: Sequence[str],
                texts: Sequence[str], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm embeddings (images [N, P], texts [M, P]) in fixed-size jitted batches (the last one padded)."""
    graphdef, state = nnx.split(model)
    context = model.text_model.config.max_position_embeddings

    @jax.jit
    def image_fn(state, pixels):
        return nnx.merge(graphdef, state).image_embeds(pixels).astype(jnp.float32)

    @jax.jit
    def text_fn(state, ids, mask):
        return nnx.merge(graphdef, state).text_embeds(ids, mask).astype(jnp.float32)

    def batched(n: int, make: Callable[[int, int], tuple], fn: Callable) -> np.ndarray:
        out = []
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            arrays = [np.concatenate([a, np.zeros((batch_size - count, *a.shape[1:]), a.dtype)]) for a in
                      make(start, count)]
            out.append(np.asarray(fn(state, *arrays))[:count])
        emb = np.concatenate(out)
        return emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)

    ids, mask = clip_pairs.tokenize(tokenizer, texts, context)
    img = batched(len(images), lambda s, c: (loader.load(images[s : s + c]),), image_fn)
    txt = batched(len(texts), lambda s, c: (ids[s : s + c], mask[s : s + c]), text_fn)
    return img, txt


def retrieval_metrics(image_emb: np.ndarray, text_emb: np.ndarray, texts: Sequence[str],
                      captions: Sequence[Sequence[str]], ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Retrieval over N held-out pairs (image i with texts[i]).

    Args:
      image_emb, text_emb: unit-norm embeddings [N, P].
      texts: the query caption of each image [N].
      captions: every caption of each image [N] -- a retrieved caption / image counts as right when its text
        is one of the query image's captions (identical scenes have identical captions).
    Returns:
      {"i2t_top{k}", "t2i_top{k}", "chance" (expected top-1 of a random ranking), "n"}.
    """
    n = len(texts)
    sim = image_emb @ text_emb.T  # [image, text]
    match = np.array([[texts[j] in set(captions[i]) for j in range(n)] for i in range(n)])
    out: dict[str, float] = {}
    for k in ks:
        top_t = np.argsort(-sim, axis=1)[:, :k]  # captions for each image
        top_i = np.argsort(-sim, axis=0)[:k, :].T  # images for each caption
        out[f"i2t_top{k}"] = float(np.mean([match[i, top_t[i]].any() for i in range(n)]))
        out[f"t2i_top{k}"] = float(np.mean([match[top_i[j], j].any() for j in range(n)]))
    out["chance"] = float(match.mean())
    out["n"] = n
    return out


def evaluate(model: CLIPModel, tokenizer: Any, loader: clip_pairs.ImageLoader,
             held: Sequence[clip_pairs.ImageCaptions], batch_size: int, seed: int) -> dict[str, float]:
    """Image-to-caption and caption-to-image retrieval over the held-out images, one drawn caption each."""
    texts = clip_pairs.holdout_captions(held, seed)
    img, txt = embed_pairs(model, tokenizer, loader, [p.image for p in held], texts, batch_size)
    return retrieval_metrics(img, txt, texts, [p.captions for p in held])


# ===================================================================================================
# the trainer
# ===================================================================================================


def total_steps_for(cfg: ml_collections.ConfigDict, num_pairs: int) -> int:
    """Optimizer steps: max_steps when > 0, else num_epochs x training images / global batch (at least 1)."""
    if cfg.max_steps > 0:
        return int(cfg.max_steps)
    return max(1, int(math.ceil(cfg.num_epochs * num_pairs / cfg.batch_size)))


def train(cfg: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Runs (or resumes) CLIP training into `workdir`; returns {"steps", "loss", "preempted", "eval"}."""
    workdir = Path(workdir).absolute()
    if cfg.batch_size < 2:
        raise ConfigError(f"batch_size {cfg.batch_size}: contrastive training needs at least 2 pairs per batch")
    if not cfg.data.captions:
        raise ConfigError("data.captions is empty: set --config.data.captions=FILE (COCO captions or LLaVA JSON)")
    if cfg.data.aspect not in ("pad", "crop"):
        raise ConfigError(f"data.aspect must be 'pad' or 'crop', got {cfg.data.aspect!r}")
    maybe_initialize_distributed(cfg)

    banner("mesh")
    mesh = sharding.make_mesh(cfg.mesh)
    rules = sharding.rules_from_config(cfg.axis_rules)
    info(f"{sharding.describe(mesh)}; processes {jax.process_count()} (this is {jax.process_index()})")
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.batch_size % shards or cfg.batch_size % jax.process_count():
        raise ConfigError(f"batch_size {cfg.batch_size} does not divide over {shards} data shards "
                          f"and {jax.process_count()} processes")

    banner("data")
    pairs = clip_pairs.read_sources(cfg.data.captions, cfg.data.image_root)
    train_pairs, held = clip_pairs.split_holdout(pairs, cfg.data.num_holdout, cfg.data.split_seed)
    total_steps = total_steps_for(cfg, len(train_pairs))
    info(f"{cfg.data.captions}: {len(pairs)} images, {sum(len(p.captions) for p in pairs)} captions; "
         f"{len(train_pairs)} train / {len(held)} held out; global batch {cfg.batch_size}; {total_steps} steps")

    banner("model")
    t0 = time.time()
    workdir.mkdir(parents=True, exist_ok=True)
    model, tokenizer, image_config, init_dir = build_or_load_model(cfg, workdir, train_pairs)
    image_config = dataclasses.replace(image_config, aspect=cfg.data.aspect)
    context = model.text_model.config.max_position_embeddings
    v, t = model.vision_model.config, model.text_model.config
    info(f"{'loaded ' + str(init_dir) if cfg.init_from else 'random init -> ' + str(init_dir)} in "
         f"{time.time() - t0:.1f}s: {count_params(nnx.state(model, nnx.Param)):,} parameters; vision "
         f"{v.num_hidden_layers}x{v.hidden_size} at {v.image_size}px/{v.patch_size}, text {t.num_hidden_layers}x"
         f"{t.hidden_size} over {t.vocab_size} tokens (context {context}), projection {model.projection_dim}")
    loader = clip_pairs.ImageLoader("", image_config, cfg.data.workers, cfg.data.cache_images)
    train_iter = clip_pairs.PairBatches(train_pairs, loader, tokenizer, context, cfg.batch_size, cfg.seed,
                                        jax.process_index(), jax.process_count())

    banner("shard")
    tx, schedule = make_optimizer(cfg, total_steps)
    with jax.set_mesh(mesh):
        parts = split_for_training(model, tx, nnx.Param)
    del model
    params = place(parts.params, sharding.state_shardings(parts.params, mesh, rules))
    opt_state = place(parts.opt_state, sharding.state_shardings(parts.opt_state, mesh, rules))
    frozen = place(parts.frozen, sharding.state_shardings(parts.frozen, mesh, rules))
    rest = place(parts.rest, sharding.state_shardings(parts.rest, mesh, rules))

    banner("step")
    jitted, batch_shardings = jit_step(make_step_fn(parts, float(cfg.model.max_logit_scale)), parts, mesh, rules)
    info(f"symmetric InfoNCE over the global batch; AdamW lr {cfg.optimizer.lr} {cfg.optimizer.schedule}, "
         f"weight decay {cfg.optimizer.weight_decay}; logit scale clamped at {cfg.model.max_logit_scale:.4f}")

    banner("checkpoint")
    if jax.process_index() == 0:
        ckpt.write_run_info(workdir, init_from=str(init_dir), trainable=[".*"],
                            extra={"model": CLIP_RUN_KIND, "config": json.loads(cfg.to_json_best_effort())})
    checkpointer = ckpt.TrainCheckpointer(workdir / ckpt.CHECKPOINT_SUBDIR, keep=cfg.checkpoint.keep,
                                          every_steps=cfg.checkpoint.every_steps, use_async=cfg.checkpoint.use_async)
    step = 0
    restored = checkpointer.restore_latest(params, opt_state)
    if restored is not None:
        nnx.replace_by_pure_dict(params, restored.params)
        nnx.replace_by_pure_dict(opt_state, restored.opt_state)
        train_iter.set_state(restored.data_state)
        step = restored.step
        info(f"resumed from step {step} in {checkpointer.directory}")
    else:
        info(f"no checkpoint in {checkpointer.directory}: starting at step 0")
    writer = train_metrics.MetricWriter(workdir)
    writer.truncate_after(step)

    banner("loop")
    preempt = _Preemption()
    preempt.install()
    pending: list[tuple[int, dict]] = []
    last_loss = float("nan")
    start_step, t_interval, t_start = step, time.time(), time.time()
    try:
        with jax.set_mesh(mesh):
            while step < total_steps:
                host = next(train_iter)
                batch = {k: jax.make_array_from_process_local_data(batch_shardings[k], host[k]) for k in BATCH_KEYS}
                params, opt_state, metrics = jitted(params, opt_state, frozen, rest, batch)
                step += 1
                pending.append((step, metrics))
                if step == cfg.debug.preempt_at_step:  # tests: behave as if SIGTERM arrived during this step
                    preempt.requested = True
                if cfg.debug.step_sleep_s > 0:
                    time.sleep(cfg.debug.step_sleep_s)
                save_due = step % checkpointer.every_steps == 0 or step == total_steps or preempt.requested
                if step % cfg.log_every == 0 or save_due:
                    rows = [(s, jax.device_get(m)) for s, m in pending]
                    pending.clear()
                    for s, m in rows:
                        if not np.isfinite(m["loss"]):
                            raise TrainingDiverged(f"loss is {float(m['loss'])} at step {s}")
                    now = time.time()
                    last_loss = float(rows[-1][1]["loss"])
                    dt = (now - t_interval) / len(rows)
                    row = {"step": step, "loss": float(np.mean([m["loss"] for _, m in rows])),
                           "last_loss": last_loss, "lr": float(schedule(step - 1)),
                           "grad_norm": float(rows[-1][1]["grad_norm"]),
                           "logit_scale": float(rows[-1][1]["logit_scale"]),
                           "batch_acc": float(np.mean([m["batch_acc"] for _, m in rows])),
                           "step_time_s": dt, "pairs_per_s": cfg.batch_size / max(dt, 1e-9),
                           "losses": {str(s): float(m["loss"]) for s, m in rows}}
                    writer.write(row)
                    if cfg.progress:
                        eta = (now - t_start) / max(step - start_step, 1) * (total_steps - step)
                        info(f"step {step}/{total_steps} loss {row['loss']:.4f} batch acc {row['batch_acc']:.3f} "
                             f"scale {row['logit_scale']:.1f} lr {row['lr']:.2e} {dt:.3f}s/step "
                             f"ETA {train_metrics.fmt_duration(eta)}")
                    t_interval = time.time()
                if save_due:
                    checkpointer.save(step, params, opt_state, train_iter.get_state(), force=True)
                if preempt.requested:
                    info(f"SIGTERM: saving step {step} and exiting")
                    train_iter.close()
                    return {"steps": step, "loss": last_loss, "preempted": True}
    finally:
        preempt.uninstall()
        checkpointer.close()
        writer.close()
    summary: dict[str, Any] = {"steps": step, "loss": last_loss, "preempted": False}

    banner("eval")
    model = nnx.merge(parts.graphdef, params, frozen, rest)
    if held:
        result = dict(evaluate(model, tokenizer, loader, held, cfg.eval.batch_size, cfg.data.split_seed),
                      step=step, captions=str(cfg.data.captions))
        if jax.process_index() == 0:
            from llava_jax.io import atomic_write_json

            atomic_write_json(workdir / "eval.json", result)
        info(f"retrieval on {len(held)} held-out images: {json.dumps(result)}")
        summary["eval"] = result
    else:
        info("data.num_holdout is 0: no retrieval evaluation")
    if cfg.eval.export_dir and jax.process_index() == 0:
        save_hf_clip(cfg.eval.export_dir, model, tokenizer, image_config)
        info(f"exported {cfg.eval.export_dir}")
    train_iter.close()
    return summary


# ===================================================================================================
# CLI
# ===================================================================================================


def main(argv: list[str]) -> None:
    from absl import flags

    from llava_jax.convert.safetensors_io import CheckpointFormatError
    from llava_jax.data.images import ImageError

    cfg, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    logging.basicConfig(level=logging.INFO if flags.FLAGS.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    for name in ("absl", "orbax", "jax._src"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        host_memory.retain_freed_memory(cfg.host_memory)
        summary = train(cfg, workdir)
    except (ConfigError, clip_pairs.PairsError, ckpt.CheckpointError, sharding.MeshConfigError,
            CheckpointFormatError, host_memory.HostMemoryError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except (TrainingDiverged, ImageError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    info(f"done: {json.dumps(summary)}")


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "configs/clip.py[:variant]", lock_config=True)
    flags.DEFINE_string("workdir", None, "output directory (init, checkpoints, metrics, eval.json)")
    flags.DEFINE_bool("verbose", False, "INFO logging")
    flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
    _define_flags()
    cli.absl_run(main)
