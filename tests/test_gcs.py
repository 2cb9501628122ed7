"""gs:// everywhere, against a local GCS emulator (tests/gcs_emulator.py, one per module): the path layer's
atomic writes, a tiny training run whose workdir, data, images and base model all live in the bucket (metrics,
TensorBoard events and Orbax checkpoints land there; SIGKILL then the same command resumes exactly), `convert
to-hf` / `from-hf` between bucket dirs, `selection.select` and `eval.pope score` with gs:// inputs and outputs,
`data_gen.captions` from and to the bucket."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from gcs_emulator import running_emulator
from test_train_cli import TEXT, VISION  # the same tiny model as the local trainer tests

REPO = Path(__file__).resolve().parents[1]
STEPS = 6


@pytest.fixture(scope="module")
def gcs():
    with running_emulator() as emu:
        yield emu


@pytest.fixture(scope="module")
def world(gcs, tmp_path_factory):
    """The synthetic set and a tiny model dir, built locally and uploaded to gs://BUCKET/data and /model."""
    from llava_jax.data.synthetic import generate
    from llava_jax.demo import build_model_dir
    from llava_jax.io import copy_tree

    root = tmp_path_factory.mktemp("gcs")
    generate(root / "data", num=24, seed=0, num_eval=4, image_size=16)
    build_model_dir(root / "data", root / "model", seed=0, vision=VISION, text=TEXT, vocab=160)
    assert copy_tree(root / "data", gcs.uri("data")) > 10
    copy_tree(root / "model", gcs.uri("model"))
    return root


def _env(gcs) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **gcs.env)
    env.pop("XLA_FLAGS", None)
    return env


def _cmd(gcs, workdir: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "llava_jax.train", f"--config={REPO / 'configs' / 'pretrain.py'}:demo",
            f"--workdir={workdir}", f"--config.init_from={gcs.uri('model')}",
            f"--config.data.train_file={gcs.uri('data', 'stage1.json')}",
            f"--config.data.image_root={gcs.uri('data', 'images')}", "--config.trainable=^projector/",
            f"--config.max_steps={STEPS}", "--config.batch_size=4", "--config.data.max_length=48",
            "--config.checkpoint.every_steps=2", "--config.log_every=1", "--config.checkpoint.keep=5", *extra]


def _losses(text: str) -> dict[int, float]:
    return {r["step"]: r["last_loss"] for r in map(json.loads, filter(str.strip, text.splitlines()))}


def _steps(ckpt_dir) -> list[int]:
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) if ckpt_dir.exists() else []


def test_atomic_writes_and_reads(gcs):
    from llava_jax import io

    target = gcs.uri("io", "a.json")
    io.atomic_write_json(target, {"x": [1, 2]})
    assert io.read_json(target) == {"x": [1, 2]}
    io.atomic_write_jsonl(gcs.uri("io", "b.jsonl"), [{"i": 0}, {"i": 1}])
    assert io.read_jsonl(gcs.uri("io", "b.jsonl")) == [{"i": 0}, {"i": 1}]
    with pytest.raises(RuntimeError), io.atomic_open(target) as f:  # a failed write leaves the old object
        f.write("half")
        raise RuntimeError
    assert io.read_json(target) == {"x": [1, 2]}
    assert sorted(p.name for p in io.as_path(gcs.uri("io")).iterdir()) == ["a.json", "b.jsonl"]


def test_copies_of_bucket_dirs(gcs, tmp_path, monkeypatch):
    from llava_jax import io

    io.atomic_write_text(gcs.uri("tree", "x.txt"), "x")
    io.atomic_write_text(gcs.uri("tree", "sub", "y.txt"), "y")
    assert io.list_files(gcs.uri("tree")) == ["sub/y.txt", "x.txt"]
    with io.local_copy(gcs.uri("tree")) as d:
        assert (d / "sub" / "y.txt").read_text() == "y"
    assert not d.exists()  # the download is temporary
    monkeypatch.setenv("LLAVA_JAX_CACHE", str(tmp_path / "cache"))
    first = io.cached_copy(gcs.uri("tree"))  # made once per host (ArrayRecord datasets), then reused
    assert (first / "x.txt").read_text() == "x" and (first / ".complete").exists()
    (first / "x.txt").write_text("local edit")
    assert io.cached_copy(gcs.uri("tree")) == first and (first / "x.txt").read_text() == "local edit"
    with io.staged_dir(gcs.uri("staged")) as out:
        (out / "a").mkdir()
        (out / "a" / "b.bin").write_bytes(b"\x00\x01")
    assert io.as_path(gcs.uri("staged", "a", "b.bin")).read_bytes() == b"\x00\x01"


def _fresh(path):
    """`path` with gcsfs's directory-listing cache dropped (another process writes the bucket)."""
    from etils.epath import backend

    backend.fsspec_backend.fs("gs://").invalidate_cache()  # the gcsfs instance etils.epath reads through
    return path


def test_training_in_the_bucket_killed_and_resumed(gcs, world):
    """Data, images, base model and workdir in the bucket. The run is SIGKILLed once step 5 is logged (after
    checkpoint 4); the same command resumes from step 4 and step 5's loss equals the killed run's step 5 (same
    batch, parameters and optimizer state), so the resume is exact."""
    from llava_jax.io import as_path

    run_dir = gcs.uri("runs", "killed")
    env = _env(gcs)
    metrics = as_path(run_dir) / "metrics.jsonl"
    # step_sleep_s: each step waits 2.5 s before its metrics row, so the kill lands before row 6.
    killed = subprocess.Popen(_cmd(gcs, run_dir, "--config.debug.step_sleep_s=2.5",
                                   "--config.checkpoint.use_async=false"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)

    def logged() -> dict[int, float]:
        try:
            return _losses(_fresh(metrics).read_text())
        except FileNotFoundError:
            return {}

    deadline = time.time() + 300
    while 5 not in logged():
        assert killed.poll() is None, "the run ended before it could be killed: " + killed.stdout.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    before = _losses(_fresh(metrics).read_text())
    assert max(before) < STEPS and _steps(as_path(run_dir) / "checkpoints") == [2, 4]

    rerun = subprocess.run(_cmd(gcs, run_dir), capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    assert "resumed from step 4" in rerun.stdout
    after = _losses(_fresh(metrics).read_text())
    assert sorted(after) == list(range(1, STEPS + 1))
    for step in range(1, 6):
        assert after[step] == before[step], (step, after[step], before[step])
    listing = sorted(p.name for p in _fresh(as_path(run_dir) / "checkpoints").iterdir())
    assert _steps(as_path(run_dir) / "checkpoints") == [2, 4, 6], listing
    events = [p for p in (as_path(run_dir) / "tb").iterdir() if p.name.startswith("events")]
    assert len(events) == 2 and all(p.stat().length > 0 for p in events)  # one file per run
    assert json.loads((as_path(run_dir) / "run.json").read_text())["init_from"] == gcs.uri("model")
    assert not (as_path(run_dir) / ".llava_jax_shared_check").exists()

    # The trained model reads back from the bucket (base model in the bucket + the step-6 checkpoint).
    from flax import nnx

    from llava_jax.checkpoint import load_trained_model
    from llava_jax.convert.model_dir import load_model_dir

    def params(model):
        return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}

    trained, base = params(load_trained_model(run_dir).model), params(load_model_dir(world / "model").model)
    changed = {k for k in base if not np.array_equal(base[k], trained[k])}
    assert changed and all(k.startswith("projector/") for k in changed)


def test_convert_to_hf_and_back_in_the_bucket(gcs, world):
    from flax import nnx

    from llava_jax.convert.__main__ import main
    from llava_jax.convert.model_dir import load_model
    from llava_jax.io import as_path

    assert main(["to-hf", gcs.uri("model"), gcs.uri("hf")]) == 0
    names = {p.name for p in as_path(gcs.uri("hf")).iterdir()}
    assert {"config.json", "tokenizer.json"} <= names
    assert any(n.endswith(".safetensors") for n in names)
    assert main(["from-hf", gcs.uri("hf"), gcs.uri("model2")]) == 0

    def flat(path):
        m = load_model(path).model
        return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}

    a, b = flat(world / "model"), flat(gcs.uri("model2"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=0, err_msg=k)


def test_data_gen_captions_with_bucket_paths(gcs):
    from data_gen.captions import main
    from llava_jax.io import as_path, atomic_write_text, read_json

    atomic_write_text(gcs.uri("dg", "pairs.tsv"), "image\tcaption\na.jpg\tA red square.\nb.jpg\tTwo circles.\n")
    assert main(["--captions", gcs.uri("dg", "pairs.tsv"), "--out", gcs.uri("dg", "stage1.json")]) == 0
    records = read_json(gcs.uri("dg", "stage1.json"))
    assert [r["image"] for r in records] == ["a.jpg", "b.jpg"]
    assert records[1]["conversations"][1]["value"] == "Two circles."
    assert as_path(gcs.uri("dg", "stage1.json")).exists()


def test_select_and_score_with_bucket_paths(gcs, world):
    import importlib.util

    from llava_jax.eval.pope import main as pope_main
    from llava_jax.io import as_path, atomic_write_jsonl, read_json
    from selection.select import run_selection

    spec = importlib.util.spec_from_file_location("select_config", REPO / "configs" / "select.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config("length")
    n = len(json.loads((world / "data" / "stage1.json").read_text()))
    np.save(world / "emb.npy", np.random.default_rng(0).standard_normal((n, 8)).astype(np.float32))
    cfg.cluster.embeddings, cfg.cluster.k, cfg.plots = str(world / "emb.npy"), 2, False
    out = gcs.uri("select")
    result = run_selection(gcs.uri("data", "stage1.json"), gcs.uri("data", "images"), out, cfg, alpha=5)
    assert len(result.selected) == 5
    subset = json.loads((as_path(out) / "stage1.json").read_text())
    assert len(subset) == 5
    report = read_json(gcs.uri("select", "report.json"))
    assert report["selected"] == 5 and report["subset"] == gcs.uri("select", "stage1.json")
    assert report["input"]["path"] == gcs.uri("data", "stage1.json")
    assert (as_path(out) / "scores.csv").exists()

    labels = [{"question_id": i, "label": "yes" if i % 2 else "no", "category": "random"} for i in range(8)]
    answers = [{"question_id": i, "text": "Yes" if i < 4 else "No"} for i in range(8)]
    atomic_write_jsonl(gcs.uri("pope", "labels.json"), labels)
    atomic_write_jsonl(gcs.uri("pope", "answers.jsonl"), answers)
    assert pope_main(["score", "--labels", gcs.uri("pope", "labels.json"), "--answers",
                      gcs.uri("pope", "answers.jsonl"), "--out", gcs.uri("pope", "score.json")]) == 0
    score = read_json(gcs.uri("pope", "score.json"))
    # yes for 0..3 (labels: 1, 3 yes), no for 4..7 (labels: 4, 6 no): 4 of 8 right, in percent
    assert score["by_category"]["random"]["accuracy"] == pytest.approx(50.0)
