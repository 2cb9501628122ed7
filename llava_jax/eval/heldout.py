"""Held-out question answering during training: greedy answers with the image and with a blank one.

`evaluate_heldout` is what `python -m llava_jax.train` runs at the end when `eval.file` is set (the demo's
runs/demo/eval.json); `heldout_summary` turns graded replies into accuracy, blind accuracy, chance and
breakdowns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from llava_jax.data import conversation, images
from llava_jax.data.synthetic import score_answer
from llava_jax.generate import generate
from llava_jax.io import read_jsonl


class EmptyEvalFileError(ValueError):
    """The held-out file holds no questions."""


def evaluate_heldout(model: Any, loaded: Any, eval_cfg: Any, *, template: str, blind: bool = True,
                     replies: list[dict] | None = None) -> dict:
    """Greedy answers to a held-out JSONL (question_id, image, text, answer, choices), with the image and blind.

    A reply is correct when it names the answer and no other choice (`synthetic.score_answer`).
    Blind = the same questions with the image replaced by a blank (mean-colour) one; `blind=False` skips
    that pass (half the cost, e.g. for picking a checkpoint on a validation split) and the summary then has
    no blind_accuracy. A `replies` list receives {"question_id", "text", "correct"} per question (with the
    image), e.g. for an answers file. Returns `heldout_summary` of the replies.
    """
    rows = read_jsonl(eval_cfg.file)
    if eval_cfg.limit and eval_cfg.limit > 0:
        rows = rows[: eval_cfg.limit]
    if not rows:
        raise EmptyEvalFileError(f"eval file {eval_cfg.file} has no questions")
    tmpl = conversation.get_template(template)
    tok, icfg, mcfg = loaded.tokenizer, loaded.image_config, loaded.config
    root = Path(eval_cfg.image_root or Path(eval_cfg.file).parent / "images")
    mean_rgb = tuple(int(round(255 * m)) for m in icfg.mean)
    blank = images.preprocess(Image.new("RGB", (icfg.crop_size, icfg.crop_size), mean_rgb), icfg)
    eos = [i for i in {tok.eos_token_id} if i is not None]
    stops = tuple(tmpl.stop_strings)
    correct: dict[str, list[bool]] = {"image": [], "blind": []}
    for start in range(0, len(rows), eval_cfg.batch_size):
        chunk = rows[start : start + eval_cfg.batch_size]
        prompts = [conversation.encode_prompt([{"from": "human", "value": "<image>\n" + r["text"]}], tmpl, tok,
                                              num_image_tokens=mcfg.num_image_tokens,
                                              image_token_id=mcfg.image_token_id) for r in chunk]
        pix = np.stack([images.preprocess(images.load_rgb(root / r["image"]), icfg) for r in chunk])
        has = np.ones((len(chunk),), dtype=bool)
        passes = [("image", pix)] + ([("blind", np.broadcast_to(blank, pix.shape).copy())] if blind else [])
        for name, pixels in passes:
            out = generate(model, prompts, pixels, has, max_new_tokens=eval_cfg.max_new_tokens, temperature=0.0,
                           eos_ids=eos, stop_strings=stops, tokenizer=tok)
            for r, ids in zip(chunk, out, strict=True):
                text = tok.decode(ids, skip_special_tokens=True)
                correct[name].append(score_answer(text, {"answer": r["answer"], "choices": r.get("choices") or []}))
                if replies is not None and name == "image":
                    replies.append({"question_id": r["question_id"], "text": text, "correct": correct[name][-1]})
    return heldout_summary(rows, correct["image"], correct["blind"] if blind else None)


def heldout_summary(rows: list[dict], correct: list[bool], blind_correct: list[bool] | None) -> dict:
    """{"accuracy", "blind_accuracy", "chance", "n", "by_category"[, "by_num_objects"]} of graded replies.

    rows: the held-out questions (chance = mean over them of 1 / #choices); correct / blind_correct: one
    grade per row, with the image and with the blank image (None: no blind pass, no blind_accuracy).
    by_category is the accuracy with the image per row `category`; by_num_objects the same per
    `num_objects` (rows of the synthetic set carry it), which separates reading one object from binding
    attributes across several.
    """
    if not rows:
        raise EmptyEvalFileError("no held-out questions to summarise")
    blind_n = len(correct) if blind_correct is None else len(blind_correct)
    if not len(rows) == len(correct) == blind_n:
        raise ValueError(f"{len(rows)} rows but {len(correct)} / {blind_n} grades")

    def breakdown(key: str) -> dict[str, float]:
        groups: dict[str, list[bool]] = {}
        for r, ok in zip(rows, correct, strict=True):
            groups.setdefault(str(r.get(key, "all")), []).append(ok)
        return {k: float(np.mean(v)) for k, v in sorted(groups.items())}

    summary = {"accuracy": float(np.mean(correct)),
               **({} if blind_correct is None else {"blind_accuracy": float(np.mean(blind_correct))}),
               "chance": float(np.mean([1.0 / len(r["choices"]) if r.get("choices") else 0.0 for r in rows])),
               "n": len(rows), "by_category": breakdown("category")}
    if any("num_objects" in r for r in rows):
        summary["by_num_objects"] = breakdown("num_objects")
    return summary
