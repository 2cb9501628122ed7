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

import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llava_jax import cli
from llava_jax.workflow import (  # noqa: F401  (build_model_dir, VISION, TEXT, VOCAB: re-exported for tests)
    TEXT,
    VISION,
    VOCAB,
    StepFailedError,
    build_model_dir,
    stage1_command,
    stage2_command,
)
from llava_jax.workflow import run as run_step


def run(cmd: Sequence[str], log_path: Path) -> None:
    """Runs a step, streaming its output to the terminal and to `log_path`; exits with a message on failure."""
    try:
        run_step(cmd, log_path)
    except StepFailedError as e:
        raise SystemExit(str(e)) from None


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
    p = cli.ArgumentParser(prog="python -m llava_jax.demo", description=__doc__.split("\n\n")[0])
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
    for flag, values in (("--stage1-set", args.stage1_set), ("--stage2-set", args.stage2_set)):
        for value in values:
            if not value.partition("=")[0] or "=" not in value:
                p.error(f"{flag} {value!r}: expected KEY=VALUE")
    if args.num <= 0 or args.num_eval <= 0:
        p.error("--num and --num-eval must be positive")
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
    print("== stage 1", flush=True)
    t = time.time()
    cmd = stage1_command(data_dir=data, model_dir=model_dir, workdir=s1, seed=args.seed, steps=args.stage1_steps,
                         overrides=args.stage1_set)
    run(cmd, out / "stage1.log")
    timings["stage1_s"] = time.time() - t

    print("== stage 2 + eval", flush=True)
    t = time.time()
    cmd = stage2_command(train_file=data / "stage2.json", image_root=data / "images", init_from=s1, workdir=s2,
                         seed=args.seed, eval_file=data / "eval.jsonl", steps=args.stage2_steps,
                         overrides=args.stage2_set)
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
    sys.exit(cli.run(main))
