"""Sequence packing vs length buckets: share of non-padding tokens per step and trained tokens/s (issue 20).

    .venv/bin/python bench/packing.py [--samples 4000] [--steps 6] [--aot-json bench/packing_aot.json]
    .venv/bin/python bench/packing.py --aot-compile   # recompute the AOT figures (several TPU compiles, ~10-40 min)

Both ways go through the pipeline's own batchers (`pipeline.BucketBatch`, `pipeline.PackBatch`) on the same
samples in the same order. "Trained tokens" are the non-padding tokens of a step (every one goes through the
forward and backward pass; the loss supervises the answers among them, the same ones either way).

The LLaVA-shaped length mix (`llava_mix`; numbers of text tokens at the 7b scale, an image adds its 576 tokens,
samples cut at max_length 2048 as the pipeline cuts them), in the proportions of LLaVA-1.5's 665K mix (its
paper's table of sources: LLaVA-Instruct 158K, ShareGPT 40K, VQAv2 / GQA / OCR-VQA / RefCOCO / VG grouped
into multi-question conversations ~370K, OKVQA / A-OKVQA / TextCaps single-turn ~100K):
  - 35% single-turn captions / short answers with an image: 60-120 text tokens (uniform), so 636-696 in all;
  - 20% LLaVA-Instruct conversations about an image: 2-8 turns (uniform) of 40-160 text tokens each;
  - 39% grouped short VQA about an image: 3-30 question / answer turns of 12-30 tokens each;
  - 6% text-only multi-turn conversations (ShareGPT): 1-8 turns of 40-400 tokens each, up to the 2048 cut.
(`--mix heavy` draws the heavier mix first tried: 40% single-turn as above, 45% image conversations of 2-10
turns of 30-200 tokens, 15% text-only as above; a fifth of its samples exceed 1412 tokens, so they cannot
share a row with a 636-token caption: pure first-fit in arrival order reached 89% on it, first-fit
decreasing within a pack (what `PackBatch` does) 93%.)
Drawn with numpy's default_rng(seed). It is measured three ways:
  1. the share of non-padding tokens at the 7b scale (max_length 2048, the 7b config's per-host batch of 128,
     buckets 512 / 1024 / 1536 / 2048 for the bucketed way — finer than the 7b config's single 2048 bucket);
  2. trained tokens/s of the trainer's own jitted step on this machine's CPU, at 1/8 scale (max_length 256, an
     image = 64 tokens, text lengths / 8; a 2-layer LLaVA of width 256; batch 8 rows; buckets 128 / 256), the
     same for the bundled synthetic set (`llava_jax.data.synthetic`, tokenized by the real pipeline);
  3. the AOT estimate for 7b on v5p-8 (`llava_jax.aot.estimate_mfu`: XLA's own roofline time of the compiled
     stage-2 step, both with the 7b config as it is, packing on, 3 image slots per row, and with packing off,
     one image per 2048-token row): trained tokens/s per chip = 128 rows x 2048 x the non-padding share of (1)
     / estimated step time / 8 chips. The compiles take minutes each, so they are done by `--aot-compile` and
     read from --aot-json (the file records the command and date); the default run combines them with this
     run's shares.
The last line is one JSON object with nonpad_fraction_packed / nonpad_fraction_bucketed (LLaVA-shaped mix,
7b scale) and ratio (trained tokens/s packed over bucketed on the LLaVA-shaped mix, this run, this machine).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import grain  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from llava_jax.data import pipeline  # noqa: E402
from llava_jax.data.conversation import IGNORE_INDEX  # noqa: E402

AOT_JSON = Path(__file__).resolve().parent / "packing_aot.json"
FULL = {"max_length": 2048, "image_tokens": 576, "batch": 128, "buckets": (512, 1024, 1536, 2048)}
SMALL = {"max_length": 256, "image_tokens": 64, "batch": 8, "buckets": (128, 256)}


def llava_mix(n: int, seed: int = 0, scale: float = 1.0, kind: str = "llava15") -> list[tuple[int, int]]:
    """(text tokens, has image) of n samples with LLaVA-1.5's shape (module docstring); text lengths x scale.
    kind: "llava15" (the mix's proportions) or "heavy" (the heavier first try)."""
    rng = np.random.default_rng(seed)

    def turns(lo_n, hi_n, lo, hi):
        return int(rng.integers(lo, hi + 1, size=int(rng.integers(lo_n, hi_n + 1))).sum())

    out = []
    for _ in range(n):
        u = rng.random()
        if kind == "heavy":
            if u < 0.40:
                text, image = int(rng.integers(60, 121)), 1
            elif u < 0.85:
                text, image = turns(2, 10, 30, 200), 1
            else:
                text, image = turns(1, 8, 40, 400), 0
        elif u < 0.35:
            text, image = int(rng.integers(60, 121)), 1
        elif u < 0.55:
            text, image = turns(2, 8, 40, 160), 1
        elif u < 0.94:
            text, image = turns(3, 30, 12, 30), 1
        else:
            text, image = turns(1, 8, 40, 400), 0
        out.append((max(4, int(round(text * scale))), image))
    return out


def examples(mix, image_tokens: int, max_length: int, image_token_id: int, vocab: int, pixels: tuple,
             seed: int = 0) -> list[dict]:
    """Pipeline examples from (text tokens, has image): BOS, the image tokens, a prompt (first 40% of the text)
    and a supervised answer; cut at max_length. pixels: the image shape ([1, 1, 3] when only shapes matter)."""
    rng = np.random.default_rng(seed)
    out = []
    for text, image in mix:
        ids = rng.integers(3, vocab - 2, size=1 + image * image_tokens + text).astype(np.int32)
        ids[0] = 1
        ids[1:1 + image * image_tokens] = image_token_id
        labels = np.full_like(ids, IGNORE_INDEX)
        answer = 1 + image * image_tokens + int(0.4 * text)
        labels[answer:] = ids[answer:]
        out.append({"input_ids": ids[:max_length], "labels": labels[:max_length], "has_image": bool(image),
                    "pixel_values": rng.normal(size=pixels).astype(np.float32) if image
                    else np.zeros(pixels, np.float32)})
    return out


def batches(exs: list[dict], packed: bool, scale: dict, max_images: int, pad_id: int = 0) -> list[dict]:
    """Every full batch of `exs` (in order) through the pipeline's batcher of either way."""
    it_ds = grain.MapDataset.source(exs).to_iter_dataset()
    if packed:
        ds = pipeline.PackBatch(it_ds, scale["batch"], scale["batch"], scale["max_length"], max_images, pad_id, 10)
    else:
        ds = pipeline.BucketBatch(it_ds, scale["batch"], scale["buckets"], pad_id, 10)
    out = []
    for b in ds:
        if b.pop(pipeline.END_KEY, None):
            break
        b.pop(pipeline.STATS_KEY, None)
        out.append(b)
    return out


def nonpad(bs: list[dict]) -> float:
    return float(sum(b["attention_mask"].sum() for b in bs) / sum(b["attention_mask"].size for b in bs))


# ------------------------------------------------------------------------------------------------ CPU step


def time_steps(bs: list[dict], step, state, steps: int) -> tuple[float, float, object]:
    """(non-padding tokens, seconds) of the trainer's step over the first `steps` batches, each shape
    compiled beforehand (compile time excluded)."""
    seen = set()
    for b in bs[:steps]:
        shape = tuple((k, v.shape) for k, v in sorted(b.items()))
        if shape not in seen:
            seen.add(shape)
            state, loss = step(state, {k: jnp.asarray(v) for k, v in b.items()})
            float(loss)
    tokens, total = 0.0, 0.0
    for b in bs[:steps]:
        jb = {k: jnp.asarray(v) for k, v in b.items()}
        t0 = time.perf_counter()
        state, loss = step(state, jb)
        float(loss)
        total += time.perf_counter() - t0
        tokens += float(b["attention_mask"].sum())
    return tokens, total, state


def synthetic_examples(n: int, image_token_id_holder: dict) -> tuple[list[dict], object]:
    """The bundled synthetic set's stage-2 records through the real ExampleMaker (tokenizer trained on it)."""
    from llava_jax.data import conversation, images, synthetic
    from llava_jax.tiny import build_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="packing_bench_"))
    synthetic.generate(tmp, num=n, seed=0, num_eval=0, image_size=64)
    recs = json.loads((tmp / "stage2.json").read_text())
    tok = build_tokenizer([t["value"] for r in recs for t in r["conversations"]], vocab_size=400)
    image_id = tok.convert_tokens_to_ids("<image>")
    image_token_id_holder["id"] = image_id
    maker = pipeline.ExampleMaker(tok, images.ImageConfig(size=64, crop_size=64),
                                  conversation.get_template("vicuna_v1"), SMALL["image_tokens"], image_id,
                                  SMALL["max_length"])
    exs = [maker({"record": r, "roots": [str(tmp / "images")]}) for r in recs]
    return [e for e in exs if pipeline.SKIP_KEY not in e], tok


def cpu_throughput(args) -> dict:
    from train_step import jax_step

    holder: dict = {}
    syn, tok = synthetic_examples(args.synthetic, holder)
    config = common.bench_config(vocab=4000, width=256, layers=2, image=64, patch=8, vision_width=128,
                                 vision_layers=2).replace(image_token_id=holder["id"])
    assert config.num_image_tokens == SMALL["image_tokens"]
    model = common.build(config)
    step, state = jax_step(model, 0.5, 0)
    m = SMALL["max_length"] // SMALL["image_tokens"]
    mix = examples(llava_mix(args.steps * SMALL["batch"] * 6, args.seed, scale=1 / 8, kind=args.mix),
                   SMALL["image_tokens"],
                   SMALL["max_length"], holder["id"], config.text.vocab_size, (64, 64, 3), args.seed)
    out = {}
    for name, exs in (("llava_mix", mix), ("synthetic", syn)):
        row = {}
        for way in ("bucketed", "packed"):
            bs = batches(exs, way == "packed", SMALL, m, tok.pad_token_id or 0)
            if len(bs) < args.steps:
                raise SystemExit(f"error: only {len(bs)} {way} batches of {name}; raise --samples / --synthetic")
            tokens, secs, state = time_steps(bs, step, state, args.steps)
            row[way] = {"nonpad_fraction": nonpad(bs), "trained_tokens_per_s": tokens / secs,
                        "step_s": secs / args.steps, "samples_per_row": _samples_per_row(bs)}
            print(f"  cpu {name} {way}: non-padding {row[way]['nonpad_fraction']:.1%}, "
                  f"{row[way]['trained_tokens_per_s']:.0f} trained tok/s ({row[way]['step_s']:.2f} s/step)",
                  flush=True)
        row["ratio"] = row["packed"]["trained_tokens_per_s"] / row["bucketed"]["trained_tokens_per_s"]
        out[name] = row
    return out


def _samples_per_row(bs: list[dict]) -> float:
    if "segment_ids" in bs[0]:
        return float(np.mean([b["segment_ids"].max(axis=1).mean() for b in bs]))
    return 1.0


# ------------------------------------------------------------------------------------------------ AOT


def aot_compile(path: Path) -> None:
    """XLA's estimated 7b step on v5p-8, packing on and off (llava_jax.aot.estimate_mfu), written to path."""
    import importlib.util

    from llava_jax import aot
    from llava_jax.io import atomic_write_json

    spec = importlib.util.spec_from_file_location("finetune_config", Path(__file__).resolve().parents[1]
                                                  / "configs" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    devices, topo = aot.topology_devices("v5p-8")
    result = {"command": "python bench/packing.py --aot-compile", "date": datetime.date.today().isoformat(),
              "topology": "v5p-8", "config": "configs/finetune.py:7b"}
    for packed in (True, False):
        cfg = module.get_config("7b")
        with cfg.unlocked():
            cfg.data.packing = packed
        t0 = time.time()
        est = aot.estimate_mfu(cfg, devices, topo)
        result["packed" if packed else "bucketed"] = {
            "per_layer_s": est["per_layer_s"], "micro_batch_s": est["micro_batch_s"], "est_step_s": est["est_step_s"],
            "est_mfu": est["est_mfu"], "images_per_row": 3 if packed else 1, "wall_s": time.time() - t0}
    result.update(rows_per_step=128, max_length=2048, chips=8)
    atomic_write_json(path, result)
    print(json.dumps(result))


def aot_tokens_per_chip(path: Path, shares: dict) -> dict | None:
    """AOT-estimated trained tokens/s per chip both ways from the recorded compiles and this run's shares."""
    if not path.exists():
        print(f"  no AOT figures at {path}: run `python bench/packing.py --aot-compile` first", flush=True)
        return None
    rec = json.loads(path.read_text())
    out = {"source": str(path.name), "recorded": rec.get("date"), "est_step_s": {}, "tokens_per_s_per_chip": {}}
    for way in ("bucketed", "packed"):
        step_s = rec[way]["est_step_s"]
        tokens = rec["rows_per_step"] * rec["max_length"] * shares[way]
        out["est_step_s"][way] = step_s
        out["tokens_per_s_per_chip"][way] = tokens / step_s / rec["chips"]
    out["ratio"] = out["tokens_per_s_per_chip"]["packed"] / out["tokens_per_s_per_chip"]["bucketed"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=4000, help="LLaVA-shaped samples at the 7b scale")
    p.add_argument("--synthetic", type=int, default=160, help="synthetic records for the CPU run")
    p.add_argument("--steps", type=int, default=4, help="timed steps per way and dataset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mix", choices=("llava15", "heavy"), default="llava15", help="the length mix (docstring)")
    p.add_argument("--aot-json", default=str(AOT_JSON))
    p.add_argument("--aot-compile", action="store_true", help="recompute the AOT figures into --aot-json")
    args = p.parse_args()
    if min(args.samples, args.synthetic, args.steps) < 1:
        print("error: --samples, --synthetic and --steps must be positive", file=sys.stderr)
        sys.exit(2)
    if args.aot_compile:
        aot_compile(Path(args.aot_json))
        return
    t0 = time.time()
    full_exs = examples(llava_mix(args.samples, args.seed, kind=args.mix), FULL["image_tokens"], FULL["max_length"], 32000, 32000,
                        (1, 1, 3), args.seed)
    full_m = FULL["max_length"] // FULL["image_tokens"]
    shares, per_row = {}, {}
    for way in ("bucketed", "packed"):
        bs = batches(full_exs, way == "packed", FULL, full_m)
        shares[way] = nonpad(bs)
        per_row[way] = _samples_per_row(bs)
        if way == "bucketed":
            lengths = {int(b["input_ids"].shape[1]) for b in bs}
        print(f"  7b scale {way}: non-padding {shares[way]:.1%} over {len(bs)} batches of {FULL['batch']}"
              + (f", {per_row[way]:.2f} samples per row" if way == "packed" else f", lengths {sorted(lengths)}"),
              flush=True)
    cpu = cpu_throughput(args)
    aot_est = aot_tokens_per_chip(Path(args.aot_json), shares)
    if aot_est:
        print(f"  AOT 7b on v5p-8 (recorded {aot_est['recorded']}): trained tokens/s per chip bucketed "
              f"{aot_est['tokens_per_s_per_chip']['bucketed']:.0f}, packed {aot_est['tokens_per_s_per_chip']['packed']:.0f}"
              f" (ratio {aot_est['ratio']:.2f}; est. step {aot_est['est_step_s']['bucketed']:.2f} / "
              f"{aot_est['est_step_s']['packed']:.2f} s)", flush=True)
    result = {"bench": "packing", "samples": args.samples, "mix": args.mix, "llava_mix_7b_scale": {
        "nonpad_fraction": shares, "samples_per_row_packed": per_row["packed"], "bucket_lengths_used": sorted(lengths)},
        "cpu": cpu, "aot_v5p8_7b": aot_est, "machine": common.machine(), "wall_s": time.time() - t0,
        "nonpad_fraction_packed": shares["packed"], "nonpad_fraction_bucketed": shares["bucketed"],
        "ratio": cpu["llava_mix"]["ratio"]}
    common.emit(result)


if __name__ == "__main__":
    main()
