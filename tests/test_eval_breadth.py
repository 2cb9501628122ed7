"""The breadth benchmarks' scorers on hand-computed cases, including the official scripts' edge rules:
TextVQA's EvalAI normalisation and soft score, MME's acc+ (both questions of an image) and yes/no reading,
MMBench's circular rule and VLMEvalKit matching, GQA's exact match, VSR, LVLM-eHub's whole-word rule,
captioning through pycocoevalcap, and malformed / unknown answer rows counted instead of crashing."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from llava_jax.eval import captioning, ehub, gqa, mmbench, mme, normalize, textvqa, vsr
from llava_jax.eval.answers import EvalDataError, read_answers_lenient


def _jsonl(path, rows, extra_lines=()):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(x + "\n" for x in extra_lines))
    return path


# ------------------------------------------------------------------------------------------ normalisation


@pytest.mark.parametrize("raw, expected", [
    ("The Dog's bone.", "dog 's bone"),        # lower, "'s" split off, final period and article dropped
    ("Two", "2"),                               # number words become digits
    ("1,000", "1000"),                          # commas deleted before anything else (word_tokenize)
    ("dont", "don't"),                          # the official contraction table
    ("Im", "im"),                               # its capitalised keys never match lower-cased text
    ("somebody'd", "somebodyd"),                # ... and this entry maps the written form away
    ("coca-cola", "coca cola"),                 # a hyphen inside a word becomes a space
    ("a - b", "b"),                             # next to a space it is deleted; "a" is an article
    ("what?", "what"),
    ("3.5", "3.5"),                             # a period before a digit stays
])
def test_evalai_normalize(raw, expected):
    assert normalize.evalai_normalize(raw) == expected


def test_period_removal_stops_after_32_like_the_official_code():
    assert normalize.process_punctuation("." * 40) == "." * 8


def test_has_word_needs_word_boundaries():
    assert normalize.has_word("there are 3 shapes", "3")
    assert not normalize.has_word("there are 13 shapes", "3")
    assert not normalize.has_word("yesterday", "yes")


# ------------------------------------------------------------------------------------------ lenient answers


def test_malformed_answer_rows_are_counted_not_fatal(tmp_path):
    path = _jsonl(tmp_path / "a.jsonl", [
        {"question_id": 1, "text": "yes"},
        {"question_id": 1, "text": "again"},        # repeated id: the first row is kept
        {"text": "no id"},
        {"question_id": 2, "text": ["a", "list"]},
        {"question_id": 3, "text": None},            # a null reply is an empty (wrong) reply
        {"question_id": {"bad": 1}, "text": "x"},
    ], extra_lines=["{not json", "[1, 2]"])
    answers, malformed = read_answers_lenient(path)
    assert set(answers) == {"1", "3"} and answers["1"]["text"] == "yes" and answers["3"]["text"] == ""
    assert malformed == 6


# ------------------------------------------------------------------------------------------ TextVQA


def test_textvqa_soft_score_by_hand():
    scores = textvqa.answer_scores(["yes"] * 3 + ["no"] * 7)
    # "yes": the 3 "yes" annotators see 2 others (2/3), the 7 others see 3 (1) -> (3 * 2/3 + 7) / 10
    assert scores["yes"] == pytest.approx(0.9)
    assert scores["no"] == pytest.approx(1.0)
    assert textvqa.answer_scores(["yes"] * 2 + ["no"] * 8)["yes"] == pytest.approx(0.6)


def test_textvqa_score_matches_llava_ids_and_counts_failures():
    annotations = [
        {"question_id": 10, "image_id": "imgA", "question": "What brand is it?", "answers": ["Coca-Cola"] * 10},
        {"question_id": 11, "image_id": "imgB", "question": "What number?", "answers": ["two"] * 4 + ["3"] * 6},
        {"question_id": 12, "image_id": "imgC", "question": "Which word?", "answers": ["stop"] * 10},
    ]
    answers = {
        "10": {"text": "coca cola."},                                   # our layout: the question id
        # LLaVA's layout: the image id as question_id, the question in the prompt's first line
        "imgB\nwhat number?": {"text": "2"},
        "zzz": {"text": "stop"},                                        # matches no question
    }
    result = textvqa.score(annotations, answers, malformed=2)
    # q10: 1.0; q11: "2" equals the 4 normalised "two" answers: every leave-one-out subset keeps >= 3 -> 1.0;
    # q12 has no answer -> 0
    assert result["accuracy"] == pytest.approx(100 * 2 / 3, abs=0.01)
    assert (result["n"], result["answered"], result["missing"], result["unknown"], result["malformed"]) == (3, 2, 1, 1, 2)


@pytest.mark.parametrize("prompt, question", [
    ("What brand?\nAnswer the question using a single word or phrase.", "what brand?"),
    ("What brand?\nReference OCR token: NIKE, 1999\nAnswer the question using a single word or phrase.",
     "what brand?"),
    ("Reference OCR token: NIKE\nWhat brand?\nAnswer the question using a single word or phrase.", "what brand?"),
    ("OCR tokens: NIKE 1999 Question: What brand? Short answer:", "what brand?"),
    ("<image>\nWhat Brand?\nAnswer the question using a single word or phrase.", "what brand?"),
])
def test_textvqa_question_of_prompt(prompt, question):
    assert textvqa.question_of_prompt(prompt) == question


def test_textvqa_reads_llava_answer_files(tmp_path):
    """LLaVA's TextVQA rows use the image id as question_id, shared by the questions of one image."""
    ann = tmp_path / "val.json"
    ann.write_text(json.dumps({"data": [
        {"question_id": 1, "image_id": "img", "question": "What brand?", "answers": ["nike"] * 10},
        {"question_id": 2, "image_id": "img", "question": "What year?", "answers": ["1999"] * 10}]}))
    suffix = "\nAnswer the question using a single word or phrase."
    answers = _jsonl(tmp_path / "a.jsonl", [{"question_id": "img", "prompt": "What brand?" + suffix, "text": "Nike"},
                                            {"question_id": "img", "prompt": "What year?" + suffix, "text": "1999"}])
    s = textvqa.score_file(ann, answers)
    assert (s["accuracy"], s["malformed"], s["unknown"]) == (100.0, 0, 0)


# ------------------------------------------------------------------------------------------ MME


def _mme_dir(tmp_path):
    root = tmp_path / "MME"
    flat = root / "existence"
    flat.mkdir(parents=True)
    for stem in ("a", "b"):
        Image.new("RGB", (8, 8)).save(flat / f"{stem}.jpg")
    (flat / "a.txt").write_text("Is there a dog? Please answer yes or no.\tYes\n"
                                "Is there a cat? Please answer yes or no.\tNo\n")
    (flat / "b.txt").write_text("Is there a car? Please answer yes or no.\tYes\n"
                                "Is there a bus? Please answer yes or no.\tNo\n")
    art = root / "artwork"  # the images/ + questions_answers_YN/ layout
    (art / "images").mkdir(parents=True)
    (art / "questions_answers_YN").mkdir()
    Image.new("RGB", (8, 8)).save(art / "images" / "c.png")
    (art / "questions_answers_YN" / "c.txt").write_text("Is this by Monet?\tYes\nIs this by Dali?\tNo\n")
    code = root / "code_reasoning"
    code.mkdir()
    Image.new("RGB", (8, 8)).save(code / "d.png")
    (code / "d.txt").write_text("Does it print 3?\tYes\nDoes it print 4?\tNo\n")
    return root


@pytest.mark.parametrize("reply, label", [
    ("Yes", "yes"), ("no", "no"), ("Yes, there is a dog.", "yes"), ("No.", "no"), (" yes", "yes"),
    ("Not at all", "no"), ("nope", "no"), ("I think so", "other"), ("", "other"), ("Maybe yes", "other"),
])
def test_mme_reads_yes_no_like_calculation_py(reply, label):
    assert mme.parse_yes_no(reply) == label


def test_mme_acc_plus_needs_both_questions_of_an_image(tmp_path):
    root = _mme_dir(tmp_path)
    answers = _jsonl(tmp_path / "answers.jsonl", [
        {"question_id": "existence/a.jpg/0", "text": "Yes"},
        {"question_id": "existence/a.jpg/1", "text": "No"},        # image a: both right
        {"question_id": "existence/b.jpg/0", "text": "Yes"},
        {"question_id": "existence/b.jpg/1", "text": "Yes"},       # image b: one wrong
        {"question_id": "artwork/c.png/0", "text": "yes"},         # image c: second question missing
        {"question_id": "code_reasoning/d.png/0", "text": "unsure"},
        {"question_id": "code_reasoning/d.png/1", "text": "No"},
        {"question_id": "nosuch/x.jpg/0", "text": "Yes"},
    ], extra_lines=["garbage"])
    out = tmp_path / "S.json"
    assert mme.main(["score", "--data-dir", str(root), "--answers", str(answers), "--out", str(out)]) == 0
    s = json.loads(out.read_text())
    ex = s["subtasks"]["existence"]
    assert (ex["acc"], ex["acc_plus"], ex["score"]) == (0.75, 0.5, 125.0)
    assert s["subtasks"]["artwork"]["score"] == pytest.approx(50.0)          # acc 1/2, acc+ 0
    assert s["subtasks"]["code_reasoning"]["score"] == pytest.approx(50.0)   # "unsure" is "other": wrong
    assert s["perception"] == pytest.approx(175.0) and s["cognition"] == pytest.approx(50.0)
    assert (s["missing"], s["unknown"], s["malformed"]) == (1, 1, 1)
    assert "OCR" in s["absent_subtasks"]
    items = mme.prompt_items(root)
    assert [it.question_id for it in items][:2] == ["artwork/c.png/0", "artwork/c.png/1"]
    assert items[0].image.endswith("artwork/images/c.png") and items[0].text.startswith("Is this by Monet?\n")


def test_mme_reads_llava_answer_rows(tmp_path):
    root = _mme_dir(tmp_path)
    suffix = "\nAnswer the question using a single word or phrase."
    answers = _jsonl(tmp_path / "a.jsonl", [
        {"question_id": "existence/a.jpg", "prompt": "Is there a cat? Please answer yes or no." + suffix, "text": "No"},
        {"question_id": "existence/a.jpg", "prompt": "Is there a dog? Please answer yes or no." + suffix, "text": "Yes"}])
    s = mme.score_file(root, answers)
    assert s["subtasks"]["existence"]["acc_plus"] == 0.5 and (s["malformed"], s["unknown"]) == (0, 0)


def test_mme_bad_question_file_is_a_named_error(tmp_path):
    root = tmp_path / "MME" / "count"
    root.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "a.jpg")
    (root / "a.txt").write_text("How many? Please answer yes or no.\tMaybe\n")
    with pytest.raises(EvalDataError, match="Yes|No"):
        mme.load_questions(tmp_path / "MME")


# ------------------------------------------------------------------------------------------ MMBench


def _png_b64():
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _tsv(path, rows):
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "split", "image"]
    lines = ["\t".join(header)] + ["\t".join(str(r.get(h, "")) for h in header) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("reply, options, letter", [
    ("B", ["cat", "dog"], "B"),
    ("The answer is B.", ["cat", "dog", "cow"], "B"),
    ("(C) cow", ["cat", "dog", "cow"], "C"),
    ("A. cat", ["cat", "dog"], "A"),
    ("A cat is sitting here", ["cat", "dog"], "A"),     # "A" may be an article: falls back to the option text
    ("A dog is sitting there", ["cat", "dog"], "B"),
    ("B or C", ["cat", "dog", "cow"], None),            # two letters, no option text
    ("a dog", ["cat", "dog"], "B"),                     # no capital letter: the option text decides
    ("Z", ["cat", "dog"], "Z"),
    ("Cannot determine the answer", ["cat", "dog"], "Z"),
    ("cat and dog", ["cat", "dog"], None),
])
def test_mmbench_answer_matching(reply, options, letter):
    assert mmbench.infer_option(reply, options) == letter


def test_mmbench_circular_rule(tmp_path):
    img = _png_b64()
    tsv = _tsv(tmp_path / "dev.tsv", [
        {"index": 7, "question": "Which animal?", "A": "cat", "B": "dog", "C": "cow", "answer": "B", "category": "x",
         "image": img},
        {"index": 9, "question": "Colour?", "hint": "Look closely.", "A": "red", "B": "blue", "C": "green",
         "D": "pink", "answer": "D", "category": "y", "image": img},
    ])
    rounds = mmbench.load_rounds(tsv)
    assert [(r["question_id"], r["answer"]) for r in rounds if r["group"] == 7] == [
        (7, "B"), (1_000_007, "A"), (2_000_007, "C")]  # options rotated: [dog, cow, cat], [cow, cat, dog]
    assert rounds[1]["options"] == ["dog", "cow", "cat"]
    prompt = mmbench.build_prompt(rounds[3])
    assert prompt == ("Look closely.\nColour?\nA. red\nB. blue\nC. green\nD. pink\n"
                      "Answer with the option's letter from the given choices directly.")
    answers = _jsonl(tmp_path / "a.jsonl", [
        # question 7 in LLaVA's layout (question_id = index, round_id): every round right
        {"question_id": 7, "round_id": 0, "text": "B"}, {"question_id": 7, "round_id": 1, "text": "A"},
        {"question_id": 7, "round_id": 2, "text": "C"},
        # question 9 in ours: round 2 wrong
        {"question_id": 9, "text": "D"}, {"question_id": 1_000_009, "text": "C"},
        {"question_id": 2_000_009, "text": "A"}, {"question_id": 3_000_009, "text": "A"},
    ], extra_lines=["{broken"])
    s = mmbench.score_file(tsv, answers)
    assert s["circular_accuracy"] == 50.0 and s["vanilla_accuracy"] == 100.0
    assert s["by_category"]["y"]["circular_accuracy"] == 0.0 and s["malformed"] == 1
    items = mmbench.prompt_items(tsv, tmp_path / "imgs")
    assert len(items) == 7 and Image.open(items[0].image).size == (8, 8)
    # rows as `predict` writes them (the round in the id, and round_id as a field) are read by their id
    ours = _jsonl(tmp_path / "ours.jsonl", [{"question_id": it.question_id, "text": "D", **it.extra} for it in items])
    assert mmbench.score_file(tsv, ours)["missing"] == 0


def test_mmbench_tsv_with_circular_copies_is_grouped_by_index(tmp_path):
    tsv = _tsv(tmp_path / "c.tsv", [
        {"index": 3, "question": "q", "A": "x", "B": "y", "answer": "A"},
        {"index": 1_000_003, "question": "q", "A": "y", "B": "x", "answer": "B"},
    ])
    rounds = mmbench.load_rounds(tsv)
    assert [(r["group"], r["round"], r["options"]) for r in rounds] == [(3, 0, ["x", "y"]), (3, 1, ["y", "x"])]
    s = mmbench.score(rounds, {"3": {"text": "A"}})  # the copy is missing: the question is wrong
    assert s["circular_accuracy"] == 0.0 and s["vanilla_accuracy"] == 100.0 and s["missing"] == 1


# ------------------------------------------------------------------------------------------ GQA, VSR, eHub


def test_gqa_exact_match_after_llava_normalisation(tmp_path):
    questions = {
        "1": {"imageId": "i1", "question": "Colour?", "answer": "red", "types": {"structural": "query"}},
        "2": {"imageId": "i2", "question": "Is there a cat?", "answer": "yes", "types": {"structural": "verify"}},
        "3": {"imageId": "i3", "question": "What?", "answer": "table", "types": {"structural": "query"}},
        "4": {"imageId": "i4", "question": "Unbalanced", "answer": "x", "isBalanced": False},
    }
    path = tmp_path / "q.json"
    path.write_text(json.dumps(questions))
    answers = _jsonl(tmp_path / "a.jsonl", [
        {"question_id": "1", "text": "Red."}, {"question_id": "2", "text": "Yes.."},
        {"question_id": "3", "text": "the table"},     # no article stripping in GQA: wrong
        {"question_id": "4", "text": "x"}])             # an unbalanced question is not scored
    s = gqa.score_file(path, answers)
    assert (s["accuracy"], s["binary"], s["open"], s["n"], s["unknown"]) == (pytest.approx(66.67), 100.0, 50.0, 3, 1)


@pytest.mark.parametrize("reply, value", [
    ("True", True), ("true.", True), ("yes", True), ("False", False), (" no ", False), ("It is true", None), ("", None),
])
def test_vsr_reply_reading(reply, value):
    assert vsr.parse_true_false(reply) is value


def test_vsr_accuracy(tmp_path):
    data = _jsonl(tmp_path / "test.jsonl", [
        {"image": "a.jpg", "caption": "The cat is on the mat.", "label": 1, "relation": "on"},
        {"image": "b.jpg", "caption": "The dog is under the car.", "label": 0, "relation": "under"},
        {"image": "c.jpg", "caption": "The cup is left of the plate.", "label": 1, "relation": "left of"},
    ])
    answers = _jsonl(tmp_path / "a.jsonl", [{"question_id": 0, "text": "True"}, {"question_id": 1, "text": "maybe"}])
    s = vsr.score_file(data, answers)
    assert (s["accuracy"], s["unreadable"], s["missing"]) == (pytest.approx(33.33), 1, 1)
    assert s["by_relation"]["on"]["accuracy"] == 100.0


@pytest.mark.parametrize("reply, gold, right", [
    ("There are 3 shapes.", ["3"], True), ("three", ["3"], True), ("13", ["3"], False),
    ("Yes, there is.", ["yes"], True), ("No", ["yes"], False), ("two or three", ["2"], True),
])
def test_ehub_whole_word_rule(reply, gold, right):
    assert ehub.is_correct(reply, gold) is right


# ------------------------------------------------------------------------------------------ captioning


def test_captioning_score_cli_contract(tmp_path):
    ann = tmp_path / "captions.json"
    ann.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
        "annotations": [
            {"image_id": 1, "caption": "A red circle on the left."}, {"image_id": 1, "caption": "A red round shape."},
            {"image_id": 2, "caption": "Two blue squares."}, {"image_id": 2, "caption": "A pair of blue squares."}]}))
    answers = _jsonl(tmp_path / "a.jsonl", [{"question_id": 1, "text": "A red circle on the left."},
                                            {"question_id": 99, "text": "unknown image"}], extra_lines=["oops"])
    out = tmp_path / "S.json"
    assert captioning.main(["score", "--annotations", str(ann), "--answers", str(answers), "--out", str(out)]) == 0
    s = json.loads(out.read_text())
    assert {"CIDEr", "BLEU-4", "METEOR", "ROUGE-L", "n"} <= set(s) and s["SPICE"] is None
    # image 1 is a reference word for word (ROUGE-L 1), image 2 has no answer (empty caption, ROUGE-L 0)
    assert s["ROUGE-L"] == pytest.approx(0.5)
    assert 0 < s["BLEU-4"] < 1 and 0 < s["METEOR"] < 1 and s["CIDEr"] > 0
    assert (s["n"], s["missing"], s["unknown"], s["malformed"]) == (2, 1, 1, 1)


@pytest.mark.slow
def test_captioning_equals_coco_eval_cap(tmp_path, monkeypatch):
    """With an answer for every image, the numbers are COCOEvalCap's (SPICE stubbed out: it downloads)."""
    import pycocoevalcap.eval as coco_eval
    from pycocotools.coco import COCO

    class NoSpice:
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "SPICE"

    monkeypatch.setattr(coco_eval, "Spice", NoSpice)
    refs = {"1": ["a red circle on the left", "the red circle is left"], "2": ["two blue squares", "blue squares"],
            "3": ["a green cross at the top", "green cross, top right"]}
    cands = {"1": "a red circle", "2": "two squares that are blue", "3": "a cross"}
    ann = {"images": [{"id": int(k)} for k in refs], "type": "captions", "info": {}, "licenses": [],
           "annotations": [{"id": i, "image_id": int(k), "caption": c}
                           for i, (k, c) in enumerate((k, c) for k, cs in refs.items() for c in cs)]}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(ann))
    coco = COCO(str(path))
    res = coco.loadRes([{"image_id": int(k), "caption": c} for k, c in cands.items()])
    ev = coco_eval.COCOEvalCap(coco, res)
    ev.evaluate()
    ours = captioning.score(refs, {k: {"text": c} for k, c in cands.items()})
    for ours_key, theirs in (("CIDEr", "CIDEr"), ("BLEU-4", "Bleu_4"), ("METEOR", "METEOR"), ("ROUGE-L", "ROUGE_L")):
        assert ours[ours_key] == pytest.approx(ev.eval[theirs], abs=1e-9)
