"""MME: yes/no questions in 14 subtasks, two per image, scored as MME's eval_tool/calculation.py scores them.

Commands:
  python -m llava_jax.eval.mme predict --model PATH --data-dir MME_DIR --out answers.jsonl
  python -m llava_jax.eval.mme score --data-dir MME_DIR --answers answers.jsonl --out score.json

MME_DIR is MME_Benchmark_release_version: one folder per subtask; artwork, celebrity, landmark, posters and
scene keep their images in <subtask>/images/ and their question files in <subtask>/questions_answers_YN/, the
others keep both side by side. A question file <stem>.txt belongs to the image <stem>.{jpg,png,jpeg} and holds
one "question<TAB>Yes|No" line per question (two per image in MME). Answer rows carry
question_id = "<subtask>/<image file>/<index of the question in that file>" and the reply in `text`; the
prompt is the question followed by LLaVA-1.5's short-answer instruction. LLaVA's own MME answer rows
(question_id "<subtask>/<image file>", the question in `prompt`) are read too.

Scoring, per subtask (as calculation.py):
  - the reply is lower-cased; it is "yes" or "no" when it is exactly that, else "yes" when its first four
    characters contain "yes", else "no" when they contain "no", else "other" (always wrong);
  - acc = correct questions / questions; acc_plus = images whose questions are all right / images;
    score = 100 * (acc + acc_plus);
  - perception = the sum of the scores of existence, count, position, color, posters, celebrity, scene,
    landmark, artwork, OCR (0-2000); cognition = commonsense_reasoning, numerical_calculation,
    text_translation, code_reasoning (0-800). A subtask absent from MME_DIR adds nothing (it is listed in
    "absent_subtasks"); a folder with another name is scored under "subtasks" but in neither total.
A question without a usable answer row counts as "other"; malformed rows and rows naming no question are
counted ("malformed", "unknown"), never fatal.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llava_jax import cli
from llava_jax.eval.answers import EvalDataError, read_answers_lenient
from llava_jax.eval.predict import PromptItem, with_instruction

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
              "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")
SHORT_ANSWER = "Answer the question using a single word or phrase."


def parse_yes_no(reply: str) -> str:
    """'yes', 'no' or 'other' for a reply, by calculation.py's rule (module docstring)."""
    reply = reply.lower()
    if reply in ("yes", "no"):
        return reply
    head = reply[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def _folders(subtask_dir: Path) -> tuple[Path, Path]:
    """(image folder, question-file folder) of a subtask."""
    if (subtask_dir / "questions_answers_YN").is_dir():
        return subtask_dir / "images", subtask_dir / "questions_answers_YN"
    return subtask_dir, subtask_dir


def load_questions(data_dir: str | os.PathLike) -> dict[str, dict[str, list[dict[str, str]]]]:
    """{subtask: {image file: [{"question_id", "question", "answer" ('yes'|'no'), "image" (path)}]}}.

    Subtask folders are the sub-directories holding question files; a bad line or a question file without
    its image raises EvalDataError.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise EvalDataError(f"MME data dir not found: {root}")
    out: dict[str, dict[str, list[dict[str, str]]]] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        image_dir, qa_dir = _folders(sub)
        files = sorted(qa_dir.glob("*.txt"))
        if not files:
            continue
        images: dict[str, list[dict[str, str]]] = {}
        for qa in files:
            image = next((qa.stem + e for e in IMAGE_EXTENSIONS if (image_dir / (qa.stem + e)).exists()), None)
            if image is None:
                raise EvalDataError(f"{qa}: no image {qa.stem}.jpg/.png in {image_dir}")
            rows = []
            for lineno, line in enumerate(qa.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                parts = line.rstrip("\n").split("\t")
                if len(parts) != 2 or parts[1].strip().lower() not in ("yes", "no"):
                    raise EvalDataError(f"{qa}:{lineno}: expected 'question<TAB>Yes|No'")
                rows.append({"question_id": f"{sub.name}/{image}/{len(rows)}", "question": parts[0],
                             "answer": parts[1].strip().lower(), "image": str(image_dir / image)})
            images[image] = rows
        out[sub.name] = images
    if not out:
        raise EvalDataError(f"{root}: no MME subtask folders with question files")
    return out


def score(questions: Mapping[str, Mapping[str, Sequence[Mapping[str, str]]]],
          answers: Mapping[str, Mapping[str, Any]], malformed: int = 0) -> dict[str, Any]:
    """MME scores of `answers` ({question id key: {"text"}}) on `questions` (from `load_questions`)."""
    known = set()
    subtasks: dict[str, dict[str, Any]] = {}
    for subtask, images in questions.items():
        n_q = correct = images_right = other = 0
        for rows in images.values():
            all_right = True
            for q in rows:
                known.add(q["question_id"])
                row = answers.get(q["question_id"])
                pred = parse_yes_no(row["text"]) if row is not None else "other"
                other += pred == "other"
                n_q += 1
                if pred == q["answer"]:
                    correct += 1
                else:
                    all_right = False
            images_right += all_right
        acc = correct / n_q if n_q else 0.0
        acc_plus = images_right / len(images) if images else 0.0
        subtasks[subtask] = {"acc": acc, "acc_plus": acc_plus, "score": 100 * (acc + acc_plus), "questions": n_q,
                             "images": len(images), "other": other}
    answered = sum(1 for k in answers if k in known)
    return {
        "perception": sum(subtasks[s]["score"] for s in PERCEPTION if s in subtasks),
        "cognition": sum(subtasks[s]["score"] for s in COGNITION if s in subtasks),
        "subtasks": subtasks,
        "absent_subtasks": [s for s in (*PERCEPTION, *COGNITION) if s not in subtasks],
        "n": len(known), "answered": answered, "missing": len(known) - answered, "malformed": malformed,
        "unknown": len(answers) - answered,
        "rules": "MME eval_tool calculation.py (yes/no from the reply's first 4 characters; score = acc + acc+)",
    }


def _row_key(questions: Mapping[str, Mapping[str, Sequence[Mapping[str, str]]]]):
    """The answer-row key: its question_id; a LLaVA row ("<subtask>/<image file>", the same for both questions
    of an image) gets the index of the question its prompt holds."""
    per_image = {f"{subtask}/{image}": rows for subtask, images in questions.items() for image, rows in images.items()}

    def key(row: Mapping[str, Any]) -> str:
        qid = str(row["question_id"]).strip()
        rows = per_image.get(qid)
        if rows is not None:
            prompt = str(row.get("prompt", ""))
            for strip in (False, True):  # the whole question first, then without MME's yes/no request
                hits = [i for i, q in enumerate(rows)
                        if (q["question"].replace(" Please answer yes or no.", "").strip() if strip
                            else q["question"]) in prompt]
                if len(hits) == 1:
                    return f"{qid}/{hits[0]}"
        return qid

    return key


def score_file(data_dir: str | os.PathLike, answers_path: str | os.PathLike) -> dict[str, Any]:
    """`score` on files."""
    data = load_questions(data_dir)
    answers, malformed = read_answers_lenient(answers_path, key_fn=_row_key(data))
    return score(data, answers, malformed)


def prompt_items(data_dir: str | os.PathLike, instruction: str = SHORT_ANSWER) -> list[PromptItem]:
    """One PromptItem per MME question, in subtask / image / question order (the question, then `instruction`
    on a new line unless it is empty)."""
    return [PromptItem(q["question_id"], with_instruction(q["question"], instruction), q["image"], {"category": subtask})
            for subtask, images in load_questions(data_dir).items() for rows in images.values() for q in rows]


def _summary(result: dict) -> str:
    """Per-subtask lines and the perception / cognition totals."""
    lines = [f"{name}: acc {100 * m['acc']:.2f} acc+ {100 * m['acc_plus']:.2f} score {m['score']:.2f}"
             for name, m in result["subtasks"].items()]
    return "\n".join([*lines, f"perception {result['perception']:.2f} cognition {result['cognition']:.2f} "
                                f"(missing {result['missing']}, malformed {result['malformed']})"])


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit status."""
    from llava_jax.eval import runner

    return runner.main(argv, prog="python -m llava_jax.eval.mme", doc=__doc__, flags=[runner.DataFlag("--data-dir")],
                       items=lambda a: prompt_items(a.data_dir), score=lambda a: score_file(a.data_dir, a.answers),
                       summary=_summary)


if __name__ == "__main__":
    sys.exit(cli.run(main))
