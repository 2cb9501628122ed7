"""The `mllm` score: how much the image raises the answer's likelihood under a LLaVA checkpoint.

    mllm = mean log p(answer tokens | image, prompt) - mean log p(answer tokens | blank image, prompt)

The record's real turns (`Example.dialogue()`) are teacher-forced through the model's conversation template with
`llava_jax.data.conversation.encode`, so the scored tokens are exactly the supervised tokens of training: every
assistant answer and its end separator. A single-turn template (stage 1's `plain`: image, then text) scores the
record's answers joined into one text, as the clip score does. The blank image is the CLIP mean colour, which CLIP normalisation maps to
zeros (`llava_jax.data.images.blank_image`, the same canvas the padding of a non-square image uses); it goes
through the same vision tower and projector as the real image, so the difference measures what the image's
content contributes. An answer that contradicts its image, or belongs to another image, scores low or negative;
one the image supports scores high; a generic answer the image does not change scores near zero.

The model is anything `python -m llava_jax.generate --model` accepts (an HF LLaVA dir, a converted model dir or a
training workdir). Examples are tokenized, sorted by length and run in fixed-size jitted batches (the last one
filled with repeats) padded to a small set of bucket lengths, so the scoring function compiles at most once per
bucket. Text-only records, unreadable images and conversations the template cannot encode are Failures.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from selection.cache import directory_fingerprint, settings_hash
from selection.clip_score import TEXT_ONLY
from selection.records import Example
from selection.scores import Failure

log = logging.getLogger(__name__)

IMAGE_MARK = "<image>"
SMALL_FILE = 1 << 16  # files up to this size are fingerprinted by content, larger ones by size
MIN_BUCKET = 64


# ------------------------------------------------------------------------------------------------ fingerprints


def _tree_fingerprint(root: Path, under: Path) -> dict[str, str | int]:
    """Relative path -> content hash (small files) or size (large files) of every file below `under`."""
    out: dict[str, str | int] = {}
    if not under.is_dir():
        return out
    for p in sorted(under.rglob("*")):
        if p.is_file():
            size = p.stat().st_size
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()[:16] \
                if size <= SMALL_FILE else size
    return out


def model_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """What identifies a model path's weights, for cache keys: a model or HF directory by its file sizes; a training
    workdir by its run.json, every checkpoint file (small metadata files by content, so a retrained run with the
    same shapes differs) and, recursively, the model it started from."""
    from llava_jax import checkpoint
    from llava_jax.io import read_json

    root = Path(path)
    if checkpoint.is_workdir(root):
        run = read_json(root / checkpoint.RUN_FILE)
        base = run.get("init_from")
        base_print: Any = str(base)
        if base and Path(base).exists():
            base_print = model_fingerprint(base)
        return {"workdir": str(root.resolve()), "run": settings_hash(run),
                "checkpoints": _tree_fingerprint(root, root / checkpoint.CHECKPOINT_SUBDIR), "base": base_print}
    return {"dir": str(root.resolve()), "files": directory_fingerprint(root)}


# ------------------------------------------------------------------------------------------------ batching


def trained_template(path: str | os.PathLike) -> str | None:
    """The conversation template a training workdir was trained with (its run.json config), else None."""
    from llava_jax import checkpoint
    from llava_jax.io import read_json

    if not checkpoint.is_workdir(path):
        return None
    data = read_json(Path(path) / checkpoint.RUN_FILE).get("config", {}).get("data", {})
    template = data.get("template") if isinstance(data, dict) else None
    return str(template) if template else None


def default_buckets(max_length: int) -> tuple[int, ...]:
    """Powers of two from 64 below `max_length`, and `max_length` itself."""
    out, b = [], MIN_BUCKET
    while b < max_length:
        out.append(b)
        b *= 2
    return (*out, int(max_length))


def _conversation(example: Example, single_turn: bool = False) -> list[dict[str, str]]:
    """LLaVA turns of an example with the image marker at the start of the first human turn; with `single_turn`
    (templates such as stage 1's `plain`) one turn holding the joined instruction and answer."""
    pairs = ((example.instruction, example.answer),) if single_turn else example.dialogue()
    turns: list[dict[str, str]] = []
    for i, (question, answer) in enumerate(pairs):
        question = question.replace(IMAGE_MARK, "").strip()
        turns.append({"from": "human", "value": f"{IMAGE_MARK}\n{question}" if i == 0 else question})
        turns.append({"from": "gpt", "value": answer})
    return turns


def _make_score_fn(graphdef, chunk: int):
    """The jitted scorer: (state, input_ids [B, T], labels [B, T], attention_mask [B, T], pixel_values
    [B, S, S, 3], blank [S, S, 3]) -> (log p of each next token with the image [B, T - 1], the same with the blank
    image [B, T - 1]); position t scores labels[:, t + 1] and is 0 where that label is ignored."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from llava_jax.data.conversation import IGNORE_INDEX
    from llava_jax.loss import nll_sum

    token_nll = jax.vmap(jax.vmap(nll_sum))  # [B, C, V] logits, [B, C] targets -> [B, C] (0 where ignored)

    def token_log_probs(model, hidden, targets):
        b, n, d = hidden.shape
        c = min(chunk, n)
        padded = -(-n // c) * c
        hidden = jnp.pad(hidden, ((0, 0), (0, padded - n), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, padded - n)), constant_values=IGNORE_INDEX)
        hs = jnp.moveaxis(hidden.reshape(b, padded // c, c, d), 1, 0)
        ts = jnp.moveaxis(targets.reshape(b, padded // c, c), 1, 0)
        nll = jax.lax.map(lambda x: token_nll(model.language_model.logits(x[0]).astype(jnp.float32), x[1]),
                          (hs, ts))  # [P/C, B, C]
        return -jnp.moveaxis(nll, 0, 1).reshape(b, padded)[:, :n]

    @jax.jit
    def score_fn(state, input_ids, labels, attention_mask, pixel_values, blank):
        model = nnx.merge(graphdef, state)
        feats = model.image_features(pixel_values)
        blank_feats = jnp.broadcast_to(model.image_features(blank[None]), feats.shape)
        out = []
        for f in (feats, blank_feats):
            embeds = model.merge(input_ids, f)
            hidden, _ = model.language_model(inputs_embeds=embeds, attention_mask=attention_mask, return_hidden=True)
            out.append(token_log_probs(model, hidden[:, :-1], labels[:, 1:]))
        return out[0], out[1]

    return score_fn


_SHARED: dict[tuple, tuple[Any, Any, Any]] = {}


def _shared_model(model_dir: str, dtype: str, chunk: int) -> tuple[Any, Any, Any]:
    """(LoadedModel, its parameter state, the jitted score function) for a model path, loaded once per process
    while its files are unchanged, so repeated selections reuse the weights and compiled functions; only the most
    recent model is kept."""
    import json

    from flax import nnx

    from llava_jax.eval.predict import load_for_inference

    key = (model_dir, dtype, chunk, json.dumps(model_fingerprint(model_dir), sort_keys=True))
    if key not in _SHARED:
        _SHARED.clear()
        loaded = load_for_inference(model_dir, dtype)
        if loaded.tokenizer is None:
            raise FileNotFoundError(f"{model_dir} holds no tokenizer; the mllm score needs the model's")
        if loaded.image_config is None:
            raise FileNotFoundError(f"{model_dir} holds no image preprocessing config")
        graphdef, state = nnx.split(loaded.model)
        _SHARED[key] = (loaded, state, _make_score_fn(graphdef, chunk))
    return _SHARED[key]


@dataclasses.dataclass(frozen=True)
class MllmDetail:
    """One example's parts of the score: mean answer log-probabilities with the image and with the blank image
    (nats per token), the number of answer tokens scored, and each answer's mean gain (image minus blank)."""

    with_image: float
    with_blank: float
    tokens: int
    turn_gains: tuple[float, ...] = ()

    @property
    def gain(self) -> float:
        """The score: mean log-probability gain over all answer tokens."""
        return self.with_image - self.with_blank


class MllmScorer:
    """The `mllm` score of examples under a LLaVA model (see the module docstring).

    Args:
      model_dir: an HF LLaVA dir, a llava_jax model dir or a training workdir (its newest checkpoint).
      image_root: the directory the examples' image paths are relative to.
      batch_size: examples per jitted call (the last batch is filled with repeats).
      max_length: token limit per example (image tokens included; longer conversations are cut, and one whose
        first answer would be cut entirely fails); also capped by the model's position limit.
      template: conversation template name; empty = the model's own: a workdir's training template (stage 1:
        plain), a model dir's stored one, vicuna_v1 when none is named.
      dtype: compute dtype, 'auto' (bfloat16 on accelerators, float32 on CPU), 'float32' or 'bfloat16'.
      buckets: padded sequence lengths (empty: `default_buckets(max_length)`).
      chunk: positions per vocabulary projection (bounds the [B, chunk, V] logits held at once).
      workers: image decoding threads.
    """

    name = "mllm"

    def __init__(self, model_dir: str, image_root: str | os.PathLike, batch_size: int = 8, max_length: int = 2048,
                 template: str = "", dtype: str = "auto", buckets: Sequence[int] = (), chunk: int = 256,
                 workers: int = 4):
        if not model_dir:
            raise ValueError("the mllm score needs mllm.model_dir (a LLaVA model dir, HF LLaVA dir or workdir)")
        if batch_size < 1 or max_length < 2 or chunk < 1:
            raise ValueError(f"mllm needs batch_size >= 1, max_length >= 2, chunk >= 1; got {batch_size}, "
                             f"{max_length}, {chunk}")
        if dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"mllm.dtype must be 'auto', 'float32' or 'bfloat16', got {dtype!r}")
        if not Path(model_dir).exists():
            raise FileNotFoundError(f"mllm.model_dir not found: {model_dir}")
        self.model_dir = os.path.abspath(model_dir)
        self.image_root = Path(image_root)
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.template = template
        self.dtype = dtype
        self.buckets = tuple(sorted(int(b) for b in buckets))
        self.chunk = int(chunk)
        self.workers = workers
        self.details: dict[str, MllmDetail] = {}
        self._loaded = None
        self._fn = None

    def settings(self) -> dict[str, Any]:
        return {"model": model_fingerprint(self.model_dir), "image_root": str(self.image_root.resolve()),
                "template": self.template or "model default", "max_length": self.max_length, "dtype": self.dtype,
                "version": 1}

    def _load(self):
        if self._loaded is None:
            self._loaded, self._state, self._fn = _shared_model(self.model_dir, self.dtype, self.chunk)
        return self._loaded

    def _encode(self, examples: Sequence[Example]) -> tuple[dict[int, dict[str, Any]], dict[int, Failure]]:
        """Token ids and labels of every example with an image; Failures for the others."""
        from llava_jax.data import conversation

        loaded = self._load()
        cfg = loaded.config
        template = conversation.get_template(self.template or trained_template(self.model_dir) or loaded.template
                                              or "vicuna_v1")
        limit = min(self.max_length, int(cfg.text.max_position_embeddings))
        encoded: dict[int, dict[str, Any]] = {}
        failures: dict[int, Failure] = {}
        for i, ex in enumerate(examples):
            if not ex.image:
                failures[i] = Failure(TEXT_ONLY)
                continue
            try:
                turns = _conversation(ex, getattr(template, "single_turn_only", False))
                enc = conversation.encode({"conversations": turns}, template, loaded.tokenizer,
                                          cfg.num_image_tokens, cfg.image_token_id, limit, has_image=True)
            except conversation.ConversationError as e:
                failures[i] = Failure(f"{e.reason}: {e}")
                continue
            encoded[i] = {"input_ids": enc.input_ids, "labels": enc.labels}
        return encoded, failures

    def _pixels(self, paths: Sequence[str]) -> list[np.ndarray | Exception]:
        from llava_jax.data.images import load_and_preprocess

        def one(path: str) -> np.ndarray | Exception:
            try:
                return load_and_preprocess(path, self._loaded.image_config)
            except Exception as e:  # noqa: BLE001 - every unreadable image becomes a counted failure
                return e

        with ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
            return list(pool.map(one, paths))

    def score(self, examples: Sequence[Example]) -> list[float | Failure]:
        """mllm scores [len(examples)]: nats per answer token gained from the image (Failure where not scored)."""
        if not examples:
            return []
        from llava_jax.data import images
        from llava_jax.data.conversation import supervised_spans
        from llava_jax.data.pipeline import collate

        encoded, failures = self._encode(examples)
        limit = min(self.max_length, int(self._loaded.config.text.max_position_embeddings))
        buckets = tuple(b for b in self.buckets if 0 < b <= limit) or default_buckets(limit)
        if buckets[-1] < limit:
            buckets = (*buckets, limit)
        blank = images.blank_image(self._loaded.image_config)
        pad_id = self._loaded.tokenizer.pad_token_id or 0
        order = sorted(encoded, key=lambda i: len(encoded[i]["input_ids"]))
        results: dict[int, float | Failure] = dict(failures)
        steps = range(0, len(order), self.batch_size)
        for start in tqdm(steps, desc="mllm score", unit="batch", disable=len(steps) < 2):
            batch = order[start : start + self.batch_size]
            pixels = self._pixels([str(self.image_root / examples[i].image) for i in batch])
            rows = []
            for i, item in zip(batch, pixels, strict=True):
                if isinstance(item, Exception):
                    results[i] = Failure(f"image_unreadable: {type(item).__name__}: {item}")
                else:
                    rows.append((i, {**encoded[i], "pixel_values": item, "has_image": True}))
            if not rows:
                continue
            samples = [r for _, r in rows]
            samples += [samples[-1]] * (self.batch_size - len(samples))
            b = collate(samples, buckets, pad_id)
            with_image, with_blank = (np.asarray(x, np.float64) for x in self._fn(
                self._state, b["input_ids"], b["labels"], b["attention_mask"], b["pixel_values"], blank))
            for row, (i, _) in enumerate(rows):
                spans = supervised_spans(b["labels"][row, 1:])
                n = sum(e - s for s, e in spans)
                if n == 0:
                    results[i] = Failure("no_answer_tokens: nothing to score after truncation")
                    continue
                gains = tuple(float(np.mean(with_image[row, s:e] - with_blank[row, s:e])) for s, e in spans)
                detail = MllmDetail(float(with_image[row].sum()) / n, float(with_blank[row].sum()) / n, n, gains)
                self.details[examples[i].key] = detail
                results[i] = detail.gain
        return [results[i] for i in range(len(examples))]
