"""The bundled synthetic dataset: procedural shape scenes with questions only the image can answer.

    python -m llava_jax.data.synthetic --out DIR [--num N] [--seed S] [--num-eval M] [--image-size PX] [--grid G]
        [--noise SHARE [--noise-kinds KINDS]] [--num-val V]
    python -m llava_jax.data.synthetic --benchmarks DIR [--seed S] [--image-size PX] [--grid G]

Each image is a G x G board (G = 2 by default, or 4) holding 1-3 objects, every one with its own shape
(circle, square, triangle, cross), its own colour (red, green, blue, yellow, purple, orange), a size (large or
small) and its own cell -- its own column while there are enough columns -- so "which side", "larger than" and
"how many" have one clear answer. The default 32 px image has 16 px cells, each 2 x 2 of the demo's 8 px
patches. Writes:

  DIR/images/*.jpg                       training and held-out images (bare file names in every record)
  DIR/stage1.json                        caption records (CC3M chat.json layout) naming objects, colours, places
  DIR/stage2.json                        multi-turn instruction records (colour / shape / count / side / size)
  DIR/eval.jsonl                         held-out questions on unseen images: question_id, image, text,
                                         answer, choices, category, num_objects
  DIR/meta.json                          counts, categories, chance level (mean of 1 / len(choices))
  DIR/coco/captions.json, instances.json COCO layout (5 captions per image; boxes [x, y, w, h] per object)
  DIR/cc_sbu_align/filter_cap.json       MiniGPT-4 layout with image/{id}.jpg (symlinks into images/)

With --noise SHARE > 0, stage2.json is instead a noisy instruction set (llava_jax.data.noise): records range
from terse to complete, and exactly round(SHARE x N) are bad -- contradicting answers, another scene's image,
an answer cut mid-sentence, a generic non-answer, exact duplicates (--noise-kinds picks and weighs them, e.g.
"contradiction=2,swap=1") -- and DIR/noise_labels.json says which and how; it is for reports only, no scorer
reads it. With --num-val V, DIR/val.jsonl holds V validation questions in eval.jsonl's layout on images of
their own (syn_val_*.jpg). Both come from rngs of their own, so --noise 0 (the default) and --num-val 0 leave
every file byte for byte as without them.

--benchmarks DIR writes held-out scenes in the public layouts of the evaluation suite's benchmarks
(llava_jax.data.benchmark_sets: captions, VSR statements, MME yes/no pairs, GQA, MMBench, counting and
multi-class questions) from an rng of its own; with --out as well, the dataset under --out is byte for byte the
same as without it.

Answers are balanced so a model that ignores the image scores at chance; `score_answer` grades a reply.
Everything is a function of the seed.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from llava_jax import cli
from llava_jax import io as lio

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (235, 205, 25),
    "purple": (135, 55, 175),
    "orange": (245, 125, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("large", "small")
COUNT_WORDS = ("zero", "one", "two", "three")
CATEGORIES = ("color", "shape", "count", "side", "size")

NOISE_LABELS = "noise_labels.json"  # which stage-2 records are bad, and how; no scorer may read it
_BACKGROUND = (244, 244, 240)
GRID = 2  # the board is GRID x GRID cells (2 or 4)
TURNS = 3  # question turns per stage-2 record (fewer when the scene has fewer that need the image)
_LARGE, _SMALL = 0.94, 0.70  # object side as a fraction of the cell side

_CAPTION_PROMPTS = (
    "Give a short caption for this picture.",
    "Describe the image briefly.",
    "Write a one-sentence summary of the image.",
    "What does this picture show? Answer in one sentence.",
    "Summarise the scene in a few words.",
)


@dataclasses.dataclass(frozen=True)
class Obj:
    """One drawn object: shape, colour name, size class, board column (0 = leftmost), box in pixels."""

    shape: str
    color: str
    size: str
    column: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (inclusive-exclusive)
    row: int = 0
    grid: int = GRID  # the board's cells per side


# ------------------------------------------------------------------------------------------------ scenes


def make_scene(rng: np.random.Generator, image_size: int, count: int | None = None, jitter: float = 0.0,
               grid: int = GRID) -> list[Obj]:
    """1-3 objects (uniform count) with distinct shapes, colours and cells; sizes vary.

    The image is a `grid` x `grid` board of cells: while the objects fit, each sits in its own column, in a
    random row; otherwise (3 objects on a 2 x 2 board) each in its own cell. Objects are centred in their cell
    and moved by up to `jitter` x cell side; large ones fill most of a cell, small ones about 70% of its side.
    """
    n = int(rng.integers(1, 4)) if count is None else count
    shapes = rng.choice(len(SHAPES), n, replace=False)
    colors = rng.choice(len(COLORS), n, replace=False)
    if n <= grid:  # one object per column, any row
        columns = np.sort(rng.choice(grid, n, replace=False))
        rows = rng.integers(0, grid, n)
    else:  # more objects than columns: one per cell
        cells = np.sort(rng.choice(grid * grid, n, replace=False))
        columns, rows = cells % grid, cells // grid
    sizes = rng.integers(0, 2, n)
    if n >= 2 and len(set(sizes.tolist())) == 1 and rng.random() < 0.5:
        sizes[rng.integers(0, n)] ^= 1  # more scenes with a size contrast
    cell = image_size / grid
    objs = []
    for k in range(n):
        side = max(3, round((_LARGE if sizes[k] == 0 else _SMALL) * cell))
        room = (cell - side) / 2
        cx = (columns[k] + 0.5) * cell + rng.uniform(-1, 1) * min(jitter * cell, room)
        cy = (rows[k] + 0.5) * cell + rng.uniform(-1, 1) * min(jitter * cell, room)
        x0, y0 = round(cx - side / 2), round(cy - side / 2)
        objs.append(
            Obj(SHAPES[shapes[k]], list(COLORS)[colors[k]], SIZES[sizes[k]], int(columns[k]),
                (x0, y0, x0 + side, y0 + side), int(rows[k]), grid)
        )
    return objs


def render(objs: Sequence[Obj], image_size: int) -> Image.Image:
    """Draws the scene on a light background (RGB, image_size x image_size)."""
    img = Image.new("RGB", (image_size, image_size), _BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in objs:
        x0, y0, x1, y1 = o.box
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif o.shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif o.shape == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
        elif o.shape == "cross":
            t = max(2, (x1 - x0) // 3)
            mx, my = (x0 + x1) // 2, (y0 + y1) // 2
            draw.rectangle((mx - t // 2 - t % 2, y0, mx + t // 2, y1 - 1), fill=fill)
            draw.rectangle((x0, my - t // 2 - t % 2, x1 - 1, my + t // 2), fill=fill)
    return img


# ------------------------------------------------------------------------------------------------ text


def _place(o: Obj) -> str:
    """Where an object is, in caption words ("in the top left corner", "left of the centre")."""
    if o.grid == 2:
        return f"in the {('top', 'bottom')[o.row]} {('left', 'right')[o.column]} corner"
    return {0: "on the far left", 1: "left of the centre", 2: "right of the centre", 3: "on the far right"}[o.column]


def caption(objs: Sequence[Obj], variant: int = 0) -> str:
    """A sentence naming every object's shape, colour, size and place.

    Objects are listed in a fixed vocabulary order, keyed alternately by shape (even variants: "a circle, red
    and large, on the far left") or by colour (odd: "a red large circle on the far left"), so each attribute
    follows the word that picks its object out -- the lookup the held-out questions ask for.
    """
    n = len(objs)
    if variant % 2 == 0:
        ordered = sorted(objs, key=lambda o: SHAPES.index(o.shape))
        parts = [f"a {o.shape}, {o.color} and {o.size}, {_place(o)}" for o in ordered]
    else:
        ordered = sorted(objs, key=lambda o: list(COLORS).index(o.color))
        parts = [f"a {o.color} {o.size} {o.shape} {_place(o)}" for o in ordered]
    body = parts[0] if n == 1 else (f"{parts[0]} and {parts[1]}" if n == 2 else f"{parts[0]}; {parts[1]}; and {parts[2]}")
    openers = ("There is", "The image shows", "This picture contains", "We can see", "A plain background with")
    opener = openers[variant % len(openers)]
    if opener == "There is" and n > 1:
        opener = "There are"
    text = f"{opener} {body}."
    return text[0].upper() + text[1:]


def detailed_description(objs: Sequence[Obj]) -> str:
    """A longer description (MiniGPT-4 style): count, then each object with its relations."""
    n = len(objs)
    lines = [f"The image shows {COUNT_WORDS[n]} {'shape' if n == 1 else 'shapes'} on a plain light background."]
    for o in objs:
        lines.append(f"A {o.color} {o.shape} is {_place(o)}, and it is {o.size}.")
    if n >= 2:
        big = [o for o in objs if o.size == "large"]
        if big and len(big) < n:
            lines.append(f"The largest object is the {big[0].color} {big[0].shape}.")
    return " ".join(lines)


def _color_q(o: Obj) -> dict[str, Any]:
    return {"text": f"What color is the {o.shape}?", "answer": o.color, "choices": list(COLORS),
            "reply": f"The {o.shape} is {o.color}."}


def _shape_q(o: Obj) -> dict[str, Any]:
    return {"text": f"What shape is the {o.color} object?", "answer": o.shape, "choices": list(SHAPES),
            "reply": f"The {o.color} object is a {o.shape}."}


def _side_q(o: Obj) -> dict[str, Any]:
    side = "left" if o.column < o.grid // 2 else "right"
    return {"text": f"Which side of the picture is the {o.shape} on?", "answer": side,
            "choices": ["left", "right"], "reply": f"The {o.shape} is {_place(o)}."}


def _count_q(n: int) -> dict[str, Any]:
    return {"text": "How many shapes are in the image?", "answer": COUNT_WORDS[n], "choices": list(COUNT_WORDS[1:]),
            "reply": f"There {'is' if n == 1 else 'are'} {COUNT_WORDS[n]} shape{'' if n == 1 else 's'}."}


def _size_q(objs: Sequence[Obj], rng: np.random.Generator) -> dict[str, Any] | None:
    pairs = [(x, y) for x in objs for y in objs if x.size == "large" and y.size == "small"]
    if not pairs:
        return None
    big, small = pairs[int(rng.integers(0, len(pairs)))]
    first, second = (big, small) if rng.random() < 0.5 else (small, big)
    return {"text": f"Which is larger, the {first.shape} or the {second.shape}?", "answer": big.shape,
            "choices": [first.shape, second.shape], "reply": larger_reply(big.shape)}


def larger_reply(shape: str) -> str:
    """The size question's reply naming `shape` as the larger object."""
    return f"The larger one is the {shape}."


def questions(objs: Sequence[Obj], rng: np.random.Generator) -> dict[str, dict[str, Any]]:
    """One question per category answerable for this scene, each about a random object ->
    {category: {"text", "answer", "choices", "reply"}}.

    "answer" is the graded word; "reply" the sentence the training records teach, which restates the object the
    question names right before the answer ("The circle is red."), as the captions do.

    Phrasings never reveal the answer: the colour question names the shape, the shape question names the
    colour, the side question asks which side of the picture a named shape is on (the
    reply names its place as the captions do: "The circle is in the top left corner."), the size question names
    two objects in a random order.
    """
    n = len(objs)
    out = {"color": _color_q(objs[int(rng.integers(0, n))]), "shape": _shape_q(objs[int(rng.integers(0, n))]),
           "count": _count_q(n), "side": _side_q(objs[int(rng.integers(0, n))])}
    size = _size_q(objs, rng) if n >= 2 else None
    if size is not None:
        out["size"] = size
    return out


def question_pool(objs: Sequence[Obj], rng: np.random.Generator) -> list[dict[str, Any]]:
    """Every training question for a scene: colour, shape and side of each object, the count, two size pairs."""
    pool = [q for o in objs for q in (_color_q(o), _shape_q(o), _side_q(o))] + [_count_q(len(objs))]
    sizes = [_size_q(objs, rng), _size_q(objs, rng)] if len(objs) >= 2 else []
    return pool + [q for q in sizes if q is not None]


_WORD = re.compile(r"[a-z0-9]+")
_SYNONYMS = {"1": "one", "2": "two", "3": "three", "colour": "color", "grey": "gray", "violet": "purple",
             "bigger": "larger"}


def _words(text: str) -> list[str]:
    return [_SYNONYMS.get(w, w) for w in _WORD.findall(text.lower())]


def score_answer(text: str, record: dict[str, Any]) -> bool:
    """True when `text` names the record's answer and no other choice (digits count as number words)."""
    words = set(_words(text))
    answer = _SYNONYMS.get(record["answer"].lower(), record["answer"].lower())
    others = {_SYNONYMS.get(c.lower(), c.lower()) for c in record["choices"]} - {answer}
    return answer in words and not (words & others)


# ------------------------------------------------------------------------------------------------ writing


def _conversation(pool: Sequence[dict[str, Any]], rng: np.random.Generator, turns: int) -> list[dict[str, str]]:
    """Up to `turns` questions drawn from `pool` in random order; a question whose answer an earlier turn
    already names ("What color is the circle?" -> "The circle is red.", then "What shape is the red object?")
    is skipped, so every answer needs the image, as in the single-turn held-out questions."""
    conv: list[dict[str, str]] = []
    said: set[str] = set()
    for i in rng.permutation(len(pool)):
        if len(conv) == 2 * turns:
            break
        q = pool[int(i)]
        if q["answer"] in said:
            continue
        text = q["text"]
        if not conv:
            text = f"{text}\n<image>" if rng.random() < 0.2 else f"<image>\n{text}"
        conv.append({"from": "human", "value": text})
        conv.append({"from": "gpt", "value": q["reply"]})
        said.update(_words(q["text"]) + _words(q["reply"]))
    return conv


def _heldout(rng: np.random.Generator, count: int, prefix: str, img_dir: Path, image_size: int, quality: int,
             grid: int) -> list[dict[str, Any]]:
    """`count` single-question rows on new images named {prefix}{j:05d}.jpg, categories in turn (eval.jsonl's
    layout: question_id, image, text, answer, choices, category, num_objects)."""
    rows = []
    for j in range(count):
        category = CATEGORIES[j % len(CATEGORIES)]
        n = None
        if category == "size":
            n = int(rng.integers(2, 4))
        while True:  # the size question needs a large and a small object
            objs = make_scene(rng, image_size, n, grid=grid)
            qs = questions(objs, rng)
            if category in qs:
                break
        name = f"{prefix}{j:05d}.jpg"
        render(objs, image_size).save(img_dir / name, quality=quality)
        q = qs[category]
        rows.append({"question_id": j, "image": name, "text": q["text"], "answer": q["answer"],
                     "choices": q["choices"], "category": category, "num_objects": len(objs)})
    return rows


def generate(out: str | os.PathLike, num: int = 5000, seed: int = 0, num_eval: int = 500,
             image_size: int = 32, quality: int = 95, grid: int = GRID, noise: float = 0.0,
             noise_kinds: str | dict[str, float] | None = None, num_val: int = 0) -> dict[str, Any]:
    """Writes the dataset under `out` (see module docstring) and returns meta.json's content.

    With noise > 0, stage2.json is the noisy set of `llava_jax.data.noise` (that share of the `num` records bad,
    of the kinds in `noise_kinds`) and noise_labels.json says which; with num_val > 0, val.jsonl holds that many
    held-out questions on images of their own. Both are drawn with their own rngs, so everything else is the
    same as without them.
    """
    if num < 1 or num_eval < 0 or num_val < 0:
        raise ValueError("need num >= 1, num_eval >= 0 and num_val >= 0")
    from llava_jax.data import noise as noise_mod  # noise builds on this module's scenes and replies

    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be a share in [0, 1], got {noise}")
    if noise_kinds:
        noise_mod.parse_kinds(noise_kinds)  # a bad mix fails before any file is written
    if grid not in (2, 4):
        raise ValueError(f"grid must be 2 or 4 cells per side, got {grid}")
    out = Path(out)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    stage1, stage2, coco_images, coco_caps, coco_inst, cc_ann = [], [], [], [], [], []
    scenes: list[list[Obj]] = []
    cat_ids = {s: i + 1 for i, s in enumerate(SHAPES)}
    for i in range(num):
        name = f"syn_{i:06d}.jpg"
        objs = make_scene(rng, image_size, grid=grid)
        scenes.append(objs)
        render(objs, image_size).save(img_dir / name, quality=quality)
        rid = f"syn_{i:06d}"
        prompt = _CAPTION_PROMPTS[int(rng.integers(0, len(_CAPTION_PROMPTS)))]
        stage1.append({"id": rid, "image": name, "conversations": [
            {"from": "human", "value": f"<image>\n{prompt}" if rng.random() < 0.5 else f"{prompt}\n<image>"},
            {"from": "gpt", "value": caption(objs, variant=int(rng.integers(0, 5)))},
        ]})
        stage2.append({"id": rid, "image": name,
                       "conversations": _conversation(question_pool(objs, rng), rng, TURNS)})
        coco_images.append({"id": i + 1, "file_name": name, "width": image_size, "height": image_size})
        for v in range(5):
            coco_caps.append({"id": len(coco_caps) + 1, "image_id": i + 1, "caption": caption(objs, variant=v)})
        for o in objs:
            x0, y0, x1, y1 = o.box
            coco_inst.append({"id": len(coco_inst) + 1, "image_id": i + 1, "category_id": cat_ids[o.shape],
                              "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                              "area": float((x1 - x0) * (y1 - y0)), "iscrowd": 0,
                              "attributes": {"color": o.color, "size": o.size}})
        cc_ann.append({"image_id": rid, "caption": detailed_description(objs)})
    eval_rows = _heldout(np.random.default_rng([seed, 1]), num_eval, "syn_eval_", img_dir, image_size, quality, grid)
    labels = None
    if noise > 0:
        stage2, labels = noise_mod.make_noisy(stage2, scenes, noise, noise_kinds, seed)
    chance = float(np.mean([1 / len(r["choices"]) for r in eval_rows])) if eval_rows else 0.0
    lio.atomic_write_json(out / "stage1.json", stage1, indent=None)
    lio.atomic_write_json(out / "stage2.json", stage2, indent=None)
    lio.atomic_write_jsonl(out / "eval.jsonl", eval_rows)
    if num_val > 0:
        val_rows = _heldout(np.random.default_rng([seed, 2]), num_val, "syn_val_", img_dir, image_size, quality, grid)
        lio.atomic_write_jsonl(out / "val.jsonl", val_rows)
    if labels is not None:
        lio.atomic_write_json(out / NOISE_LABELS, labels, indent=None)
    categories = [{"id": cat_ids[s], "name": s, "supercategory": "shape"} for s in SHAPES]
    lio.atomic_write_json(out / "coco" / "captions.json",
                          {"images": coco_images, "annotations": coco_caps, "categories": categories}, indent=None)
    lio.atomic_write_json(out / "coco" / "instances.json",
                          {"images": coco_images, "annotations": coco_inst, "categories": categories}, indent=None)
    cc_dir = out / "cc_sbu_align"
    cc_img = cc_dir / "image"
    if cc_img.exists():
        shutil.rmtree(cc_img)
    cc_img.mkdir(parents=True)
    for i in range(num):
        src = Path("..") / ".." / "images" / f"syn_{i:06d}.jpg"
        try:
            os.symlink(src, cc_img / f"syn_{i:06d}.jpg")
        except OSError:
            shutil.copyfile(img_dir / f"syn_{i:06d}.jpg", cc_img / f"syn_{i:06d}.jpg")
    lio.atomic_write_json(cc_dir / "filter_cap.json", {"annotations": cc_ann}, indent=None)
    per_cat: dict[str, int] = {}
    per_count: dict[str, int] = {}
    for r in eval_rows:
        per_cat[r["category"]] = per_cat.get(r["category"], 0) + 1
        per_count[str(r["num_objects"])] = per_count.get(str(r["num_objects"]), 0) + 1
    meta = {
        "seed": seed, "image_size": image_size, "grid": grid, "num_train_images": num, "num_eval": len(eval_rows),
        "stage1_records": len(stage1), "stage2_records": len(stage2),
        "stage2_turns": sum(len(r["conversations"]) // 2 for r in stage2),
        "eval_per_category": per_cat, "eval_per_num_objects": dict(sorted(per_count.items())), "chance": chance, "colors": list(COLORS), "shapes": list(SHAPES),
        "categories": list(CATEGORIES),
        "scoring": "llava_jax.data.synthetic.score_answer: the reply names the answer and no other choice",
    }
    if noise > 0:  # keys only when asked for, so the clean set's meta.json stays as it was
        meta["noise"] = {"share": noise, "labels": NOISE_LABELS, "counts": labels["counts"]}
    if num_val > 0:
        meta["num_val"] = num_val
    lio.atomic_write_json(out / "meta.json", meta)
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (see module docstring)."""
    p = cli.ArgumentParser(prog="python -m llava_jax.data.synthetic", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="dataset directory (required unless --benchmarks is given)")
    p.add_argument("--num", type=int, default=5000, help="training images")
    p.add_argument("--num-eval", type=int, default=500, help="held-out eval questions (one image each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--grid", type=int, default=GRID, help="board cells per side (2 or 4)")
    p.add_argument("--noise", type=float, default=0.0,
                   help="share of bad stage-2 records in [0, 1] (0: the clean set, byte for byte)")
    p.add_argument("--noise-kinds", default="",
                   help="kinds of bad records, e.g. contradiction,swap or contradiction=2,swap=1 "
                        "(kinds: contradiction, swap, truncated, generic, duplicate; default: a mix of all)")
    p.add_argument("--num-val", type=int, default=0, help="validation questions (val.jsonl, images of their own)")
    p.add_argument("--benchmarks", default=None, metavar="DIR",
                   help="also (or only) write the benchmark layouts of llava_jax.data.benchmark_sets to DIR")

    def _error(message: str) -> None:
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)

    p.error = _error  # type: ignore[method-assign]
    args = p.parse_args(argv)
    if args.out is None and args.benchmarks is None:
        _error("give --out DIR, --benchmarks DIR or both")
    t0 = time.perf_counter()
    if args.benchmarks is not None:
        from llava_jax.data.benchmark_sets import write_benchmarks

        if args.grid not in (2, 4):
            _error(f"grid must be 2 or 4 cells per side, got {args.grid}")
        bench = write_benchmarks(args.benchmarks, seed=args.seed, image_size=args.image_size, grid=args.grid)
        print(f"wrote benchmark layouts {bench['questions']} to {args.benchmarks}", file=sys.stderr)
        if args.out is None:
            return 0
    try:
        meta = generate(args.out, args.num, args.seed, args.num_eval, args.image_size, grid=args.grid,
                        noise=args.noise, noise_kinds=args.noise_kinds or None, num_val=args.num_val)
    except ValueError as e:
        _error(str(e))
    noisy = f", {meta['noise']['counts']['bad']} of {meta['stage2_records']} stage-2 records bad" if "noise" in meta else ""
    print(f"wrote {meta['num_train_images']} training images, {meta['num_eval']} eval questions "
          f"(chance {meta['chance']:.3f}){noisy} to {args.out} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
