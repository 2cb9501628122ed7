"""Every configured benchmark for every model, in one command, into one side-by-side table and a bar chart.

Command:
  python -m llava_jax.eval.suite --model NAME=PATH [--model NAME=PATH ...] --suite configs/eval_suite.py[:ARG] \
      --out DIR [--only BENCH,BENCH] [--batch-size N] [--dtype auto|float32|bfloat16]

PATH is anything `llava_jax.generate` loads (HF LLaVA dir, converted model dir, training workdir); NAME labels
its column. The suite config (`get_config(ARG)` -> ConfigDict) holds `benchmarks` {name: entry} (entry fields:
llava_jax.eval.benchmarks) and `predict` (batch_size, max_new_tokens, dtype, template). Benchmarks whose data
files are missing are skipped and listed.

For each model and benchmark: answers go to DIR/answers/<model>/<benchmark>.jsonl through the shared batched
generation (progress bar; greedy). A rerun keeps every answer already there and generates only the missing
ones; a model whose answers are all there is not even loaded. Scores go to DIR/scores/<model>/<benchmark>.json
(each benchmark's own score JSON). Then:
  DIR/table.md    one row per benchmark and metric, one column per model, the best value of a row in bold
  DIR/table.csv   the same numbers
  DIR/table.json  {"models", "rows": [{"benchmark", "metric", "values": {model: value}, "best": [models]}],
                   "skipped": {benchmark: reason}}
  DIR/chart.png   one bar group per row (a panel per benchmark metric, models side by side)
Every metric in the table is higher-is-better.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llava_jax import cli
from llava_jax.eval import benchmarks as bench_lib
from llava_jax.eval.answers import qid_key
from llava_jax.io import atomic_write_bytes, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


def load_suite_config(spec: str):
    """Loads `path.py[:arg]` and returns its get_config(arg) (a ConfigDict or a dict)."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise FileNotFoundError(2, "No such file or directory", path)
    module_spec = importlib.util.spec_from_file_location("eval_suite_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise cli.UsageError(f"{path} has no get_config(arg)")
    return module.get_config(arg) if arg else module.get_config()


def parse_models(specs: Sequence[str]) -> dict[str, str]:
    """["NAME=PATH", ...] -> {NAME: PATH}; a bad spec, a repeated name or a missing path raises UsageError."""
    models: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise cli.UsageError(f"--model {spec!r}: expected NAME=PATH")
        if name in models:
            raise cli.UsageError(f"--model name {name!r} given twice")
        if "/" in name or name.startswith("."):
            raise cli.UsageError(f"--model name {name!r} must not contain '/' or start with '.'")
        if not os.path.exists(path):
            raise cli.UsageError(f"--model {name}: {path} does not exist")
        models[name] = path
    if not models:
        raise cli.UsageError("give at least one --model NAME=PATH")
    return models


def _to_dict(config: Any) -> dict[str, Any]:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def _answered_keys(path: Path) -> set[str]:
    if not path.exists():
        return set()
    from llava_jax.eval.answers import read_answers_lenient

    return set(read_answers_lenient(path)[0])


def run_suite(models: Mapping[str, str], config: Mapping[str, Any], out: str | os.PathLike,
              only: Sequence[str] = (), batch_size: int | None = None, dtype: str | None = None) -> dict[str, Any]:
    """Predicts, scores and tabulates (module docstring); returns table.json's content."""
    from llava_jax.eval.predict import PredictSettings, load_for_inference, run_predictions

    config = _to_dict(config)
    entries: dict[str, dict[str, Any]] = {k: dict(v) for k, v in config.get("benchmarks", {}).items()}
    unknown = [b for b in only if b not in entries]
    if unknown:
        raise cli.UsageError(f"--only names benchmarks not in the suite: {unknown} (suite: {sorted(entries)})")
    predict_cfg = dict(config.get("predict", {}))
    out = Path(out)
    skipped: dict[str, str] = {}
    runnable: dict[str, tuple[dict[str, Any], bench_lib.Kind]] = {}
    for name, entry in entries.items():
        if only and name not in only:
            continue
        kind = bench_lib.get_kind(str(entry.get("kind", "")))
        reason = bench_lib.missing_data(entry)
        if reason:
            skipped[name] = reason
            log.warning("skipping %s: %s", name, reason)
        else:
            runnable[name] = (entry, kind)
    items = {name: kind.items(entry, out / "work" / name) for name, (entry, kind) in runnable.items()}

    scores: dict[str, dict[str, dict[str, Any]]] = {}
    for model_name, model_path in models.items():
        loaded = None
        scores[model_name] = {}
        for name, (entry, kind) in runnable.items():
            answers_path = out / "answers" / model_name / f"{name}.jsonl"
            todo = {qid_key(it.question_id) for it in items[name]} - _answered_keys(answers_path)
            if todo:
                if loaded is None:
                    print(f"== {model_name}: loading {model_path}", flush=True)
                    loaded = load_for_inference(model_path, dtype or predict_cfg.get("dtype") or "auto")
                settings = PredictSettings(
                    model=model_path, template=predict_cfg.get("template") or None,
                    batch_size=int(batch_size or predict_cfg.get("batch_size") or 8),
                    max_new_tokens=int(entry.get("max_new_tokens") or kind.max_new_tokens),
                    model_id=model_name, resume=True)
                print(f"== {model_name} / {name}: {len(todo)} of {len(items[name])} questions to answer", flush=True)
                run_predictions(items[name], settings, answers_path, loaded=loaded)
            else:
                print(f"== {model_name} / {name}: all {len(items[name])} answers already there", flush=True)
            result = kind.score(entry, answers_path)
            atomic_write_json(out / "scores" / model_name / f"{name}.json", result)
            scores[model_name][name] = result
        del loaded

    table = build_table(list(models), {m: {b: runnable[b][1].metrics(s) for b, s in per.items()}
                                       for m, per in scores.items()}, list(runnable), skipped)
    write_outputs(table, out)
    return table


def build_table(models: Sequence[str], metrics: Mapping[str, Mapping[str, Mapping[str, float | None]]],
                benchmarks: Sequence[str], skipped: Mapping[str, str]) -> dict[str, Any]:
    """table.json's content from {model: {benchmark: {metric: value}}}; "best" lists the models with the row's
    highest value (all of them on a tie; none when no model has a value)."""
    rows = []
    for b in benchmarks:
        names: list[str] = []
        for m in models:
            for metric in metrics.get(m, {}).get(b, {}):
                if metric not in names:
                    names.append(metric)
        for metric in names:
            values = {m: metrics.get(m, {}).get(b, {}).get(metric) for m in models}
            present = [v for v in values.values() if v is not None]
            top = max(present) if present else None
            rows.append({"benchmark": b, "metric": metric, "values": values,
                         "best": [m for m, v in values.items() if v is not None and v == top]})
    return {"models": list(models), "rows": rows, "skipped": dict(skipped)}


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if abs(value) < 10 and value != int(value) else f"{value:.2f}"


def to_markdown(table: Mapping[str, Any]) -> str:
    """The markdown table (best value of each row in bold) plus a line per skipped benchmark."""
    models = table["models"]
    lines = ["| benchmark | metric | " + " | ".join(models) + " |",
             "|---|---|" + "---:|" * len(models)]
    for row in table["rows"]:
        cells = [f"**{_fmt(row['values'][m])}**" if m in row["best"] else _fmt(row["values"][m]) for m in models]
        lines.append(f"| {row['benchmark']} | {row['metric']} | " + " | ".join(cells) + " |")
    if table["skipped"]:
        lines.append("")
        lines.extend(f"- skipped {name}: {reason}" for name, reason in table["skipped"].items())
    return "\n".join(lines) + "\n"


def to_csv(table: Mapping[str, Any]) -> str:
    """benchmark, metric, one column per model (empty when a model has no value)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["benchmark", "metric", *table["models"]])
    for row in table["rows"]:
        writer.writerow([row["benchmark"], row["metric"],
                         *("" if row["values"][m] is None else row["values"][m] for m in table["models"])])
    return buf.getvalue()


def plot(table: Mapping[str, Any]) -> bytes:
    """A PNG: one panel per table row, one bar per model (the best ones outlined)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, models = table["rows"], table["models"]
    ncols = min(4, max(1, len(rows)))
    nrows = max(1, -(-len(rows) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.6 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax in axes.flat[len(rows):]:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows, strict=False):
        values = [row["values"][m] or 0.0 for m in models]
        bars = ax.bar(range(len(models)), values, color=[colors[i % len(colors)] for i in range(len(models))])
        for bar, m in zip(bars, models, strict=True):
            if m in row["best"]:
                bar.set_edgecolor("black")
                bar.set_linewidth(2)
        ax.bar_label(bars, labels=[_fmt(row["values"][m]) for m in models], fontsize=7)
        ax.set_ylim(0, (max(values) * 1.2) or 1.0)
        ax.set_xticks(range(len(models)), models, rotation=20, fontsize=8)
        ax.set_title(f"{row['benchmark']}: {row['metric']}", fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_outputs(table: Mapping[str, Any], out: str | os.PathLike) -> None:
    """table.md, table.csv, table.json and chart.png under `out`, each written atomically."""
    out = Path(out)
    atomic_write_text(out / "table.md", to_markdown(table))
    atomic_write_text(out / "table.csv", to_csv(table))
    atomic_write_json(out / "table.json", table)
    atomic_write_bytes(out / "chart.png", plot(table))


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit status."""
    parser = cli.ArgumentParser(prog="python -m llava_jax.eval.suite", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH", help="repeatable")
    parser.add_argument("--suite", default="configs/eval_suite.py", help="suite config file[:arg]")
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", default="", help="comma-separated benchmark names (default: all configured)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--dtype", default=None, choices=("auto", "float32", "bfloat16"))
    args = parser.parse_args(argv)
    models = parse_models(args.model)
    config = load_suite_config(args.suite)
    if args.batch_size is not None and args.batch_size < 1:
        raise cli.UsageError("--batch-size must be >= 1")
    from llava_jax import host_memory

    host_memory.retain_freed_memory()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    only = [b for b in args.only.split(",") if b]
    table = run_suite(models, config, args.out, only=only, batch_size=args.batch_size, dtype=args.dtype)
    print(to_markdown(table), end="")
    print(f"wrote {args.out}/table.md, table.csv, table.json, chart.png")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
