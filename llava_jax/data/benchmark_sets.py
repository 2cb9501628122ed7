"""Held-out synthetic scenes written in each benchmark's public layout, so the evaluation suite runs on bundled
data (`python -m llava_jax.data.synthetic --benchmarks DIR`; configs/eval_suite.py:DIR reads them).

The scenes are `llava_jax.data.synthetic`'s (same shapes, colours, board and image size), drawn from an rng of
their own ([seed, 3, k] per benchmark), on images named bench_* that no training or eval file uses. Under DIR:

  captioning/captions.json, images/   COCO caption layout: 5 reference captions per image (synthetic.caption)
  vsr/test.jsonl, images/             VSR layout: {"image", "caption", "label": 1|0, "relation"}; statements
                                      "The <shape> is left of / right of / above / below the <shape>." (half
                                      true, half with the relation flipped)
  mme/<subtask>/<image>.jpg + .txt    MME's flat layout for existence, count, position, color: two
                                      "question<TAB>Yes|No" lines per image, one true, one false
  gqa/testdev_balanced_questions.json GQA layout: colour / shape questions (structural "query", open) and
      gqa/images/<imageId>.jpg        "Is there a <shape>?" (structural "verify", binary); lower-case answers
  mmbench/mmbench_dev.tsv             MMBench TSV: colour / shape questions, 4 options, base64 images
  ehub/counting.jsonl                 "How many shapes are there in the image?" -> "1".."3"
  ehub/multiclass.jsonl, images/      "Is there a <shape> in the image?" -> yes / no (balanced)
  benchmarks.json                     what was written (counts per benchmark, seed)

TextVQA needs text in the images, which the scenes do not have: no synthetic TextVQA set is written.
"""

from __future__ import annotations

import base64
import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llava_jax import io as lio
from llava_jax.data.synthetic import COLORS, GRID, SHAPES, Obj, caption, make_scene, render

RELATIONS = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
_YES_NO = " Please answer yes or no."


def _scene(rng: np.random.Generator, image_size: int, grid: int, count: int | None = None) -> list[Obj]:
    return make_scene(rng, image_size, count, grid=grid)


def _save(objs: Sequence[Obj], image_size: int, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    render(objs, image_size).save(path, quality=95)


def _relation(a: Obj, b: Obj) -> str | None:
    """A true spatial relation of a to b (columns first, then rows), None when they share a cell line both ways."""
    if a.column != b.column:
        return "left of" if a.column < b.column else "right of"
    if a.row != b.row:
        return "above" if a.row < b.row else "below"
    return None


def _captioning(out: Path, rng: np.random.Generator, num: int, size: int, grid: int) -> int:
    images, anns = [], []
    for i in range(num):
        objs = _scene(rng, size, grid)
        name = f"bench_cap_{i:05d}.jpg"
        _save(objs, size, out / "images" / name)
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
        for v in range(5):
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "caption": caption(objs, variant=v)})
    lio.atomic_write_json(out / "captions.json", {"images": images, "annotations": anns}, indent=None)
    return num


def _vsr(out: Path, rng: np.random.Generator, num: int, size: int, grid: int) -> int:
    rows = []
    for i in range(num):
        while True:
            objs = _scene(rng, size, grid, int(rng.integers(2, 4)))
            a, b = (objs[int(k)] for k in rng.choice(len(objs), 2, replace=False))
            relation = _relation(a, b)
            if relation is not None:
                break
        label = i % 2 == 0
        shown = relation if label else RELATIONS[relation]
        name = f"bench_vsr_{i:05d}.jpg"
        _save(objs, size, out / "images" / name)
        rows.append({"image": name, "caption": f"The {a.shape} is {shown} the {b.shape}.", "label": int(label),
                     "relation": shown})
    lio.atomic_write_jsonl(out / "test.jsonl", rows)
    return num


def _mme_pair(subtask: str, objs: Sequence[Obj], rng: np.random.Generator) -> list[tuple[str, str]]:
    o = objs[int(rng.integers(0, len(objs)))]
    if subtask == "existence":
        absent = [s for s in SHAPES if s not in {x.shape for x in objs}]
        return [(f"Is there a {o.shape} in this image?", "Yes"),
                (f"Is there a {absent[int(rng.integers(0, len(absent)))]} in this image?", "No")]
    if subtask == "count":
        n = len(objs)
        wrong = [k for k in (1, 2, 3) if k != n][int(rng.integers(0, 2))]
        return [(f"Are there {n} shapes in this image?", "Yes"), (f"Are there {wrong} shapes in this image?", "No")]
    if subtask == "position":
        side = "left" if o.column < o.grid // 2 else "right"
        other = "right" if side == "left" else "left"
        return [(f"Is the {o.shape} on the {side} side of the image?", "Yes"),
                (f"Is the {o.shape} on the {other} side of the image?", "No")]
    wrong = [c for c in COLORS if c != o.color][int(rng.integers(0, len(COLORS) - 1))]
    return [(f"Is the {o.shape} {o.color}?", "Yes"), (f"Is the {o.shape} {wrong}?", "No")]


def _mme(out: Path, rng: np.random.Generator, num: int, size: int, grid: int) -> int:
    total = 0
    for subtask in ("existence", "count", "position", "color"):
        for i in range(max(1, num // 4)):
            objs = _scene(rng, size, grid)
            stem = f"bench_mme_{subtask}_{i:05d}"
            _save(objs, size, out / subtask / f"{stem}.jpg")
            pairs = _mme_pair(subtask, objs, rng)
            if rng.random() < 0.5:
                pairs = pairs[::-1]
            lio.atomic_write_text(out / subtask / f"{stem}.txt", "".join(f"{q}{_YES_NO}\t{a}\n" for q, a in pairs))
            total += 2
    return total


def _gqa(out: Path, rng: np.random.Generator, num: int, size: int, grid: int) -> int:
    questions: dict[str, Any] = {}
    for i in range(num):
        objs = _scene(rng, size, grid)
        image_id = f"bench_gqa_{i:05d}"
        _save(objs, size, out / "images" / f"{image_id}.jpg")
        o = objs[int(rng.integers(0, len(objs)))]
        kind = i % 3
        if kind == 0:
            q, a, types = f"What color is the {o.shape}?", o.color, ("query", "attr")
        elif kind == 1:
            q, a, types = f"What shape is the {o.color} object?", o.shape, ("query", "cat")
        else:
            present = rng.random() < 0.5
            shape = o.shape if present else [s for s in SHAPES if s not in {x.shape for x in objs}][0]
            q, a, types = f"Is there a {shape} in the image?", "yes" if present else "no", ("verify", "obj")
        questions[str(1000 + i)] = {"imageId": image_id, "question": q, "answer": a, "isBalanced": True,
                                    "types": {"structural": types[0], "semantic": types[1], "detailed": types[1]}}
    lio.atomic_write_json(out / "testdev_balanced_questions.json", questions, indent=None)
    return num


def _mmbench(out: Path, rng: np.random.Generator, num: int, size: int, grid: int) -> int:
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t", lineterminator="\n")
    writer.writerow(["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category",
                     "split", "image"])
    for i in range(num):
        objs = _scene(rng, size, grid)
        o = objs[int(rng.integers(0, len(objs)))]
        if i % 2 == 0:
            question, right, pool, category = f"What color is the {o.shape}?", o.color, list(COLORS), "color"
        else:
            question, right, pool, category = f"What shape is the {o.color} object?", o.shape, list(SHAPES), "shape"
        others = [c for c in pool if c != right]
        options = [right, *(others[int(k)] for k in rng.choice(len(others), 3, replace=False))]
        options = [options[int(k)] for k in rng.permutation(4)]
        png = io.BytesIO()
        render(objs, size).save(png, format="PNG")
        writer.writerow([i, question, "", *options, "ABCD"[options.index(right)], category, "attribute",
                         "dev", base64.b64encode(png.getvalue()).decode("ascii")])
    lio.atomic_write_text(out / "mmbench_dev.tsv", buf.getvalue())
    return num


def _ehub(out: Path, rng: np.random.Generator, num: int, size: int, grid: int) -> int:
    counting, multiclass = [], []
    for i in range(num):
        objs = _scene(rng, size, grid)
        name = f"bench_ehub_{i:05d}.jpg"
        _save(objs, size, out / "images" / name)
        counting.append({"question_id": i, "image": name, "text": "How many shapes are there in the image?",
                         "answer": str(len(objs)), "category": "counting"})
        present = i % 2 == 0
        absent = [s for s in SHAPES if s not in {x.shape for x in objs}]
        shape = objs[int(rng.integers(0, len(objs)))].shape if present else absent[int(rng.integers(0, len(absent)))]
        multiclass.append({"question_id": i, "image": name, "text": f"Is there a {shape} in the image?",
                           "answer": "yes" if present else "no", "category": "multiclass"})
    lio.atomic_write_jsonl(out / "counting.jsonl", counting)
    lio.atomic_write_jsonl(out / "multiclass.jsonl", multiclass)
    return 2 * num


WRITERS = {"captioning": _captioning, "vsr": _vsr, "mme": _mme, "gqa": _gqa, "mmbench": _mmbench, "ehub": _ehub}


def write_benchmarks(out: str | os.PathLike, num: int = 40, seed: int = 0, image_size: int = 32,
                     grid: int = GRID) -> dict[str, Any]:
    """Writes every layout of the module docstring under `out` (`num` images per benchmark); returns
    benchmarks.json's content."""
    if num < 2:
        raise ValueError(f"need at least 2 images per benchmark, got {num}")
    out = Path(out)
    counts = {}
    for k, (name, writer) in enumerate(WRITERS.items()):
        counts[name] = writer(out / name, np.random.default_rng([seed, 3, k]), num, image_size, grid)
    meta = {"seed": seed, "image_size": image_size, "grid": grid, "images_per_benchmark": num,
            "questions": counts, "not_written": {"textvqa": "the synthetic scenes hold no text"}}
    lio.atomic_write_json(out / "benchmarks.json", meta)
    return meta
