"""Stage 2 (visual instruction tuning): train projector + LLM on instruction data, vision tower frozen.

    python -m llava_jax.train --config=configs/finetune.py:7b --workdir=runs/7b/stage2 \
        --config.init_from=runs/7b/stage1 --config.data.train_file=llava_v1_5_mix665k.json \
        --config.data.image_root=IMAGES

Variants: `demo` (tiny CPU demo; ends with the held-out eval into WORKDIR/eval.json), `7b`, `13b`
(LLaVA-1.5's recipe: lr 2e-5, global batch 128, 1 epoch, vicuna_v1 template, `pad` images, AdamW,
weight decay 0, cosine with 3% warmup, clip 1.0, max length 2048) with sequence packing on (`data.packing`:
first-fit, several samples per 2048-token row, each with its own segment id and positions; LLaVA's mix of
~650-token captioned images and conversations up to 2048 is then >= 95% tokens instead of about half padding,
bench/packing.py). `init_from` is the stage-1 workdir.
`7b_lora`, `13b_lora`: LLaVA's LoRA recipe (finetune_lora.sh): adapters of rank 128, alpha 256, dropout 0.05
on every linear layer of the LLM, lr 2e-4, projector lr 2e-5, the rest as above; the frozen base is held in
bf16 and only the adapters and the projector train (and are checkpointed). `demo_lora`: the demo with LoRA.
Every value can be overridden with --config.key=value.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import ml_collections


def _pretrain_module():
    spec = importlib.util.spec_from_file_location("llava_jax_configs_pretrain", Path(__file__).with_name("pretrain.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lora_config(c: ml_collections.ConfigDict) -> None:
    """LLaVA's LoRA recipe on top of a stage-2 config: adapters and projector train, the LLM base is frozen."""
    c.trainable = ("^projector/", "_lora_[ab]$")
    c.lora.rank = 128
    c.lora.alpha = 256.0
    c.lora.dropout = 0.05
    c.optimizer.lr = 2e-4
    c.optimizer.projector_lr = 2e-5


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Stage-2 config for variant `arg` in {demo, 7b, 13b, demo_lora, 7b_lora, 13b_lora} (default 7b)."""
    variant = arg or "7b"
    if variant in ("demo_lora", "7b_lora", "13b_lora"):
        c = get_config(variant[: -len("_lora")])
        lora_config(c)
        if variant == "demo_lora":
            # The demo's LLM is random before stage 2, so the adapters carry all of its language learning: a
            # rank of half the width (128), and the full demo's learning rate on the projector.
            c.lora.rank = 64
            c.lora.alpha = 128.0
            c.optimizer.lr = 2e-3
            c.optimizer.projector_lr = 1e-3
        else:
            c.lora.base_dtype = "bfloat16"
            # Fits per `python -m llava_jax.aot` (BENCHMARKS.md): 7b_lora on v5e-8, 13b_lora on v5e-16.
            c.grad_accum_steps = 8  # micro-batch 16: 2 sequences per chip on v5e-8, 1 on v5e-16
        return c
    pretrain = _pretrain_module()
    c = pretrain.base_config()
    c.stage = "finetune"
    c.trainable = ("^projector/", "^language_model/")
    c.projector_pattern = "^projector/"
    c.data.template = "vicuna_v1"
    c.data.aspect = "pad"
    c.data.max_length = 2048
    c.batch_size = 128
    c.grad_accum_steps = 1
    c.num_epochs = 1.0
    c.optimizer.lr = 2e-5
    c.optimizer.weight_decay = 0.0
    c.optimizer.warmup_ratio = 0.03
    c.optimizer.schedule = "cosine"
    c.optimizer.grad_clip = 1.0
    if variant in ("7b", "13b"):
        pretrain.scale_config(c, variant)
        # Fits per `python -m llava_jax.aot --topology=v5p-8`: 7b with 4 micro-batches of 32 (51.3 of 95 GiB
        # per chip; also v5e-16 with 8: 11.5 of 16 GiB), 13b with 8 micro-batches of 16 (78.6 of 95 GiB).
        c.grad_accum_steps = 4 if variant == "7b" else 8
    elif variant == "demo":
        pretrain.demo_config(c)
        c.data.max_length = 104
        c.data.bucket_lengths = (96, 104)
        c.init_from = "runs/demo/stage1"
        c.data.train_file = "runs/demo/data/stage2.json"
        c.batch_size = 32
        c.max_steps = 1200
        c.optimizer.lr = 1e-3
        c.eval.file = "runs/demo/data/eval.jsonl"
        c.eval.image_root = "runs/demo/data/images"
        c.eval.max_new_tokens = 12  # replies are short sentences: "The circle is red."
    else:
        raise ValueError(f"unknown variant {variant!r}: demo, 7b, 13b, demo_lora, 7b_lora or 13b_lora")
    return c
