"""ScienceQA: answer extraction rules, prompt layout, scoring tables and the score command."""

from __future__ import annotations

import json

import pytest

from llava_jax.eval import scienceqa
from llava_jax.eval.answers import EvalDataError

# (reply, official letter per LLaVA's eval_science_qa.py, lenient letter). Official letters derived by hand from
# its rules: equals A-E; else len >= 3 and "X. " prefix (X in A-E); else exactly one `The answer is ([A-Z]).`
# (case-sensitive, `.` = any character but a newline); else FAILED (None). No stripping.
REPLIES = [
    ("B", "B", "B"),
    ("B.", None, "B"),  # 2 characters: no "X. " prefix, no regex match
    (" B", None, "B"),  # not stripped
    ("B\n", None, "B"),
    ("B. because it floats", "B", "B"),
    ("A. ", "A", "A"),  # exactly 3 characters
    ("B.\nIt floats.", None, "B"),  # "B.\n" is not "B. "
    ("The answer is B.", "B", "B"),
    ("Wood floats. The answer is B", None, "B"),  # nothing follows the letter
    ("The answer is B\nbecause wood floats.", None, "B"),  # `.` does not match the newline
    ("The answer is (B).", None, "B"),
    ("The answer is BC", "B", None),  # any character may follow; lenient refuses a following letter
    ("The answer is A. No wait, The answer is B.", None, None),  # two matches
    ("The answer is B. The answer is B.", None, None),  # two matches, same letter
    ("the answer is B.", None, None),  # lowercase "the"
    ("The answer is b.", None, None),
    ("b", None, None),
    ("F", None, "F"),  # official options are A-E only
    ("The answer is G.", "G", "G"),  # a letter beyond the options still parses (and is then wrong)
    ("AB", None, None),
    ("", None, None),
    ("I think it is B", None, None),
]


@pytest.mark.parametrize("reply, official, lenient", REPLIES)
def test_extract_letter_official_and_lenient(reply, official, lenient):
    assert scienceqa.extract_letter(reply) == official  # official is the default
    assert scienceqa.extract_letter(reply, "official") == official
    assert scienceqa.extract_letter(reply, "lenient") == lenient


def test_option_index_limits():
    assert scienceqa.option_index("C", 3) == 2
    assert scienceqa.option_index("D", 3) == -1  # beyond the problem's choices
    assert scienceqa.option_index("F", 6) == -1  # official: A-E only
    assert scienceqa.option_index("F", 6, "lenient") == 5
    assert scienceqa.option_index(None, 3) == -1
    with pytest.raises(ValueError, match="unknown ScienceQA rules"):
        scienceqa.extract_letter("B", "strict")


def _problem(pid, answer, *, choices=("yes", "no"), hint="", image=None, subject="natural science", grade="grade3"):
    return {
        "question": f"Question {pid}?",
        "choices": list(choices),
        "answer": answer,
        "hint": hint,
        "image": image,
        "subject": subject,
        "grade": grade,
        "split": "test",
    }


@pytest.fixture()
def sqa_dir(tmp_path):
    problems = {
        "1": _problem("1", 0, image="image.png", hint="A hint."),  # TXT + IMG
        "2": _problem("2", 1, choices=("a", "b", "c"), image="image.png", subject="social science", grade="grade8"),
        "3": _problem("3", 2, choices=("a", "b", "c", "d"), subject="language science", grade="grade10"),
        "4": _problem("4", 0, hint="Read this."),  # TXT only
        "5": _problem("5", 1),  # NO context
        "9": _problem("9", 0),  # train split
    }
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"train": ["9"], "test": ["1", "2", "3", "4", "5"]}))
    return tmp_path


def test_load_problems_and_prompt(sqa_dir):
    problems = scienceqa.load_problems(sqa_dir, "test")
    assert [p.pid for p in problems] == ["1", "2", "3", "4", "5"]
    prompt = scienceqa.build_prompt(problems[0])
    assert prompt.splitlines() == [
        "Question 1?",
        "Context: A hint.",
        "Options:",
        "(A) yes",
        "(B) no",
        scienceqa.ANSWER_INSTRUCTION,
    ]
    assert "Context:" not in scienceqa.build_prompt(problems[4])
    with pytest.raises(EvalDataError, match="split 'val'"):
        scienceqa.load_problems(sqa_dir, "val")


def test_image_path_layouts(sqa_dir):
    problems = scienceqa.load_problems(sqa_dir, "test")
    (sqa_dir / "images" / "1").mkdir(parents=True)
    (sqa_dir / "images" / "1" / "image.png").write_bytes(b"x")
    (sqa_dir / "images" / "test" / "2").mkdir(parents=True)
    (sqa_dir / "images" / "test" / "2" / "image.png").write_bytes(b"x")
    root = sqa_dir / "images"
    assert scienceqa.image_path(problems[0], root) == str(root / "1" / "image.png")
    assert scienceqa.image_path(problems[1], root) == str(root / "test" / "2" / "image.png")
    with pytest.raises(EvalDataError, match="has no image"):
        scienceqa.image_path(problems[2], root)


def test_score_tables(sqa_dir):
    problems = scienceqa.load_problems(sqa_dir, "test")
    answers = {
        "1": {"text": "A"},  # correct (TXT, IMG, natural, G1-6)
        "2": {"text": "The answer is C."},  # wrong (IMG, social, G7-12)
        "3": {"text": "E"},  # letter outside its 4 options -> wrong, listed
        "4": {"text": "no idea"},  # failed -> wrong, listed
        "77": {"text": "A"},  # unknown id
    }  # "5" missing -> wrong, listed
    result = scienceqa.score(problems, answers)
    assert (result["n"], result["correct"], result["accuracy"]) == (5, 1, 20.0)
    assert (result["image_n"], result["image_accuracy"]) == (2, 50.0)
    assert result["failed_ids"] == ["4"]
    assert result["out_of_range_ids"] == ["3"]
    assert result["missing_ids"] == ["5"]
    assert result["unknown_answers"] == 1
    assert result["by_context"]["TXT"] == {"n": 2, "correct": 1, "accuracy": 50.0}
    assert result["by_context"]["IMG"] == {"n": 2, "correct": 1, "accuracy": 50.0}
    assert result["by_context"]["NO"] == {"n": 2, "correct": 0, "accuracy": 0.0}
    assert result["by_subject"]["natural science"] == {"n": 3, "correct": 1, "accuracy": 33.33}
    assert result["by_grade"]["G7-12"] == {"n": 2, "correct": 0, "accuracy": 0.0}
    assert result["by_grade"]["G1-6"]["n"] == 3

    only = scienceqa.score(problems, answers, only_answered=True)
    assert (only["n"], only["correct"], only["accuracy"]) == (4, 1, 25.0)


def test_score_command(sqa_dir, tmp_path, capsys):
    answers = tmp_path / "answers.jsonl"
    answers.write_text("\n".join(json.dumps({"question_id": q, "text": t}) for q, t in
                                 [(1, "A"), ("2", "B. b"), ("3", "C"), ("4", "A"), ("5", "A")]) + "\n")
    out = tmp_path / "score.json"
    rc = scienceqa.main(["score", "--data-dir", str(sqa_dir), "--answers", str(answers), "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    # Official (default): the int id 1 is not the pid "1" -- LLaVA's scorer counts problem 1 as missing.
    assert result["rules"] == "official" and result["split"] == "test"
    assert (result["accuracy"], result["id_mismatch"], result["missing_ids"]) == (60.0, 1, ["1"])
    assert result["results"] == {"1": -1, "2": 1, "3": 2, "4": 0, "5": 0}
    assert result["outputs"]["1"] == "FAILED" and result["outputs"]["2"] == "B. b"
    assert "(official rules): accuracy 60.0%" in capsys.readouterr().out
    rc = scienceqa.main(["score", "--data-dir", str(sqa_dir), "--answers", str(answers), "--out", str(out),
                         "--rules", "lenient"])
    result = json.loads(out.read_text())
    assert rc == 0 and result["rules"] == "lenient"
    assert result["accuracy"] == 80.0 and result["num_failed"] == 0 and result["id_mismatch"] == 0


def test_score_command_rejects_duplicate_answers(sqa_dir, tmp_path, capsys):
    answers = tmp_path / "answers.jsonl"
    answers.write_text('{"question_id": "1", "text": "A"}\n{"question_id": 1, "text": "B"}\n')
    rc = scienceqa.main(["score", "--data-dir", str(sqa_dir), "--answers", str(answers)])
    assert rc == 2
    assert "more than once" in capsys.readouterr().err


def test_bad_problem_is_named(tmp_path):
    (tmp_path / "problems.json").write_text(json.dumps({"1": _problem("1", 5)}))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["1"]}))
    with pytest.raises(EvalDataError, match="answer index 5"):
        scienceqa.load_problems(tmp_path, "test")


def _mixed_set(tmp_path):
    """One problem per reply in REPLIES plus a missing answer; the right answer is the letter each reply aims at.

    Even pids have an image (their prompts start with "<image>\\n", as LLaVA's and our predict write them).
    """
    problems, answers, official, lenient, image = {}, [], [], [], []
    for i, (reply, off, len_) in enumerate([*REPLIES, ("<missing>", None, None)]):
        pid = str(100 + i)
        n_choices = 5 if i % 3 else 3
        letter = off or len_ or "B"
        answer = "ABCDE".index(letter) if letter in "ABCDE"[:n_choices] else 1
        has_image = i % 2 == 0
        problems[pid] = _problem(pid, answer, choices=[f"c{k}" for k in range(n_choices)],
                                 image="image.png" if has_image else None, grade=f"grade{1 + i % 12}")
        prompt = ("<image>\n" if has_image else "") + f"Question {pid}?"
        if reply != "<missing>":
            answers.append({"question_id": pid, "prompt": prompt, "text": reply, "answer_id": f"id{i}",
                            "model_id": "llava-v1.5-13b", "metadata": {}})
        # Hand-derived verdicts: correct iff the parsed letter names the right option within the choices.
        official.append(off is not None and off in "ABCDE"[:n_choices] and "ABCDE".index(off) == answer)
        lenient.append(len_ is not None and len_ in "ABCDEFGHIJ"[:n_choices] and "ABCDEFGHIJ".index(len_) == answer)
        image.append(has_image and reply != "<missing>")
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": list(problems), "val": []}))
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps(a) + "\n" for a in answers))
    return tmp_path, path, official, lenient, image


def test_mixed_replies_official_and_lenient_differ(tmp_path):
    sqa_dir, answers_path, official, lenient, image = _mixed_set(tmp_path)
    problems = scienceqa.load_problems(sqa_dir, "test")
    answers = scienceqa.read_answers(answers_path)
    off = scienceqa.score(problems, answers)
    len_ = scienceqa.score(problems, answers, rules="lenient")
    pids = [p.pid for p in problems]
    assert [off["results"][pid] == p.answer for pid, p in zip(pids, problems, strict=True)] == official
    assert [len_["results"][pid] == p.answer for pid, p in zip(pids, problems, strict=True)] == lenient
    assert sum(official) == 5 and sum(lenient) == 11  # the two rule sets really differ on this set
    assert off["accuracy"] == 21.74 and len_["accuracy"] == 47.83  # LLaVA's eval_science_qa.py: 21.74%
    assert off["acc"] == pytest.approx(100 * 5 / 23)
    # LLaVA's IMG-Accuracy: over answers whose prompt holds <image> (the missing answer is not one).
    assert off["image_n"] == sum(image) == 11
    assert off["image_correct"] == sum(f for f, i in zip(official, image, strict=True) if i)
    assert len_["image_n"] == 12  # lenient: problems with an image
    assert off["missing_ids"] == [pids[-1]] and off["outputs"][pids[-1]] == "FAILED"
    assert off["out_of_range_ids"] == [pids[18]]  # "The answer is G."
    # per-category tables are kept
    assert sum(row["n"] for row in off["by_grade"].values()) == 23
    assert off["by_context"]["IMG"]["n"] == 12


def test_analysis_file_has_llavas_fields(tmp_path):
    sqa_dir, answers_path, official, _, _ = _mixed_set(tmp_path)
    out = tmp_path / "analysis.json"
    assert scienceqa.main(["score", "--data-dir", str(sqa_dir), "--answers", str(answers_path),
                           "--analysis", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["correct"]) == sum(official) and len(result["incorrect"]) == 23 - sum(official)
    first = result["correct"][0]
    assert first == {"question_id": "100", "parsed_ans": "B", "ground_truth": "B", "question": "<image>\nQuestion 100?",
                     "pred": "B", "is_multimodal": True}
    missing = result["incorrect"][-1]
    assert (missing["parsed_ans"], missing["pred"], missing["question"], missing["is_multimodal"]) == (
        "FAILED", "FAILED", "Unknown", False)


def test_reads_llava_answers_and_result_files(tmp_path):
    """Ours reads theirs: a model_vqa_science.py answers JSONL and an eval_science_qa.py result JSON."""
    sqa_dir, answers_path, official, _, _ = _mixed_set(tmp_path)
    problems = scienceqa.load_problems(sqa_dir, "test")
    from_jsonl = scienceqa.score(problems, scienceqa.read_answers(answers_path))
    result_json = tmp_path / "result.json"
    result_json.write_text(json.dumps({"acc": 1.0, "correct": 1, "count": 22, "results": {},
                                       "outputs": {a["question_id"]: a["text"] for a in
                                                   map(json.loads, answers_path.read_text().splitlines())}}))
    from_result = scienceqa.score(problems, scienceqa.read_answers(result_json))
    assert from_result["results"] == from_jsonl["results"] and from_result["correct"] == sum(official)
    assert from_result["image_n"] == 11  # no prompts there: the problem's image decides (not for the missing one)


def test_split_dedup_and_official_limits(tmp_path):
    problems = {"1": _problem("1", 0), "2": _problem("2", 5, choices=list("abcdef"))}
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["1", "1"], "big": ["2"]}))
    assert [p.pid for p in scienceqa.load_problems(tmp_path, "test")] == ["1"]  # counted once, as LLaVA does
    big = scienceqa.load_problems(tmp_path, "big")
    with pytest.raises(EvalDataError, match="beyond E"):
        scienceqa.score(big, {"2": {"question_id": "2", "text": "F"}})
    assert scienceqa.score(big, {"2": {"question_id": "2", "text": "F"}}, rules="lenient")["correct"] == 1


def test_predict_writes_rows_llavas_scorer_reads(sqa_dir, monkeypatch):
    """Theirs reads ours: eval_science_qa.py keys rows by question_id and looks up each pid string of the split,
    reads `text`, and counts a row as an image question when "<image>" is in its `prompt`."""
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image

    import llava_jax.generate as generate_lib
    from llava_jax.data.images import ImageConfig
    from llava_jax.eval import predict as predict_lib
    from llava_jax.tiny import build_tokenizer

    for pid in ("1", "2"):
        (sqa_dir / "images" / pid).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(sqa_dir / "images" / pid / "image.png")
    tok = build_tokenizer(["Question yes no Options Context Reply with only the letter A B C"], vocab_size=300)
    loaded = SimpleNamespace(model="model", tokenizer=tok, template="vicuna_v1",
                             config=SimpleNamespace(num_image_tokens=2, image_token_id=tok.convert_tokens_to_ids("<image>")),
                             image_config=ImageConfig(size=8, crop_size=8))
    monkeypatch.setattr(predict_lib, "load_for_inference", lambda path, dtype="auto": loaded)
    monkeypatch.setattr(generate_lib, "generate",
                        lambda model, ids, *a, **k: [tok.encode("A", add_special_tokens=False) for _ in ids])
    out = sqa_dir / "answers.jsonl"
    assert scienceqa.main(["predict", "--model", "/m/tiny", "--data-dir", str(sqa_dir), "--out", str(out),
                           "--batch-size", "2"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert all({"question_id", "prompt", "text", "answer_id", "model_id", "metadata"} <= set(r) for r in rows)
    by_id = {r["question_id"]: r for r in rows}
    split = json.loads((sqa_dir / "pid_splits.json").read_text())["test"]
    problems = json.loads((sqa_dir / "problems.json").read_text())
    assert all(pid in by_id for pid in split)  # exact pid strings
    assert [("<image>" in by_id[pid]["prompt"]) for pid in split] == [bool(problems[pid]["image"]) for pid in split]
    assert all(by_id[pid]["text"] == "A" and isinstance(by_id[pid]["metadata"], dict) for pid in split)
    assert len({r["answer_id"] for r in rows}) == len(rows)
    result = scienceqa.score(scienceqa.load_problems(sqa_dir), scienceqa.read_answers(out))
    assert (result["correct"], result["image_n"], result["id_mismatch"]) == (2, 2, 0)  # pids 1 and 4 answer A
