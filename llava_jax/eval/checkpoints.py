"""Picks a training run's best checkpoint on a validation split, then evaluates it and the final one on held-out
questions -- so a run that over-trains (a small data subset for many steps) is judged at its best point.

    python -m llava_jax.eval.checkpoints --workdir WORKDIR --val VAL.jsonl --eval EVAL.jsonl \
        [--image-root DIR] [--out FILE] [--batch-size 32] [--max-new-tokens 12]

Every checkpoint kept in WORKDIR/checkpoints is scored on the validation questions (accuracy with the image;
same JSONL layout as the held-out file: question_id, image, text, answer, choices). The best is the earliest
step with the highest validation accuracy. The held-out evaluation (`llava_jax.eval.heldout`: accuracy, blind
accuracy, per category) runs on that checkpoint and on the last one. Writes (default WORKDIR/checkpoints.json)
{"validation": {step: accuracy}, "best_step", "final_step", "best": summary, "final": summary}.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flax import nnx

from llava_jax import checkpoint as ckpt
from llava_jax import cli
from llava_jax.io import atomic_write_json, read_json


def best_step(validation: dict[int, float]) -> int:
    """The earliest step with the highest validation accuracy ({step: accuracy}, non-empty)."""
    if not validation:
        raise ValueError("no validation results to pick from")
    top = max(validation.values())
    return min(s for s, acc in validation.items() if acc == top)


class CheckpointEvaluator:
    """Evaluates checkpoints of training workdirs, loading each base model once (runs that start from the same
    base and train the same parameters share it, and the compiled generation step with it)."""

    def __init__(self, *, batch_size: int = 32, max_new_tokens: int = 12):
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self._bases: dict[tuple[str, tuple[str, ...]], Any] = {}

    def _eval_cfg(self, file: str | Path, image_root: str | Path | None, limit: int) -> Any:
        return types.SimpleNamespace(file=str(file), image_root=str(image_root or ""), limit=int(limit),
                                     batch_size=self.batch_size, max_new_tokens=self.max_new_tokens)

    def _load(self, workdir: Path, step: int) -> tuple[Any, str]:
        """The workdir's model with checkpoint `step`'s trainable weights, and its conversation template."""
        info = read_json(workdir / ckpt.RUN_FILE)
        key = (str(info["init_from"]), tuple(info["trainable"]))
        template = str(info.get("config", {}).get("data", {}).get("template") or "vicuna_v1")
        if key not in self._bases:
            self._bases[key] = _load_base(info["init_from"])
        loaded = self._bases[key]
        params = nnx.state(loaded.model, ckpt.trainable_filter(info["trainable"]))
        _, restored = ckpt.restore_params(workdir / ckpt.CHECKPOINT_SUBDIR, params, step=step)
        nnx.replace_by_pure_dict(params, restored)
        nnx.update(loaded.model, params)
        return loaded, template

    def evaluate(self, workdir: str | Path, val_file: str | Path, eval_file: str | Path, *,
                 image_root: str | Path | None = None, val_limit: int = 0, eval_limit: int = 0) -> dict[str, Any]:
        """Validation accuracy of every kept checkpoint, then the held-out summary of the best and the last.

        Returns {"validation": {str(step): accuracy}, "best_step", "final_step", "best", "final"}, where best /
        final are `heldout_summary` dicts (accuracy, blind_accuracy, chance, n, by_category, ...).
        """
        from llava_jax.eval.heldout import evaluate_heldout

        workdir = Path(workdir)
        if not ckpt.is_workdir(workdir):
            raise ckpt.CheckpointError(f"{workdir} is not a training workdir (no {ckpt.RUN_FILE})")
        steps = checkpoint_steps(workdir)
        if not steps:
            raise ckpt.CheckpointError(f"no checkpoint in {workdir / ckpt.CHECKPOINT_SUBDIR}")
        validation: dict[int, float] = {}
        val_cfg = self._eval_cfg(val_file, image_root, val_limit)
        for step in steps:
            loaded, template = self._load(workdir, step)
            validation[step] = evaluate_heldout(loaded.model, loaded, val_cfg, template=template,
                                                blind=False)["accuracy"]
        best, final = best_step(validation), steps[-1]
        eval_cfg = self._eval_cfg(eval_file, image_root, eval_limit)
        results: dict[int, dict] = {}
        for step in dict.fromkeys((best, final)):
            loaded, template = self._load(workdir, step)
            results[step] = evaluate_heldout(loaded.model, loaded, eval_cfg, template=template)
        return {"validation": {str(s): a for s, a in validation.items()}, "best_step": best, "final_step": final,
                "best": results[best], "final": results[final]}

    def answers(self, workdir: str | Path, step: int, questions_file: str | Path, *,
                image_root: str | Path | None = None) -> list[dict]:
        """Greedy replies of checkpoint `step` to a questions JSONL: [{"question_id", "text", "correct"}]."""
        from llava_jax.eval.heldout import evaluate_heldout

        loaded, template = self._load(Path(workdir), step)
        replies: list[dict] = []
        evaluate_heldout(loaded.model, loaded, self._eval_cfg(questions_file, image_root, 0), template=template,
                         blind=False, replies=replies)
        return replies


def checkpoint_steps(workdir: str | Path) -> list[int]:
    """The finished checkpoint steps of a training workdir, oldest first (empty when there are none)."""
    import orbax.checkpoint as ocp

    directory = (Path(workdir) / ckpt.CHECKPOINT_SUBDIR).absolute()
    if not directory.is_dir():
        return []
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        return sorted(int(s) for s in manager.all_steps())
    finally:
        manager.close()


def _load_base(path: str) -> Any:
    import jax.numpy as jnp

    return ckpt.load_base_model(path, dtype=jnp.float32, param_dtype=jnp.float32)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (see the module docstring); a bad argument is one `error:` line and exit code 2."""
    p = cli.ArgumentParser(prog="python -m llava_jax.eval.checkpoints", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--val", required=True, help="validation questions (JSONL)")
    p.add_argument("--eval", required=True, help="held-out questions (JSONL)")
    p.add_argument("--image-root", default=None, help="default: images/ next to each question file")
    p.add_argument("--out", default=None, help="default: WORKDIR/checkpoints.json")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.error = lambda message: _fail(message)  # type: ignore[method-assign]
    args = p.parse_args(argv)
    for name in ("val", "eval"):
        if not Path(getattr(args, name)).is_file():
            _fail(f"--{name} {getattr(args, name)} is not a file")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        _fail("--batch-size and --max-new-tokens must be >= 1")
    try:
        result = CheckpointEvaluator(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens).evaluate(
            args.workdir, args.val, args.eval, image_root=args.image_root)
    except ckpt.CheckpointError as e:
        _fail(str(e))
    out = Path(args.out) if args.out else Path(args.workdir) / "checkpoints.json"
    atomic_write_json(out, result)
    print(f"best step {result['best_step']} (validation {result['validation'][str(result['best_step'])]:.3f}): "
          f"held-out {result['best']['accuracy']:.3f}; final step {result['final_step']}: "
          f"{result['final']['accuracy']:.3f} -> {out}")
    return 0


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    sys.exit(cli.run(main))
