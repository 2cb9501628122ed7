"""The benchmark kinds the suite knows: for each, how to build its questions from a config entry, how to score
an answers file, and which numbers go into the side-by-side table.

A config entry (configs/eval_suite.py) is a dict with "kind" plus that kind's data fields:

  kind        data fields                                    table metrics
  captioning  annotations, image_root, prompt?               CIDEr, BLEU-4, METEOR, ROUGE-L
  vsr         data, image_root                               accuracy
  mme         data_dir                                       perception, cognition (when present)
  textvqa     annotations, image_root                        accuracy
  gqa         questions, image_root                          accuracy
  mmbench     tsv                                            circular accuracy, vanilla accuracy
  ehub        questions, image_root (counting, multi-class)  accuracy
  vqa         questions, annotations, image_root (OKVQA...)  accuracy
  pope        questions, labels (list), image_root           mean accuracy, mean F1
  scienceqa   data_dir, split?, image_root?                  accuracy, image accuracy

Optional in every entry: max_new_tokens (else the kind's), instruction (the line after each question: by
default LLaVA-1.5's "Answer the question using a single word or phrase." for mme, textvqa, gqa, ehub, vqa, pope
and "Answer with true or false." for vsr; "" sends the bare question -- captioning, mmbench and scienceqa keep
their own prompts). An entry is "configured" when every data file it
names exists; the suite skips the others and says why.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from llava_jax.eval.predict import PromptItem

SHORT_ANSWER = "Answer the question using a single word or phrase."


@dataclasses.dataclass(frozen=True)
class Kind:
    """One benchmark kind: its data fields (paths), question builder, scorer and table metrics."""

    paths: tuple[str, ...]
    items: Callable[[Mapping[str, Any], Path], list[PromptItem]]  # (entry, work dir for decoded files)
    score: Callable[[Mapping[str, Any], Path], dict[str, Any]]  # (entry, answers file)
    metrics: Callable[[Mapping[str, Any]], dict[str, float | None]]  # score JSON -> {metric label: value}
    max_new_tokens: int = 16


def _instruction(entry: Mapping[str, Any], default: str) -> str:
    """The entry's "instruction" when it has one (also ""), else `default`."""
    value = entry.get("instruction")
    return default if value is None else str(value)


def _captioning() -> Kind:
    from llava_jax.eval import captioning as m

    return Kind(("annotations", "image_root"),
                lambda e, w: m.prompt_items(e["annotations"], e["image_root"], e.get("prompt") or m.PROMPT),
                lambda e, a: m.score_file(e["annotations"], a),
                lambda s: {k: s[k] for k in ("CIDEr", "BLEU-4", "METEOR", "ROUGE-L")}, max_new_tokens=40)


def _vsr() -> Kind:
    from llava_jax.eval import vsr as m

    return Kind(("data", "image_root"), lambda e, w: m.prompt_items(e["data"], e["image_root"], _instruction(e, m.INSTRUCTION)),
                lambda e, a: m.score_file(e["data"], a), lambda s: {"accuracy": s["accuracy"]}, max_new_tokens=8)


def _mme_metrics(s: Mapping[str, Any]) -> dict[str, float | None]:
    from llava_jax.eval.mme import COGNITION, PERCEPTION

    present = s["subtasks"]
    out: dict[str, float | None] = {}
    if any(t in present for t in PERCEPTION):
        out["perception"] = round(s["perception"], 2)
    if any(t in present for t in COGNITION):
        out["cognition"] = round(s["cognition"], 2)
    return out


def _mme() -> Kind:
    from llava_jax.eval import mme as m

    return Kind(("data_dir",), lambda e, w: m.prompt_items(e["data_dir"], _instruction(e, SHORT_ANSWER)), lambda e, a: m.score_file(e["data_dir"], a),
                _mme_metrics, max_new_tokens=8)


def _textvqa() -> Kind:
    from llava_jax.eval import textvqa as m

    return Kind(("annotations", "image_root"), lambda e, w: m.prompt_items(e["annotations"], e["image_root"], _instruction(e, SHORT_ANSWER)),
                lambda e, a: m.score_file(e["annotations"], a), lambda s: {"accuracy": s["accuracy"]})


def _gqa() -> Kind:
    from llava_jax.eval import gqa as m

    return Kind(("questions", "image_root"), lambda e, w: m.prompt_items(e["questions"], e["image_root"], _instruction(e, SHORT_ANSWER)),
                lambda e, a: m.score_file(e["questions"], a), lambda s: {"accuracy": s["accuracy"]})


def _mmbench() -> Kind:
    from llava_jax.eval import mmbench as m

    return Kind(("tsv",), lambda e, w: m.prompt_items(e["tsv"], w / "images"), lambda e, a: m.score_file(e["tsv"], a),
                lambda s: {"circular accuracy": s["circular_accuracy"], "vanilla accuracy": s["vanilla_accuracy"]},
                max_new_tokens=8)


def _ehub() -> Kind:
    from llava_jax.eval import ehub as m

    return Kind(("questions", "image_root"), lambda e, w: m.prompt_items(e["questions"], e["image_root"], _instruction(e, SHORT_ANSWER)),
                lambda e, a: m.score_file(e["questions"], a), lambda s: {"accuracy": s["accuracy"]})


def _vqa() -> Kind:
    from llava_jax.eval import vqa as m
    from llava_jax.eval.answers import read_answers
    from llava_jax.eval.predict import items_from_questions

    return Kind(("questions", "annotations", "image_root"),
                lambda e, w: items_from_questions(e["questions"], e["image_root"],
                                                 prompt_suffix=_instruction(e, SHORT_ANSWER)),
                lambda e, a: m.score(m.load_annotations(e["annotations"]), read_answers(a)),
                lambda s: {"accuracy": s["accuracy"]})


def _pope() -> Kind:
    from llava_jax.eval import pope as m
    from llava_jax.eval.answers import read_records
    from llava_jax.eval.predict import items_from_questions

    return Kind(("questions", "labels", "image_root"),
                lambda e, w: items_from_questions(e["questions"], e["image_root"],
                                                 prompt_suffix=_instruction(e, SHORT_ANSWER)),
                lambda e, a: m.score(m.rekey_labels_by_questions(list(e["labels"]), e["questions"]),
                                     read_records(a, "answers")),
                lambda s: {"mean accuracy": s["mean_accuracy"], "mean F1": s["mean_f1"]}, max_new_tokens=8)


def _scienceqa() -> Kind:
    from llava_jax.eval import scienceqa as m
    from llava_jax.eval.answers import read_answers

    def items(e: Mapping[str, Any], work: Path) -> list[PromptItem]:
        root = e.get("image_root") or os.path.join(e["data_dir"], "images")
        return [PromptItem(p.pid, m.build_prompt(p), m.image_path(p, root) if p.has_image else None)
                for p in m.load_problems(e["data_dir"], e.get("split") or "test")]

    return Kind(("data_dir",), items,
                lambda e, a: m.score(m.load_problems(e["data_dir"], e.get("split") or "test"), read_answers(a)),
                lambda s: {"accuracy": s["accuracy"], "image accuracy": s.get("image_accuracy")}, max_new_tokens=8)


KINDS: dict[str, Callable[[], Kind]] = {
    "captioning": _captioning, "vsr": _vsr, "mme": _mme, "textvqa": _textvqa, "gqa": _gqa, "mmbench": _mmbench,
    "ehub": _ehub, "vqa": _vqa, "pope": _pope, "scienceqa": _scienceqa,
}


def get_kind(name: str) -> Kind:
    """The Kind called `name`; an unknown name raises ValueError listing the known ones."""
    if name not in KINDS:
        raise ValueError(f"unknown benchmark kind {name!r} (known: {', '.join(sorted(KINDS))})")
    return KINDS[name]()


def missing_data(entry: Mapping[str, Any]) -> str | None:
    """Why an entry cannot run (its kind is unknown, a field is empty, a named file is absent), else None."""
    kind = get_kind(str(entry.get("kind", "")))
    for field in kind.paths:
        value = entry.get(field)
        paths = list(value) if isinstance(value, (list, tuple)) else [value]
        if not paths or any(not p for p in paths):
            return f"{field} not configured"
        for p in paths:
            if not os.path.exists(str(p)):
                return f"{field} not found: {p}"
    return None
