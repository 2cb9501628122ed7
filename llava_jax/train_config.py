"""The trainer's config: every key `llava_jax.train` reads with its neutral default (configs/pretrain.py and
configs/finetune.py start from `base_config` and set the recipe), and checks of values that would otherwise
fail late."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_collections

from llava_jax import sharding
from llava_jax.models.lora import DEFAULT_TARGET_PATTERNS


class ConfigError(ValueError):
    """The training config is inconsistent."""


def base_config() -> ml_collections.ConfigDict:
    """Every key the trainer reads, with neutral defaults; stage configs override the recipe."""
    c = ml_collections.ConfigDict()
    c.stage = "finetune"  # informational: 'pretrain' (stage 1) or 'finetune' (stage 2)
    c.init_from = ""  # a model dir (convert compose / from-hf) or an earlier stage's workdir
    c.seed = 0
    c.host_memory = "auto"  # auto | retain | system: host allocator on XLA:CPU (llava_jax.host_memory)

    c.model = ml_collections.ConfigDict()
    c.model.dtype = "float32"  # compute dtype
    c.model.param_dtype = "float32"  # master weights
    c.model.remat = "none"  # none | full | dots | dots_no_batch (jax.checkpoint policy of each scanned layer)
    c.model.loss_budget = 0.5  # fraction of positions sent through the vocabulary projection (0 = all)
    c.model.loss_chunk = 0  # positions per vocabulary chunk in the loss (0 = one piece)
    c.model.attention_impl = ""  # '' (XLA) | xla | cudnn (fused GPU) | flash_tpu (Pallas TPU kernel): attention.attention_fn
    c.model.arch = ""  # preset name used by aot.py when there is no model dir (7b, 13b)

    # Which parameters train: regexes searched in 'a/b/c' parameter paths; everything else is frozen.
    c.trainable = ("^projector/",)
    c.projector_pattern = "^projector/"  # gets optimizer.projector_lr when that is > 0

    # LoRA adapters on the language model's linear layers (llava_jax.models.lora); rank 0 = off. With LoRA,
    # `trainable` must match the adapters (`_lora_[ab]$`); the base weights it does not match stay frozen.
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0
    c.lora.alpha = 16.0  # scale = alpha / rank
    c.lora.dropout = 0.0  # on the adapter input, training only
    c.lora.targets = DEFAULT_TARGET_PATTERNS  # regexes searched in 'language_model/{q,k,v,o,gate,up,down}_kernel'
    c.lora.base_dtype = ""  # '' = model.param_dtype; 'bfloat16' holds the frozen weights in bf16

    c.data = ml_collections.ConfigDict()
    c.data.source = "llava_json"  # llava_json | random (fixed-shape random tokens, for AOT/benchmarks)
    c.data.train_file = ""
    c.data.image_root = ""
    c.data.template = "vicuna_v1"
    c.data.max_length = 2048
    c.data.bucket_lengths = ()  # empty = the pipeline's default buckets up to max_length
    # Sequence packing (llava_jax.data.pipeline.PackBatch): several samples per row of max_length, first-fit,
    # each with its own segment id and positions; buckets are then unused. pack_rows: rows packed together
    # (global, like batch_size; 0 = batch_size); max_images_per_row: image slots per row (0 = max_length //
    # image tokens).
    c.data.packing = False
    c.data.pack_rows = 0
    c.data.max_images_per_row = 0
    c.data.aspect = "pad"
    c.data.num_workers = 0
    c.data.shuffle = True
    c.data.max_skip_fraction = 0.01

    c.batch_size = 128  # global, per optimizer step
    c.grad_accum_steps = 1
    c.num_epochs = 1.0
    c.max_steps = -1  # > 0 overrides num_epochs

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.lr = 2e-5
    c.optimizer.projector_lr = 0.0  # 0 = same as lr
    c.optimizer.weight_decay = 0.0
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.warmup_ratio = 0.03
    c.optimizer.schedule = "cosine"  # cosine | constant | linear
    c.optimizer.grad_clip = 1.0

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    # logical axis -> mesh axes, by precedence; "name:" = replicated
    c.axis_rules = sharding.rules_to_config(sharding.DEFAULT_RULES)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 500
    c.checkpoint.keep = 3
    c.checkpoint.use_async = True

    c.log_every = 10
    c.peak_tflops_per_device = 0.0  # 0 = look up the device kind; unknown kinds report no MFU
    c.progress = True

    c.eval = ml_collections.ConfigDict()
    c.eval.file = ""  # held-out JSONL (question_id, image, text, answer, choices)
    c.eval.image_root = ""
    c.eval.max_new_tokens = 8
    c.eval.batch_size = 32
    c.eval.limit = 0  # > 0: first N questions only

    c.distributed = ml_collections.ConfigDict()
    c.distributed.enabled = False
    c.distributed.auto = True  # initialise by itself on a multi-host TPU slice (llava_jax.multihost)
    c.distributed.coordinator_address = ""  # host:port; empty = from the environment
    c.distributed.num_processes = -1
    c.distributed.process_id = -1

    c.debug = ml_collections.ConfigDict()
    c.debug.fail_at_step = -1  # tests: inject a NaN loss at this step
    c.debug.step_sleep_s = 0.0  # tests: sleep after every step (to interrupt a run at a known point)
    return c


def dtype_of(name: str) -> Any:
    """'bfloat16' | 'float32' | 'float16' -> jnp dtype."""
    table = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}
    if name not in table:
        raise ConfigError(f"unknown dtype {name!r}; known: {sorted(table)}")
    return table[name]


def check_attention_impl(cfg: ml_collections.ConfigDict) -> None:
    """Fails before any compile when `model.attention_impl` is unknown, or is 'flash_tpu' while some batch
    length (a data bucket) is not a multiple of the kernel's block: a bucket first seen hours into a run
    would otherwise fail there."""
    from llava_jax.data.pipeline import resolve_buckets
    from llava_jax.models import attention

    impl = cfg.model.attention_impl or None
    if impl not in attention.ATTENTION_IMPLS:
        known = ", ".join(str(x) for x in attention.ATTENTION_IMPLS if x)
        raise ConfigError(f"unknown model.attention_impl {impl!r}; known: {known}")
    if impl == "flash_tpu":
        lengths = resolve_buckets(() if cfg.data.packing else cfg.data.bucket_lengths, cfg.data.max_length)
        bad = [n for n in lengths if n % attention.FLASH_BLOCK]
        if bad:
            raise ConfigError(f"model.attention_impl 'flash_tpu' needs every batch length (data.bucket_lengths, "
                              f"data.max_length) divisible by {attention.FLASH_BLOCK}; these are not: {bad}")
