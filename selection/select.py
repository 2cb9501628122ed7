"""Selects a small, diverse, high-quality subset of instruction data (InstructionGPT-4).

    python -m selection.select --data FILE --image-root DIR --out DIR --alpha N \
        [--config configs/select.py[:variant]] [--config.key=value ...]

Stages: read the input (LLaVA JSON/JSONL or MiniGPT-4 filter_cap.json) -> scores with a non-zero weight (each cached
per example) -> image embeddings and clusters -> normalise and weight the scores -> spread alpha over the clusters
by size and take the best examples of each -> write OUT/<input file name> (the subset, in the input's format),
OUT/scores.csv, OUT/report.json and PNG plots.

A score with a non-zero weight that needs a model (clip, reward, mllm) whose model_dir is not set is dropped:
weight 0, listed with the reason in report.json's "dropped_scores" and on stdout. Dropping every weighted score is
an error.

An example is eligible unless a weighted score failed for it (failures are counted, never defaulted), it has no
cluster (its image could not be read), or another record with the same instruction and answer scored higher
(`dedupe_answers`). Text-only records form a group of their own; the CLIP score does not apply to them, so they
are ranked, among themselves, by the other scores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from tqdm import tqdm

from llava_jax import cli
from llava_jax.io import atomic_write_json
from selection import allocate, report
from selection.cluster import METHODS, cluster_embeddings, resolve_method
from selection.combine import NORMALISATIONS, combine
from selection.records import Dataset, load_dataset, write_subset
from selection.scores import MODEL_DIR_KEYS, SCORE_NAMES, LengthScorer, ScoreColumn, Scorer, compute_scores

log = logging.getLogger(__name__)

DEFAULT_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "select.py")


class SelectionConfigError(ValueError):
    """The config asks for something the inputs cannot provide (a score without its model, unknown strategy)."""


@dataclasses.dataclass
class SelectionResult:
    """What a run decided: `selected` indices into the input records (ascending), per-example arrays, the
    report dict written to report.json, and the path of the subset file."""

    selected: list[int]
    keys: list[str]
    raw: dict[str, np.ndarray]
    final: np.ndarray
    labels: np.ndarray
    eligible: np.ndarray
    report: dict[str, Any]
    subset_path: Path
    columns: dict[str, ScoreColumn]


def _validate(config: ml_collections.ConfigDict) -> None:
    """Fails fast, before any scoring, on settings that would only fail later."""
    if config.strategy not in ("score", "random"):
        raise SelectionConfigError(f"strategy must be 'score' or 'random', got {config.strategy!r}")
    if config.normalization not in NORMALISATIONS:
        raise SelectionConfigError(f"normalization must be one of {NORMALISATIONS}, got {config.normalization!r}")
    if config.cluster.method not in METHODS:
        raise SelectionConfigError(f"cluster.method must be one of {METHODS}, got {config.cluster.method!r}")
    if int(config.cluster.k) < 1:
        raise SelectionConfigError(f"cluster.k must be >= 1, got {config.cluster.k}")
    resolve_weights(config)


def _active_weights(config: ml_collections.ConfigDict) -> dict[str, float]:
    weights = {name: float(w) for name, w in config.weights.items()}
    unknown = set(weights) - set(SCORE_NAMES)
    if unknown:
        raise SelectionConfigError(f"unknown score names in weights: {sorted(unknown)}; known: {SCORE_NAMES}")
    return {name: w for name, w in weights.items() if w != 0.0}


def _model_dir(config: ml_collections.ConfigDict, dotted: str) -> str:
    section, key = dotted.split(".")
    return str(config[section][key]) if section in config else ""


def resolve_weights(config: ml_collections.ConfigDict) -> tuple[dict[str, float], dict[str, str]]:
    """(the non-zero weights the selector uses, {score: reason} for weighted scores dropped because their model
    directory is not set). With the random strategy both are empty; dropping every weighted score raises."""
    if config.strategy != "score":
        return {}, {}
    requested = _active_weights(config)
    dropped = {name: f"weight {w:g} but no --config.{MODEL_DIR_KEYS[name]}: not computed, weight 0"
               for name, w in requested.items() if name in MODEL_DIR_KEYS
               and not _model_dir(config, MODEL_DIR_KEYS[name])}
    weights = {name: w for name, w in requested.items() if name not in dropped}
    if requested and not weights:
        needs = ", ".join(f"{name} needs --config.{MODEL_DIR_KEYS[name]}" for name in dropped)
        raise SelectionConfigError(f"no weighted score can be computed: {needs}")
    return weights, dropped


def _build_scorer(name: str, config: ml_collections.ConfigDict, cache_dir: Path, clip_scorer,
                  image_root: str = "") -> Scorer:
    if name == "length":
        return LengthScorer(config.length.unit, config.length.tokenizer_dir, config.length.dedupe_sentences)
    if name == "reward":
        from selection.reward_score import RewardScorer

        return RewardScorer(config.reward.model_dir, config.reward.batch_size, config.reward.max_length,
                            config.reward.device)
    if name == "gpt":
        from selection.gpt_score import GptScorer

        client = dict(config.gpt.client.to_dict())
        client["base_url"] = client.get("base_url") or None
        params = {"temperature": float(config.gpt.temperature), "max_tokens": int(config.gpt.max_tokens)}
        return GptScorer(client, cache_dir, params)
    if name == "mllm":
        from selection.mllm_score import MllmScorer

        m = config.mllm
        try:
            return MllmScorer(m.model_dir, image_root, m.batch_size, m.max_length, m.template, m.dtype,
                              tuple(m.buckets), workers=m.workers)
        except (ValueError, FileNotFoundError) as e:
            raise SelectionConfigError(str(e)) from e
    if name == "clip":
        if clip_scorer is None:
            raise SelectionConfigError("the clip score needs --config.clip.model_dir")
        return clip_scorer
    raise SelectionConfigError(f"unknown score {name!r}")


def _make_clip_scorer(config: ml_collections.ConfigDict, image_root: str, cache_dir: Path):
    if not config.clip.model_dir:
        return None
    from selection.clip_score import ClipScorer

    c = config.clip
    return ClipScorer(c.model_dir, image_root, cache_dir, c.batch_size, c.max_sentences, c.scale, c.aspect,
                      c.workers, dtype=c.dtype)


def _cluster_labels(
    dataset: Dataset, config: ml_collections.ConfigDict, clip_scorer
) -> tuple[np.ndarray, np.ndarray | None, dict[str, str], dict[str, Any]]:
    """Labels [N] (image clusters 0..K-1, text-only records K, no embedding -1), the embeddings used (or None),
    failures {key: reason} and a summary for the report."""
    examples = dataset.examples
    n = len(examples)
    k = int(config.cluster.k)
    has_image = np.array([bool(ex.image) for ex in examples])
    failures: dict[str, str] = {}
    embeddings = None
    if config.cluster.embeddings:
        embeddings = np.load(config.cluster.embeddings, mmap_mode="r")
        if embeddings.ndim != 2 or len(embeddings) != n:
            raise SelectionConfigError(
                f"cluster.embeddings has shape {embeddings.shape}; expected [{n}, D] (one row per input record)")
        usable = np.ones(n, bool)
    elif k > 1 or clip_scorer is not None:
        if clip_scorer is None:
            raise SelectionConfigError(
                f"clustering into k={k} needs image embeddings: set --config.clip.model_dir or "
                "--config.cluster.embeddings (or use k=1)")
        embeddings, failures = clip_scorer.image_embeddings(examples)
        usable = has_image & np.array([ex.key not in failures for ex in examples])
    else:
        usable = has_image
    labels = np.full(n, -1, np.int32)
    rows = np.flatnonzero(usable)
    method = "none"
    if len(rows):
        if k > 1:
            method = resolve_method(config.cluster.method, len(rows), config.cluster.spectral_max_n)
            labels[rows] = cluster_embeddings(
                np.asarray(embeddings)[rows], k, config.cluster.method, config.cluster.n_neighbors,
                config.seed, config.cluster.spectral_max_n, config.cluster.sample_size, config.cluster.eigen_solver)
        else:
            labels[rows] = 0
    text_only = ~has_image if not config.cluster.embeddings else np.zeros(n, bool)
    key_index = {ex.key: i for i, ex in enumerate(examples)}
    labels[text_only] = k
    summary = {"k": k, "method": method, "clustered": int(len(rows)), "text_only_group": int(text_only.sum()),
               "text_only_label": k if text_only.any() else None, "without_embedding": int((labels < 0).sum()),
               "embedding_failures": dict(Counter(reason.split(":")[0] for key, reason in failures.items()
                                                  if not text_only[key_index[key]]))}
    return labels, embeddings, failures, summary


def _dedupe(texts: list[str], keys: list[str], final: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """Mask [N] of eligible examples whose text (instruction + answer) repeats a better-scoring eligible one."""
    best: dict[str, int] = {}
    for i in np.flatnonzero(eligible):
        norm = " ".join(texts[i].lower().split())
        j = best.get(norm)
        if j is None or (final[i], keys[j]) > (final[j], keys[i]):
            best[norm] = i
    keep = set(best.values())
    return np.array([bool(eligible[i]) and i not in keep for i in range(len(texts))])


@contextlib.contextmanager
def _stage(name: str, timings: dict[str, float], show: bool = True) -> Iterator[None]:
    """Times a stage into timings[name] and shows it as a one-step progress bar (with its elapsed time)."""
    bar = tqdm(total=1, desc=f"selection: {name}", unit="stage", disable=not show, leave=True)
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = time.perf_counter() - start
        bar.update(1)
        bar.close()


def resolve_image_root(dataset: Dataset, image_root: str | os.PathLike) -> Path:
    """The directory the examples' image paths are relative to. For MiniGPT-4 input, --image-root may be the
    cc_sbu_align directory (images under image/) or the image folder itself."""
    root = Path(image_root)
    if dataset.format == "minigpt4":
        first = next((ex.image for ex in dataset.examples if ex.image), None)
        if first and not (root / first).exists() and (root / "image" / first).exists():
            return root / "image"
    return root


def run_selection(
    data: str | os.PathLike,
    image_root: str | os.PathLike,
    out: str | os.PathLike,
    config: ml_collections.ConfigDict,
    alpha: int | None = None,
) -> SelectionResult:
    """Runs every stage (see the module docstring) and writes the outputs under `out`; returns the decisions.
    `data`, `image_root` and `out` may be gs:// (see `_run_selection_remote`)."""
    from llava_jax.io import is_remote

    if any(is_remote(p) for p in (data, image_root, out)):
        return _run_selection_remote(data, image_root, out, config, alpha)
    timings: dict[str, float] = {}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    alpha = int(config.alpha if alpha is None else alpha)
    cache_dir = Path(config.cache_dir) if config.cache_dir else out / "cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    _validate(config)

    with _stage("read", timings):
        dataset = load_dataset(data, config.instruction)
        examples = dataset.examples
        keys = [ex.key for ex in examples]
        n = len(examples)
        image_root = resolve_image_root(dataset, image_root)
    if not 0 <= alpha <= n:
        raise allocate.BudgetError(f"alpha={alpha} must be between 0 and the {n} usable examples")
    log.info("read %d %s records from %s", n, dataset.format, data)

    weights, dropped = resolve_weights(config)
    for name, reason in dropped.items():
        log.warning("score %s dropped: %s", name, reason)
    clip_scorer = _make_clip_scorer(config, str(image_root), cache_dir)
    columns: dict[str, ScoreColumn] = {}
    gpt_stats = None
    for name in SCORE_NAMES:
        if name not in weights:
            continue
        scorer = _build_scorer(name, config, cache_dir, clip_scorer, str(image_root))
        with _stage(f"score_{name}", timings):
            columns[name] = compute_scores(scorer, examples, cache_dir)
        if name == "gpt":
            gpt_stats = scorer.last_stats or None
        log.info("%s: %d computed, %d from cache, %d failed", name, columns[name].computed, columns[name].cached,
                 len(columns[name].errors))

    with _stage("cluster", timings):
        if config.strategy == "score":
            labels, embeddings, _, cluster_summary = _cluster_labels(dataset, config, clip_scorer)
        else:
            labels, embeddings, cluster_summary = np.zeros(n, np.int32), None, {"k": 1, "method": "none"}

    raw = {name: col.values for name, col in columns.items()}
    text_only = np.array([not ex.image for ex in examples])
    combined = combine(raw, weights, config.normalization, not_applicable={"clip": text_only}, size=n)
    final = combined.final
    reasons = [""] * n
    for name, col in columns.items():
        for i, key in enumerate(keys):
            if not reasons[i] and key in col.errors and not (name == "clip" and text_only[i]):
                reasons[i] = f"{name}_failed: {col.errors[key]}"
    for i in np.flatnonzero(labels < 0):
        if not reasons[i]:
            reasons[i] = "no_cluster: no image embedding"
    eligible = np.array([not r for r in reasons])
    if config.dedupe_answers and config.strategy == "score":
        texts = [f"{ex.instruction}\n\0\n{ex.answer}" for ex in examples]
        for i in np.flatnonzero(_dedupe(texts, keys, final, eligible)):
            reasons[i] = "duplicate_answer"
        eligible = np.array([not r for r in reasons])

    with _stage("allocate", timings):
        if config.strategy == "random":
            selected = allocate.select_random(eligible, alpha, int(config.seed))
            table = {0: {"size": n, "eligible": int(eligible.sum()), "allocated": alpha}}
        else:
            selected, table = allocate.select_by_clusters(keys, final, labels, eligible, alpha)
    selected_mask = np.zeros(n, bool)
    selected_mask[selected] = True

    subset_path = out / Path(data).name
    plots = []
    with _stage("write", timings):
        write_subset(subset_path, dataset, selected)
        report.write_scores_csv(out / "scores.csv", keys, raw, combined.normalised, final, labels, eligible,
                                selected_mask, reasons)
        if config.plots:
            report.plot_score_histograms(out / "scores.png", {**raw, "final": final}, selected_mask)
            report.plot_cluster_sizes(out / "clusters.png", table)
            plots += ["scores.png", "clusters.png"]
            if embeddings is not None:
                report.plot_projection(out / "projection.png", np.asarray(embeddings), labels, selected_mask,
                                       int(config.seed))
                plots.append("projection.png")

    summary = {
        "input": {"path": str(data), "format": dataset.format, "records": len(dataset.records), "examples": n,
                  "duplicate_ids": dataset.duplicate_ids,
                  "skipped": dataset.skipped, "image_root": str(image_root)},
        "alpha": alpha,
        "strategy": config.strategy,
        "selected": len(selected),
        "subset": str(subset_path),
        "eligible": int(eligible.sum()),
        "excluded": dict(Counter(r.split(":")[0] for r in reasons if r)),
        "weights": combined.weights,
        "dropped_scores": dropped,
        "normalization": config.normalization,
        "clusters": {str(c): v for c, v in table.items()},
        "clustering": cluster_summary,
        "scores": report.score_statistics(raw, final, selected_mask),
        "score_runs": {name: {"computed": col.computed, "cached": col.cached, "failed": len(col.errors),
                              "failures": col.error_counts()} for name, col in columns.items()},
        "gpt_requests": gpt_stats,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "plots": plots,
        "config": config.to_dict(),
    }
    atomic_write_json(out / "report.json", summary)
    return SelectionResult(selected, keys, raw, final, labels, eligible, summary, subset_path, columns)


def _run_selection_remote(data: str | os.PathLike, image_root: str | os.PathLike, out: str | os.PathLike,
                          config: ml_collections.ConfigDict, alpha: int | None) -> SelectionResult:
    """run_selection with gs:// paths: the data file and image root are read through local copies, the outputs
    (and the score cache under `out`, reused when it is there) are written locally and uploaded at the end;
    report.json names the given paths."""
    import contextlib
    import dataclasses
    import tempfile

    from llava_jax.io import as_path, copy_tree, download_file, is_remote, local_copy, path_str, staged_dir

    with contextlib.ExitStack() as stack:
        local_data = Path(data)
        if is_remote(data):
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="llava_jax_select_"))
            local_data = Path(tmp) / as_path(data).name
            download_file(data, local_data)
        local_root = stack.enter_context(local_copy(image_root))
        local_out = stack.enter_context(staged_dir(out))
        if is_remote(out) and not config.cache_dir and (as_path(out) / "cache").is_dir():
            copy_tree(as_path(out) / "cache", local_out / "cache")
        result = run_selection(local_data, local_root, local_out, config, alpha)
        report = dict(result.report)
        report["input"] = dict(report["input"], path=str(data),
                               image_root=str(image_root) if is_remote(image_root) else report["input"]["image_root"])
        subset = as_path(out) / Path(local_data).name
        report["subset"] = path_str(subset)
        atomic_write_json(local_out / "report.json", report)
    return dataclasses.replace(result, report=report, subset_path=subset)


def main(argv: list[str]) -> None:
    """absl entry point; see the module docstring."""
    from absl import flags

    FLAGS = flags.FLAGS  # noqa: N806
    for noisy in ("httpx", "httpcore", "openai"):  # one INFO line per HTTP request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cfg = FLAGS.config
    result = run_selection(FLAGS.data, FLAGS.image_root, FLAGS.out, cfg, FLAGS.alpha)
    r = result.report
    print(f"selected {r['selected']} of {r['input']['records']} ({r['eligible']} eligible) -> {result.subset_path}")
    for name, reason in r["dropped_scores"].items():
        print(f"score {name} dropped: {reason}")
    if r["excluded"]:
        print(f"excluded: {r['excluded']}")


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    flags.DEFINE_string("data", None, "LLaVA JSON/JSONL or MiniGPT-4 filter_cap.json", required=True)
    flags.DEFINE_string("image_root", None, "directory the records' image paths are relative to", required=True)
    flags.DEFINE_string("out", None, "output directory", required=True)
    flags.DEFINE_integer("alpha", None, "number of examples to keep (default: config.alpha)")
    config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "selector config (configs/select.py[:variant])")


if __name__ == "__main__":
    _define_flags()
    # absl spells the flag --image_root; accept the documented --image-root as well.
    sys.argv = [a.replace("--image-root", "--image_root", 1) if a.startswith("--image-root") else a
                for a in sys.argv]
    cli.absl_run(main)
