"""CLIP image embeddings (for clustering) and the CLIP score (image-answer agreement) with the project's Flax CLIP.

The model is a Hugging Face CLIP directory loaded by `llava_jax.convert.load_clip`. Images go through the one image
loader (`llava_jax.data.images`), centre-cropped as CLIP expects unless configured otherwise. The image and text
towers run jitted on fixed-size batches (the last batch padded), so each compiles once.

CLIP score = scale x cosine(image embedding, answer embedding). An answer longer than the text tower's context is
split into sentences (the first `max_sentences`, each cut to the context); their normalised embeddings are averaged.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from selection.cache import EmbeddingCache, directory_fingerprint
from selection.records import Example
from selection.scores import Failure, split_sentences

log = logging.getLogger(__name__)

TEXT_ONLY = "text_only: the record has no image"


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class ClipEncoder:
    """Loads a HF CLIP directory into the Flax CLIPModel and embeds images and texts in fixed-size jitted batches.

    `dtype` is the compute dtype (float32 default; bfloat16 on accelerators); weights stay float32.
    """

    def __init__(self, model_dir: str, batch_size: int = 32, aspect: str = "crop", dtype: str = "float32"):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from llava_jax.data.images import ImageConfig

        try:
            from llava_jax.convert import load_clip
        except ImportError:  # the package may not re-export it
            from llava_jax.convert.model_dir import load_clip

        self.model_dir = os.path.abspath(model_dir)
        self.batch_size = batch_size
        model, self.tokenizer, image_config = load_clip(self.model_dir, dtype=jnp.dtype(dtype))
        if self.tokenizer is None:
            raise FileNotFoundError(f"{self.model_dir} holds no tokenizer; the CLIP score needs the text tower's")
        if image_config is None:
            side = model.vision_model.config.image_size
            image_config = ImageConfig(size=side, crop_size=side)
        self.image_config = dataclasses.replace(image_config, aspect=aspect)
        self.context = int(model.text_model.config.max_position_embeddings)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        graphdef, state = nnx.split(model)

        @jax.jit
        def image_fn(state, pixel_values):
            return nnx.merge(graphdef, state).image_embeds(pixel_values).astype(jnp.float32)

        @jax.jit
        def text_fn(state, input_ids, attention_mask):
            return nnx.merge(graphdef, state).text_embeds(input_ids, attention_mask).astype(jnp.float32)

        self._state = state
        self._image_fn = image_fn
        self._text_fn = text_fn

    def _batched(self, n: int, make: Callable[[int, int], tuple], fn: Callable, desc: str | None) -> np.ndarray:
        outs = []
        starts = range(0, n, self.batch_size)
        for start in tqdm(starts, desc=desc, unit="batch", disable=desc is None):
            count = min(self.batch_size, n - start)
            arrays = make(start, count)
            padded = [np.concatenate([a, np.zeros((self.batch_size - count, *a.shape[1:]), a.dtype)])
                      if count < self.batch_size else a for a in arrays]
            outs.append(np.asarray(fn(self._state, *padded))[:count])
        return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)

    def load_images(self, paths: Sequence[str], workers: int = 4) -> list[np.ndarray | Exception]:
        """Loads and preprocesses images: each item [S, S, 3] float32, or the exception that stopped it."""
        from llava_jax.data.images import load_and_preprocess

        def one(path: str) -> np.ndarray | Exception:
            try:
                return load_and_preprocess(path, self.image_config)
            except Exception as e:  # noqa: BLE001 - every unreadable image becomes a counted failure
                return e

        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(one, paths))

    def embed_pixels(self, pixels: np.ndarray, desc: str | None = None) -> np.ndarray:
        """pixel_values [N, S, S, 3] float32 -> unit-norm image embeddings [N, P] float32."""
        emb = self._batched(len(pixels), lambda s, c: (pixels[s : s + c],), self._image_fn, desc)
        return _unit_rows(emb)

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Texts -> (input_ids [N, context] int32, attention_mask [N, context] int32), cut to the context."""
        from llava_jax.data.clip_pairs import tokenize

        return tokenize(self.tokenizer, texts, self.context)

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """Token counts of texts without truncation."""
        return [len(x) for x in self.tokenizer(list(texts), truncation=False)["input_ids"]]

    def embed_texts(self, texts: Sequence[str], desc: str | None = None) -> np.ndarray:
        """Texts -> unit-norm text embeddings [N, P] float32 (each text cut to the context)."""
        ids, mask = self.tokenize(texts)
        emb = self._batched(len(texts), lambda s, c: (ids[s : s + c], mask[s : s + c]), self._text_fn, desc)
        return _unit_rows(emb)


_ENCODERS: dict[tuple, ClipEncoder] = {}


def shared_encoder(model_dir: str, batch_size: int, aspect: str, dtype: str = "float32") -> ClipEncoder:
    """One ClipEncoder per (model directory and its files, batch size, aspect) in this process, so repeated
    selections reuse the loaded weights and compiled functions; only the most recent one is kept."""
    key = (os.path.abspath(model_dir), batch_size, aspect, dtype,
           tuple(sorted(directory_fingerprint(model_dir).items())))
    if key not in _ENCODERS:
        _ENCODERS.clear()
        _ENCODERS[key] = ClipEncoder(model_dir, batch_size, aspect, dtype)
    return _ENCODERS[key]


class ClipScorer:
    """Image embeddings and CLIP scores of examples; image embeddings are cached per example in `cache_dir`."""

    name = "clip"

    def __init__(
        self,
        model_dir: str,
        image_root: str,
        cache_dir: str | os.PathLike,
        batch_size: int = 32,
        max_sentences: int = 10,
        scale: float = 100.0,
        aspect: str = "crop",
        workers: int = 4,
        chunk_batches: int = 16,
        save_every: int = 50_000,
        dtype: str = "float32",
    ):
        if not model_dir:
            raise ValueError("CLIP scores and image embeddings need clip.model_dir (a Hugging Face CLIP directory)")
        self.model_dir = os.path.abspath(model_dir)
        self.image_root = Path(image_root)
        self.cache_dir = Path(cache_dir)
        self.batch_size = batch_size
        self.max_sentences = max_sentences
        self.scale = scale
        self.aspect = aspect
        self.workers = workers
        self.chunk_batches = chunk_batches
        self.save_every = save_every
        self.dtype = dtype
        self._encoder: ClipEncoder | None = None
        self._image_embeddings: dict[tuple[str, str], np.ndarray] = {}
        self._image_failures: dict[str, str] = {}

    @property
    def encoder(self) -> ClipEncoder:
        if self._encoder is None:
            self._encoder = shared_encoder(self.model_dir, self.batch_size, self.aspect, self.dtype)
        return self._encoder

    def _model_settings(self) -> dict[str, Any]:
        return {"model_dir": self.model_dir, "files": directory_fingerprint(self.model_dir), "aspect": self.aspect,
                "dtype": self.dtype, "image_root": str(self.image_root.resolve())}

    def settings(self) -> dict[str, Any]:
        return {**self._model_settings(), "max_sentences": self.max_sentences, "scale": self.scale, "version": 1}

    def image_embeddings(self, examples: Sequence[Example]) -> tuple[np.ndarray, dict[str, str]]:
        """Unit-norm image embeddings [N, P] float32 (zero rows where missing) and {key: failure reason}.

        Cached embeddings are reused; only the missing ones load images (streamed in chunks of
        `chunk_batches` batches, so memory holds one chunk of pixels) and run the vision tower. The cache is
        written every `save_every` new embeddings and at the end.
        """
        failures: dict[str, str] = {ex.key: TEXT_ONLY for ex in examples if not ex.image}
        with_image = [i for i, ex in enumerate(examples) if ex.image]
        cache = EmbeddingCache(self.cache_dir, "clip-image", self._model_settings())
        keys = [(examples[i].key, examples[i].image or "") for i in with_image]
        cached, missing = cache.lookup(keys)
        missing_set = set(missing)
        fresh: dict[int, np.ndarray] = {}

        def store() -> None:
            rows = [(keys[j], fresh[j] if j in fresh else cached[j]) for j in range(len(keys))
                    if j in fresh or (cached is not None and j not in missing_set)]
            if rows:
                cache.store([k for k, _ in rows], np.stack([r for _, r in rows]))

        chunk = self.batch_size * self.chunk_batches
        unsaved = 0
        with tqdm(total=len(missing), desc="clip images", unit="img", disable=not missing) as bar:
            for start in range(0, len(missing), chunk):
                part = missing[start : start + chunk]
                paths = [str(self.image_root / examples[with_image[j]].image) for j in part]
                good, pixels = [], []
                for j, item in zip(part, self.encoder.load_images(paths, self.workers), strict=True):
                    if isinstance(item, Exception):
                        failures[keys[j][0]] = f"image_unreadable: {type(item).__name__}: {item}"
                    else:
                        good.append(j)
                        pixels.append(item)
                if good:
                    fresh.update(zip(good, self.encoder.embed_pixels(np.stack(pixels)), strict=True))
                    unsaved += len(good)
                bar.update(len(part))
                if unsaved >= self.save_every:
                    store()
                    unsaved = 0
        if unsaved:
            store()
        dim = cached.shape[1] if cached is not None else next(iter(fresh.values())).shape[0] if fresh else 0
        out = np.zeros((len(examples), dim), np.float32)
        for j, i in enumerate(with_image):
            if j in fresh:
                out[i] = fresh[j]
            elif j not in missing_set and cached is not None:
                out[i] = cached[j]
            else:
                continue
            self._image_embeddings[keys[j]] = out[i]
        self._image_failures.update(failures)
        if failures:
            log.warning("no image embedding for %d of %d examples", len(failures), len(examples))
        return out, failures

    def answer_embeddings(self, answers: Sequence[str], chunk: int = 4096) -> np.ndarray:
        """Unit-norm answer embeddings [N, P]: whole answers when they fit the context, otherwise the normalised
        mean of their first `max_sentences` sentence embeddings. Answers are tokenised `chunk` at a time."""
        enc = self.encoder
        out = []
        with tqdm(total=len(answers), desc="clip texts", unit="text", disable=len(answers) <= chunk) as bar:
            for start in range(0, len(answers), chunk):
                part = answers[start : start + chunk]
                pieces: list[str] = []
                owner: list[int] = []
                for i, (answer, count) in enumerate(zip(part, enc.token_counts(part), strict=True)):
                    parts = [answer] if count <= enc.context else split_sentences(answer)[: self.max_sentences]
                    parts = parts or [answer]
                    pieces.extend(parts)
                    owner.extend([i] * len(parts))
                emb = enc.embed_texts(pieces)
                sums = np.zeros((len(part), emb.shape[1]), np.float32)
                np.add.at(sums, np.asarray(owner), emb)
                out.append(_unit_rows(sums))
                bar.update(len(part))
        return np.concatenate(out)

    def score(self, examples: Sequence[Example]) -> list[float | Failure]:
        """scale x cosine(image, answer) per example; Failure for text-only records and unreadable images."""
        if not examples:
            return []
        missing = [ex for ex in examples if ex.image and (ex.key, ex.image) not in self._image_embeddings]
        if missing:
            self.image_embeddings(missing)
        results: list[float | Failure] = [Failure(TEXT_ONLY)] * len(examples)
        usable = [i for i, ex in enumerate(examples) if (ex.key, ex.image or "") in self._image_embeddings]
        usable_set = set(usable)
        for i, ex in enumerate(examples):
            if ex.image and i not in usable_set:
                results[i] = Failure(self._image_failures.get(ex.key, "image_unreadable"))
        if usable:
            text = self.answer_embeddings([examples[i].answer for i in usable])
            for row, i in enumerate(usable):
                image = self._image_embeddings[(examples[i].key, examples[i].image)]
                results[i] = float(self.scale * np.dot(image, text[row]))
        return results
