"""Building blocks of the end-to-end runs on the synthetic set (`llava_jax.demo`, `selection.experiment`).

- `build_model_dir`: a BPE tokenizer trained on the synthetic text and a random tiny LLaVA written as a model dir;
- `stage1_command` / `stage2_command`: the `python -m llava_jax.train` command lines of the two stages
  (configs/pretrain.py:demo, configs/finetune.py:demo) with the paths of one run;
- `run`: one such step as a subprocess, its output logged to a file (and echoed unless told not to).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# The tiny model: 32 px images in 8 px patches (16 image tokens; the synthetic set's default 2 x 2 board puts
# each object in a 16 px cell of 2 x 2 patches), a 2-layer vision tower, a 3-layer LLM.
VISION = dict(hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8, projection_dim=64, hidden_act="quick_gelu")
TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)
VOCAB = 512


class StepFailedError(RuntimeError):
    """A subprocess step exited with a non-zero code (its log file names the cause)."""


def build_model_dir(data_dir: Path, out_dir: Path, seed: int, *, vision: Mapping[str, Any] | None = None,
                    text: Mapping[str, Any] | None = None, vocab: int = VOCAB) -> dict[str, Any]:
    """Trains the tokenizer on the synthetic text under `data_dir` and writes a random tiny LLaVA model dir.

    vision / text: CLIPVisionConfig / LlamaConfig fields (default: VISION / TEXT). The tokenizer sees
    stage1.json, stage2.json and eval.jsonl. Returns {"vocab": tokenizer size, "image_tokens": per image}.
    """
    vision = dict(VISION if vision is None else vision)
    text = dict(TEXT if text is None else text)
    from llava_jax.convert.model_dir import save_model_dir
    from llava_jax.data.conversation import get_template
    from llava_jax.data.images import ImageConfig
    from llava_jax.io import read_json, read_jsonl
    from llava_jax.models.clip import CLIPVisionConfig
    from llava_jax.models.llama import LlamaConfig
    from llava_jax.models.llava import LlavaConfig, build_llava
    from llava_jax.tiny import IMAGE_TOKEN, build_tokenizer

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    texts = []
    for name in ("stage1.json", "stage2.json"):
        for rec in read_json(data_dir / name):
            texts.extend(t["value"].replace("<image>", "") for t in rec["conversations"])
    texts.extend(r["text"] for r in read_jsonl(data_dir / "eval.jsonl"))
    # The template's fixed text is in every sample: weight it so BPE learns whole words for it.
    texts.extend([get_template("vicuna_v1").system] * 500)
    tokenizer = build_tokenizer(texts, vocab_size=vocab)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = LlavaConfig(
        vision=CLIPVisionConfig(**vision),
        text=LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **text),
        image_token_id=image_token_id,
        projector="mlp2x_gelu",
        vision_feature_layer=(0, -1),
        vision_feature_select_strategy="default",
        pad_token_id=tokenizer.pad_token_id,
    )
    model = build_llava(config, seed=seed)
    image_config = ImageConfig(size=vision["image_size"], crop_size=vision["image_size"], aspect="pad")
    save_model_dir(out_dir, model, config, tokenizer, image_config, template="vicuna_v1")
    return {"vocab": len(tokenizer), "image_tokens": config.num_image_tokens}


def stage1_command(*, data_dir: Path, model_dir: Path, workdir: Path, seed: int, steps: int = 0,
                   overrides: Sequence[str] = ()) -> list[str]:
    """`python -m llava_jax.train` for stage 1 (configs/pretrain.py:demo) on DATA/stage1.json from `model_dir`.

    steps > 0 overrides the config's max_steps; overrides are extra `KEY=VALUE` config settings.
    """
    data_dir = Path(data_dir)
    cmd = [sys.executable, "-m", "llava_jax.train", f"--config={CONFIGS / 'pretrain.py'}:demo",
           f"--workdir={workdir}", f"--config.init_from={model_dir}",
           f"--config.data.train_file={data_dir / 'stage1.json'}",
           f"--config.data.image_root={data_dir / 'images'}", f"--config.seed={seed}"]
    if steps:
        cmd.append(f"--config.max_steps={steps}")
    return cmd + [f"--config.{kv}" for kv in overrides]


def stage2_command(*, train_file: Path, image_root: Path, init_from: Path, workdir: Path, seed: int,
                   eval_file: Path | None = None, steps: int = 0, overrides: Sequence[str] = ()) -> list[str]:
    """`python -m llava_jax.train` for stage 2 (configs/finetune.py:demo) on `train_file` from a stage-1 workdir.

    With `eval_file` the trainer ends with the held-out evaluation (WORKDIR/eval.json); without one it
    evaluates nothing (`eval.file` is cleared). steps > 0 overrides max_steps; overrides: `KEY=VALUE`.
    """
    cmd = [sys.executable, "-m", "llava_jax.train", f"--config={CONFIGS / 'finetune.py'}:demo",
           f"--workdir={workdir}", f"--config.init_from={init_from}", f"--config.data.train_file={train_file}",
           f"--config.data.image_root={image_root}", f"--config.seed={seed}",
           f"--config.eval.file={eval_file or ''}", f"--config.eval.image_root={image_root}"]
    if steps:
        cmd.append(f"--config.max_steps={steps}")
    return cmd + [f"--config.{kv}" for kv in overrides]


def run(cmd: Sequence[str], log_path: Path, *, echo: bool = True, env: Mapping[str, str] | None = None) -> None:
    """Runs a step in the repository root, writing its output to `log_path` (and to the terminal when `echo`,
    minus XLA start-up chatter). Raises StepFailedError on a non-zero exit. The step does not preallocate
    accelerator memory (`XLA_PYTHON_CLIENT_PREALLOCATE=false` unless set): the caller may hold a JAX client on the
    same GPU, and each client would otherwise reserve 75% of its memory."""
    if echo:
        print("$ " + " ".join(cmd), flush=True)
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                                env={"XLA_PYTHON_CLIENT_PREALLOCATE": "false", **os.environ,
                                     "PYTHONUNBUFFERED": "1", **(env or {})})
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            log.flush()  # the log shows progress while the step runs
            if echo and not _chatter(line):
                sys.stdout.write(line)
                sys.stdout.flush()
        code = proc.wait()
    if code:
        raise StepFailedError(f"step failed with exit code {code}: {' '.join(cmd)} (log: {log_path})")


def _chatter(line: str) -> bool:
    return any(s in line for s in ("TPU", "libtpu", "=== Source Location", "InitGoogle", "E0000", "W0000"))
