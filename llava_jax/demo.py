"""The CPU demo: a tiny LLaVA learns to look at synthetic shape scenes, end to end through the real tools.

    python -m llava_jax.demo [--out runs/demo] [--num 4000] [--seed 0]

1. `llava_jax.data.synthetic` writes images, stage-1 captions, stage-2 instructions and a held-out file;
2. a BPE tokenizer is trained on that text (`llava_jax.tiny.build_tokenizer`) and a tiny random LLaVA is
   written as a model dir (our own init, `save_model_dir`);
3. stage 1 and stage 2 run through `python -m llava_jax.train` (configs/pretrain.py:demo,
   configs/finetune.py:demo); stage 2 ends with the held-out evaluation (with and without the image);
4. `python -m llava_jax.convert to-hf` exports the result to OUT/hf, and (when torch is installed)
   transformers loads it and answers a held-out question.
OUT/eval.json holds {"accuracy", "blind_accuracy", "chance", "n"}; OUT/demo.json a summary with timings.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
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


def build_model_dir(data_dir: Path, out_dir: Path, seed: int, *, vision: dict | None = None, text: dict | None = None,
                    vocab: int = VOCAB) -> dict[str, Any]:
    """Trains the tokenizer on the synthetic text and writes a random tiny LLaVA model dir; returns sizes.

    vision / text: CLIPVisionConfig / LlamaConfig fields (default: the demo's VISION / TEXT).
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


def run(cmd: Sequence[str], log_path: Path) -> None:
    """Runs a step, streaming its output to the terminal and to `log_path`; raises on failure."""
    print("$ " + " ".join(cmd), flush=True)
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if not _noise(line):
                sys.stdout.write(line)
                sys.stdout.flush()
        code = proc.wait()
    if code:
        raise SystemExit(f"step failed with exit code {code}: {' '.join(cmd)} (log: {log_path})")


def _noise(line: str) -> bool:
    return any(s in line for s in ("TPU", "libtpu", "=== Source Location", "InitGoogle", "E0000", "W0000"))


def check_hf(hf_dir: Path, data_dir: Path) -> dict[str, Any]:
    """Loads the export with transformers and answers the first held-out question greedily."""
    try:
        import torch
        from transformers import AutoProcessor, LlavaForConditionalGeneration
    except ImportError as e:
        return {"checked": False, "reason": f"transformers/torch unavailable: {e}"}
    from PIL import Image

    from llava_jax.data.synthetic import score_answer
    from llava_jax.io import read_jsonl

    question = read_jsonl(data_dir / "eval.jsonl")[0]
    model = LlavaForConditionalGeneration.from_pretrained(str(hf_dir)).eval()
    processor = AutoProcessor.from_pretrained(str(hf_dir))
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question["text"]}]}],
        add_generation_prompt=True)
    image = Image.open(data_dir / "images" / question["image"]).convert("RGB")
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    return {"checked": True, "question": question["text"], "expected": question["answer"], "answer": answer,
            "correct": bool(score_answer(answer, question))}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llava_jax.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo", help="output directory (data, model, stage1, stage2, hf)")
    p.add_argument("--num", type=int, default=4000, help="synthetic training images")
    p.add_argument("--num-eval", type=int, default=200, help="held-out questions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stage1-steps", type=int, default=0, help="override configs/pretrain.py:demo max_steps")
    p.add_argument("--stage2-steps", type=int, default=0, help="override configs/finetune.py:demo max_steps")
    p.add_argument("--stage1-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra --config.KEY=VALUE for stage 1 (repeatable)")
    p.add_argument("--stage2-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra --config.KEY=VALUE for stage 2 (repeatable)")
    p.add_argument("--fresh", action="store_true", help="delete OUT first (otherwise finished steps resume)")
    args = p.parse_args(argv)
    from llava_jax import host_memory

    host_memory.retain_freed_memory()  # XLA:CPU: reuse freed pages (before JAX's backend starts)

    from llava_jax.io import atomic_write_json, read_json

    out = Path(args.out).absolute()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    data, model_dir, s1, s2, hf = out / "data", out / "model", out / "stage1", out / "stage2", out / "hf"
    timings: dict[str, float] = {}
    t0 = time.time()

    print("== data", flush=True)
    if not (data / "meta.json").exists():
        from llava_jax.data.synthetic import generate

        generate(data, num=args.num, seed=args.seed, num_eval=args.num_eval, image_size=VISION["image_size"])
    timings["data_s"] = time.time() - t0

    print("== model", flush=True)
    t = time.time()
    sizes = {}
    from llava_jax.convert.model_dir import is_model_dir

    if not is_model_dir(model_dir):
        sizes = build_model_dir(data, model_dir, args.seed)
    timings["model_s"] = time.time() - t

    py = sys.executable
    common = [f"--config.data.image_root={data / 'images'}", f"--config.seed={args.seed}"]
    print("== stage 1", flush=True)
    t = time.time()
    cmd = [py, "-m", "llava_jax.train", f"--config={CONFIGS / 'pretrain.py'}:demo", f"--workdir={s1}",
           f"--config.init_from={model_dir}", f"--config.data.train_file={data / 'stage1.json'}", *common]
    if args.stage1_steps:
        cmd.append(f"--config.max_steps={args.stage1_steps}")
    cmd += [f"--config.{kv}" for kv in args.stage1_set]
    run(cmd, out / "stage1.log")
    timings["stage1_s"] = time.time() - t

    print("== stage 2 + eval", flush=True)
    t = time.time()
    cmd = [py, "-m", "llava_jax.train", f"--config={CONFIGS / 'finetune.py'}:demo", f"--workdir={s2}",
           f"--config.init_from={s1}", f"--config.data.train_file={data / 'stage2.json'}",
           f"--config.eval.file={data / 'eval.jsonl'}", f"--config.eval.image_root={data / 'images'}", *common]
    if args.stage2_steps:
        cmd.append(f"--config.max_steps={args.stage2_steps}")
    cmd += [f"--config.{kv}" for kv in args.stage2_set]
    run(cmd, out / "stage2.log")
    timings["stage2_s"] = time.time() - t
    result = read_json(s2 / "eval.json")
    atomic_write_json(out / "eval.json", result)

    print("== export", flush=True)
    t = time.time()
    if hf.exists():
        shutil.rmtree(hf)
    run([py, "-m", "llava_jax.convert", "to-hf", str(s2), str(hf)], out / "export.log")
    hf_check = check_hf(hf, data)
    timings["export_s"] = time.time() - t
    timings["total_s"] = time.time() - t0

    ok = result["accuracy"] >= 0.9 and result["blind_accuracy"] <= result["chance"] + 0.10
    summary = {"eval": result, "targets_met": ok, "hf_check": hf_check, "timings": timings, "model": sizes}
    atomic_write_json(out / "demo.json", summary)
    print(f"== done in {timings['total_s']:.0f}s: accuracy {result['accuracy']:.3f}, blind "
          f"{result['blind_accuracy']:.3f}, chance {result['chance']:.3f} (n={result['n']}); HF export {hf}: "
          f"{hf_check}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
