"""VQA answer normalisation and accuracy, POPE reading and metrics, on hand-computed examples."""

from __future__ import annotations

import json

import pytest

from llava_jax.eval import pope, vqa
from llava_jax.eval.answers import EvalDataError, read_answers


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("Yes.", "yes"),
        ("Two", "2"),
        ("the dog", "dog"),
        ("An apple!", "apple"),
        ("dont know", "don't know"),
        ("isnt", "isn't"),
        ("3.5", "3.5"),  # a period before a digit stays
        ("1,000", "1000"),  # digit-comma-digit: punctuation removed without a space
        ("black-and-white", "black and white"),  # no space next to '-': replaced by a space
        ("red - white", "red white"),  # a space next to '-': removed
        ("  None\t", "0"),
        ("a man's hat", "man's hat"),
    ],
)
def test_normalize_answer(raw, normalized):
    assert vqa.normalize_answer(raw) == normalized


def test_vqa_accuracy_hand_computed():
    gts = ["2"] * 2 + ["3"] * 8
    # 2 annotators match: each of them leaves 1 other match (1/3), the other 8 leave 2 (2/3) -> (2/3 + 16/3) / 10
    assert vqa.vqa_accuracy("two", gts) == pytest.approx(0.6)
    gts3 = ["cat"] * 3 + ["dog"] * 7
    assert vqa.vqa_accuracy("Cat.", gts3) == pytest.approx((3 * 2 / 3 + 7 * 1.0) / 10)
    assert vqa.vqa_accuracy("dog", gts3) == pytest.approx(1.0)
    assert vqa.vqa_accuracy("bird", gts3) == 0.0
    assert vqa.vqa_accuracy("one", ["1"]) == 1.0
    with pytest.raises(EvalDataError):
        vqa.vqa_accuracy("x", [])


def test_vqa_score_layouts_and_command(tmp_path, capsys):
    v2 = {"annotations": [
        {"question_id": 1, "answer_type": "number", "answers": [{"answer": "2", "answer_id": i} for i in range(10)]},
        {"question_id": 2, "answer_type": "yes/no", "answers": [{"answer": "yes"}] * 10},
        {"question_id": 3, "answer_type": "other", "answers": [{"answer": "red"}] * 3 + [{"answer": "blue"}] * 7},
    ]}
    ann_path = tmp_path / "v2.json"
    ann_path.write_text(json.dumps(v2))
    textvqa = tmp_path / "textvqa.json"
    textvqa.write_text(json.dumps({"data": [{"question_id": "t1", "answers": ["stop"] * 10}]}))
    assert vqa.load_annotations(textvqa) == {"t1": {"answers": ["stop"] * 10, "answer_type": None}}

    answers = tmp_path / "answers.jsonl"
    answers.write_text("\n".join(json.dumps(r) for r in [
        {"question_id": 1, "text": "Two"}, {"question_id": "2", "text": "No"}, {"question_id": 3, "text": "red"},
    ]))
    out = tmp_path / "score.json"
    assert vqa.main(["score", "--annotations", str(ann_path), "--answers", str(answers), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["accuracy"] == pytest.approx(round(100 * (1 + 0 + 0.9) / 3, 2))
    assert result["by_answer_type"]["other"]["accuracy"] == 90.0
    assert result["num_missing"] == 0
    assert "VQA accuracy" in capsys.readouterr().out


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("Yes, there is a dog in the image.", "yes"),
        ("No, there is no dog.", "no"),
        ("There is not a dog in the image.", "no"),
        ("There isn't a dog.", "no"),
        ("Yes. There is no cat though.", "yes"),  # only the first sentence counts
        ("NO", "no"),
        ("Nothing suggests otherwise", "yes"),  # "nothing" is not the word "no"
    ],
)
def test_reply_to_yes_no(reply, expected):
    assert pope.reply_to_yes_no(reply) == expected


def test_pope_metrics_hand_computed():
    preds = ["yes", "yes", "no", "no", "yes", "no"]
    golds = ["yes", "no", "no", "yes", "yes", "no"]
    m = pope.pope_metrics(preds, golds)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 2, 1)
    assert m["accuracy"] == round(100 * 4 / 6, 2)
    assert m["precision"] == round(100 * 2 / 3, 2)
    assert m["recall"] == round(100 * 2 / 3, 2)
    assert m["f1"] == round(100 * 2 / 3, 2)
    assert m["yes_ratio"] == 50.0
    with pytest.raises(EvalDataError):
        pope.pope_metrics(["maybe"], ["yes"])


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pope_score_command_with_categories(tmp_path, capsys):
    random = _write_jsonl(tmp_path / "coco_pope_random.json", [
        {"question_id": 1, "image": "a.jpg", "text": "Is there a dog?", "label": "yes"},
        {"question_id": 2, "image": "a.jpg", "text": "Is there a cat?", "label": "no"},
    ])
    popular = _write_jsonl(tmp_path / "coco_pope_popular.json", [
        {"question_id": 1, "image": "b.jpg", "text": "Is there a car?", "label": "no"},
        {"question_id": 2, "image": "b.jpg", "text": "Is there a bus?", "label": "yes"},
    ])
    answers = _write_jsonl(tmp_path / "answers.jsonl", [
        {"question_id": 1, "category": "random", "text": "Yes."},
        {"question_id": 2, "category": "random", "text": "No, there is not."},
        {"question_id": 1, "category": "popular", "text": "Yes, there is a car."},
        {"question_id": 2, "category": "popular", "text": "Yes"},
    ])
    out = tmp_path / "pope.json"
    assert pope.main(["score", "--labels", str(random), str(popular), "--answers", str(answers),
                      "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["by_category"]["random"]["accuracy"] == 100.0
    assert result["by_category"]["popular"]["accuracy"] == 50.0
    assert result["by_category"]["popular"]["precision"] == 50.0
    assert result["mean_accuracy"] == 75.0
    assert "mean accuracy 75.0" in capsys.readouterr().out

    # Without categories in the answers, ids shared by two categories are ambiguous.
    bare = _write_jsonl(tmp_path / "bare.jsonl", [{"question_id": q, "text": "yes"} for q in (1, 2)])
    with pytest.raises(EvalDataError, match="several categories"):
        pope.score(pope.load_labels([random, popular]), [json.loads(x) for x in bare.read_text().splitlines()])
    # A missing answer is an error, not a silent skip.
    with pytest.raises(EvalDataError, match="no answer"):
        pope.score(pope.load_labels([random]), [{"question_id": 1, "text": "yes"}])


def test_pope_bad_label_is_named(tmp_path):
    bad = _write_jsonl(tmp_path / "coco_pope_random.json", [{"question_id": 1, "label": "maybe"}])
    with pytest.raises(EvalDataError, match="need yes/no"):
        pope.load_labels([bad])


def test_pope_combined_questions_file(tmp_path):
    """LLaVA's layout: label files numbered from 1 each, answers keyed by a combined, renumbered questions file."""
    random = _write_jsonl(tmp_path / "coco_pope_random.json", [
        {"question_id": 1, "image": "a.jpg", "text": "Is there a dog?", "label": "yes"},
        {"question_id": 2, "image": "a.jpg", "text": "Is there a cat?", "label": "no"},
    ])
    popular = _write_jsonl(tmp_path / "coco_pope_popular.json", [
        {"question_id": 1, "image": "b.jpg", "text": "Is there a car?", "label": "no"},
    ])
    questions = _write_jsonl(tmp_path / "llava_pope_test.jsonl", [
        {"question_id": 0, "image": "b.jpg", "text": "Is there a car?", "category": "popular"},
        {"question_id": 1, "image": "a.jpg", "text": "Is there a dog?", "category": "random"},
        {"question_id": 2, "image": "a.jpg", "text": "Is there a cat?", "category": "random"},
    ])
    answers = _write_jsonl(tmp_path / "answers.jsonl", [
        {"question_id": 0, "text": "No."}, {"question_id": 1, "text": "No."}, {"question_id": 2, "text": "No."},
    ])
    out = tmp_path / "pope.json"
    assert pope.main(["score", "--labels", str(random), str(popular), "--questions", str(questions),
                      "--answers", str(answers), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["by_category"]["popular"]["accuracy"] == 100.0
    r = result["by_category"]["random"]
    assert (r["tp"], r["fp"], r["tn"], r["fn"]) == (0, 0, 1, 1)
    assert result["by_category"]["random"]["accuracy"] == 50.0

    swapped = _write_jsonl(tmp_path / "swapped.jsonl", [
        {"question_id": 0, "image": "b.jpg", "text": "Is there a car?", "category": "popular"},
        {"question_id": 1, "image": "a.jpg", "text": "Is there a cat?", "category": "random"},
        {"question_id": 2, "image": "a.jpg", "text": "Is there a dog?", "category": "random"},
    ])
    with pytest.raises(EvalDataError, match="disagree on text"):
        pope.rekey_labels_by_questions([random, popular], swapped)


def test_vqa_score_reads_official_results_layout(tmp_path):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"annotations": [
        {"question_id": 1, "answers": [{"answer": "2"}] * 10},
        {"question_id": 2, "answers": [{"answer": "yes"}] * 10},
        {"question_id": 3, "answers": [{"answer": "red"}] * 10},
    ]}))
    results = tmp_path / "results.json"  # official layout: a JSON list of {question_id, answer}
    results.write_text(json.dumps([{"question_id": 1, "answer": 2}, {"question_id": 2, "answer": "yes"},
                                   {"question_id": 3, "answer": None}]))
    result = vqa.score(vqa.load_annotations(ann), read_answers(results))
    assert result["accuracy"] == round(100 * 2 / 3, 2) and result["num_missing"] == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "text": ["x"]}\n')
    with pytest.raises(EvalDataError, match="list reply"):
        read_answers(bad)
