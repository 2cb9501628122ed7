"""Image captioning (COCO / Flickr30k / NoCaps in the COCO caption-annotation layout): CIDEr, BLEU, METEOR and
ROUGE-L computed by `pycocoevalcap`, as the COCO caption evaluation computes them.

Commands:
  python -m llava_jax.eval.captioning predict --model PATH --annotations captions.json --image-root DIR \
      --out answers.jsonl [--prompt TEXT]
  python -m llava_jax.eval.captioning score --annotations captions.json --answers answers.jsonl --out S.json

Annotations: {"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]} (COCO's
captions_val2014.json; Flickr30k and NoCaps are distributed or converted to the same layout). Answer rows carry
question_id = the COCO image_id and the caption in `text`.

Scoring, as pycocoevalcap's COCOEvalCap: references and candidates go through its PTBTokenizer (Stanford
CoreNLP's PTB tokenizer, Java; punctuation tokens dropped), then Bleu(4), Meteor (Java), Rouge (ROUGE-L) and
Cider (CIDEr-D) score every image. S.json holds the corpus-level values unscaled ("CIDEr", "BLEU-1".."BLEU-4",
"METEOR", "ROUGE-L") and "n" (images scored). SPICE is left out: it downloads Stanford CoreNLP models at run
time, which this project never does ("SPICE": null and a note say so).

Differences from COCOEvalCap, where it would crash or silently shrink the test set: every annotated image is
scored, and an image without a usable answer row gets an empty caption (it scores 0 where the metric allows);
rows naming an image without annotations, or malformed rows, are counted ("unknown", "malformed") and left
out. With an answer for every image the numbers equal COCOEvalCap's.
Java must be installed (`.ci/run` installs a headless JRE when `java` is missing).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from llava_jax import cli
from llava_jax.eval.answers import EvalDataError, qid_key, read_answers_lenient
from llava_jax.eval.predict import PromptItem
from llava_jax.io import read_json

PROMPT = "Provide a one-sentence caption for the provided image."
SPICE_NOTE = "SPICE is not computed: it downloads Stanford CoreNLP models at run time"


def load_annotations(path: str | os.PathLike) -> tuple[dict[str, list[str]], dict[str, str]]:
    """({image id key: [reference captions]}, {image id key: file name}) from a COCO caption JSON."""
    if not os.path.exists(path):
        raise EvalDataError(f"caption annotations not found: {path}")
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise EvalDataError(f"{path}: expected a COCO caption JSON with an 'annotations' list")
    refs: dict[str, list[str]] = {}
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise EvalDataError(f"{path}: annotation #{i} needs image_id and a string caption")
        refs.setdefault(qid_key(ann["image_id"]), []).append(ann["caption"])
    files = {qid_key(im["id"]): str(im.get("file_name", "")) for im in data.get("images", [])
             if isinstance(im, dict) and "id" in im}
    if not refs:
        raise EvalDataError(f"{path}: no caption annotations")
    return refs, files


def _check_java() -> None:
    if shutil.which("java") is None:
        raise EvalDataError("captioning needs Java for the PTB tokenizer and METEOR: install a JRE "
                            "(apt-get install default-jre-headless)")


def coco_caption_scores(references: Mapping[str, Sequence[str]], candidates: Mapping[str, str]) -> dict[str, float]:
    """pycocoevalcap's corpus scores for {image: [refs]} and {image: caption} over the same images."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    _check_java()
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in refs] for k, refs in references.items()})
    res = tokenizer.tokenize({k: [{"caption": candidates[k]}] for k in references})
    out: dict[str, float] = {}
    with contextlib.redirect_stdout(sys.stderr):  # pycocoevalcap's Bleu prints its counts
        bleu, _ = Bleu(4).compute_score(gts, res)
    for i, value in enumerate(bleu, 1):
        out[f"BLEU-{i}"] = float(value)
    meteor = Meteor()
    try:
        out["METEOR"] = float(meteor.compute_score(gts, res)[0])
    finally:
        del meteor  # its __del__ stops the Java process
    out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return out


def score(references: Mapping[str, Sequence[str]], answers: Mapping[str, Mapping[str, Any]],
          malformed: int = 0) -> dict[str, Any]:
    """The score JSON (module docstring) for {image id key: refs} and answer rows {image id key: {"text"}}."""
    candidates = {k: answers[k]["text"] if k in answers else "" for k in references}
    answered = sum(1 for k in references if k in answers)
    metrics = coco_caption_scores(references, candidates)
    return {"CIDEr": metrics["CIDEr"], "BLEU-4": metrics["BLEU-4"], "METEOR": metrics["METEOR"],
            "ROUGE-L": metrics["ROUGE-L"], **{f"BLEU-{i}": metrics[f"BLEU-{i}"] for i in (1, 2, 3)},
            "SPICE": None, "note": SPICE_NOTE, "n": len(references), "answered": answered,
            "missing": len(references) - answered, "malformed": malformed,
            "unknown": sum(1 for k in answers if k not in references)}


def score_file(annotations_path: str | os.PathLike, answers_path: str | os.PathLike) -> dict[str, Any]:
    """`score` on files."""
    refs, _ = load_annotations(annotations_path)
    answers, malformed = read_answers_lenient(answers_path)
    return score(refs, answers, malformed)


def prompt_items(annotations_path: str | os.PathLike, image_root: str | os.PathLike,
                 prompt: str = PROMPT) -> list[PromptItem]:
    """One PromptItem per annotated image (question_id = its COCO image id, an int when the JSON has one)."""
    data = read_json(annotations_path)
    refs, files = load_annotations(annotations_path)
    ids = {qid_key(im["id"]): im["id"] for im in data.get("images", []) if isinstance(im, dict) and "id" in im}
    items = []
    for key in refs:
        if not files.get(key):
            raise EvalDataError(f"{annotations_path}: image {key} has no file_name in 'images'")
        items.append(PromptItem(ids.get(key, key), prompt, os.path.join(image_root, files[key])))
    return items


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit status."""
    from llava_jax.eval import runner

    return runner.main(
        argv, prog="python -m llava_jax.eval.captioning", doc=__doc__, max_new_tokens=48,
        flags=[runner.DataFlag("--annotations"), runner.DataFlag("--image-root", both=False),
               runner.DataFlag("--prompt", both=False, required=False, default=PROMPT)],
        items=lambda a: prompt_items(a.annotations, a.image_root, a.prompt),
        score=lambda a: score_file(a.annotations, a.answers),
        summary=lambda r: (f"CIDEr {r['CIDEr']:.4f} BLEU-4 {r['BLEU-4']:.4f} METEOR {r['METEOR']:.4f} "
                           f"ROUGE-L {r['ROUGE-L']:.4f} (n={r['n']}, missing {r['missing']}; {SPICE_NOTE})"))


if __name__ == "__main__":
    sys.exit(cli.run(main))
