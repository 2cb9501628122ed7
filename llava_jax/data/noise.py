"""Planted noise for the synthetic instruction set: bad records of named kinds and a range of informativeness.

`make_noisy(records, scenes, noise, ...)` takes the clean stage-2 records of `llava_jax.data.synthetic` (with the
scene each record was drawn from) and returns a noisy copy plus its labels. It runs after the clean generation
with its own rng (derived from the seed), so the clean outputs do not depend on it.

Among the records, first every record gets a level of detail, as real instruction sets range from terse to
complete answers (MiniGPT-4's longer descriptions were the better ones):

  terse      the first question turn only
  partial    up to two question turns, then a description that names some of the objects (colour, shape, place)
  complete   every question turn, then a detailed description (count, every object's colour, shape, place, size)

A record's informativeness is the share of its scene's facts (per object: colour-shape pairing, place, size;
plus the count) its answers state, so length and what a record teaches go together without any marker.

Then exactly round(noise x N) records are made bad, split over the chosen kinds by their weights:

  contradiction  one or more answers state another valid value (colour, shape, side, count, the larger object),
                 as fluently as a correct answer; a description, if any, gets one object's attribute changed
  swap           the record is paired with another scene's image (one where some of its answers are false)
  truncated      the last answer is cut mid-sentence (a strict prefix, not ending at a sentence end)
  generic        every answer is a generic non-answer ("It is a picture."-style)
  duplicate      an exact copy (image and conversation) of an earlier good record, under its own id

The labels go to a separate file that no scorer reads:

  {"noise": share, "mix": {kind: share}, "seed": seed,
   "records": {id: {"bad": bool, "kind": kind or null, "detail": level, "informativeness": 0-1,
                    "turns": [changed gpt-turn indices] (contradiction, truncated),
                    "image_of": id (swap: whose image it now has), "of": id (duplicate: the original)}},
   "counts": {"records", "good", "bad", one count per kind, "good_detail": {level: good records}}}

For a bad record, "detail" and "informativeness" describe its text before the corruption.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from llava_jax.data import synthetic as syn

KINDS = ("contradiction", "swap", "truncated", "generic", "duplicate")
DEFAULT_MIX: dict[str, float] = {"contradiction": 0.3, "swap": 0.25, "truncated": 0.15, "generic": 0.15,
                                 "duplicate": 0.15}
LEVELS = ("terse", "partial", "complete")

GENERIC_ANSWERS = (
    "It is a picture.",
    "This is an image.",
    "I can see the picture.",
    "The image shows what it shows.",
    "That is visible in the image.",
    "The answer is in the picture.",
    "It is hard to say from here.",
    "There is something in the image.",
    "The picture has some things in it.",
    "I am not sure about that.",
    "Please look at the image for that.",
    "It looks like a typical picture.",
)

DESCRIBE_PROMPTS = (
    "Describe the image in detail.",
    "What can you see in this picture?",
    "Tell me what the picture shows.",
    "Give a detailed description of the scene.",
    "Describe everything in the image.",
)

_SENTENCE_END = ".!?"


class NoiseError(ValueError):
    """A bad noise setting: a share outside [0, 1], an unknown kind, or a set too small for the kinds asked."""


# ------------------------------------------------------------------------------------------------ settings


def parse_kinds(spec: str | Mapping[str, float] | None) -> dict[str, float]:
    """The kind mix from "contradiction,swap" (equal shares) or "contradiction=2,swap=1" (weights, normalised)
    or a mapping; None or "" gives DEFAULT_MIX. Returns {kind: share} summing to 1, in KINDS order."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return dict(DEFAULT_MIX)
    if isinstance(spec, str):
        weights: dict[str, float] = {}
        for part in spec.split(","):
            name, _, value = part.strip().partition("=")
            name = name.strip()
            try:
                weights[name] = float(value) if value else 1.0
            except ValueError:
                raise NoiseError(f"noise kind weight {value!r} for {name!r} is not a number") from None
    else:
        weights = {str(k): float(v) for k, v in spec.items()}
    unknown = sorted(set(weights) - set(KINDS))
    if unknown:
        raise NoiseError(f"unknown noise kind(s) {', '.join(unknown)}; choose from {', '.join(KINDS)}")
    if any(not np.isfinite(w) or w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise NoiseError("noise kind weights must be >= 0 with a positive sum")
    total = sum(weights.values())
    return {k: weights[k] / total for k in KINDS if weights.get(k, 0) > 0}


def allocate(total: int, mix: Mapping[str, float]) -> dict[str, int]:
    """Splits `total` records over the kinds by share (largest remainder; ties to the earlier kind) -> {kind: n}
    summing to `total`."""
    names = list(mix)
    exact = np.asarray([mix[k] * total for k in names], np.float64)
    counts = np.floor(exact).astype(int)
    order = sorted(range(len(names)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - int(counts.sum())]:
        counts[i] += 1
    return {k: int(c) for k, c in zip(names, counts, strict=True)}


# ------------------------------------------------------------------------------------------------ questions

_QUESTIONS = (
    ("color", re.compile(r"What color is the (\w+)\?")),
    ("shape", re.compile(r"What shape is the (\w+) object\?")),
    ("side", re.compile(r"Which side of the picture is the (\w+) on\?")),
    ("count", re.compile(r"How many shapes are in the image\?")),
    ("size", re.compile(r"Which is larger, the (\w+) or the (\w+)\?")),
)


def parse_question(text: str) -> tuple[str, tuple[str, ...]] | None:
    """(category, the words naming its objects) of a synthetic question ("<image>" ignored), or None."""
    text = text.replace("<image>", "").strip()
    for category, pattern in _QUESTIONS:
        m = pattern.fullmatch(text)
        if m:
            return category, m.groups()
    return None


def _find(objs: Sequence[syn.Obj], shape: str | None = None, color: str | None = None) -> syn.Obj | None:
    for o in objs:
        if (shape is None or o.shape == shape) and (color is None or o.color == color):
            return o
    return None


def true_reply(question: str, objs: Sequence[syn.Obj]) -> str | None:
    """The reply the clean set gives to `question` for the scene `objs`; None if the scene cannot answer it."""
    parsed = parse_question(question)
    if parsed is None:
        return None
    category, args = parsed
    if category == "count":
        return syn._count_q(len(objs))["reply"]
    if category == "size":
        a, b = _find(objs, shape=args[0]), _find(objs, shape=args[1])
        if a is None or b is None or a.size == b.size:
            return None
        return syn.larger_reply(a.shape if a.size == "large" else b.shape)
    o = _find(objs, color=args[0]) if category == "shape" else _find(objs, shape=args[0])
    if o is None:
        return None
    return {"color": syn._color_q, "shape": syn._shape_q, "side": syn._side_q}[category](o)["reply"]


def _other(values: Sequence[str], current: str, rng: np.random.Generator) -> str:
    rest = [v for v in values if v != current]
    return rest[int(rng.integers(0, len(rest)))]


def contradicting_reply(question: str, objs: Sequence[syn.Obj], rng: np.random.Generator) -> str | None:
    """A fluent reply to `question` stating another valid value than the scene's: another colour or shape, the
    other side, another count, or the smaller object as the larger; None if the question is not a synthetic one
    the scene answers."""
    parsed = parse_question(question)
    if parsed is None or true_reply(question, objs) is None:
        return None
    category, args = parsed
    if category == "count":
        wrong = _other(syn.COUNT_WORDS[1:], syn.COUNT_WORDS[len(objs)], rng)
        return syn._count_q(syn.COUNT_WORDS.index(wrong))["reply"]
    if category == "size":
        first = _find(objs, shape=args[0])
        return syn.larger_reply(args[1] if first is not None and first.size == "large" else args[0])
    o = _find(objs, color=args[0]) if category == "shape" else _find(objs, shape=args[0])
    assert o is not None  # true_reply found it
    if category == "color":
        return syn._color_q(dataclasses.replace(o, color=_other(list(syn.COLORS), o.color, rng)))["reply"]
    if category == "shape":
        return syn._shape_q(dataclasses.replace(o, shape=_other(syn.SHAPES, o.shape, rng)))["reply"]
    return syn._side_q(dataclasses.replace(o, column=o.grid - 1 - o.column))["reply"]


def _facts_of(question: str, objs: Sequence[syn.Obj]) -> set[str]:
    """The scene facts a correct reply to `question` states ("bind:circle", "place:circle", "size:circle",
    "count")."""
    parsed = parse_question(question)
    if parsed is None:
        return set()
    category, args = parsed
    if category == "count":
        return {"count"}
    if category == "size":
        return {f"size:{args[0]}", f"size:{args[1]}"}
    if category == "shape":
        o = _find(objs, color=args[0])
        return {f"bind:{o.shape}"} if o else set()
    return {f"{'place' if category == 'side' else 'bind'}:{args[0]}"}


# ------------------------------------------------------------------------------------------------ descriptions


def _named(o: syn.Obj) -> str:
    """"a red circle", "an orange cross"."""
    return f"{'an' if o.color[0] in 'aeiou' else 'a'} {o.color} {o.shape}"


def _phrase(o: syn.Obj) -> str:
    return f"{_named(o)} {syn._place(o)}"


def partial_description(objs: Sequence[syn.Obj], rng: np.random.Generator) -> tuple[str, set[str]]:
    """A description naming some of the objects (colour, shape, place; no count, no sizes) -> (text, facts).

    With one object it names only its colour and shape."""
    if len(objs) == 1:
        o = objs[0]
        return f"The picture shows {_named(o)}.", {f"bind:{o.shape}"}
    k = int(rng.integers(1, len(objs)))
    chosen = [objs[int(i)] for i in sorted(rng.choice(len(objs), k, replace=False))]
    body = " and ".join(_phrase(o) for o in chosen)
    facts = {f"{f}:{o.shape}" for o in chosen for f in ("bind", "place")}
    return f"The picture shows {body}.", facts


def complete_description(objs: Sequence[syn.Obj]) -> tuple[str, set[str]]:
    """The detailed description (count, every object's colour, shape, place and size) -> (text, facts)."""
    facts = {"count"} | {f"{f}:{o.shape}" for o in objs for f in ("bind", "place", "size")}
    text = re.sub(r"\bA (?=[aeiou])", "An ", syn.detailed_description(objs))  # "An orange cross is ..."
    return text, facts


def _perturb(objs: Sequence[syn.Obj], rng: np.random.Generator) -> list[syn.Obj]:
    """The scene with one object's colour (to one no other object has), shape (likewise) or side changed."""
    objs = list(objs)
    k = int(rng.integers(0, len(objs)))
    o = objs[k]
    what = int(rng.integers(0, 3))
    if what == 0:
        free = [c for c in syn.COLORS if c not in {x.color for x in objs}]
        objs[k] = dataclasses.replace(o, color=free[int(rng.integers(0, len(free)))])
    elif what == 1:
        free = [s for s in syn.SHAPES if s not in {x.shape for x in objs}]
        objs[k] = dataclasses.replace(o, shape=free[int(rng.integers(0, len(free)))])
    else:
        objs[k] = dataclasses.replace(o, column=o.grid - 1 - o.column)
    return objs


# ------------------------------------------------------------------------------------------------ records


def _shape_detail(record: dict[str, Any], objs: Sequence[syn.Obj], level: str,
                  rng: np.random.Generator) -> tuple[dict[str, Any], float]:
    """The record cut or extended to a level of detail -> (new record, informativeness in [0, 1])."""
    conv = record["conversations"]
    pairs = [conv[i:i + 2] for i in range(0, len(conv), 2)]
    keep = {"terse": 1, "partial": 2, "complete": len(pairs)}[level]
    pairs = [copy.deepcopy(p) for p in pairs[:keep]]
    facts: set[str] = set()
    for q, _ in pairs:
        facts |= _facts_of(q["value"], objs)
    if level != "terse":
        text, more = partial_description(objs, rng) if level == "partial" else complete_description(objs)
        facts |= more
        prompt = DESCRIBE_PROMPTS[int(rng.integers(0, len(DESCRIBE_PROMPTS)))]
        pairs.append([{"from": "human", "value": prompt}, {"from": "gpt", "value": text}])
    total = 3 * len(objs) + 1
    return {**record, "conversations": [t for p in pairs for t in p]}, round(len(facts) / total, 4)


def truncate(text: str, rng: np.random.Generator) -> str:
    """A strict prefix of `text` cut at a word boundary mid-sentence: at least one word, not ending in ".", "!",
    "?" (or a comma); preferring cuts between 30% and 90% of the length."""
    cuts = []
    for m in re.finditer(r" ", text):
        prefix = text[: m.start()].rstrip(" ,;:")
        if prefix and prefix[-1] not in _SENTENCE_END:
            cuts.append(prefix)
    if not cuts:
        raise NoiseError(f"cannot truncate {text!r} mid-sentence")
    middle = [c for c in cuts if 0.3 * len(text) <= len(c) <= 0.9 * len(text)]
    pool = middle or cuts
    return pool[int(rng.integers(0, len(pool)))]


def _contradict(record: dict[str, Any], objs: Sequence[syn.Obj], rng: np.random.Generator
                ) -> tuple[dict[str, Any], list[int]]:
    """Wrong answers in at least one question turn (each further one with probability 1/2); a description
    turn, if any, rewritten for a scene with one attribute changed. -> (record, changed gpt-turn indices)."""
    conv = copy.deepcopy(record["conversations"])
    answerable = [i for i in range(1, len(conv), 2) if true_reply(conv[i - 1]["value"], objs) is not None]
    first = answerable[int(rng.integers(0, len(answerable)))]
    changed = [i for i in answerable if i == first or rng.random() < 0.5]
    for i in changed:
        conv[i]["value"] = contradicting_reply(conv[i - 1]["value"], objs, rng)
    for i in range(1, len(conv), 2):
        if parse_question(conv[i - 1]["value"]) is None:  # a description turn
            wrong = _perturb(objs, rng)
            if conv[i]["value"] == complete_description(objs)[0]:
                conv[i]["value"] = complete_description(wrong)[0]
            else:
                conv[i]["value"] = _rewrite_partial(conv[i]["value"], objs, wrong)
            changed.append(i)
    return {**record, "conversations": conv}, sorted(changed)


def _rewrite_partial(text: str, objs: Sequence[syn.Obj], wrong: Sequence[syn.Obj]) -> str:
    """A partial description with each named object's phrase replaced by its phrase in the perturbed scene;
    if the changed object is not named, a named one gets another colour instead."""
    out = text
    for o, w in zip(objs, wrong, strict=True):
        for old, new in ((_phrase(o), _phrase(w)), (f"{_named(o)}.", f"{_named(w)}.")):
            out = out.replace(old, new)
    if out == text:
        for o in objs:
            if _named(o) in text:
                free = [c for c in syn.COLORS if c not in {x.color for x in objs}]
                return text.replace(_named(o), _named(dataclasses.replace(o, color=free[0])), 1)
    return out


def _swap_partner(i: int, records: Sequence[dict[str, Any]], scenes: Sequence[Sequence[syn.Obj]],
                  rng: np.random.Generator) -> int:
    """Another record whose scene makes at least one of record i's question answers false."""
    conv = records[i]["conversations"]
    qa = [(conv[j - 1]["value"], conv[j]["value"]) for j in range(1, len(conv), 2)
          if parse_question(conv[j - 1]["value"]) is not None]
    for _ in range(100):
        k = int(rng.integers(0, len(records) - 1))
        k += k >= i
        if any(true_reply(q, scenes[k]) != a for q, a in qa):
            return k
    raise NoiseError(f"found no scene that contradicts record {records[i].get('id', i)}")


def make_noisy(records: Sequence[dict[str, Any]], scenes: Sequence[Sequence[syn.Obj]], noise: float,
               kinds: str | Mapping[str, float] | None = None, seed: int = 0,
               ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The noisy instruction set and its labels (see the module docstring).

    records: N clean stage-2 records (unique "id"s), scenes: the N scenes they describe, noise: the share of
    bad records in [0, 1], kinds: the kind mix (parse_kinds), seed: the dataset seed (the rng is derived from it).
    Returns (N records in the input order and ids, labels).
    """
    if not 0.0 <= noise <= 1.0 or not np.isfinite(noise):
        raise NoiseError(f"noise must be a share in [0, 1], got {noise}")
    if len(records) != len(scenes):
        raise NoiseError(f"{len(records)} records but {len(scenes)} scenes")
    ids = [r["id"] for r in records]
    if len(set(ids)) != len(ids):
        raise NoiseError("record ids must be unique")
    mix = parse_kinds(kinds)
    n = len(records)
    n_bad = int(round(noise * n))
    counts = allocate(n_bad, mix)
    if counts.get("duplicate", 0) and n_bad == n:
        raise NoiseError("duplicates need at least one good record to copy; lower the noise or drop 'duplicate'")
    if counts.get("swap", 0) and n < 2:
        raise NoiseError("image swaps need at least two records")
    rng = np.random.default_rng([seed, 3])
    out, labels = [], {}
    for rec, objs in zip(records, scenes, strict=True):
        level = LEVELS[int(rng.integers(0, len(LEVELS)))]
        shaped, info = _shape_detail(rec, objs, level, rng)
        out.append(shaped)
        labels[rec["id"]] = {"bad": False, "kind": None, "detail": level, "informativeness": info}
    bad = np.sort(rng.choice(n, n_bad, replace=False)) if n_bad else np.zeros(0, int)
    kind_of = rng.permutation([k for k in mix for _ in range(counts[k])])
    assigned = dict(zip(bad.tolist(), kind_of.tolist(), strict=True))
    good = [i for i in range(n) if i not in assigned]
    first_good = good[0] if good else n
    for i in sorted(assigned):  # a duplicate follows its original, as in real sets (keep-first dedup keeps it)
        if assigned[i] == "duplicate" and i < first_good:
            later = [k for k in sorted(assigned) if k > first_good and assigned[k] != "duplicate"]
            if later:
                assigned[i], assigned[later[0]] = assigned[later[0]], assigned[i]
    for i in sorted(assigned):  # duplicates last: they copy a good record's final form
        kind = assigned[i]
        lab = labels[ids[i]]
        lab.update(bad=True, kind=kind)
        if kind == "contradiction":
            out[i], lab["turns"] = _contradict(out[i], scenes[i], rng)
        elif kind == "swap":
            k = _swap_partner(i, out, scenes, rng)
            out[i] = {**out[i], "image": records[k]["image"]}
            lab["image_of"] = ids[k]
        elif kind == "truncated":
            conv = copy.deepcopy(out[i]["conversations"])
            conv[-1]["value"] = truncate(conv[-1]["value"], rng)
            out[i] = {**out[i], "conversations": conv}
            lab["turns"] = [len(conv) - 1]
        elif kind == "generic":
            conv = copy.deepcopy(out[i]["conversations"])
            for t in conv[1::2]:
                t["value"] = GENERIC_ANSWERS[int(rng.integers(0, len(GENERIC_ANSWERS)))]
            out[i] = {**out[i], "conversations": conv}
    for i in sorted(assigned):
        if assigned[i] == "duplicate":
            before = [g for g in good if g < i] or good
            j = before[int(rng.integers(0, len(before)))]
            out[i] = {**copy.deepcopy(out[j]), "id": ids[i]}
            labels[ids[i]]["of"] = ids[j]
    summary = {"records": n, "good": n - n_bad, "bad": n_bad, **{k: counts.get(k, 0) for k in KINDS},
               "good_detail": {lv: sum(1 for i in good if labels[ids[i]]["detail"] == lv) for lv in LEVELS}}
    return out, {"noise": noise, "mix": mix, "seed": seed, "records": labels, "counts": summary}
