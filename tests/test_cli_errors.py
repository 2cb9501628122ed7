"""Every command-line tool reports a bad argument or config as one line `error: ...` on stderr and exit code 2.

Each `python -m` entry point under llava_jax/, data_gen/ and selection/ runs once (in a subprocess, several at a
time) with an argument that cannot work; a test also checks that every entry point has a case here, so a new
tool cannot skip the contract. The helpers of llava_jax/cli.py are checked in-process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from llava_jax import cli

REPO = Path(__file__).resolve().parents[1]
MISSING = "/nonexistent-llava-jax"

# module, arguments ({tmp}: a scratch dir; {data}/{images}: a valid one-record LLaVA JSON and its image root),
# a fragment the error line must contain (so the right problem is the one reported)
CASES = [
    ("data_gen.captions", f"--captions {MISSING}/c.json --out {{tmp}}/x.json", "c.json"),
    ("data_gen.instruct", f"--captions {MISSING}/c.json --instances {MISSING}/i.json --out {{tmp}}/x.json",
     "c.json"),
    ("llava_jax.aot", "--config=configs/finetune.py:no_such_variant", "no_such_variant"),
    ("llava_jax.clip_train", f"--config=configs/clip.py:synthetic --workdir {{tmp}}/w "
                             f"--config.data.captions={MISSING}/c.json --config.data.image_root={MISSING}/img", "c.json"),
    ("llava_jax.convert", f"from-llava {MISSING}/llava --vision {MISSING}/clip {{tmp}}/m", "config.json"),
    ("llava_jax.data.build", f"--data {MISSING}/d.json --out {{tmp}}/b", "d.json"),
    ("llava_jax.data.synthetic", "--out {tmp}/s --num -3", "num"),
    ("llava_jax.data.validate", f"--data {MISSING}/d.json --image-root {{tmp}}", "d.json"),
    ("llava_jax.demo", "--out {tmp}/demo --stage1-set no_equals_sign", "KEY=VALUE"),
    ("llava_jax.eval.captioning", f"score --annotations {MISSING}/c.json --answers {MISSING}/a.jsonl --out {{tmp}}/s.json",
     "c.json"),
    ("llava_jax.eval.ehub", f"score --questions {MISSING}/q.jsonl --answers {MISSING}/a.jsonl", "q.jsonl"),
    ("llava_jax.eval.gqa", f"score --questions {MISSING}/q.json --answers {MISSING}/a.jsonl", "q.json"),
    ("llava_jax.eval.mmbench", f"score --tsv {MISSING}/dev.tsv --answers {MISSING}/a.jsonl", "dev.tsv"),
    ("llava_jax.eval.mme", f"score --data-dir {MISSING}/MME --answers {MISSING}/a.jsonl --out {{tmp}}/s.json",
     MISSING),
    ("llava_jax.eval.suite", f"--model a={MISSING}/m --out {{tmp}}/suite", f"{MISSING}/m"),
    ("llava_jax.eval.textvqa", f"score --annotations {MISSING}/t.json --answers {MISSING}/a.jsonl", MISSING),
    ("llava_jax.eval.vsr", f"score --data {MISSING}/test.jsonl --answers {MISSING}/a.jsonl", MISSING),
    ("llava_jax.eval.checkpoints", f"--workdir {MISSING}/w --val {MISSING}/v.jsonl --eval {MISSING}/e.jsonl",
     MISSING),
    ("llava_jax.eval.compare", f"--questions {MISSING}/q.jsonl --answers-a {MISSING}/a --answers-b {MISSING}/b "
                               "--out {tmp}/c", MISSING),
    ("llava_jax.eval.llava_bench", f"summarize --reviews {MISSING}/r.jsonl", "r.jsonl"),
    ("llava_jax.eval.pope", f"score --labels {MISSING}/l.json --answers {MISSING}/a.jsonl", MISSING),
    ("llava_jax.eval.predict", f"--model {MISSING}/m --questions {MISSING}/q.jsonl --out {{tmp}}/a.jsonl", MISSING),
    ("llava_jax.eval.scienceqa", f"score --data-dir {MISSING}/sqa --answers {MISSING}/a.jsonl", MISSING),
    ("llava_jax.eval.vqa", f"score --annotations {MISSING}/an.json --answers {MISSING}/a.jsonl", MISSING),
    ("llava_jax.generate", f"--model {MISSING}/m --prompt hi", f"{MISSING}/m"),
    ("llava_jax.serve", f"--model {MISSING}/m --port 0", f"{MISSING}/m"),
    ("llava_jax.chat", f"--model {MISSING}/m --image {MISSING}/i.png", f"{MISSING}/m"),
    ("llava_jax.train", "--config=configs/finetune.py:demo --workdir {tmp}/t --config.data.no_such_key=1",
     "--config.data.no_such_key: the config has no field 'no_such_key'"),
    ("selection.cluster", f"--embeddings {MISSING}/e.npy --out {{tmp}}/l.npy", "e.npy"),
    # the example: a missing CLIP directory printed a traceback
    ("selection.select", f"--data {{data}} --image-root {{images}} --out {{tmp}}/sel --alpha 1 "
                         f"--config.clip.model_dir={MISSING}/clip", f"{MISSING}/clip"),
    ("selection.experiment", "--out {tmp}/x --no-such-option", "no-such-option"),
]
# more than one kind of mistake for the two flag systems (argparse, absl + ml_collections)
EXTRA_CASES = [
    ("llava_jax.convert", "frobnicate", "frobnicate"),
    ("llava_jax.generate", "--prompt hi", "--model"),
    ("llava_jax.serve", "--model {tmp} --api-key-env LLAVA_JAX_UNSET_KEY_VAR", "LLAVA_JAX_UNSET_KEY_VAR"),
    ("llava_jax.serve", f"--model {{tmp}} --image-root {MISSING}/img", f"{MISSING}/img"),
    ("llava_jax.train", "--config=configs/no_such_file.py --workdir {tmp}/t", "no_such_file.py"),
    ("llava_jax.train", "--config=configs/finetune.py:demo_lora --workdir {tmp}/t --config.lora.rank=-2",
     "LoRA rank"),
    ("llava_jax.convert", f"from-peft {MISSING}/p --base {MISSING}/b {{tmp}}/m", "adapter_config.json"),
    ("llava_jax.convert", f"to-peft {MISSING}/w {{tmp}}/p", MISSING),
    ("llava_jax.train", "--config=configs/finetune.py:demo --workdir {tmp}/t --config.optimizer.lr=abc", "abc"),
    ("llava_jax.train", "--workdir {tmp}/t", "config"),
    ("llava_jax.data.synthetic", "--benchmarks {tmp}/b --grid 3", "grid"),
    ("llava_jax.eval.suite", "--model a=. --suite configs/no_such_suite.py --out {tmp}/s", "no_such_suite.py"),
]
ALL = CASES + EXTRA_CASES


def entry_points() -> set[str]:
    """Dotted names of the modules that run as `python -m` tools."""
    names = set()
    for package in ("llava_jax", "data_gen", "selection"):
        for path in sorted((REPO / package).rglob("*.py")):
            if re.search(r"^if __name__ == .__main__.:", path.read_text(), re.M):
                rel = path.relative_to(REPO).with_suffix("")
                parts = rel.parts[:-1] if rel.name == "__main__" else rel.parts
                names.add(".".join(parts))
    return names


def _run(case: tuple[str, str, str], tmp: Path, data: Path, images: Path) -> subprocess.CompletedProcess:
    module, args, _ = case
    argv = args.format(tmp=tmp, data=data, images=images).split()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("LLAVA_JAX_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Runs every case (three at a time); {index: CompletedProcess}."""
    from PIL import Image

    base = tmp_path_factory.mktemp("cli")
    images = base / "images"
    images.mkdir()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(images / "a.png")
    data = base / "data.json"
    data.write_text(json.dumps([{"id": "a", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": "A red square."}]}]))
    dirs = [base / f"case{i}" for i in range(len(ALL))]
    for d in dirs:
        d.mkdir()
    with ThreadPoolExecutor(max_workers=3) as pool:
        procs = list(pool.map(lambda i: _run(ALL[i], dirs[i], data, images), range(len(ALL))))
    return dict(enumerate(procs))


@pytest.mark.parametrize("index", range(len(ALL)), ids=[f"{i}-{m}" for i, (m, _, _) in enumerate(ALL)])
def test_bad_argument_is_one_error_line_and_exit_2(results, index):
    module, args, fragment = ALL[index]
    proc = results[index]
    context = f"python -m {module} {args}\nstdout: {proc.stdout[-1500:]}\nstderr: {proc.stderr[-3000:]}"
    assert proc.returncode == 2, context
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, context
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], context  # one error line, and nothing after it
    assert fragment in errors[0], context


def test_every_entry_point_has_a_case():
    covered = {m for m, _, _ in CASES}
    missing = sorted(entry_points() - covered)
    assert not missing, f"add a bad-argument case to CASES for {missing}"
    assert {"llava_jax.convert", "llava_jax.train", "selection.select", "data_gen.instruct"} <= entry_points()


# ------------------------------------------------------------------------------------------------ in-process


def test_argument_parser_error_is_one_line(capsys):
    parser = cli.ArgumentParser(prog="tool")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("go").add_argument("--n", type=int, required=True)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["go", "--n", "x"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: tool go: argument --n: invalid int value")


def test_run_maps_user_errors_and_keeps_bugs(capsys, monkeypatch):
    monkeypatch.delenv("LLAVA_JAX_TRACEBACK", raising=False)

    def bad_value(argv):
        raise cli.UsageError("first line\n  second line")

    def missing_file(argv):
        open(f"{MISSING}/x.json")

    def ok(argv):
        return None

    def bug(argv):
        raise TypeError("a bug")

    assert cli.run(bad_value) == 2
    assert capsys.readouterr().err == "error: first line second line\n"
    assert cli.run(missing_file) == 2
    assert capsys.readouterr().err == f"error: {MISSING}/x.json: No such file or directory\n"
    assert cli.run(ok) == 0
    with pytest.raises(TypeError):
        cli.run(bug)
    monkeypatch.setenv("LLAVA_JAX_TRACEBACK", "1")
    with pytest.raises(cli.UsageError):
        cli.run(bad_value)


def test_flag_error_message_keeps_the_config_error_not_its_traceback():
    text = ("flag --config=c.py:x: Error whilst parsing config file: Traceback (most recent call last):\n"
            '  File "c.py", line 3, in get_config\n    raise ValueError("unknown variant x")\n'
            "ValueError: unknown variant x")
    assert cli.flag_error_message(ValueError(text)) == ("flag --config=c.py:x: Error whilst parsing config file: "
                                                        "ValueError: unknown variant x")
    assert cli.flag_error_message(AttributeError("'nope'"), ["prog", "--config.a.nope=1"]) == (
        "--config.a.nope: the config has no field 'nope'")
