"""The evaluation suite end to end: two tiny random LLaVA model dirs built in the test, the synthetic benchmark
layouts (`python -m llava_jax.data.synthetic --benchmarks`), one table (markdown / CSV / JSON, best bolded) and
the bar chart; a rerun reuses the finished predictions without loading a model."""

from __future__ import annotations

import json

import pytest

from llava_jax.data import benchmark_sets, synthetic
from llava_jax.eval import mme, suite

VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
              patch_size=8, projection_dim=16)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, tie_word_embeddings=False)
ONLY = ("vsr", "mme", "mmbench", "counting", "multiclass", "gqa")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from llava_jax.workflow import build_model_dir

    root = tmp_path_factory.mktemp("suite")
    synthetic.generate(root / "data", num=12, num_eval=5, image_size=16)
    models = {}
    for seed in (0, 1):
        build_model_dir(root / "data", root / f"model{seed}", seed=seed, vision=VISION, text=TEXT, vocab=300)
        models[f"m{seed}"] = str(root / f"model{seed}")
    benchmark_sets.write_benchmarks(root / "bench", num=4, seed=1, image_size=16)
    return root, models


def test_benchmarks_flag_writes_every_layout_and_leaves_the_dataset_alone(tmp_path):
    plain, both = tmp_path / "plain", tmp_path / "both"
    assert synthetic.main(["--out", str(plain), "--num", "3", "--num-eval", "2"]) == 0
    assert synthetic.main(["--out", str(both), "--num", "3", "--num-eval", "2", "--benchmarks", str(tmp_path / "b")]) == 0
    for name in ("stage1.json", "stage2.json", "eval.jsonl", "meta.json", "coco/captions.json"):
        assert (plain / name).read_bytes() == (both / name).read_bytes(), name
    meta = json.loads((tmp_path / "b" / "benchmarks.json").read_text())
    assert set(meta["questions"]) == set(benchmark_sets.WRITERS)
    questions = mme.load_questions(tmp_path / "b" / "mme")
    assert set(questions) == {"existence", "count", "position", "color"}
    for images in questions.values():  # MME's pairs: one Yes and one No per image
        assert all(sorted(q["answer"] for q in rows) == ["no", "yes"] for rows in images.values())
    vsr_rows = [json.loads(x) for x in (tmp_path / "b" / "vsr" / "test.jsonl").read_text().splitlines()]
    assert {r["label"] for r in vsr_rows} == {0, 1}


def test_suite_two_models_table_plot_and_resume(world, monkeypatch):
    root, models = world
    out = root / "suite"
    config = suite.load_suite_config(f"configs/eval_suite.py:{root / 'bench'}")
    config.predict.batch_size = 4
    table = suite.run_suite(models, config, out, only=ONLY)
    assert table["models"] == ["m0", "m1"]
    benches = {r["benchmark"] for r in table["rows"]}
    assert benches == set(ONLY)
    mme_rows = [r for r in table["rows"] if r["benchmark"] == "mme"]
    assert [r["metric"] for r in mme_rows] == ["perception"]  # the synthetic MME has no cognition subtasks
    for row in table["rows"]:
        assert set(row["values"]) == {"m0", "m1"} and all(v is not None for v in row["values"].values())
        assert row["best"] and max(row["values"].values()) == row["values"][row["best"][0]]
    md = (out / "table.md").read_text()
    assert md.startswith("| benchmark | metric | m0 | m1 |") and "**" in md
    csv_lines = (out / "table.csv").read_text().splitlines()
    assert csv_lines[0] == "benchmark,metric,m0,m1" and len(csv_lines) == len(table["rows"]) + 1
    assert json.loads((out / "table.json").read_text()) == table
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for model in models:  # every question answered, in LLaVA's answer-file fields
        rows = [json.loads(x) for x in (out / "answers" / model / "mme.jsonl").read_text().splitlines()]
        assert len(rows) == 8 and {"question_id", "prompt", "text", "answer_id", "model_id"} <= set(rows[0])
        assert rows[0]["model_id"] == model
        for bench in ONLY:  # every answer row is found by its scorer
            score = json.loads((out / "scores" / model / f"{bench}.json").read_text())
            assert (score["missing"], score["malformed"], score["unknown"]) == (0, 0, 0), bench

    # A rerun finds every answer: no model is loaded, the table is the same.
    def no_loading(*args, **kwargs):
        raise AssertionError("a finished benchmark was predicted again")

    monkeypatch.setattr("llava_jax.eval.predict.load_for_inference", no_loading)
    assert suite.run_suite(models, config, out, only=ONLY) == table

    # A partly finished file: only the missing answers are generated.
    monkeypatch.undo()
    path = out / "answers" / "m1" / "vsr.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-2]) + "\n")
    again = suite.run_suite({"m1": models["m1"]}, config, out, only=("vsr",))
    assert len(path.read_text().splitlines()) == len(lines)
    assert again["rows"][0]["values"]["m1"] == next(
        r for r in table["rows"] if r["benchmark"] == "vsr")["values"]["m1"]


def test_suite_cli_errors(tmp_path, capsys):
    assert suite.main.__name__ == "main"
    from llava_jax import cli

    assert cli.run(suite.main, ["--model", "noequals", "--out", str(tmp_path)]) == 2
    assert "NAME=PATH" in capsys.readouterr().err
    assert cli.run(suite.main, ["--model", f"a={tmp_path}", "--suite", "configs/eval_suite.py", "--out",
                                str(tmp_path / "o"), "--only", "nosuch"]) == 2
    assert "nosuch" in capsys.readouterr().err


def test_table_bolds_every_best_value():
    table = suite.build_table(["a", "b"], {"a": {"x": {"acc": 50.0, "f1": None}}, "b": {"x": {"acc": 50.0, "f1": 3.0}}},
                              ["x"], {"y": "tsv not found"})
    md = suite.to_markdown(table)
    assert "| x | acc | **50.00** | **50.00** |" in md and "| x | f1 | - | **3.00** |" in md
    assert "skipped y: tsv not found" in md
    assert suite.to_csv(table).splitlines()[2] == "x,f1,,3.0"


def test_existing_scorers_plug_into_the_suite(tmp_path):
    """vqa (OKVQA-style), pope and scienceqa entries: questions built, an oracle answers file scored in full."""
    from llava_jax.eval import benchmarks as bench_lib
    from llava_jax.io import atomic_write_jsonl

    img = tmp_path / "i.jpg"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(img)
    questions = tmp_path / "q.jsonl"
    atomic_write_jsonl(questions, [{"question_id": 1, "image": "i.jpg", "text": "What is it?", "category": "random"},
                                   {"question_id": 2, "image": "i.jpg", "text": "Is there a dog?", "category": "random"}])
    annotations = tmp_path / "ann.jsonl"
    atomic_write_jsonl(annotations, [{"question_id": 1, "answers": ["cat"] * 10}, {"question_id": 2, "answers": ["no"] * 10}])
    labels = tmp_path / "coco_pope_random.json"
    atomic_write_jsonl(labels, [{"question_id": 7, "image": "i.jpg", "text": "What is it?", "label": "yes"},
                                {"question_id": 8, "image": "i.jpg", "text": "Is there a dog?", "label": "no"}])
    entries = {
        "vqa": {"kind": "vqa", "questions": str(questions), "annotations": str(annotations), "image_root": str(tmp_path)},
        "pope": {"kind": "pope", "questions": str(questions), "labels": [str(labels)], "image_root": str(tmp_path)},
    }
    oracle = {"vqa": ["cat", "no"], "pope": ["yes", "no"]}
    for name, entry in entries.items():
        assert bench_lib.missing_data(entry) is None
        kind = bench_lib.get_kind(entry["kind"])
        items = kind.items(entry, tmp_path / "work")
        assert [it.question_id for it in items] == [1, 2] and items[0].text.endswith("single word or phrase.")
        answers = tmp_path / f"{name}.jsonl"
        atomic_write_jsonl(answers, [{"question_id": it.question_id, "text": t, **it.extra}
                                     for it, t in zip(items, oracle[name], strict=True)])
        metrics = kind.metrics(kind.score(entry, answers))
        assert metrics and all(v == 100.0 for v in metrics.values()), (name, metrics)
    assert bench_lib.missing_data({"kind": "scienceqa", "data_dir": str(tmp_path / "nope")}).startswith("data_dir not found")
    with pytest.raises(ValueError, match="unknown benchmark kind"):
        bench_lib.get_kind("nosuch")


def test_bare_variant_drops_the_answer_format_instruction(world):
    root, _ = world
    from llava_jax.eval import benchmarks as bench_lib

    official = suite.load_suite_config(f"configs/eval_suite.py:{root / 'bench'}").to_dict()["benchmarks"]
    bare = suite.load_suite_config(f"configs/eval_suite.py:{root / 'bench'},bare").to_dict()["benchmarks"]
    for name in ("mme", "counting", "vsr", "gqa"):
        kind = bench_lib.get_kind(official[name]["kind"])
        with_text = kind.items(official[name], root / "w")[0].text
        bare_text = kind.items(bare[name], root / "w")[0].text
        assert with_text.startswith(bare_text + "\n") and "\n" not in bare_text, name
