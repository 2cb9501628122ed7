"""ScienceQA: answer extraction rules, prompt layout, scoring tables and the score command."""

from __future__ import annotations

import json

import pytest

from llava_jax.eval import scienceqa
from llava_jax.eval.answers import EvalDataError


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("B", "B"),
        ("  C\n", "C"),
        ("A. The magnet attracts.", "A"),
        ("D.", "D"),
        ("The answer is B.", "B"),
        ("Looking at the map, the answer is C. It is north.", None),  # lower-case "the answer is"
        ("Looking at the map. The answer is (C).", "C"),
        ("The answer is A. Wait, no. The answer is B.", None),  # two matches -> failed
        ("The answer is Apple.", None),  # not a letter
        ("b", None),  # lower-case letter is not an option letter
        ("AB", None),
        ("A.B.", None),  # "A." must be followed by a space or the end
        ("", None),
        ("I think it is B", None),
    ],
)
def test_extract_letter(reply, expected):
    assert scienceqa.extract_letter(reply) == expected


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
    assert result["accuracy"] == 80.0 and result["num_failed"] == 0
    assert "accuracy 80.0%" in capsys.readouterr().out


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
