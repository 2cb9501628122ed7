"""selection.experiment on a tiny setting (configs/experiment.py:tiny: a few dozen records, a few steps): the arms'
subsets have the right sizes and bad shares, results.json / RESULTS.md / the plot name the arms, and a rerun after
an interruption trains only the arms that had not finished. Plus the pure pieces: arm planning and names,
settings, AUROC, the seed average, the CLI's one-line errors.

The end-to-end check starts 4 stage-2 trainings, one stage 1 and one CLIP run (~15 s each on an idle CPU).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from selection import experiment as ex
from selection import experiment_report as rep

REPO = Path(__file__).resolve().parents[1]


def _cfg(**kw):
    cfg = ex.load_config(f"{REPO / 'configs' / 'experiment.py'}:tiny")
    for k, v in kw.items():
        cfg[k] = v
    return cfg


# ------------------------------------------------------------------------------------------------ pure pieces


def test_plan_names_arms_as_the_issue_does():
    cfg = _cfg(budgets="0.25,0.08", random_seeds=2, noise="0.5,0.3")
    plan = ex.plan_arms(cfg)
    main = [a.name for a in plan.arms if a.noise == 0.5]
    assert main == ["full", "clean", "select", "random#seed0", "random#seed1", "oracle@0.08", "select@0.25",
                    "random@0.25#seed0", "random@0.25#seed1", "oracle@0.25", "nocluster", "clip", "length", "mllm"]
    sweep = [a.name for a in plan.arms if a.noise == 0.3]
    assert sweep == ["full", "select", "random#seed0", "random#seed1", "select@0.25", "random@0.25#seed0",
                     "random@0.25#seed1"]
    assert set(plan.left_out) == {"reward", "gpt"} and "weight 0" in plan.left_out["reward"]
    assert plan.budgets == [0.08, 0.25]


def test_plan_rejects_bad_settings():
    for kw, match in ((dict(budgets="0.08,1.5"), "outside"), (dict(noise="x"), "comma list"),
                      (dict(arms="full,bogus"), "unknown arm"), (dict(arms="reward"), "cannot run"),
                      (dict(budgets="0.1,0.1"), "repeats"), (dict(noise="0", arms="clean"), "no bad record")):
        with pytest.raises(ex.ExperimentError, match=match):
            ex.plan_arms(_cfg(**kw))


def test_overrides_are_typed_and_known():
    cfg = _cfg()
    ex.apply_overrides(cfg, ["stage2.steps=7", "stage2.bucket_lengths=[64, 96]", "noise=0.3,0.5", "seed=3"])
    assert cfg.stage2.steps == 7 and cfg.stage2.bucket_lengths == (64, 96) and cfg.noise == "0.3,0.5"
    for bad in ("stage2.nope=1", "stage2.steps=many", "steps"):
        with pytest.raises(ex.ExperimentError):
            ex.apply_overrides(cfg, [bad])


def test_auroc_matches_pairwise_counting():
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=60), 1)  # rounding makes ties
    positive = rng.random(60) < 0.4
    pos, neg = scores[positive], scores[~positive]
    expected = np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg])
    assert rep.auroc(scores, positive) == pytest.approx(expected)
    assert rep.auroc(np.r_[scores, np.nan], np.r_[positive, True]) == pytest.approx(expected)
    assert rep.auroc(scores, np.ones(60, bool)) is None


def test_seed_runs_average_into_their_group():
    def run(seed, acc, bad):
        return {"kind": "random", "budget": 0.1, "noise": 0.5, "seed": seed, "records": 10, "bad_share": bad,
                "accuracy": acc, "blind_accuracy": 0.3, "by_category": {"color": acc}, "best_step": 2,
                "final": {"accuracy": acc - 0.1, "blind_accuracy": 0.3}}

    grouped = rep.group_arms({"random#seed0": run(0, 0.5, 0.4), "random#seed1": run(1, 0.7, 0.6),
                              "full": {**run(0, 0.9, 0.5), "kind": "full"}})
    r = grouped["random"]
    assert r["accuracy"] == pytest.approx(0.6) and r["accuracy_std"] == pytest.approx(0.1)
    assert (r["accuracy_min"], r["accuracy_max"]) == (0.5, 0.7) and r["bad_share"] == pytest.approx(0.5)
    assert r["final"]["accuracy"] == pytest.approx(0.5) and set(r["seeds"]) == {"random#seed0", "random#seed1"}
    assert grouped["full"]["accuracy"] == 0.9


def test_cli_bad_argument_is_one_error_line(tmp_path):
    for args in (["--budgets", "2"], ["--arms", "bogus"], ["--set", "stage2.nope=1"], ["--quick", "--config", "x"]):
        proc = subprocess.run([sys.executable, "-m", "selection.experiment", "--out", str(tmp_path / "o"), *args],
                              capture_output=True, text=True, cwd=REPO, timeout=120)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ end to end


def test_tiny_experiment_subsets_results_and_resume(tmp_path, monkeypatch):
    cfg = _cfg(arms="full,random,oracle", random_seeds=2)
    out = tmp_path / "exp"
    real_run = ex.workflow.run
    started = []

    def interrupted(cmd, log_path, **kw):
        if any("finetune.py" in c for c in cmd):
            started.append(Path(log_path).parent.name)
            if len(started) == 3:  # the third stage-2 run never finishes: the process "dies" there
                raise KeyboardInterrupt
        return real_run(cmd, log_path, **kw)

    monkeypatch.setattr(ex.workflow, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ex.Experiment(cfg, out, echo=False).run()
    assert started == ["full", "random#seed0", "random#seed1"]
    arms = out / "arms" / "noise0.5"
    finished = {name: (arms / name / "result.json").stat().st_mtime_ns for name in ("full", "random#seed0")}
    assert not (arms / "random#seed1" / "result.json").exists()
    partial = json.loads((out / "results.json").read_text())
    assert set(partial["runs"]) == {"full", "random#seed0"} and "oracle@0.25" in partial["pending"]
    assert "Partial" in (out / "RESULTS.md").read_text()

    monkeypatch.setattr(ex.workflow, "run", real_run)
    exp = ex.Experiment(cfg, out, echo=False)
    doc = exp.run()
    assert exp.stage2_runs == 2  # random#seed1 and oracle@0.25 only
    assert {name: (arms / name / "result.json").stat().st_mtime_ns for name in finished} == finished

    labels = rep.read_labels(out / "data" / "noise0.5")
    assert len(labels) == 40 and sum(v["bad"] for v in labels.values()) == 20
    assert set(doc["arms"]) == {"full", "random", "oracle@0.25"} and doc["pending"] == []
    subsets = {name: [r["id"] for r in json.loads((arms / name / "subset.json").read_text())]
               for name in ("full", "random#seed0", "random#seed1", "oracle@0.25")}
    assert {k: len(v) for k, v in subsets.items()} == {"full": 40, "random#seed0": 10, "random#seed1": 10,
                                                       "oracle@0.25": 10}
    assert subsets["random#seed0"] != subsets["random#seed1"]
    for name in ("random#seed0", "random#seed1"):
        bad = sum(labels[i]["bad"] for i in subsets[name])
        assert doc["runs"][name]["bad_share"] == pytest.approx(bad / 10)
    assert doc["arms"]["random"]["bad_share"] == pytest.approx(
        np.mean([doc["runs"][n]["bad_share"] for n in ("random#seed0", "random#seed1")]))
    assert doc["arms"]["oracle@0.25"]["bad_share"] == 0.0
    assert doc["arms"]["full"]["bad_share"] == pytest.approx(0.5) and doc["arms"]["full"]["records"] == 40
    for a in doc["arms"].values():
        assert 0.0 <= a["accuracy"] <= 1.0 and 0.0 <= a["final"]["accuracy"] <= 1.0
    run = doc["runs"]["full"]
    assert run["final_step"] == 4 and set(run["validation"]) == {"2", "4"} and run["best_step"] in (2, 4)
    md = (out / "RESULTS.md").read_text()
    for name in ("`full`", "`random`", "`oracle@0.25`", "± "):
        assert name in md
    assert "Partial" not in md
    assert (out / "accuracy_vs_budget.png").stat().st_size > 1000
    # --report-only: a wider plan over the same OUT reports the finished arms, lists the rest, trains nothing.
    wider = _cfg(arms="full,random,oracle", random_seeds=2, budgets="0.25,0.5")
    exp = ex.Experiment(wider, out, echo=False)
    again = exp.report_only()
    assert exp.stage2_runs == 0 and again["arms"]["full"] == doc["arms"]["full"]
    assert {"oracle@0.5", "random@0.5#seed0"} <= set(again["pending"])
    assert "Partial" in (out / "RESULTS.md").read_text()
    # Other world settings in the same OUT are refused rather than mixed into one table.
    with pytest.raises(ex.ExperimentError, match="other settings"):
        ex.Experiment(_cfg(arms="full", seed=1), out, echo=False).run()
    with pytest.raises(ex.ExperimentError, match="other settings"):
        ex.Experiment(_cfg(arms="full", seed=1), out, echo=False).report_only()


@pytest.mark.slow
def test_tiny_experiment_with_the_selector(tmp_path):
    """The selector arms through the trained CLIP and the stage-1 mllm score (adds a CLIP run and scoring)."""
    out = tmp_path / "exp"
    doc = ex.Experiment(_cfg(arms="full,select,length"), out, echo=False).run()
    arms = out / "arms" / "noise0.5"
    labels = rep.read_labels(out / "data" / "noise0.5")
    for name in ("select", "length"):
        ids = [r["id"] for r in json.loads((arms / name / "subset.json").read_text())]
        assert len(ids) == 10 and doc["arms"][name]["bad_share"] == pytest.approx(
            sum(labels[i]["bad"] for i in ids) / 10)
    assert set(doc["scores"]["0.5"]["auroc"]) >= {"clip", "length", "mllm", "final"}
    assert "| score | all bad" in (out / "RESULTS.md").read_text()
    assert (out / "clip" / "hf" / "config.json").is_file()
    # The selector never sees the labels: its inputs are the noisy set and the images.
    report = json.loads((out / "select" / "noise0.5" / "select" / "report.json").read_text())
    assert report["input"]["path"].endswith("stage2.json") and "noise_labels" not in json.dumps(report)


@pytest.mark.slow
def test_tiny_experiment_with_a_judge_server(tmp_path, monkeypatch):
    """With a judge server the gpt score joins the selector and select vs full is judged in both orders."""
    sys.path.insert(0, str(Path(__file__).parent))
    from openai_server import LocalOpenAIServer, Reply, chat_completion

    monkeypatch.setenv("TEST_JUDGE_KEY", "k")
    with LocalOpenAIServer(lambda req, n: Reply(body=chat_completion("7 5\nScore: 70"))) as server:
        cfg = _cfg(arms="full,select")
        cfg.judge.base_url = server.base_url
        cfg.judge.api_key_env = "TEST_JUDGE_KEY"
        doc = ex.Experiment(cfg, tmp_path / "exp", echo=False).run()
        assert len(server.requests) > 40  # a gpt rating per record, then the judge (identical requests answered once)
    assert doc["judge"]["overall"]["n"] == 6 and doc["judge"]["overall"]["ties"] == 6  # the same scores in both orders
    assert "gpt" in doc["scores"]["0.5"]["auroc"] and "gpt" not in doc["left_out"]
    assert "Pairwise judge" in (tmp_path / "exp" / "RESULTS.md").read_text()


def test_mllm_from_the_full_arm_needs_that_arm():
    with pytest.raises(ex.ExperimentError, match="full arm"):
        ex.plan_arms(_cfg(arms="select"))
    assert ex.plan_arms(_cfg(arms="random")).arms[0].kind == "random"  # no mllm score needed
    cfg = _cfg(arms="select")
    cfg.mllm.model = "stage1"
    assert [a.name for a in ex.plan_arms(cfg).arms] == ["select"]
