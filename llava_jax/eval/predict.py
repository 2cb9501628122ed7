"""Batched answer generation for every benchmark: prompts + images in, an answers JSONL out.

Command (generic questions file, e.g. VQA / POPE / LLaVA-Bench questions in LLaVA's JSONL layout):
  python -m llava_jax.eval.predict --model PATH --questions questions.jsonl --image-root DIR \
      --out answers.jsonl [--prompt-suffix "Answer with a single word or phrase."] [--batch-size 8]

PATH may be an HF LLaVA dir, a converted model dir or a training workdir. Each prompt is wrapped in the model's
conversation template (`--template` overrides it) with the image marker first, encoded by
`llava_jax.data.conversation.encode_prompt`, and decoded greedily unless --temperature > 0. Prompts are sorted
by length into batches (less padding), the last batch is filled up to the batch size so shapes repeat, and the
answers are written in question order in LLaVA's layout: {question_id, prompt, text, answer_id, model_id,
metadata, category?}. The file is rewritten
atomically every few batches; `--resume` keeps the answers already in --out and generates only the rest.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from llava_jax import cli, host_memory
from llava_jax.eval.answers import EvalDataError, answer_record, qid_key, read_answers, read_questions
from llava_jax.io import atomic_write_jsonl

log = logging.getLogger(__name__)

IMAGE_MARK = "<image>"


@dataclasses.dataclass(frozen=True)
class PromptItem:
    """One question to answer: its id, the user's text (no image marker), an image path or None, extra fields
    copied into the answer record (e.g. category)."""

    question_id: Any
    text: str
    image: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PredictSettings:
    """How to load the model and decode."""

    model: str
    template: str | None = None
    batch_size: int = 8
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    dtype: str = "auto"
    model_id: str | None = None
    resume: bool = False
    flush_every: int = 10

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PredictSettings:
        """Settings from the flags of `add_predict_flags` (absent ones keep their defaults)."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def add_predict_flags(parser: argparse.ArgumentParser, max_new_tokens: int = 128) -> None:
    """Adds the model and decoding flags shared by every `predict` command."""
    g = parser.add_argument_group("model and decoding")
    g.add_argument("--model", required=True, help="HF LLaVA dir, converted model dir or training workdir")
    g.add_argument("--template", default=None, help="conversation template (default: the model's)")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="compute dtype; auto = bfloat16 on accelerators, float32 on CPU")
    g.add_argument("--model-id", default=None, help="name stored in each answer (default: the model path)")
    g.add_argument("--resume", action="store_true", help="keep answers already in --out, generate the rest")
    g.add_argument("--flush-every", type=int, default=10, help="rewrite --out every N batches")


def items_from_questions(path: str | os.PathLike, image_root: str | os.PathLike | None, *,
                         prompt_suffix: str = "", limit: int = 0) -> list[PromptItem]:
    """PromptItems from a questions JSONL {question_id, image?, text, category?}; images resolved under root."""
    questions = read_questions(path, need=("text",))
    if limit:
        questions = questions[:limit]
    items = []
    for q in questions:
        image = q.get("image")
        if image:
            if image_root is None:
                raise EvalDataError(f"question {q['question_id']} has an image but no --image-root was given")
            image = os.path.join(image_root, str(image))
        text = str(q["text"]).replace(IMAGE_MARK, "").strip()
        if prompt_suffix:
            text = f"{text}\n{prompt_suffix}"
        extra = {"category": q["category"]} if "category" in q else {}
        items.append(PromptItem(q["question_id"], text, image or None, extra))
    return items


def with_instruction(text: str, instruction: str) -> str:
    """`text`, then `instruction` on a new line when there is one."""
    return f"{text}\n{instruction}" if instruction else text


def user_message(item: PromptItem) -> str:
    """The user's turn as the model sees it: the image marker on its own line first when there is an image."""
    return f"{IMAGE_MARK}\n{item.text}" if item.image else item.text


def cut_at_stop_strings(text: str, stop_strings: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string, stripped."""
    end = len(text)
    for s in stop_strings:
        if s:
            i = text.find(s)
            if i != -1:
                end = min(end, i)
    return text[:end].strip()


def truncate_at_eos(token_ids: list[int], eos_ids: Sequence[int]) -> list[int]:
    """`token_ids` before the first end-of-sequence id (decoding with skip_special_tokens would otherwise drop
    the EOS and keep whatever follows it)."""
    for pos, token in enumerate(token_ids):
        if token in eos_ids:
            return token_ids[:pos]
    return token_ids


def _resolve_dtype(name: str):
    import jax
    import jax.numpy as jnp

    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def load_for_inference(path: str, dtype_name: str = "auto"):
    """Loads an HF LLaVA dir, a model dir or a training workdir (`llava_jax.convert.model_dir.load_model`).

    Parameters are kept in the compute dtype (inference needs no fp32 master copy).
    Returns:
      the LoadedModel (model, config, tokenizer, image_config, template).
    """
    from llava_jax.convert.model_dir import load_model

    dtype = _resolve_dtype(dtype_name)
    return load_model(path, dtype=dtype, param_dtype=dtype)


def _batched(order: Sequence[int], batch_size: int) -> list[list[int]]:
    return [list(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]


def run_predictions(items: Sequence[PromptItem], settings: PredictSettings, out_path: str | os.PathLike,
                    loaded: Any = None, generate_fn: Callable[..., list[list[int]]] | None = None
                    ) -> list[dict[str, Any]]:
    """Generates an answer per item and writes the answers JSONL (see module docstring).

    Args:
      items: the questions.
      settings: model path and decoding settings.
      out_path: answers JSONL.
      loaded: an already loaded LoadedModel (skips loading `settings.model`).
      generate_fn: the batched decoder, `llava_jax.generate.generate` unless given (same signature).
    Returns:
      the answer records in item order.
    """
    from tqdm import tqdm

    from llava_jax.data import conversation, images
    from llava_jax.generate import eos_ids_of

    if generate_fn is None:
        from llava_jax.generate import generate as generate_fn

    if settings.batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    keys = [qid_key(it.question_id) for it in items]
    if len(set(keys)) != len(keys):
        raise EvalDataError("question ids must be unique")
    done: dict[str, dict] = {}
    if settings.resume and os.path.exists(out_path):
        done = {k: v for k, v in read_answers(out_path).items() if k in set(keys)}
        log.info("resuming: %d of %d answers already in %s", len(done), len(items), out_path)
    todo = [i for i, k in enumerate(keys) if k not in done]

    if loaded is None:
        loaded = load_for_inference(settings.model, settings.dtype)
    model, config, tokenizer, image_config = loaded.model, loaded.config, loaded.tokenizer, loaded.image_config
    template = conversation.get_template(settings.template or getattr(loaded, "template", None) or "vicuna_v1")
    model_id = settings.model_id or os.path.basename(os.path.normpath(settings.model))
    eos_ids = eos_ids_of(tokenizer, config)

    prompts: dict[int, list[int]] = {}
    for i in todo:
        prompts[i] = conversation.encode_prompt(
            user_message(items[i]), template, tokenizer, config.num_image_tokens, config.image_token_id,
            has_image=items[i].image is not None,
        )
    order = sorted(todo, key=lambda i: len(prompts[i]))
    records: dict[str, dict] = dict(done)

    def write() -> list[dict[str, Any]]:
        rows = [records[k] for k in keys if k in records]
        atomic_write_jsonl(out_path, rows)
        return rows

    blank = images.blank_image(image_config)

    def pixels_of(i: int) -> np.ndarray:
        if items[i].image is None:
            return blank
        try:
            return images.load_and_preprocess(items[i].image, image_config)
        except (images.ImageError, OSError) as e:
            raise EvalDataError(f"question {keys[i]}: cannot use image {items[i].image}: {e}") from e

    batches = _batched(order, settings.batch_size)
    for b, batch in enumerate(tqdm(batches, desc="predict", unit="batch")):
        filled = batch + [batch[-1]] * (settings.batch_size - len(batch))
        pixels = np.stack([pixels_of(i) for i in filled])
        has_image = np.array([items[i].image is not None for i in filled], bool)
        outputs = generate_fn(
            model, [prompts[i] for i in filled], pixels, has_image,
            max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p,
            eos_ids=eos_ids, stop_strings=template.stop_strings, tokenizer=tokenizer, seed=settings.seed + b,
        )
        for i, new_ids in zip(batch, outputs, strict=False):
            new_ids = truncate_at_eos(list(new_ids), eos_ids)
            text = cut_at_stop_strings(tokenizer.decode(new_ids, skip_special_tokens=True), template.stop_strings)
            records[keys[i]] = answer_record(items[i].question_id, user_message(items[i]), text, model_id,
                                             **items[i].extra)
        if (b + 1) % max(1, settings.flush_every) == 0:
            write()
    return write()


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit status."""
    parser = cli.ArgumentParser(prog="python -m llava_jax.eval.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", required=True, help="JSONL of {question_id, image?, text, category?}")
    parser.add_argument("--image-root", default=None)
    parser.add_argument("--out", required=True, help="answers JSONL")
    parser.add_argument("--prompt-suffix", default="", help="appended on a new line to every question")
    parser.add_argument("--limit", type=int, default=0, help="only the first N questions (0: all)")
    add_predict_flags(parser)
    args = parser.parse_args(argv)
    host_memory.retain_freed_memory()  # XLA:CPU: reuse freed pages (before JAX's backend starts)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        items = items_from_questions(args.questions, args.image_root, prompt_suffix=args.prompt_suffix,
                                     limit=args.limit)
        rows = run_predictions(items, PredictSettings.from_args(args), args.out)
    except EvalDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(rows)} answers to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
