"""Prediction helpers, the ScienceQA layout builder, and `scienceqa predict` end to end on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from llava_jax.eval import predict, scienceqa
from llava_jax.eval.answers import EvalDataError


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_items_from_questions(tmp_path):
    q = _write_jsonl(tmp_path / "q.jsonl", [
        {"question_id": 5, "image": "a.jpg", "text": "<image>\nIs there a dog?", "category": "random"},
        {"question_id": "t", "text": "Say hi."},
    ])
    items = predict.items_from_questions(q, tmp_path / "imgs", prompt_suffix="Answer yes or no.")
    assert items[0].image == str(tmp_path / "imgs" / "a.jpg")
    assert items[0].text == "Is there a dog?\nAnswer yes or no."
    assert items[0].extra == {"category": "random"}
    assert predict.user_message(items[0]).startswith("<image>\nIs there")
    assert items[1].image is None and predict.user_message(items[1]) == "Say hi.\nAnswer yes or no."
    with pytest.raises(EvalDataError, match="no --image-root"):
        predict.items_from_questions(q, None)


def test_cut_at_stop_strings():
    assert predict.cut_at_stop_strings(" B</s>USER: more", ("</s>",)) == "B"
    assert predict.cut_at_stop_strings("A###Human", ("###", "</s>")) == "A"
    assert predict.cut_at_stop_strings("  plain  ", ()) == "plain"


def _mc_set(tmp_path, n=3):
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    rows = []
    for i in range(n):
        Image.fromarray(np.full((20, 28, 3), 40 * i, np.uint8)).save(img_dir / f"{i}.jpg")
        rows.append({"question_id": i, "image": f"{i}.jpg" if i != 1 else None, "text": f"<image>\nWhich shape {i}?",
                     "choices": ["circle", "square", "triangle"], "answer": ["circle", 1, "C"][i % 3],
                     "category": "shape"})
    return _write_jsonl(tmp_path / "eval.jsonl", rows), img_dir


def test_build_scienceqa_layout(tmp_path):
    questions, img_dir = _mc_set(tmp_path)
    out = tmp_path / "sqa"
    assert scienceqa.main(["build", "--questions", str(questions), "--image-root", str(img_dir),
                           "--out", str(out)]) == 0
    problems = scienceqa.load_problems(out, "test")
    assert [p.answer for p in problems] == [0, 1, 2]
    assert [p.has_image for p in problems] == [True, False, True]
    assert problems[0].question == "Which shape 0?" and problems[0].subject == "shape"
    with Image.open(scienceqa.image_path(problems[2], out / "images")) as img:
        assert img.size == (28, 20)


def test_build_rejects_bad_answer(tmp_path):
    q = _write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "text": "x", "choices": ["a", "b"], "answer": "c"}])
    with pytest.raises(EvalDataError, match="not an index"):
        scienceqa.build_from_questions(q, None, tmp_path / "out")


def _fake_loaded():
    from types import SimpleNamespace

    from llava_jax.data.images import ImageConfig
    from llava_jax.tiny import build_tokenizer

    tok = build_tokenizer(["circle square triangle yes no"], vocab_size=300)
    cfg = SimpleNamespace(num_image_tokens=4, image_token_id=tok.convert_tokens_to_ids("<image>"))
    return SimpleNamespace(model="model", config=cfg, tokenizer=tok, image_config=ImageConfig(size=8, crop_size=8),
                           template="vicuna_v1")


def test_run_predictions_batches_orders_and_resumes(tmp_path):
    loaded = _fake_loaded()
    tok = loaded.tokenizer
    calls = []

    def fake_generate(model, input_ids_list, pixel_values, has_image, *, max_new_tokens, eos_ids, stop_strings,
                      **kw):
        calls.append((list(map(len, input_ids_list)), pixel_values.shape, has_image.tolist()))
        assert eos_ids == [tok.eos_token_id] and "</s>" in stop_strings
        image_id = loaded.config.image_token_id
        # Reply with the number of image tokens in each prompt, then the stop string and junk after it.
        return [tok.encode(f"n{ids.count(image_id)}</s>more", add_special_tokens=False) for ids in input_ids_list]

    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(img)
    items = [
        predict.PromptItem(0, "a much longer question " * 5, str(img)),
        predict.PromptItem(1, "short", None, {"category": "c"}),
        predict.PromptItem(2, "medium question here", str(img)),
    ]
    out = tmp_path / "answers.jsonl"
    settings = predict.PredictSettings(model="/models/tiny", batch_size=2, max_new_tokens=3)
    rows = predict.run_predictions(items, settings, out, loaded=loaded, generate_fn=fake_generate)
    assert [r["question_id"] for r in rows] == [0, 1, 2]  # question order, not length order
    assert [r["text"] for r in rows] == ["n4", "n0", "n4"]
    assert rows[1]["category"] == "c" and rows[0]["model_id"] == "tiny"
    assert rows[2]["prompt"] == "<image>\nmedium question here"
    # Sorted by prompt length; the last batch is filled up to the batch size.
    assert len(calls) == 2 and calls[0][1] == (2, 8, 8, 3) and calls[1][1] == (2, 8, 8, 3)
    assert calls[0][2] == [False, True] and calls[1][2] == [True, True]
    assert [json.loads(x)["question_id"] for x in out.read_text().splitlines()] == [0, 1, 2]

    # Resume: only missing answers are generated.
    out.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    calls.clear()
    settings.resume = True
    rows2 = predict.run_predictions(items, settings, out, loaded=loaded, generate_fn=fake_generate)
    assert len(calls) == 1 and rows2 == rows


def test_run_predictions_names_a_missing_image(tmp_path):
    items = [predict.PromptItem("q7", "What is it?", str(tmp_path / "absent.jpg"))]
    settings = predict.PredictSettings(model="m", batch_size=1)
    with pytest.raises(EvalDataError, match="question q7: cannot use image"):
        predict.run_predictions(items, settings, tmp_path / "a.jsonl", loaded=_fake_loaded(),
                                generate_fn=lambda *a, **k: [[]])


@pytest.fixture(scope="module")
def tiny_hf_llava(tmp_path_factory):
    """A random tiny HF LLaVA directory (vision 32 px, 16 patches) with a tokenizer trained on the synthetic set."""
    pytest.importorskip("torch")
    from llava_jax.data import synthetic
    from llava_jax.tiny import build_tokenizer, make_hf_llava

    root = tmp_path_factory.mktemp("tiny_sqa")
    synthetic.generate(root / "syn", num=2, num_eval=5, image_size=32)
    texts = [json.loads(x)["text"] for x in (root / "syn" / "eval.jsonl").read_text().splitlines()]
    tok = build_tokenizer(texts + [scienceqa.ANSWER_INSTRUCTION, "Options: Context:"], vocab_size=400)
    make_hf_llava(root / "hf", tok, seed=0)
    return root


def _build_sqa(root, out):
    assert scienceqa.main(["build", "--questions", str(root / "syn" / "eval.jsonl"),
                           "--image-root", str(root / "syn" / "images"), "--out", str(out)]) == 0
    return out


def _predict_cli(root, sqa, out, batch_size):
    rc = scienceqa.main(["predict", "--model", str(root / "hf"), "--data-dir", str(sqa), "--out", str(out),
                         "--batch-size", str(batch_size), "--max-new-tokens", "4", "--model-id", "tiny"])
    assert rc == 0
    return [json.loads(x) for x in out.read_text().splitlines()]


def test_scienceqa_predict_and_score_on_tiny_model(tiny_hf_llava, tmp_path):
    root = tiny_hf_llava
    sqa = _build_sqa(root, tmp_path / "sqa")
    rows = _predict_cli(root, sqa, tmp_path / "answers.jsonl", batch_size=2)
    assert [r["question_id"] for r in rows] == [str(i) for i in range(5)]
    assert all(r["prompt"].startswith("<image>\n") and "Options:\n(A) " in r["prompt"] for r in rows)
    assert all(isinstance(r["text"], str) and r["model_id"] == "tiny" for r in rows)

    score_path = tmp_path / "score.json"
    assert scienceqa.main(["score", "--data-dir", str(sqa), "--answers", str(tmp_path / "answers.jsonl"),
                           "--out", str(score_path)]) == 0
    result = json.loads(score_path.read_text())
    assert result["n"] == 5 and result["num_missing"] == 0 and result["image_n"] == 5
    assert result["num_failed"] + result["num_out_of_range"] + result["correct"] <= 5


@pytest.mark.slow
def test_batching_does_not_change_greedy_answers(tiny_hf_llava, tmp_path):
    """Left padding and filler rows must not change greedy answers (compiles several batch shapes: slow)."""
    root = tiny_hf_llava
    sqa = _build_sqa(root, tmp_path / "sqa")
    one = _predict_cli(root, sqa, tmp_path / "bs1.jsonl", batch_size=1)
    three = _predict_cli(root, sqa, tmp_path / "bs3.jsonl", batch_size=3)
    assert [r["text"] for r in one] == [r["text"] for r in three]
