"""The trainer through its command line on a tiny model and the synthetic set: stage 1 trains only the
projector, exact resume after SIGKILL (also of a LoRA run), SIGTERM saves and exits 0, a NaN loss stops naming the step, and
two jax.distributed processes on 127.0.0.1 give the losses of one process with the same global batch.

Each trainer process costs ~15 s of CPU (import + compile); the SIGTERM, NaN and LoRA-resume checks are marked
slow (run them with `pytest -m slow tests/test_train_cli.py`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = 6
VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16,
              patch_size=8, projection_dim=16)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from llava_jax.data.synthetic import generate
    from llava_jax.demo import build_model_dir

    root = tmp_path_factory.mktemp("train_cli")
    generate(root / "data", num=48, seed=0, num_eval=4, image_size=16)
    build_model_dir(root / "data", root / "model", seed=0, vision=VISION, text=TEXT, vocab=160)
    return root


def _env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    return env


def _cmd(root: Path, workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "llava_jax.train", f"--config={REPO / 'configs' / 'pretrain.py'}:demo",
            f"--workdir={workdir}", f"--config.init_from={root / 'model'}",
            f"--config.data.train_file={root / 'data' / 'stage1.json'}",
            f"--config.data.image_root={root / 'data' / 'images'}", "--config.trainable=^projector/",
            f"--config.max_steps={STEPS}", "--config.batch_size=4", "--config.data.max_length=48",
            "--config.checkpoint.every_steps=2", "--config.log_every=1", "--config.checkpoint.keep=5",
            *extra]


def _losses(workdir: Path) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return {r["step"]: r["last_loss"] for r in rows}


def _params(workdir: Path) -> dict[str, np.ndarray]:
    from flax import nnx

    from llava_jax.checkpoint import load_trained_model

    model = load_trained_model(workdir).model
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def reference_run(setup):
    workdir = setup / "ref"
    proc = subprocess.run(_cmd(setup, workdir), capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return workdir, proc.stdout


def test_banner_metrics_and_checkpoints(reference_run):
    workdir, out = reference_run
    for section in ("mesh", "data", "model", "shard", "step", "checkpoint", "loop", "eval"):
        assert f"==== {section} " in out
    assert "ETA" in out
    losses = _losses(workdir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(np.isfinite(v) for v in losses.values())
    row = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s"):
        assert key in row
    assert any(p.name.startswith("events") for p in (workdir / "tb").iterdir())
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2, 4, 6]


def test_stage1_changes_only_the_projector(setup, reference_run):
    from flax import nnx

    from llava_jax.convert.model_dir import load_model_dir

    base = load_model_dir(setup / "model").model
    before = {"/".join(map(str, p)): np.asarray(v.get_value())
              for p, v in nnx.to_flat_state(nnx.state(base, nnx.Param))}
    after = _params(reference_run[0])
    assert before.keys() == after.keys()
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed and all(k.startswith("projector/") for k in changed), changed
    # frozen weights are not in the checkpoint: only the projector's arrays are stored
    stored = [p.name for p in (reference_run[0] / "checkpoints" / "6" / "params").iterdir()]
    assert stored


def _kill_and_resume(setup, workdir: Path, reference: Path, *extra: str) -> str:
    """Runs `extra`'s training into `workdir`, SIGKILLs it once checkpoint 4 exists, reruns the same command and
    checks that losses and parameters equal the uninterrupted `reference` run. Returns the rerun's output."""
    proc = subprocess.Popen(_cmd(setup, workdir, *extra, "--config.debug.step_sleep_s=1.0",
                                 "--config.checkpoint.use_async=false"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), cwd=REPO)
    deadline = time.time() + 300
    while not (workdir / "checkpoints" / "4").is_dir():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(_losses(workdir))
    assert killed_at < STEPS
    rerun = subprocess.run(_cmd(setup, workdir, *extra), capture_output=True, text=True, env=_env(), cwd=REPO,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from step 4" in rerun.stdout
    ref_losses, losses = _losses(reference), _losses(workdir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step in range(5, STEPS + 1):
        assert losses[step] == ref_losses[step], (step, losses[step], ref_losses[step])
    ref, got = _params(reference), _params(workdir)
    assert ref.keys() == got.keys()
    for k in ref:
        assert np.array_equal(ref[k], got[k]), k
    return rerun.stdout


def test_exact_resume_after_sigkill(setup, reference_run):
    _kill_and_resume(setup, setup / "killed", reference_run[0])


# LoRA (configs/finetune.py:demo_lora's settings on the tiny model): adapters with dropout + projector at its own
# learning rate; the checkpoints hold only those.
LORA = ("--config.lora.rank=4", "--config.lora.alpha=8", "--config.lora.dropout=0.1",
        "--config.trainable=('^projector/','_lora_[ab]$')", "--config.optimizer.projector_lr=1e-3")


@pytest.mark.slow  # three more trainer processes (~50 s on an idle 2-core machine): pytest -m slow
def test_lora_exact_resume_after_sigkill(setup):
    reference = setup / "lora_ref"
    proc = subprocess.run(_cmd(setup, reference, *LORA), capture_output=True, text=True, env=_env(), cwd=REPO,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "LoRA on ['q', 'k', 'v', 'o', 'gate', 'up', 'down']: rank 4" in proc.stdout
    meta = json.loads((reference / "checkpoints" / "6" / "params" / "_METADATA").read_text())
    stored = set(meta["tree_metadata"])  # "('language_model', 'q_lora_a')", ...
    assert any("q_lora_b" in k for k in stored) and any("'projector'" in k for k in stored), stored
    assert all("_lora_" in k or "'projector'" in k for k in stored), stored  # only what trains
    _kill_and_resume(setup, setup / "lora_killed", reference, *LORA)
    params = _params(reference)  # the rebuilt workdir model carries the adapters, and they trained
    assert np.any(params["language_model/q_lora_b"])


@pytest.mark.slow
def test_sigterm_saves_and_exits_zero(setup):
    workdir = setup / "term"
    proc = subprocess.Popen(_cmd(setup, workdir, "--config.debug.step_sleep_s=1.0"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env(), cwd=REPO)
    deadline = time.time() + 300
    while not (workdir / "metrics.jsonl").exists() or not _losses(workdir):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM: saving step" in out
    saved = int(out.split("SIGTERM: saving step ")[1].split()[0])
    assert saved < STEPS
    assert (workdir / "checkpoints" / str(saved)).is_dir()


@pytest.mark.slow
def test_nan_loss_stops_naming_the_step(setup):
    workdir = setup / "nan"
    proc = subprocess.run(_cmd(setup, workdir, "--config.debug.fail_at_step=3"), capture_output=True, text=True,
                          env=_env(), cwd=REPO, timeout=600)
    assert proc.returncode == 1
    assert "loss is nan at step 3" in proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(setup, reference_run):
    workdir = setup / "dist"
    port = _free_port()
    procs = []
    for pid in range(2):
        cmd = _cmd(setup, workdir, "--config.distributed.enabled=true",
                   f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                   "--config.distributed.num_processes=2", f"--config.distributed.process_id={pid}")
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=_env(), cwd=REPO))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert "processes 2" in outs[0]
    ref, got = _losses(reference_run[0]), _losses(workdir)
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert abs(got[step] - ref[step]) <= 1e-5 * max(1.0, abs(ref[step])), (step, got[step], ref[step])
