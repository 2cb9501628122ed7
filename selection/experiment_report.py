"""What `selection.experiment` reports: per-arm results, random seeds averaged, the detection of planted bad
records by each score (AUROC), the claims of the issue checked on the numbers, RESULTS.md and the plots.

Only this module (for the experiment) reads the noise labels file; the selector never does.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llava_jax.io import atomic_open, read_json

CATEGORIES = ("color", "shape", "count", "side", "size")
_GOOD = {"bad": False, "kind": None}


# ------------------------------------------------------------------------------------------------ inputs


def read_labels(data_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """{record id: {"bad", "kind", ...}} from DATA/noise_labels.json ({} for a clean set, which has none)."""
    from llava_jax.data.synthetic import NOISE_LABELS

    path = Path(data_dir) / NOISE_LABELS
    return read_json(path)["records"] if path.is_file() else {}


def bad_counts(ids: Sequence[str], labels: Mapping[str, Mapping[str, Any]]) -> tuple[int, dict[str, int]]:
    """(number of bad records among ids, {kind: count})."""
    kinds = Counter(str(labels.get(i, _GOOD)["kind"]) for i in ids if labels.get(i, _GOOD)["bad"])
    return sum(kinds.values()), dict(sorted(kinds.items()))


def auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """P(score of a random positive > score of a random negative), ties counting half (Mann-Whitney U / n1 n0).

    scores [N] float (NaN rows are ignored), positive [N] bool. None when a class is empty.
    """
    from scipy.stats import rankdata

    scores = np.asarray(scores, np.float64)
    positive = np.asarray(positive, bool)
    keep = np.isfinite(scores)
    scores, positive = scores[keep], positive[keep]
    n1, n0 = int(positive.sum()), int((~positive).sum())
    if n1 == 0 or n0 == 0:
        return None
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def score_detection(scores_csv: str | os.PathLike, labels: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """How well each raw score (and the combined `final`) of a selector run ranks good records above the planted
    bad ones: {"n", "bad", "auroc": {score: AUROC}, "auroc_by_kind": {score: {kind: AUROC good vs that kind}},
    "mean_by_kind": {score: {"good" | kind: mean}}}. Reads the selector's scores.csv (id, raw scores, *_norm,
    final, cluster, eligible, selected, excluded_reason)."""
    with open(scores_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    fixed = {"id", "final", "cluster", "eligible", "selected", "excluded_reason"}
    names = [c for c in (rows[0].keys() if rows else []) if c not in fixed and not c.endswith("_norm")] + ["final"]
    kinds = np.array([str(labels.get(r["id"], _GOOD)["kind"]) if labels.get(r["id"], _GOOD)["bad"] else "good"
                      for r in rows])
    good = kinds == "good"
    out: dict[str, Any] = {"n": len(rows), "bad": int((~good).sum()), "auroc": {}, "auroc_by_kind": {},
                           "mean_by_kind": {}}
    for name in names:
        values = np.array([float(r[name]) if r[name] not in ("", None) else np.nan for r in rows])
        out["auroc"][name] = auroc(values, good)
        out["auroc_by_kind"][name] = {}
        out["mean_by_kind"][name] = {"good": _nanmean(values[good])}
        for kind in sorted(set(kinds) - {"good"}):
            sel = good | (kinds == kind)
            out["auroc_by_kind"][name][kind] = auroc(values[sel], good[sel])
            out["mean_by_kind"][name][kind] = _nanmean(values[kinds == kind])
    return out


def _nanmean(x: np.ndarray) -> float | None:
    x = x[np.isfinite(x)]
    return float(x.mean()) if len(x) else None


# ------------------------------------------------------------------------------------------------ arms


def arm_result(arm: Any, ids: Sequence[str], labels: Mapping[str, Mapping[str, Any]], ev: Mapping[str, Any], *,
               subset: str, seconds: Mapping[str, float]) -> dict[str, Any]:
    """One arm's result.json: its subset's size and bad share, the held-out summary of the checkpoint picked on
    validation (top level) and of the final step ("final"), the validation curve and timings."""
    bad, kinds = bad_counts(ids, labels)
    best = ev["best"]
    return {
        "kind": arm.kind, "budget": arm.budget, "noise": arm.noise, "seed": arm.seed, "group": arm.group,
        "records": len(ids), "bad": bad, "bad_share": bad / max(1, len(ids)), "bad_kinds": kinds,
        "accuracy": best["accuracy"], "blind_accuracy": best.get("blind_accuracy"), "chance": best.get("chance"),
        "n": best.get("n"), "by_category": best.get("by_category", {}), "by_num_objects": best.get("by_num_objects", {}),
        "best_step": ev["best_step"], "final_step": ev["final_step"], "validation": ev["validation"],
        "final": {k: ev["final"].get(k) for k in ("accuracy", "blind_accuracy", "by_category")},
        "subset": subset, "seconds": {k: round(float(v), 1) for k, v in seconds.items()},
    }


def _mean(values: Sequence[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def average_seeds(runs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The mean of a random arm's seed runs, with their spread (std, min, max) and each run's figures."""
    items = list(runs.values())
    acc = [r["accuracy"] for r in items]
    first = items[0]
    cats = sorted({c for r in items for c in r["by_category"]})
    return {
        "kind": first["kind"], "budget": first["budget"], "noise": first["noise"], "records": first["records"],
        "bad_share": _mean([r["bad_share"] for r in items]),
        "accuracy": _mean(acc), "accuracy_std": float(np.std(acc)) if len(acc) > 1 else 0.0,
        "accuracy_min": float(min(acc)), "accuracy_max": float(max(acc)),
        "blind_accuracy": _mean([r.get("blind_accuracy") for r in items]),
        "by_category": {c: _mean([r["by_category"].get(c) for r in items]) for c in cats},
        "final": {"accuracy": _mean([r["final"]["accuracy"] for r in items]),
                  "blind_accuracy": _mean([r["final"].get("blind_accuracy") for r in items])},
        "best_step": None, "seeds": {name: {k: r[k] for k in ("accuracy", "bad_share", "best_step", "seed")}
                                     | {"final_accuracy": r["final"]["accuracy"]} for name, r in runs.items()},
    }


def group_arms(results: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per-run results -> results names: random seed runs (`<group>#seed<k>`) averaged into `<group>`."""
    out: dict[str, dict[str, Any]] = {}
    groups: dict[str, dict[str, Mapping[str, Any]]] = {}
    for name, r in results.items():
        if r["kind"] == "random":
            groups.setdefault(name.split("#")[0], {})[name] = r
        else:
            out[name] = dict(r)
    for group, runs in groups.items():
        out[group] = average_seeds(runs)
    return out


def check_claims(arms: Mapping[str, Mapping[str, Any]], budgets: Sequence[float], input_bad_share: float | None
                 ) -> dict[str, Any]:
    """The issue's goals checked on the numbers: select beats random by >= 10 points at the smallest budget with
    under a third of the input's bad share; some budget <= 25% reaches the full set's accuracy."""
    out: dict[str, Any] = {}
    sel, rnd, full = arms.get("select"), arms.get("random"), arms.get("full")
    if sel and rnd:
        gap = 100 * (sel["accuracy"] - rnd["accuracy"])
        out["select_minus_random_points"] = round(gap, 1)
        out["select_beats_random_by_10"] = bool(gap >= 10)
    if sel and input_bad_share is not None:
        out["select_bad_share"] = sel["bad_share"]
        out["input_bad_share"] = input_bad_share
        out["select_bad_below_a_third"] = bool(sel["bad_share"] < input_bad_share / 3)
    if full:
        reached = {}
        for i, b in enumerate(budgets):
            name = "select" if i == 0 else f"select@{b:g}"
            if b <= 0.25 and name in arms:
                reached[f"{b:g}"] = bool(arms[name]["accuracy"] >= full["accuracy"])
        if reached:
            out["select_reaches_full"] = reached
            out["claim_holds"] = any(reached.values())
    return out


def assemble(results: Mapping[str, Mapping[str, Any]], *, main_noise: float, noise_levels: Sequence[float],
             budgets: Sequence[float], scores: Mapping[str, Any], left_out: Mapping[str, str],
             clip_eval: Mapping[str, Any], data_meta: Mapping[str, Any], settings: Mapping[str, Any],
             elapsed_s: float, planned: Sequence[str], judge: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """results.json: {"arms": main-level arms by results name, "sweep": {noise: arms}, "runs": every run,
    "scores", "claims", "judge" (select vs full, pairwise, when judged), "left_out", "clip", "data", "settings",
    "pending", "elapsed_s"}."""
    per_level: dict[str, dict[str, Mapping[str, Any]]] = {}
    for name, r in results.items():
        per_level.setdefault(f"{r['noise']:g}", {})[name.split("~")[0]] = r
    sweep = {level: group_arms(rs) for level, rs in sorted(per_level.items())}
    arms = sweep.get(f"{main_noise:g}", {})
    input_bad = arms.get("full", {}).get("bad_share")
    if input_bad is None and data_meta.get("noise"):
        counts = data_meta["noise"]["counts"]
        input_bad = counts["bad"] / max(1, counts["records"])
    return {
        "arms": arms,
        "sweep": sweep if len(noise_levels) > 1 else {},
        "runs": dict(results),
        "scores": dict(scores),
        "claims": check_claims(arms, budgets, input_bad),
        "noise": main_noise, "noise_levels": list(noise_levels), "budgets": list(budgets),
        "judge": {k: judge[k] for k in ("overall", "judge_model") if k in judge} if judge else None,
        "left_out": dict(left_out), "clip": dict(clip_eval),
        "data": {k: data_meta.get(k) for k in ("num_train_images", "stage2_records", "num_eval", "num_val", "noise",
                                               "chance")},
        "settings": dict(settings),
        "pending": [n for n in planned if n not in results],
        "elapsed_s": round(elapsed_s, 1),
    }


# ------------------------------------------------------------------------------------------------ RESULTS.md


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _acc(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def arm_order(arms: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """full, clean, then by budget: oracle, random, select, ablations."""
    rank = {"full": 0, "clean": 1, "oracle": 2, "random": 3, "select": 4, "nocluster": 5, "clip": 6, "length": 7,
            "mllm": 8, "reward": 9, "gpt": 10}
    return sorted(arms, key=lambda n: (arms[n]["budget"] or 0.0, rank.get(arms[n]["kind"], 99), n))


def arm_table(arms: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Markdown rows: arm, budget, records, % bad, accuracy (best validation checkpoint), final-step accuracy,
    blind, per category, best step."""
    head = ["arm", "budget", "records", "% bad", "accuracy", "final step", "blind", *CATEGORIES, "best step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in arm_order(arms):
        a = arms[name]
        acc = _acc(a["accuracy"])
        if "accuracy_std" in a:
            acc += f" ± {a['accuracy_std']:.3f}"
        cats = [_acc(a["by_category"].get(c)) for c in CATEGORIES]
        lines.append("| " + " | ".join([
            f"`{name}`", "-" if a["budget"] is None else f"{100 * a['budget']:g}%", str(a["records"]),
            _pct(a["bad_share"]), acc, _acc(a["final"]["accuracy"]), _acc(a.get("blind_accuracy")), *cats,
            "-" if a.get("best_step") is None else str(a["best_step"])]) + " |")
    return lines


def write_markdown(path: str | os.PathLike, doc: Mapping[str, Any]) -> None:
    """RESULTS.md: the arm table (like InstructionGPT-4's Tables 4/5), the claims, score detection, the noise
    sweep, and what was left out."""
    s = doc["settings"]
    lines = ["# InstructionGPT-4 in miniature: results", ""]
    d = doc["data"]
    lines += [f"Noisy instruction set: {d.get('stage2_records')} records at noise {doc['noise']:g}; budgets "
              f"{', '.join(f'{100 * b:g}%' for b in doc['budgets'])}; stage 2: {s['stage2']['steps']} steps x "
              f"{s['stage2']['batch_size']} for every arm from one stage-1 run; accuracy = held-out "
              f"({d.get('num_eval')} questions, chance {_acc(d.get('chance'))}) of the checkpoint with the best "
              f"validation accuracy ({d.get('num_val')} questions; {s['stage2']['validations']} checkpoints); "
              f"'final step' = the last checkpoint; random = mean ± std over {s['random_seeds']} seeds.", ""]
    if doc.get("pending"):
        lines += [f"**Partial**: {len(doc['pending'])} arm(s) not finished: {', '.join(doc['pending'])}", ""]
    lines += arm_table(doc["arms"]) + [""]
    c = doc.get("claims", {})
    if c:
        lines += ["## The claims", ""]
        if "select_minus_random_points" in c:
            lines.append(f"- select vs random at the smallest budget: {c['select_minus_random_points']:+.1f} points "
                         f"(goal: >= +10): {'met' if c['select_beats_random_by_10'] else 'not met'}")
        if "select_bad_share" in c:
            lines.append(f"- select's share of bad records {_pct(c['select_bad_share'])}% vs the input's "
                         f"{_pct(c['input_bad_share'])}% (goal: below a third): "
                         f"{'met' if c['select_bad_below_a_third'] else 'not met'}")
        if "select_reaches_full" in c:
            reached = ", ".join(f"{100 * float(b):g}%: {'yes' if v else 'no'}" for b, v in c["select_reaches_full"].items())
            lines.append(f"- select reaches the full set's accuracy at a budget <= 25% ({reached}): "
                         f"{'holds' if c['claim_holds'] else 'does not hold'}")
        lines.append("")
    for level, det in doc.get("scores", {}).items():
        kinds = sorted({k for v in det["auroc_by_kind"].values() for k in v})
        lines += [f"## Detection of the planted bad records (noise {level}; AUROC, good above bad; 0.5 = chance)", "",
                  "| score | all bad | " + " | ".join(kinds) + " |", "|" + "---|" * (len(kinds) + 2)]
        for name, value in det["auroc"].items():
            per = [_acc(det["auroc_by_kind"][name].get(k)) for k in kinds]
            lines.append(f"| {name} | {_acc(value)} | " + " | ".join(per) + " |")
        lines.append("")
    if doc.get("sweep"):
        names = sorted({n for arms in doc["sweep"].values() for n in arms},
                       key=lambda n: (n.split("@")[-1] if "@" in n else "", n))
        lines += ["## Noise sweep (accuracy)", "", "| noise | " + " | ".join(f"`{n}`" for n in names) + " |",
                  "|" + "---|" * (len(names) + 1)]
        for level, arms in doc["sweep"].items():
            lines.append(f"| {level} | " + " | ".join(_acc(arms[n]["accuracy"]) if n in arms else "-" for n in names)
                         + " |")
        lines.append("")
    if doc.get("judge"):
        o = doc["judge"]["overall"]
        lines += ["## Pairwise judge: select vs full (both orders)", "",
                  f"{o.get('wins')} win / {o.get('ties')} tie / {o.get('losses')} lose ({o.get('failed')} failed); "
                  f"win score {o.get('win_score')} (judge {doc['judge'].get('judge_model')}).", ""]
    if doc.get("left_out"):
        lines += ["## Left out", ""] + [f"- {k}: {v}" for k, v in doc["left_out"].items()] + [""]
    clip = doc.get("clip") or {}
    if any(k in clip for k in ("i2t_top1", "t2i_top1")):
        lines += [f"CLIP (trained here): image-to-caption top-1 {_acc(clip.get('i2t_top1'))}, caption-to-image "
                  f"{_acc(clip.get('t2i_top1'))} (chance {clip.get('chance', '-')}).", ""]
    lines.append(f"Elapsed since the first run of this OUT started: {doc['elapsed_s'] / 60:.1f} min (reruns included).")
    with atomic_open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------------ plots


def plot(out: str | os.PathLike, doc: Mapping[str, Any]) -> list[str]:
    """OUT/accuracy_vs_budget.png (and accuracy_vs_noise.png with a sweep); returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    arms = doc["arms"]
    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, style in (("select", "o-"), ("random", "s--"), ("oracle", "^:")):
        pts = sorted((a["budget"], a["accuracy"], a.get("accuracy_std", 0.0)) for a in arms.values()
                     if a["kind"] == kind and a["budget"] is not None)
        if pts:
            x, y, e = zip(*pts, strict=True)
            ax.errorbar([100 * v for v in x], y, yerr=e if kind == "random" else None, fmt=style, label=kind,
                        capsize=3)
    for kind in ("nocluster", "clip", "length", "mllm", "reward", "gpt"):
        for a in arms.values():
            if a["kind"] == kind:
                ax.plot([100 * a["budget"]], [a["accuracy"]], "x", label=kind)
    for kind, color in (("full", "black"), ("clean", "green")):
        if kind in arms:
            ax.axhline(arms[kind]["accuracy"], color=color, linestyle="-." if kind == "clean" else "-", linewidth=1,
                       label=f"{kind} ({arms[kind]['records']} records)")
    ax.set_xscale("log")
    ax.set_xlabel("budget (% of the noisy set)")
    ax.set_ylabel("held-out accuracy (best validation checkpoint)")
    ax.set_title(f"noise {doc['noise']:g}")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_budget.png", dpi=110)
    plt.close(fig)
    written.append("accuracy_vs_budget.png")
    if doc.get("sweep"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        names = sorted({n for a in doc["sweep"].values() for n in a})
        for name in names:
            pts = sorted((float(level), a[name]["accuracy"]) for level, a in doc["sweep"].items() if name in a)
            ax.plot(*zip(*pts, strict=True), "o-", label=name)
        ax.set_xlabel("share of bad records")
        ax.set_ylabel("held-out accuracy")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "accuracy_vs_noise.png", dpi=110)
        plt.close(fig)
        written.append("accuracy_vs_noise.png")
    return written
