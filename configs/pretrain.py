"""Stage 1 (feature alignment): train the projector on image-caption pairs with the `plain` template.

    python -m llava_jax.train --config=configs/pretrain.py:7b --workdir=runs/7b/stage1 \
        --config.init_from=MODEL_DIR --config.data.train_file=blip_laion_cc_sbu_558k.json \
        --config.data.image_root=IMAGES

Variants: `demo` (the tiny CPU demo on the bundled synthetic set), `7b`, `13b` (LLaVA-1.5's recipe:
mlp2x_gelu projector, lr 1e-3, global batch 256, 1 epoch, AdamW, weight decay 0, cosine with 3% warmup,
clip 1.0, max length 2048; samples packed several per row, `data.packing`). Every value can be overridden with
--config.key=value.
"""

from __future__ import annotations

import ml_collections

from llava_jax.train_config import base_config


def scale_config(c: ml_collections.ConfigDict, arch: str) -> None:
    """Settings shared by the 7b / 13b variants of both stages (sized for Cloud TPU): bf16 compute, fp32 master
    weights, FSDP over every chip, full remat of each layer, the loss's vocabulary projection in 512-position
    chunks, the Pallas TPU flash-attention kernel (on GPU pass --config.model.attention_impl=cudnn), and sequence
    packing: first-fit, several samples per 2048-token row, each with its own segment id and positions, so
    little of a step computes padding (bench/packing.py; turn off with --config.data.packing=False)."""
    c.model.arch = arch
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat = "full"
    c.model.attention_impl = "flash_tpu"  # XLA's estimated 7b MFU on v5p-8: 53.1% with XLA attention (BENCHMARKS.md)
    c.model.loss_chunk = 512
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    c.data.num_workers = 8
    # LLaVA's samples run from ~600 tokens (an image's 576 plus a caption) to 2048: padded to 2048 a step
    # computes mostly padding; packed rows are >= 95% tokens (BENCHMARKS.md, "Sequence packing").
    c.data.packing = True
    c.checkpoint.every_steps = 500
    c.log_every = 10


def demo_config(c: ml_collections.ConfigDict) -> None:
    """Settings shared by the demo variants: tiny model, synthetic data under runs/demo, everything trains."""
    c.trainable = (".*",)
    c.data.image_root = "runs/demo/data/images"
    c.data.max_length = 128
    c.data.num_workers = 0
    c.mesh.data = -1
    c.checkpoint.every_steps = 100
    c.checkpoint.keep = 2
    c.log_every = 10
    c.peak_tflops_per_device = 0.0


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Stage-1 config for variant `arg` in {demo, 7b, 13b} (default 7b)."""
    variant = arg or "7b"
    c = base_config()
    c.stage = "pretrain"
    c.trainable = ("^projector/",)
    c.projector_pattern = "^projector/"
    c.data.template = "plain"
    c.data.aspect = "crop"
    c.data.max_length = 2048
    c.batch_size = 256
    c.grad_accum_steps = 1
    c.num_epochs = 1.0
    c.optimizer.lr = 1e-3
    c.optimizer.weight_decay = 0.0
    c.optimizer.warmup_ratio = 0.03
    c.optimizer.schedule = "cosine"
    c.optimizer.grad_clip = 1.0
    if variant in ("7b", "13b"):
        scale_config(c, variant)
        # micro-batch 32 (7b) / 16 (13b): the stage-2 sizes that fit a v5p-8 (python -m llava_jax.aot)
        c.grad_accum_steps = 8 if variant == "7b" else 16
    elif variant == "demo":
        demo_config(c)
        c.data.max_length = 64
        c.data.bucket_lengths = (48, 64)
        c.init_from = "runs/demo/model"
        c.data.train_file = "runs/demo/data/stage1.json"
        c.batch_size = 32
        c.max_steps = 900
        c.optimizer.lr = 2e-3
        c.optimizer.weight_decay = 0.0
    else:
        raise ValueError(f"unknown variant {variant!r}: demo, 7b or 13b")
    return c
