"""The InstructionGPT-4 experiment in miniature: does a selected few percent of a noisy instruction set fine-tune
a better model than all of it?

    python -m selection.experiment --out runs/igpt4_mini [--noise 0.5[,0.3,0.7]] [--budgets 0.08,0.25] \
        [--arms full,clean,oracle,random,select,nocluster,clip,length,mllm] [--quick] \
        [--config configs/experiment.py[:variant]] [--set KEY=VALUE ...] \
        [--reward-model-dir DIR] [--judge-url URL [--judge-model NAME]] [--report-only]

Steps, each skipped when its output exists (rerunning the command resumes; a stage-2 run that was cut off
continues from its last checkpoint):
  1. data     `llava_jax.data.synthetic` with planted noise (OUT/data/noise<share>/: the noisy stage2.json, the
              noise_labels.json that only this experiment reads -- never the selector --, val.jsonl, eval.jsonl)
  2. model    a tiny random LLaVA and its tokenizer (`llava_jax.workflow.build_model_dir`)
  3. stage 1  one run (configs/pretrain.py:demo) -> OUT/stage1
  4. CLIP     one contrastive run (`llava_jax.clip_train`, configs/clip.py:synthetic) exported as an HF CLIPModel
              (`convert clip-to-hf`) -> OUT/clip/hf: the selector's clip score and clusters
  5. subsets  full (the noisy set), clean (its good records: the oracle); per budget: oracle@b (good records only),
              random@b (seeded; the selector's random strategy), select@b (the selector, default weights); at the
              smallest budget also nocluster (K = 1) and each single score (clip, length, mllm; reward and gpt only
              with a reward model / judge server -- otherwise their weights are 0 and results.json says so)
  6. stage 2  per arm, from the same stage-1 checkpoint, the same number of steps -> OUT/arms/noise<share>/<arm>/
  7. eval     per arm: the checkpoint with the best validation accuracy, then held-out accuracy (with the image,
              blind, per category) of it and of the final step (`llava_jax.eval.checkpoints`)
  8. report   OUT/results.json, OUT/RESULTS.md, OUT/accuracy_vs_budget.png (+ accuracy_vs_noise.png for a noise
              list); AUROC of every score for the planted bad records and each subset's share of bad records
With --noise a list, every arm runs at the first level; full, random and select (every budget) at the others.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from llava_jax import cli, workflow
from llava_jax.io import atomic_write_json, atomic_write_jsonl, read_json, read_jsonl
from selection import experiment_report as report

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILE = REPO / "configs" / "experiment.py"
SELECT_CONFIG_FILE = REPO / "configs" / "select.py"
CLIP_CONFIG_FILE = REPO / "configs" / "clip.py"
SELECTOR_KINDS = {"random": "random", "select": "default", "nocluster": "nocluster", "clip": "clip",
                  "length": "length", "mllm": "mllm", "reward": "reward", "gpt": "gpt"}
ABLATIONS = ("nocluster", "clip", "length", "mllm", "reward", "gpt")  # at the smallest budget only
SWEEP_KINDS = ("full", "random", "select")  # at every noise level of a list
# Settings that change what an arm's numbers mean: an OUT directory refuses a rerun with other values.
WORLD_KEYS = ("seed", "data", "model", "stage1", "stage2", "clip", "mllm", "eval")


class ExperimentError(ValueError):
    """A bad setting (budget, noise level, arm kind, override) or an OUT directory made with other settings."""


# ------------------------------------------------------------------------------------------------ settings


def _load_module(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(spec: str | None = None) -> ml_collections.ConfigDict:
    """configs/experiment.py's get_config for 'PATH[:variant]' or ':variant' (default: the default variant)."""
    path, _, variant = (spec or "").rpartition(":") if ":" in (spec or "") else (spec or "", "", "")
    module = _load_module(Path(path) if path else CONFIG_FILE, "llava_jax_configs_experiment")
    try:
        return module.get_config(variant or None)
    except ValueError as e:
        raise ExperimentError(str(e)) from None


def apply_overrides(cfg: ml_collections.ConfigDict, items: Sequence[str]) -> None:
    """Applies `KEY=VALUE` items (dotted keys; values as Python literals, else strings) to `cfg` in place.

    An unknown key, or a value of another type than the key's, raises ExperimentError.
    """
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ExperimentError(f"setting {item!r} is not KEY=VALUE")
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
                raise ExperimentError(f"unknown config key {key!r}")
            node = node[p]
        if leaf not in node or isinstance(node[leaf], ml_collections.ConfigDict):
            raise ExperimentError(f"unknown config key {key!r}")
        old = node[leaf]
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if isinstance(old, str):
            value = text
        elif isinstance(old, tuple) and isinstance(value, (list, tuple)):
            value = tuple(value)
        elif isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not type(old):
            raise ExperimentError(f"{key} takes a {type(old).__name__}, got {text!r}")
        node[leaf] = value


def parse_shares(text: str, what: str, *, zero_ok: bool) -> list[float]:
    """'0.08,0.25' -> [0.08, 0.25]; each in (0, 1] ([0, 1] with zero_ok), no repeats, order kept."""
    try:
        values = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ExperimentError(f"{what} must be a comma list of numbers, got {text!r}") from None
    if not values:
        raise ExperimentError(f"{what} is empty")
    for v in values:
        if not (0.0 <= v <= 1.0 if zero_ok else 0.0 < v <= 1.0):
            raise ExperimentError(f"{what} {v:g} is outside {'[0, 1]' if zero_ok else '(0, 1]'}")
    if len(set(values)) != len(values):
        raise ExperimentError(f"{what} repeats a value: {text!r}")
    return values


def fmt_share(x: float) -> str:
    """0.08 -> '0.08' (the spelling of budgets and noise levels in arm and directory names)."""
    return f"{x:g}"


# ------------------------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class Arm:
    """One stage-2 run. name: its results key (a random seed run: `<group>#seed<k>`); kind: an ARM_KINDS entry;
    budget: share of the noisy set (None for full / clean); noise: the level it trains at; group: the results
    name a seed run is averaged into (its own name otherwise)."""

    name: str
    kind: str
    budget: float | None
    noise: float
    seed: int = 0
    group: str = ""


@dataclass
class Plan:
    """The arms in run order (main noise level first), the levels and budgets, and left-out kinds with reasons."""

    noise_levels: list[float]
    budgets: list[float]
    arms: list[Arm] = field(default_factory=list)
    left_out: dict[str, str] = field(default_factory=dict)


def arm_name(kind: str, budget: float | None, smallest: float) -> str:
    """full / clean; random, select and the ablations bare at the smallest budget and `<kind>@<budget>` at the
    others; the oracle subsets always `oracle@<budget>`."""
    if budget is None:
        return kind
    if kind != "oracle" and budget == smallest:
        return kind
    return f"{kind}@{fmt_share(budget)}"


def unavailable_kinds(cfg: ml_collections.ConfigDict) -> dict[str, str]:
    """Arm kinds that cannot run with these settings, with the reason."""
    out = {}
    if not cfg.reward.model_dir:
        out["reward"] = "no reward model dir given (--reward-model-dir): reward weight 0"
    if not cfg.judge.base_url:
        out["gpt"] = "no judge server given (--judge-url): gpt weight 0"
    if not cfg.mllm.model:
        out["mllm"] = "mllm.model is empty: mllm weight 0"
    return out


def plan_arms(cfg: ml_collections.ConfigDict) -> Plan:
    """Every arm of `cfg` in run order. Raises ExperimentError for unknown kinds, or an explicitly requested kind
    that cannot run (a default run leaves it out and records why)."""
    kinds = _load_module(CONFIG_FILE, "llava_jax_configs_experiment").ARM_KINDS
    noise_levels = parse_shares(cfg.noise, "noise", zero_ok=True)
    budgets = sorted(parse_shares(cfg.budgets, "budget", zero_ok=False))
    if int(cfg.random_seeds) < 1:
        raise ExperimentError(f"random_seeds must be >= 1, got {cfg.random_seeds}")
    requested = [k.strip() for k in str(cfg.arms).split(",") if k.strip()]
    unknown = [k for k in requested if k not in kinds]
    if unknown:
        raise ExperimentError(f"unknown arm kinds {unknown}; known: {', '.join(kinds)}")
    missing = unavailable_kinds(cfg)
    for k in requested:
        if k in missing:
            raise ExperimentError(f"arm {k!r} cannot run: {missing[k]}")
    wanted = set(requested or kinds)
    plan = Plan(noise_levels, budgets, left_out={k: v for k, v in missing.items() if k in wanted})
    wanted -= set(missing)
    if noise_levels[0] == 0.0 and wanted & {"clean", "oracle"}:
        raise ExperimentError("with noise 0 there is no bad record: clean and oracle arms would equal full/random")
    smallest = budgets[0]
    for level_index, noise in enumerate(noise_levels):
        allowed = wanted if level_index == 0 else wanted & set(SWEEP_KINDS)

        def add(kind: str, budget: float | None, seed: int = 0, *, _noise: float = noise) -> None:
            group = arm_name(kind, budget, smallest)
            name = f"{group}#seed{seed}" if kind == "random" else group
            plan.arms.append(Arm(name, kind, budget, _noise, seed, group))

        for kind in ("full", "clean"):
            if kind in allowed:
                add(kind, None)
        for budget in budgets:
            if "select" in allowed:
                add("select", budget)
            if "random" in allowed:
                for seed in range(int(cfg.random_seeds)):
                    add("random", budget, seed)
            if "oracle" in allowed:
                add("oracle", budget)
        for kind in ABLATIONS:
            if kind in allowed:
                add(kind, smallest)
    if not plan.arms:
        raise ExperimentError("no arm to run")
    uses_mllm = any(a.kind in SELECTOR_KINDS and a.kind not in ("random", "clip", "length", "reward", "gpt")
                    for a in plan.arms)
    if str(cfg.mllm.model) == "full" and uses_mllm and plan.arms[0].name != "full":
        raise ExperimentError("mllm.model=full scores with the full arm's model: include the full arm (or set "
                              "mllm.model=stage1 / a path)")
    return plan


# ------------------------------------------------------------------------------------------------ the run


def _done(path: Path) -> bool:
    return path.is_file()


class Experiment:
    """Runs the plan of `cfg` into `out`; every step writes its output atomically, so a rerun resumes."""

    def __init__(self, cfg: ml_collections.ConfigDict, out: str | os.PathLike, *, echo: bool = True):
        self.cfg = cfg
        self.out = Path(out).absolute()
        self.echo = echo
        self.plan = plan_arms(cfg)
        self.main_noise = self.plan.noise_levels[0]
        self.started = time.time()  # of the first run of this OUT (check_settings reads it back)
        self._evaluator = None
        self.stage2_runs = 0  # stage-2 trainings started by this process (the tests count them)

    # -------------------------------------------------------------------------------------------- paths

    def data_dir(self, noise: float) -> Path:
        return self.out / "data" / f"noise{fmt_share(noise)}"

    def arm_dir(self, arm: Arm) -> Path:
        return self.out / "arms" / f"noise{fmt_share(arm.noise)}" / arm.name

    @property
    def model_dir(self) -> Path:
        return self.out / "model"

    @property
    def stage1_dir(self) -> Path:
        return self.out / "stage1"

    @property
    def clip_dir(self) -> Path:
        return Path(self.cfg.clip.model_dir).absolute() if self.cfg.clip.model_dir else self.out / "clip" / "hf"

    @property
    def mllm_dir(self) -> str:
        m = str(self.cfg.mllm.model)
        if m == "full":  # the full arm's stage-2 run (main noise level): it knows the answer format
            return str(self.out / "arms" / f"noise{fmt_share(self.main_noise)}" / "full" / "train")
        return "" if not m else str(self.stage1_dir) if m == "stage1" else str(Path(m).absolute())

    def say(self, msg: str) -> None:
        if self.echo:
            print(f"[experiment {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    # -------------------------------------------------------------------------------------------- steps

    def check_settings(self) -> None:
        """Writes OUT/settings.json on the first run; a rerun whose world settings differ is refused."""
        world = {k: self.cfg[k].to_dict() if isinstance(self.cfg[k], ml_collections.ConfigDict) else self.cfg[k]
                 for k in WORLD_KEYS}
        world = json.loads(json.dumps(world))
        path = self.out / "settings.json"
        if path.is_file():
            before = read_json(path)["world"]
            if before != world:
                diff = sorted(k for k in WORLD_KEYS if before.get(k) != world.get(k))
                raise ExperimentError(f"{self.out} holds results made with other settings ({', '.join(diff)}); "
                                      f"use another --out")
        self.out.mkdir(parents=True, exist_ok=True)
        meta = self.data_dir(self.main_noise) / "meta.json"  # runs from before "started" was kept: first output
        started = read_json(path).get("started") if path.is_file() else None
        started = started or (meta.stat().st_mtime if meta.is_file() else time.time())
        self.started = float(started)
        atomic_write_json(path, {"world": world, "started": self.started,
                                 "config": json.loads(self.cfg.to_json_best_effort())})

    def make_data(self, noise: float) -> Path:
        """The synthetic set at `noise` (same seed at every level: the same scenes, other records made bad)."""
        d = self.data_dir(noise)
        if not _done(d / "meta.json"):
            from llava_jax.data.synthetic import generate

            c = self.cfg.data
            self.say(f"data: {c.num} images, noise {noise:g} -> {d}")
            generate(d, num=int(c.num), seed=int(self.cfg.seed), num_eval=int(c.num_eval), image_size=int(c.image_size),
                     noise=float(noise), noise_kinds=c.noise_kinds or None, num_val=int(c.num_val))
        return d

    def make_model(self) -> None:
        from llava_jax.convert.model_dir import is_model_dir

        if not is_model_dir(self.model_dir):
            self.say(f"model: tiny LLaVA -> {self.model_dir}")
            m = self.cfg.model
            workflow.build_model_dir(self.data_dir(self.main_noise), self.model_dir, int(self.cfg.seed),
                                     vision=m.vision.to_dict(), text=m.text.to_dict(), vocab=int(m.vocab))

    def stage1(self) -> None:
        done = self.out / "stage1.done.json"
        if _done(done):
            return
        self.say(f"stage 1: {self.cfg.stage1.steps} steps -> {self.stage1_dir}")
        t = time.time()
        cmd = workflow.stage1_command(data_dir=self.data_dir(self.main_noise), model_dir=self.model_dir,
                                      workdir=self.stage1_dir, seed=int(self.cfg.seed),
                                      steps=int(self.cfg.stage1.steps), overrides=tuple(self.cfg.stage1.set))
        workflow.run(cmd, self.out / "stage1.log", echo=False)
        atomic_write_json(done, {"seconds": time.time() - t})

    def clip(self) -> dict[str, Any]:
        """Trains and exports the CLIP (unless clip.model_dir is given); returns its retrieval evaluation."""
        if self.cfg.clip.model_dir:
            return {"given": str(self.clip_dir)}
        work = self.out / "clip"
        done = work / "export.done.json"
        if not _done(done):
            data = self.data_dir(self.main_noise)
            self.say(f"CLIP: contrastive training -> {work}")
            t = time.time()
            cmd = [sys.executable, "-m", "llava_jax.clip_train", f"--config={CLIP_CONFIG_FILE}:synthetic",
                   f"--workdir={work / 'train'}",
                   # short captions and the detailed descriptions (MiniGPT-4 layout) of the clean scenes
                   f"--config.data.captions={data / 'coco' / 'captions.json'},{data / 'cc_sbu_align' / 'filter_cap.json'}",
                   f"--config.data.image_root={data / 'images'},{data / 'cc_sbu_align'}", f"--config.seed={self.cfg.seed}"]
            if int(self.cfg.clip.steps):
                cmd.append(f"--config.max_steps={int(self.cfg.clip.steps)}")
            cmd += [f"--config.{kv}" for kv in self.cfg.clip.set]
            workflow.run(cmd, self.out / "clip_train.log", echo=False)
            if self.clip_dir.exists():
                shutil.rmtree(self.clip_dir)
            workflow.run([sys.executable, "-m", "llava_jax.convert", "clip-to-hf", str(work / "train"),
                          str(self.clip_dir)], self.out / "clip_export.log", echo=False)
            atomic_write_json(done, {"seconds": time.time() - t})
        ev = work / "train" / "eval.json"
        return read_json(ev) if ev.is_file() else {}

    # -------------------------------------------------------------------------------------------- subsets

    def selector_config(self, kind: str, seed: int, noise: float) -> ml_collections.ConfigDict:
        """configs/select.py's variant for an arm kind, with this run's model dirs; a score whose model or
        server is not given gets weight 0."""
        module = _load_module(SELECT_CONFIG_FILE, "llava_jax_configs_select")
        c = module.get_config(SELECTOR_KINDS[kind])
        c.seed = int(seed)
        c.cache_dir = str(self.out / "select" / f"noise{fmt_share(noise)}" / "cache")
        c.plots = kind == "select"
        scored = kind != "random"  # the random strategy reads no model
        c.clip.model_dir = str(self.clip_dir) if scored else ""
        if "mllm" in c:
            c.mllm.model_dir = self.mllm_dir if scored else ""
        c.reward.model_dir = str(self.cfg.reward.model_dir)
        if self.cfg.judge.base_url:
            c.gpt.client.base_url = str(self.cfg.judge.base_url)
            c.gpt.client.model = str(self.cfg.judge.model)
            c.gpt.client.api_key_env = str(self.cfg.judge.api_key_env)
            c.gpt.client.progress = False
        for name in unavailable_kinds(self.cfg):
            if name in c.weights:
                c.weights[name] = 0.0
        apply_overrides(c, tuple(self.cfg.select.set))
        return c

    def budget_size(self, budget: float, total: int) -> int:
        return max(1, int(round(budget * total)))

    def make_subset(self, arm: Arm) -> tuple[Path, list[str]]:
        """Writes the arm's training file (ARM_DIR/subset.json, LLaVA JSON) and returns it with the record ids."""
        d = self.arm_dir(arm)
        path = d / "subset.json"
        if _done(path):
            return path, [r["id"] for r in read_json(path)]
        data = self.data_dir(arm.noise)
        records = read_json(data / "stage2.json")
        labels = report.read_labels(data)
        n = len(records)
        if arm.kind == "full":
            picked = list(range(n))
        elif arm.kind == "clean":
            picked = [i for i, r in enumerate(records) if not labels[r["id"]]["bad"]]
        elif arm.kind == "oracle":
            good = [i for i, r in enumerate(records) if not labels[r["id"]]["bad"]]
            size = self.budget_size(arm.budget, n)
            if size > len(good):
                raise ExperimentError(f"{arm.name}: budget {size} exceeds the {len(good)} good records")
            rng = np.random.default_rng([int(self.cfg.seed), 7, int(round(arm.budget * 1e6))])
            picked = sorted(int(i) for i in rng.choice(good, size=size, replace=False))
        else:
            from selection.select import run_selection

            cfg = self.selector_config(arm.kind, arm.seed, arm.noise)
            sel_out = self.out / "select" / f"noise{fmt_share(arm.noise)}" / arm.name
            self.say(f"select: {arm.name} (noise {arm.noise:g}, alpha {self.budget_size(arm.budget, n)})")
            result = run_selection(data / "stage2.json", data / "images", sel_out, cfg,
                                   alpha=self.budget_size(arm.budget, n))
            picked = sorted(result.selected)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, [records[i] for i in picked], indent=None)
        return path, [records[i]["id"] for i in picked]

    # -------------------------------------------------------------------------------------------- stage 2

    def stage2_overrides(self) -> list[str]:
        s = self.cfg.stage2
        steps = int(s.steps)
        every = max(1, steps // max(1, int(s.validations)))
        buckets = ",".join(str(int(b)) for b in s.bucket_lengths)
        return [f"batch_size={int(s.batch_size)}", f"checkpoint.every_steps={every}",
                f"checkpoint.keep={int(s.validations) + 2}", f"data.max_length={int(s.max_length)}",
                f"data.bucket_lengths=({buckets},)", f"log_every={min(50, every)}", *s.set]

    @property
    def evaluator(self):
        if self._evaluator is None:
            from llava_jax.eval.checkpoints import CheckpointEvaluator

            self._evaluator = CheckpointEvaluator(batch_size=int(self.cfg.eval.batch_size),
                                                  max_new_tokens=int(self.cfg.eval.max_new_tokens))
        return self._evaluator

    def run_arm(self, arm: Arm) -> dict[str, Any]:
        """Subset -> stage 2 -> best-on-validation and final held-out evaluation -> ARM_DIR/result.json."""
        d = self.arm_dir(arm)
        result_path = d / "result.json"
        if _done(result_path):
            return read_json(result_path)
        t0 = time.time()
        subset, ids = self.make_subset(arm)
        data = self.data_dir(arm.noise)
        labels = report.read_labels(data)
        t1 = time.time()
        self.say(f"stage 2: {arm.name} (noise {arm.noise:g}): {len(ids)} records, {self.cfg.stage2.steps} steps")
        cmd = workflow.stage2_command(train_file=subset, image_root=data / "images", init_from=self.stage1_dir,
                                      workdir=d / "train", seed=int(self.cfg.seed), steps=int(self.cfg.stage2.steps),
                                      overrides=self.stage2_overrides())
        self.stage2_runs += 1
        workflow.run(cmd, d / "train.log", echo=False)
        t2 = time.time()
        ev = self.evaluator.evaluate(d / "train", data / "val.jsonl", data / "eval.jsonl", image_root=data / "images")
        t3 = time.time()
        result = report.arm_result(arm, ids, labels, ev, subset=str(subset.relative_to(self.out)),
                                   seconds={"subset": t1 - t0, "train": t2 - t1, "eval": t3 - t2})
        atomic_write_json(result_path, result)
        self.say(f"{arm.name}: accuracy {result['accuracy']:.3f} (final step {result['final']['accuracy']:.3f}), "
                 f"blind {result['blind_accuracy']:.3f}, {result['bad_share']:.1%} bad, "
                 f"train {t2 - t1:.0f}s eval {t3 - t2:.0f}s")
        return result

    # -------------------------------------------------------------------------------------------- all

    def run(self) -> dict[str, Any]:
        """Every step of the plan; writes the report after each arm (partial results are always on disk)."""
        t0 = time.time()
        self.check_settings()
        for noise in self.plan.noise_levels:
            self.make_data(noise)
        self.make_model()
        self.stage1()
        clip_eval = self.clip() if self._needs_clip() else {"skipped": "no arm uses the CLIP"}
        results = self.finished_results()  # earlier runs' arms too (a rerun with fewer --arms keeps them)
        for arm in self.plan.arms:
            results[self.arm_key(arm)] = self.run_arm(arm)
            self.write_report(results, clip_eval, time.time() - self.started)
        judged = self.judge(results)
        if judged:
            self.write_report(results, clip_eval, time.time() - self.started)
        self.say(f"done in {time.time() - t0:.0f}s -> {self.out / 'RESULTS.md'}")
        return read_json(self.out / "results.json")

    def report_only(self) -> dict[str, Any]:
        """The report (results.json, RESULTS.md, plots) of the arms already finished under OUT, judged against
        this plan (its missing arms are listed as not finished); runs nothing."""
        if not (self.data_dir(self.main_noise) / "meta.json").is_file():  # before check_settings writes into OUT
            raise ExperimentError(f"{self.out} holds no finished data step: nothing to report")
        self.check_settings()
        ev = self.out / "clip" / "train" / "eval.json"
        clip_eval = read_json(ev) if ev.is_file() else {}
        self.write_report(self.finished_results(), clip_eval, time.time() - self.started)
        self.say(f"report -> {self.out / 'RESULTS.md'}")
        return read_json(self.out / "results.json")

    def judge(self, results: dict[str, dict[str, Any]]) -> bool:
        """With a judge server: the select arm's held-out replies against the full arm's, judged pairwise in both
        orders (`llava_jax.eval.compare`; the judge is told each question's answer) -> OUT/judge/summary.json.
        Returns whether a judgment exists."""
        out = self.out / "judge"
        if not self.cfg.judge.base_url or not {"select", "full"} <= set(results):
            return False
        if not _done(out / "summary.json"):
            data = self.data_dir(self.main_noise)
            questions = data / "eval.jsonl"
            out.mkdir(parents=True, exist_ok=True)
            for name in ("select", "full"):
                arm = next(a for a in self.plan.arms if a.name == name and a.noise == self.main_noise)
                replies = self.evaluator.answers(self.arm_dir(arm) / "train", int(results[name]["best_step"]),
                                                 questions, image_root=data / "images")
                atomic_write_jsonl(out / f"{name}.jsonl", replies)
            context = [{"image": q["image"], "caption": f"The correct answer is: {q['answer']} "
                        f"(choices: {', '.join(q.get('choices') or [])})."} for q in read_jsonl(questions)]
            atomic_write_jsonl(out / "context.jsonl", context)
            self.say("judge: select vs full, both orders")
            workflow.run([sys.executable, "-m", "llava_jax.eval.compare", "--questions", str(questions),
                          "--answers-a", str(out / "select.jsonl"), "--answers-b", str(out / "full.jsonl"),
                          "--context", str(out / "context.jsonl"), "--out", str(out),
                          "--judge-base-url", str(self.cfg.judge.base_url), "--judge-model", str(self.cfg.judge.model),
                          "--judge-api-key-env", str(self.cfg.judge.api_key_env)], self.out / "judge.log", echo=False)
        return True

    def finished_results(self) -> dict[str, dict[str, Any]]:
        """Every finished arm under OUT/arms, by results key."""
        found = {}
        for path in sorted(self.out.glob("arms/noise*/*/result.json")):
            r = read_json(path)
            arm = Arm(path.parent.name, r["kind"], r["budget"], float(r["noise"]), int(r.get("seed", 0)), r["group"])
            found[self.arm_key(arm)] = r
        return found

    def arm_key(self, arm: Arm) -> str:
        return arm.name if arm.noise == self.main_noise else f"{arm.name}~noise{fmt_share(arm.noise)}"

    def _needs_clip(self) -> bool:
        return any(a.kind in SELECTOR_KINDS and a.kind != "random" for a in self.plan.arms)

    def write_report(self, results: dict[str, dict[str, Any]], clip_eval: dict[str, Any], elapsed: float) -> None:
        """results.json, RESULTS.md and the plots from the arms finished so far."""
        scores = {}
        for noise in self.plan.noise_levels:
            csv_path = self.out / "select" / f"noise{fmt_share(noise)}" / "select" / "scores.csv"
            if csv_path.is_file():
                scores[fmt_share(noise)] = report.score_detection(csv_path, report.read_labels(self.data_dir(noise)))
        meta = read_json(self.data_dir(self.main_noise) / "meta.json")
        judge_path = self.out / "judge" / "summary.json"
        judged = read_json(judge_path) if judge_path.is_file() else None
        doc = report.assemble(
            results, main_noise=self.main_noise, noise_levels=self.plan.noise_levels, budgets=self.plan.budgets,
            scores=scores, left_out=self.plan.left_out, clip_eval=clip_eval, data_meta=meta,
            settings=json.loads(self.cfg.to_json_best_effort()), elapsed_s=elapsed,
            planned=[self.arm_key(a) for a in self.plan.arms], judge=judged)
        atomic_write_json(self.out / "results.json", doc)
        report.write_markdown(self.out / "RESULTS.md", doc)
        report.plot(self.out, doc)


# ------------------------------------------------------------------------------------------------ CLI


def build_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
    """The config file / variant, then --set items, then the dedicated flags."""
    spec = args.config or (f"{CONFIG_FILE}:quick" if args.quick else None)
    if args.config and args.quick:
        raise ExperimentError("--quick and --config both choose the settings; give one")
    cfg = load_config(spec)
    apply_overrides(cfg, args.set)
    for flag, key in (("noise", "noise"), ("budgets", "budgets"), ("arms", "arms")):
        if getattr(args, flag) is not None:
            cfg[key] = str(getattr(args, flag))
    if args.reward_model_dir is not None:
        cfg.reward.model_dir = args.reward_model_dir
    if args.judge_url is not None:
        cfg.judge.base_url = args.judge_url
    if args.judge_model is not None:
        cfg.judge.model = args.judge_model
    if cfg.reward.model_dir and not Path(cfg.reward.model_dir).is_dir():
        raise ExperimentError(f"--reward-model-dir {cfg.reward.model_dir} is not a directory")
    if cfg.clip.model_dir and not Path(cfg.clip.model_dir).is_dir():
        raise ExperimentError(f"clip.model_dir {cfg.clip.model_dir} is not a directory")
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (see the module docstring)."""
    p = cli.ArgumentParser(prog="python -m selection.experiment", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (rerunning resumes)")
    p.add_argument("--noise", default=None, help="share of bad records, or a list: every arm at the first level, "
                                                   "full/random/select at the others (default 0.5)")
    p.add_argument("--budgets", default=None, help="comma list of subset shares (default 0.08,0.25)")
    p.add_argument("--arms", default=None, help="comma list of arm kinds (default: all that can run)")
    p.add_argument("--quick", action="store_true", help="the quick variant (~10 min)")
    p.add_argument("--config", default=None, help="configs/experiment.py[:variant]")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--reward-model-dir", default=None, help="a reward model dir: the reward score joins")
    p.add_argument("--judge-url", default=None, help="an OpenAI-compatible server: the gpt score joins")
    p.add_argument("--judge-model", default=None)
    p.add_argument("--report-only", action="store_true",
                   help="write the report of the arms already finished under --out (missing ones listed); run nothing")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("absl", "orbax", "jax._src", "selection"):
        logging.getLogger(name).setLevel(logging.ERROR)
    cfg = build_config(args)
    from llava_jax import host_memory

    host_memory.retain_freed_memory()
    try:
        experiment = Experiment(cfg, args.out)
        if args.report_only:
            experiment.report_only()
        else:
            experiment.run()
    except workflow.StepFailedError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
