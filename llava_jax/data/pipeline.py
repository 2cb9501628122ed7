"""Grain input pipeline: records -> fixed-shape training batches with exact resume.

    source(s) -> [mix by weight] -> shuffle(seed, reshuffled every epoch) -> repeat -> slice per process
      -> map(ExampleMaker: image decode + CLIP preprocess + turn-by-turn tokenization)
      -> to_iter_dataset (read threads) -> BucketBatch (drops bad records, pads to a bucket length)
      -> [mp_prefetch workers] -> TrainIterator (counts skips, enforces the skip ceiling)

A batch is a dict of numpy arrays: input_ids [B,T] int32, labels [B,T] int32 (-100 ignored, unshifted),
attention_mask [B,T] int32, pixel_values [B,H,W,3] float32, has_image [B] bool (zeros image when absent);
T is the smallest configured bucket that holds the batch's longest sample, so a step compiles at most
len(buckets) times. `TrainIterator.get_state()` / `set_state()` (JSON-able dicts; also grain's Orbax
checkpoint API) restore the exact position: the batches after a restore are those of an uninterrupted run.

With `packing` (`PackBatch` in place of `BucketBatch`) each row of T = max_length holds several samples,
placed first-fit (see `_PackBatchIterator`), and a batch adds segment_ids [B,T] int32 (1, 2, ... per sample in the row,
0 = padding) and positions [B,T] int32 (restarting at 0 for each sample); pixel_values becomes image slots
[B,M,H,W,3] and has_image [B,M] int32 the segment id owning each slot (0 = empty), M = max_images_per_row.
Labels hold IGNORE_INDEX at each sample's first token (the previous sample never predicts it), so a packed
batch's summed loss and supervised-token count are those of the same samples unpacked.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from llava_jax.data import conversation, images, sources, validate

log = logging.getLogger(__name__)

SKIP_KEY = "_skip"
STATS_KEY = "_stats"
END_KEY = "_end"


class SkipCeilingExceededError(RuntimeError):
    """Too large a fraction of the records could not be used; the run stops instead of training on scraps."""


# ------------------------------------------------------------------------------------------------ per record


@dataclasses.dataclass
class ExampleMaker:
    """Turns a source element into a model-ready example, or a skip marker naming the reason.

    Output: {"input_ids": [T] int32, "labels": [T] int32, "pixel_values": [H,W,3] float32, "has_image": bool}
    or {"_skip": reason, "_message": text}. Same checks as `validate.check_record` (they raise the same errors).
    """

    tokenizer: Any
    image_config: images.ImageConfig
    template: conversation.Template
    num_image_tokens: int
    image_token_id: int
    max_length: int

    def make(self, element: Mapping[str, Any]) -> dict[str, Any]:
        """Like __call__ but raises the record's error instead of returning a skip marker."""
        record = element["record"]
        sources.raise_placeholder(record)
        if not isinstance(record, dict):
            raise sources.NotAnObjectError("record is not a JSON object")
        rel = sources.image_field(record)
        image_bytes = element.get("image_bytes")
        if rel is not None:
            src = image_bytes if image_bytes is not None else sources.resolve_image_path(rel, element["roots"])
            pixels = images.load_and_preprocess(src, self.image_config)
        else:
            pixels = images.blank_image(self.image_config)
        encoded = conversation.encode(
            record,
            self.template,
            self.tokenizer,
            self.num_image_tokens,
            self.image_token_id,
            self.max_length,
            has_image=rel is not None,
        )
        return {
            "input_ids": encoded.input_ids,
            "labels": encoded.labels,
            "pixel_values": pixels,
            "has_image": rel is not None,
        }

    def __call__(self, element: Mapping[str, Any]) -> dict[str, Any]:
        try:
            return self.make(element)
        except Exception as e:  # a bad record is skipped and counted, never a crash
            reason = validate.reason_of(e)
            if reason == "internal_error":
                log.exception("unexpected error while preparing a record")
            return {SKIP_KEY: reason, "_message": f"{type(e).__name__}: {e}"[:300]}


# ------------------------------------------------------------------------------------------------ batching


def pick_bucket(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= length (buckets sorted ascending); ValueError when none holds it."""
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"sequence of {length} tokens exceeds the largest bucket {buckets[-1]}")


def collate(examples: Sequence[Mapping[str, Any]], buckets: Sequence[int], pad_id: int) -> dict[str, np.ndarray]:
    """Stacks examples, right-padding tokens to the bucket of the longest one (see module docstring)."""
    seq = pick_bucket(max(len(e["input_ids"]) for e in examples), buckets)
    n = len(examples)
    input_ids = np.full((n, seq), pad_id, np.int32)
    labels = np.full((n, seq), conversation.IGNORE_INDEX, np.int32)
    mask = np.zeros((n, seq), np.int32)
    for i, e in enumerate(examples):
        t = len(e["input_ids"])
        input_ids[i, :t] = e["input_ids"]
        labels[i, :t] = e["labels"]
        mask[i, :t] = 1
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": mask,
        "pixel_values": np.stack([e["pixel_values"] for e in examples]).astype(np.float32, copy=False),
        "has_image": np.asarray([bool(e["has_image"]) for e in examples], bool),
    }


class _BucketBatchIterator(grain.DatasetIterator):
    def __init__(self, parent, batch_size, buckets, pad_id, max_consecutive_skips):
        super().__init__(parent)
        self._batch_size = batch_size
        self._buckets = buckets
        self._pad_id = pad_id
        self._max_consecutive_skips = max_consecutive_skips

    def __next__(self) -> dict[str, Any]:
        examples: list[dict] = []
        skipped: collections.Counter = collections.Counter()
        seen = 0
        consecutive = 0
        while len(examples) < self._batch_size:
            try:
                element = next(self._parent)
            except StopIteration:
                if seen:  # end of data: the partial batch is dropped, its counts still reported
                    return {END_KEY: True, STATS_KEY: {"seen": seen, "skipped": dict(skipped)}}
                raise
            seen += 1
            if SKIP_KEY in element:
                skipped[element[SKIP_KEY]] += 1
                consecutive += 1
                log.debug("skipped record: %s (%s)", element[SKIP_KEY], element.get("_message"))
                if consecutive > self._max_consecutive_skips:
                    raise SkipCeilingExceededError(
                        f"{consecutive} records in a row were unusable (last: {element[SKIP_KEY]}: "
                        f"{element.get('_message')}); check the data with `python -m llava_jax.data.validate`"
                    )
                continue
            consecutive = 0
            examples.append(element)
        batch = collate(examples, self._buckets, self._pad_id)
        batch[STATS_KEY] = {"seen": seen, "skipped": dict(skipped)}
        return batch

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


class BucketBatch(grain.IterDataset):
    """Batches of exactly `batch_size` usable examples; skip markers are dropped and reported in `_stats`."""

    def __init__(self, parent, batch_size: int, buckets: Sequence[int], pad_id: int, max_consecutive_skips: int):
        super().__init__(parent)
        self._batch_size = batch_size
        self._buckets = tuple(sorted(int(b) for b in buckets))
        self._pad_id = int(pad_id)
        self._max_consecutive_skips = max_consecutive_skips

    def __iter__(self):
        return _BucketBatchIterator(
            self._parent.__iter__(), self._batch_size, self._buckets, self._pad_id, self._max_consecutive_skips
        )


# ------------------------------------------------------------------------------------------------ packing


def collate_packed(rows: Sequence[Sequence[Mapping[str, Any]]], length: int, max_images: int, pad_id: int,
                   image_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Packed batch (see module docstring) from rows of examples, each row's samples in order, left-aligned.

    rows: B lists of examples ({"input_ids" [t], "labels" [t], "pixel_values", "has_image"}), each list's
    total length <= `length` and image count <= `max_images`; image_shape: [H, W, 3] of an image slot.
    """
    n = len(rows)
    input_ids = np.full((n, length), pad_id, np.int32)
    labels = np.full((n, length), conversation.IGNORE_INDEX, np.int32)
    mask = np.zeros((n, length), np.int32)
    segment_ids = np.zeros((n, length), np.int32)
    positions = np.zeros((n, length), np.int32)
    pixel_values = np.zeros((n, max_images, *image_shape), np.float32)
    owner = np.zeros((n, max_images), np.int32)
    for i, row in enumerate(rows):
        at, slot = 0, 0
        for j, e in enumerate(row):
            t = len(e["input_ids"])
            if at + t > length:
                raise ValueError(f"row {i} holds {at + t} tokens, more than {length}")
            input_ids[i, at:at + t] = e["input_ids"]
            labels[i, at:at + t] = e["labels"]
            labels[i, at] = conversation.IGNORE_INDEX  # never predicted from the previous sample
            mask[i, at:at + t] = 1
            segment_ids[i, at:at + t] = j + 1
            positions[i, at:at + t] = np.arange(t, dtype=np.int32)
            if e["has_image"]:
                if slot >= max_images:
                    raise ValueError(f"row {i} holds more than {max_images} images")
                pixel_values[i, slot] = e["pixel_values"]
                owner[i, slot] = j + 1
                slot += 1
            at += t
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "segment_ids": segment_ids,
            "positions": positions, "pixel_values": pixel_values, "has_image": owner}


class _Bin:
    __slots__ = ("examples", "tokens", "images")

    def __init__(self):
        self.examples: list[dict] = []
        self.tokens = 0
        self.images = 0


class _PackBatchIterator(grain.DatasetIterator):
    """First-fit packing with exact resume.

    A pack is `rows` bins of `length` tokens / `max_images` images. It reads examples until they hold as many
    tokens as the bins (or the data ends), then places them first-fit decreasing: the examples carried over
    from the previous pack first, in their order, then the new ones longest first, each into the first bin with
    room. Examples that fit no bin are carried to the next pack (the first `rows` carried always find a bin,
    so every example is placed). The pack is emitted as rows / batch_size batches, its rows in bin order. The state names the parent's state where the pack started reading, the parent states before each
    carried example it began with, and how many of its batches were returned: `set_state` re-reads those and
    replays the pack, so the batches after a restore equal an uninterrupted run's. A pack's read / skipped
    counts ride on its first batch (carried examples count in the pack that read them).
    """

    def __init__(self, parent, batch_size, rows, length, max_images, pad_id, max_consecutive_skips):
        super().__init__(parent)
        self._batch_size, self._rows, self._length = batch_size, rows, length
        self._max_images, self._pad_id = max_images, pad_id
        self._max_consecutive_skips = max_consecutive_skips
        self._carry: list[tuple[Any, dict]] = []  # (parent state before it, example) for the next pack
        self._reset(skip_batches=0)

    def _reset(self, skip_batches: int) -> None:
        self._pack_state = self._parent.get_state()  # where the current pack started reading the parent
        self._pack_carry_states: list = [s for s, _ in self._carry]
        self._ready: list[dict] = []  # the current pack's batches not yet returned
        self._emitted = 0  # batches of the current pack already returned
        self._skip_batches = skip_batches
        self._ended = False

    def _fits(self, b: _Bin, e: Mapping[str, Any]) -> bool:
        return b.tokens + len(e["input_ids"]) <= self._length and (not e["has_image"] or b.images < self._max_images)

    def _fill(self) -> None:
        """Reads one pack and turns it into batches (self._ready)."""
        bins = [_Bin() for _ in range(self._rows)]
        seen, consecutive = 0, 0
        skipped: collections.Counter = collections.Counter()
        carried = list(self._carry)
        self._pack_carry_states = [s for s, _ in carried]
        self._pack_state = self._parent.get_state()
        fresh: list[tuple[Any, dict]] = []
        room = self._rows * self._length - sum(len(e["input_ids"]) for _, e in carried)
        ended = False
        while room > 0:  # read until the examples could fill every bin
            before = self._parent.get_state()
            try:
                element = next(self._parent)
            except StopIteration:
                ended = True
                break
            seen += 1
            if SKIP_KEY in element:
                skipped[element[SKIP_KEY]] += 1
                consecutive += 1
                if consecutive > self._max_consecutive_skips:
                    raise SkipCeilingExceededError(
                        f"{consecutive} records in a row were unusable (last: {element[SKIP_KEY]}: "
                        f"{element.get('_message')}); check the data with `python -m llava_jax.data.validate`")
                continue
            consecutive = 0
            if len(element["input_ids"]) > self._length:
                raise ValueError(f"example of {len(element['input_ids'])} tokens exceeds the row length "
                                 f"{self._length}")
            fresh.append((before, element))
            room -= len(element["input_ids"])
        # carried examples first (each of the first `rows` has an empty bin at worst), then the fresh ones
        # longest first (first-fit decreasing; a stable sort keeps arrival order among equal lengths)
        order = carried + sorted(fresh, key=lambda x: -len(x[1]["input_ids"]))
        overflow = []
        for before, element in order:
            target = next((b for b in bins if self._fits(b, element)), None)
            if target is None:
                overflow.append((before, element))
                continue
            target.examples.append(element)
            target.tokens += len(element["input_ids"])
            target.images += bool(element["has_image"])
        self._carry = overflow
        full = [b.examples for b in bins if b.examples]
        n_batches = len(full) // self._batch_size  # at the end of data a partial batch is dropped
        stats = {"seen": seen, "skipped": dict(skipped)}
        shape = next((e["pixel_values"].shape for row in full for e in row), None)
        self._ready = []
        for k in range(n_batches):
            batch = collate_packed(full[k * self._batch_size:(k + 1) * self._batch_size], self._length,
                                   self._max_images, self._pad_id, shape)
            batch[STATS_KEY] = stats if k == 0 else {"seen": 0, "skipped": {}}
            self._ready.append(batch)
        if ended and not overflow:
            self._ended = True
            if not self._ready:
                self._ready.append({END_KEY: True, STATS_KEY: stats})
        self._emitted = 0

    def __next__(self) -> dict[str, Any]:
        while True:
            if self._ready:
                batch = self._ready.pop(0)
                self._emitted += 1
                if self._skip_batches:  # replaying a pack after set_state: its first batches were returned
                    self._skip_batches -= 1
                    continue
                return batch
            if self._ended:
                raise StopIteration
            self._fill()

    def get_state(self) -> dict[str, Any]:
        if not self._ready and not self._ended:  # the pack is used up: the next one starts here
            return {"parent": self._parent.get_state(), "carry": [s for s, _ in self._carry], "emitted": 0}
        return {"parent": self._pack_state, "carry": list(self._pack_carry_states), "emitted": self._emitted}

    def set_state(self, state: dict[str, Any]) -> None:
        carry = []
        for s in state.get("carry", []):  # re-read the examples the pack began with
            self._parent.set_state(s)
            carry.append((s, next(self._parent)))
        self._parent.set_state(state["parent"])
        self._carry = carry
        self._reset(skip_batches=int(state["emitted"]))


class PackBatch(grain.IterDataset):
    """Batches of `batch_size` packed rows of `length` tokens (first-fit over `rows` bins, a multiple of
    batch_size; more bins fill rows better and hold more examples in memory); see `_PackBatchIterator`."""

    def __init__(self, parent, batch_size: int, rows: int, length: int, max_images: int, pad_id: int,
                 max_consecutive_skips: int):
        super().__init__(parent)
        if rows < batch_size or rows % batch_size:
            raise ValueError(f"pack_rows {rows} must be a positive multiple of the per-process batch {batch_size}")
        if max_images < 1:
            raise ValueError(f"max_images_per_row must be >= 1, got {max_images}")
        self._args = (batch_size, rows, int(length), int(max_images), int(pad_id), max_consecutive_skips)

    def __iter__(self):
        return _PackBatchIterator(self._parent.__iter__(), *self._args)


class TrainIterator(grain.DatasetIterator):
    """The trainer's iterator: yields batches, keeps skip counts, stops the run past the skip ceiling.

    get_state() -> {"pipeline": grain state, "seen": n, "skipped": {reason: n}} (JSON-able);
    set_state(state) restores position and counts.
    """

    def __init__(self, parent, max_skip_fraction: float, min_records_for_ceiling: int):
        super().__init__(parent)
        self.max_skip_fraction = float(max_skip_fraction)
        self.min_records_for_ceiling = int(min_records_for_ceiling)
        self.seen = 0
        self.skipped: collections.Counter = collections.Counter()

    @property
    def skip_fraction(self) -> float:
        return sum(self.skipped.values()) / self.seen if self.seen else 0.0

    def stats(self) -> dict[str, Any]:
        """{"seen": records read, "skipped": total, "skip_fraction": f, "skip_reasons": {reason: n}}."""
        return {"seen": self.seen, "skipped": sum(self.skipped.values()), "skip_fraction": self.skip_fraction,
                "skip_reasons": dict(self.skipped)}

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._parent)
        stats = batch.pop(STATS_KEY, None) or {"seen": 0, "skipped": {}}
        self.seen += int(stats["seen"])
        if stats["skipped"]:
            self.skipped.update(stats["skipped"])
            log.warning("skipped %d unusable records in this batch: %s (total %d of %d read)",
                        sum(stats["skipped"].values()), stats["skipped"], sum(self.skipped.values()), self.seen)
        if self.seen >= self.min_records_for_ceiling and self.skip_fraction > self.max_skip_fraction:
            raise SkipCeilingExceededError(
                f"{sum(self.skipped.values())} of {self.seen} records skipped ({self.skip_fraction:.2%}), above "
                f"data.max_skip_fraction={self.max_skip_fraction:.2%}; reasons: {dict(self.skipped)}. "
                "Run `python -m llava_jax.data.validate --data FILE --image-root DIR` to list them."
            )
        if batch.get(END_KEY):
            raise StopIteration
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"pipeline": self._parent.get_state(), "seen": self.seen, "skipped": dict(self.skipped)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["pipeline"])
        self.seen = int(state.get("seen", 0))
        self.skipped = collections.Counter({k: int(v) for k, v in state.get("skipped", {}).items()})

    def close(self) -> None:
        close = getattr(self._parent, "close", None)
        if close is not None:
            close()


# ------------------------------------------------------------------------------------------------ factory

DEFAULTS: dict[str, Any] = {
    "image_root": "",
    "weights": None,
    "template": "vicuna_v1",
    "system": None,
    "max_length": 2048,
    "buckets": None,
    "num_epochs": None,
    "shuffle": True,
    "num_workers": 0,
    "worker_buffer_size": 2,
    "read_threads": 8,
    "read_buffer": 64,
    "max_skip_fraction": 0.01,
    "min_records_for_ceiling": 200,
    "max_consecutive_skips": 1000,
    "packing": False,
    "pack_rows": 0,
    "max_images_per_row": 0,
}


def _cfg(cfg: Any, key: str) -> Any:
    if isinstance(cfg, Mapping):
        value = cfg.get(key, DEFAULTS.get(key))
    else:
        value = getattr(cfg, key, DEFAULTS.get(key)) if hasattr(cfg, key) else DEFAULTS.get(key)
    return value


def resolve_buckets(buckets: Sequence[int] | None, max_length: int) -> tuple[int, ...]:
    """Sorted bucket lengths, none above max_length, max_length always included."""
    chosen = sorted({int(b) for b in (buckets or ()) if 0 < int(b) <= max_length} | {int(max_length)})
    return tuple(chosen)


def build_dataset(
    cfg_data: Any,
    *,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """The record-level MapDataset (before the per-record transform): mixed, shuffled, repeated, sliced.

    Elements are source elements ({"record", "roots", "image_bytes"}). See make_train_iterator for keys.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} out of range for process_count {process_count}")
    specs = sources.parse_specs(_cfg(cfg_data, "data"), _cfg(cfg_data, "image_root"), _cfg(cfg_data, "weights"))
    num_epochs = _cfg(cfg_data, "num_epochs")
    shuffle = bool(_cfg(cfg_data, "shuffle"))
    parts = []
    for i, spec in enumerate(specs):
        src = sources.open_source(spec, seed=seed)
        if len(src) == 0:
            raise sources.DataFileError(f"dataset {spec.path} has no records")
        ds = grain.MapDataset.source(src)
        if shuffle:
            ds = ds.shuffle(seed=(seed + 7919 * i) % 2**32)
        parts.append(ds)
    if len(parts) == 1:
        ds = parts[0].repeat(num_epochs) if num_epochs != 1 else parts[0]
    else:
        # Each part repeats (and reshuffles) forever; an "epoch" of the mixture is as many records as all
        # parts hold together, drawn in proportion to the weights.
        total = sum(len(p) for p in parts)
        ds = grain.MapDataset.mix([p.repeat(None) for p in parts], [s.weight for s in specs])
        if num_epochs is not None:
            ds = ds[: int(num_epochs) * total]
    if process_count > 1:
        ds = ds[process_index::process_count]
    return ds


def make_train_iterator(
    cfg_data: Any,
    tokenizer,
    image_config: images.ImageConfig,
    num_image_tokens: int,
    image_token_id: int,
    global_batch: int,
    process_index: int | None = None,
    process_count: int | None = None,
    seed: int = 0,
) -> TrainIterator:
    """The training batch iterator of this process (per-process batch = global_batch / process_count).

    process_index / process_count default to jax.process_index() / jax.process_count(); every process must
    pass the same `seed` so their slices of each shuffled epoch are disjoint and cover the data.

    cfg_data (ConfigDict or dict) keys, defaults in DEFAULTS:
      data: path, comma-separated paths, or list of {"path", "image_root(s)", "weight"}; a .json/.jsonl file
        (LLaVA layout), a MiniGPT-4 cc_sbu_align dir or filter_cap.json, or an ArrayRecord dir from `build`.
      image_root: image root(s) for entries that name none (str, comma-separated, or list).
      weights: mixture weights, one per dataset (None: each entry's weight, default 1).
      template: conversation template name (conversation.template_names()); system: override its system text.
      max_length: token limit per sample; buckets: padded lengths (max_length always added).
      num_epochs: None = repeat forever; shuffle: reshuffle each epoch with `seed`. For a mixture an epoch is
        as many records as all its datasets hold together.
      num_workers: grain mp_prefetch worker processes (0 = in-process); worker_buffer_size: batches per worker.
      read_threads / read_buffer: threads and buffer of the in-process reader.
      max_skip_fraction: stop with SkipCeilingExceededError when more records than this fraction are unusable
        (checked once min_records_for_ceiling records were read); max_consecutive_skips: same, for a run of bad
        records in a row.
      packing: pack several samples per row of max_length (first-fit; buckets are then unused); pack_rows: rows
        packed together (0 = the per-process batch; a multiple of it); max_images_per_row: image slots per
        packed row (0 = max(1, max_length // num_image_tokens)).
    """
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if global_batch % process_count:
        raise ValueError(f"global_batch {global_batch} is not divisible by process_count {process_count}")
    batch_size = global_batch // process_count
    max_length = int(_cfg(cfg_data, "max_length"))
    buckets = resolve_buckets(_cfg(cfg_data, "buckets"), max_length)
    template = conversation.get_template(_cfg(cfg_data, "template"), system=_cfg(cfg_data, "system"))
    maker = ExampleMaker(tokenizer, image_config, template, int(num_image_tokens), int(image_token_id), max_length)
    ds = build_dataset(cfg_data, seed=seed, process_index=process_index, process_count=process_count)
    ds = ds.map(maker)
    read = grain.ReadOptions(num_threads=int(_cfg(cfg_data, "read_threads")),
                             prefetch_buffer_size=int(_cfg(cfg_data, "read_buffer")))
    it_ds = ds.to_iter_dataset(read)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if _cfg(cfg_data, "packing"):
        rows = int(_cfg(cfg_data, "pack_rows") or 0) or batch_size
        max_images = int(_cfg(cfg_data, "max_images_per_row") or 0) or max(1, max_length // int(num_image_tokens))
        it_ds = PackBatch(it_ds, batch_size, rows, max_length, max_images, pad_id,
                          int(_cfg(cfg_data, "max_consecutive_skips")))
    else:
        it_ds = BucketBatch(it_ds, batch_size, buckets, pad_id, int(_cfg(cfg_data, "max_consecutive_skips")))
    workers = int(_cfg(cfg_data, "num_workers"))
    if workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # library use without absl.app: grain's workers read its flags
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers,
                                         per_worker_buffer_size=int(_cfg(cfg_data, "worker_buffer_size")))
        )
    return TrainIterator(iter(it_ds), float(_cfg(cfg_data, "max_skip_fraction")),
                         int(_cfg(cfg_data, "min_records_for_ceiling")))
