"""Image-caption pairs for contrastive (CLIP) training: reading, the held-out split, and fixed-shape batches.

Inputs: a COCO captions JSON ({"images", "annotations": [{"image_id", "caption"}]}, several captions per image),
or anything `llava_jax.data.sources.load_records` reads (a LLaVA stage-1 JSON such as CC3M chat.json, where the
first answer is the caption; a MiniGPT-4 filter_cap.json). Pairs are grouped by image: each image keeps all its
captions and a training batch draws one of them per image and step. Several files can be combined
(`read_sources`), each with its own image root; an image named by more than one keeps every caption.

Batches are a function of (seed, step) alone: step s takes global positions [s B, (s + 1) B) of an endless
sequence of per-epoch permutations of the training images, so `get_state` / `set_state` (the step) resume a run
exactly. Each JAX process keeps rows p::P of the global batch.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from llava_jax.data.images import ImageConfig, load_and_preprocess
from llava_jax.io import read_json


class PairsError(ValueError):
    """The captions file cannot be read as image-caption pairs, or holds too few of them."""


@dataclasses.dataclass(frozen=True)
class ImageCaptions:
    """One image (path relative to the image root) and its captions (at least one)."""

    image: str
    captions: tuple[str, ...]


def _coco_pairs(path: Path) -> list[ImageCaptions]:
    from data_gen.context import ContextError, load_contexts

    try:
        contexts, _ = load_contexts(path)
    except ContextError as e:
        raise PairsError(str(e)) from e
    return [ImageCaptions(c.file_name, tuple(c.captions)) for c in contexts]


def _record_pairs(path: Path) -> list[ImageCaptions]:
    from llava_jax.data.sources import RecordError, image_field, load_records

    try:
        records = load_records(path)
    except RecordError as e:
        raise PairsError(str(e)) from e
    by_image: dict[str, list[str]] = {}
    for rec in records:
        try:
            image = image_field(rec)
        except RecordError:
            continue
        answers = [t.get("value") for t in rec.get("conversations") or [] if isinstance(t, dict)
                   and t.get("from") == "gpt"]
        if image is None or not answers or not isinstance(answers[0], str) or not answers[0].strip():
            continue
        by_image.setdefault(image, []).append(" ".join(answers[0].split()))
    return [ImageCaptions(image, tuple(caps)) for image, caps in by_image.items()]


def read_pairs(path: str | os.PathLike) -> list[ImageCaptions]:
    """Every captioned image of a COCO captions JSON or a LLaVA / MiniGPT-4 record file, in file order.

    Records without an image or a caption are skipped. Raises PairsError when the file is unreadable or holds
    no pair."""
    path = Path(path)
    if not path.is_file():
        raise PairsError(f"captions file {str(path)!r} does not exist")
    head = read_json(path) if path.suffix.lower() == ".json" else None
    pairs = _coco_pairs(path) if isinstance(head, dict) and "images" in head else _record_pairs(path)
    if not pairs:
        raise PairsError(f"{path}: no image-caption pairs found (expected COCO captions or LLaVA records)")
    return pairs


def _split_list(value: str | Sequence[str]) -> list[str]:
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(x).strip() for x in items if str(x).strip()]


def read_sources(captions: str | Sequence[str], image_root: str | Sequence[str]) -> list[ImageCaptions]:
    """Pairs of one or more caption files (a list or a comma-separated string), each read by `read_pairs`.

    `image_root` is one root for every file or one per file (same forms). Image paths come back resolved
    (root joined, links followed), so an image that several files name -- the synthetic set's
    cc_sbu_align/image/*.jpg link to images/*.jpg -- is one image with the captions of all of them.
    """
    from llava_jax.data.sources import RecordError, check_relative_path

    files, roots = _split_list(captions), _split_list(image_root) or [""]
    if not files:
        raise PairsError("no captions file given")
    if len(roots) not in (1, len(files)):
        raise PairsError(f"{len(files)} caption files but {len(roots)} image roots (give one, or one per file)")
    merged: dict[str, list[str]] = {}
    for i, f in enumerate(files):
        root = roots[0] if len(roots) == 1 else roots[i]
        for pair in read_pairs(f):
            try:
                check_relative_path(pair.image)
            except RecordError as e:
                raise PairsError(f"{f}: {e}") from e
            key = os.path.realpath(os.path.join(root, pair.image))
            caps = merged.setdefault(key, [])
            caps.extend(c for c in pair.captions if c not in caps)
    return [ImageCaptions(image, tuple(caps)) for image, caps in merged.items()]


def split_holdout(pairs: Sequence[ImageCaptions], num_holdout: int, seed: int = 0
                  ) -> tuple[list[ImageCaptions], list[ImageCaptions]]:
    """(train, held-out): `num_holdout` images drawn by `seed` from the images sorted by path (so the split does
    not depend on file order); at least one image must remain for training."""
    if num_holdout < 0 or num_holdout >= len(pairs):
        raise PairsError(f"cannot hold out {num_holdout} of {len(pairs)} images (need 0 <= n < {len(pairs)})")
    ordered = sorted(pairs, key=lambda p: p.image)
    chosen = set(np.random.default_rng([seed, 7]).permutation(len(ordered))[:num_holdout].tolist())
    train = [p for i, p in enumerate(ordered) if i not in chosen]
    held = [p for i, p in enumerate(ordered) if i in chosen]
    return train, held


def tokenize(tokenizer: Any, texts: Sequence[str], context: int) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (input_ids [N, context] int32, attention_mask [N, context] int32), each cut to the context
    (the tokenizer keeps its end token) and padded with the pad id."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = np.full((len(texts), context), pad, np.int32)
    mask = np.zeros((len(texts), context), np.int32)
    encoded = tokenizer(list(texts), truncation=True, max_length=context)["input_ids"]
    for i, row in enumerate(encoded):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


class ImageLoader:
    """Loads images through the project's one loader (`load_and_preprocess`) on a thread pool, optionally
    keeping every decoded image in memory (small images, many epochs)."""

    def __init__(self, root: str | os.PathLike, config: ImageConfig, workers: int = 4, cache: bool = False):
        self.root, self.config, self.cache = Path(root), config, cache
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers))
        self._cached: dict[str, np.ndarray] = {}

    def _one(self, rel: str) -> np.ndarray:
        if rel in self._cached:
            return self._cached[rel]
        arr = load_and_preprocess(self.root / rel, self.config)
        if self.cache:
            self._cached[rel] = arr
        return arr

    def load(self, rels: Sequence[str]) -> np.ndarray:
        """Relative paths -> pixel_values [N, S, S, 3] float32; raises the loader's error for a bad image."""
        return np.stack(list(self._pool.map(self._one, rels)))

    def close(self) -> None:
        self._pool.shutdown(wait=False)


class PairBatches:
    """Endless fixed-shape training batches of (image, one of its captions).

    Batch: input_ids / attention_mask [B, context] int32, pixel_values [B, S, S, 3] float32, where B is this
    process's share of `global_batch`. Deterministic per (seed, step); the state is the step.
    """

    def __init__(self, pairs: Sequence[ImageCaptions], loader: ImageLoader, tokenizer: Any, context: int,
                 global_batch: int, seed: int, process_index: int = 0, process_count: int = 1):
        if not pairs:
            raise PairsError("no training pairs")
        self.pairs, self.loader, self.tokenizer, self.context = list(pairs), loader, tokenizer, context
        self.global_batch, self.seed = global_batch, seed
        self.rows = slice(process_index, None, process_count)
        self.step = 0
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs))}
        return self._perms[epoch]

    def indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(pair index [global B], caption index [global B]) of a step."""
        n, b = len(self.pairs), self.global_batch
        positions = np.arange(step * b, (step + 1) * b)
        idx = np.array([self._perm(int(p // n))[p % n] for p in positions])
        draw = np.random.default_rng([self.seed, step, 1]).random(b)
        caps = np.array([int(u * len(self.pairs[i].captions)) for u, i in zip(draw, idx, strict=True)])
        return idx, caps

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        idx, caps = self.indices(self.step)
        self.step += 1
        idx, caps = idx[self.rows], caps[self.rows]
        texts = [self.pairs[i].captions[c] for i, c in zip(idx, caps, strict=True)]
        ids, mask = tokenize(self.tokenizer, texts, self.context)
        pixels = self.loader.load([self.pairs[i].image for i in idx])
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])

    def close(self) -> None:
        self.loader.close()


def holdout_captions(pairs: Sequence[ImageCaptions], seed: int = 0) -> list[str]:
    """One caption per held-out image, drawn by `seed` (every phrasing gets evaluated across images)."""
    rng = np.random.default_rng([seed, 11])
    return [p.captions[int(rng.integers(0, len(p.captions)))] for p in pairs]
