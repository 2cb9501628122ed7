"""Pack a LLaVA JSON dataset and its image folder into ArrayRecord shards (a TFDS dataset).

    python -m llava_jax.data.build --data FILE --image-root DIR --out DIR [--check-images] [--overwrite]

Each example holds the record as JSON text and the image file's original bytes (decoded later, exactly as from
the folder), so the pipeline gives identical batches from JSON + folder and from the shards. Records are
written in file order (TFDS shuffling disabled; the pipeline shuffles). Records that fail the record checks
(unparseable line, bad or missing image path, bad conversation; with --check-images also undecodable images)
are left out and counted. Read back with `sources.ArrayRecordSource(DIR)` (`tfds.data_source` underneath;
TensorFlow is not needed).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import sys
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds

from llava_jax import cli
from llava_jax.data import sources, validate

log = logging.getLogger(__name__)


class LlavaRecords(tfds.core.GeneratorBasedBuilder):
    """LLaVA records with their image bytes, one split ('train')."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "record JSON + raw image bytes"}

    def __init__(self, *, data_path: str, image_roots: Sequence[str], check_images: bool = False,
                 seed: int = 0, **kwargs):
        self._data_path = data_path
        self._image_roots = tuple(image_roots)
        self._check_images = check_images
        self._seed = seed
        self.skipped: collections.Counter = collections.Counter()
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="LLaVA-format records (JSON text) with raw image bytes (empty for text-only records).",
            features=tfds.features.FeaturesDict(
                {
                    "record": tfds.features.Text(),
                    "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                }
            ),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        records = sources.load_records(self._data_path, seed=self._seed)
        width = len(str(len(records)))
        for index, record in enumerate(records):
            try:
                validate.check_record(record, self._image_roots, check_image=self._check_images)
                rel = sources.image_field(record)
                data = b""
                if rel is not None:
                    with open(sources.resolve_image_path(rel, self._image_roots), "rb") as f:
                        data = f.read()
            except Exception as e:  # left out and counted, like the training pipeline does
                self.skipped[validate.reason_of(e)] += 1
                continue
            yield str(index).zfill(width), {"record": json.dumps(record, ensure_ascii=False), "image": data}


def build(data: str, image_roots: Sequence[str], out: str, *, check_images: bool = False, seed: int = 0,
          overwrite: bool = False) -> dict:
    """Builds the shards under `out`; returns {"path", "written", "skipped": {reason: n}}.

    An existing build in `out` is kept (TFDS reuses it) unless `overwrite`.
    """
    builder = LlavaRecords(data_path=data, image_roots=image_roots, check_images=check_images, seed=seed,
                           data_dir=out, file_format="array_record")
    mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
    written = builder.info.splits["train"].num_examples
    return {"path": os.fspath(builder.data_dir), "written": int(written), "skipped": dict(builder.skipped)}


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (see module docstring)."""
    p = cli.ArgumentParser(prog="python -m llava_jax.data.build", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="LLaVA JSON / JSONL or MiniGPT-4 filter_cap.json")
    p.add_argument("--image-root", action="append", default=[], help="image root (repeat or comma-separate)")
    p.add_argument("--out", required=True, help="output directory (TFDS data_dir)")
    p.add_argument("--check-images", action="store_true", help="decode every image and leave out bad ones")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="rebuild even if OUT already holds a build")
    args = p.parse_args(argv)
    roots = [r.strip() for item in args.image_root for r in item.split(",") if r.strip()]
    if not roots and args.data.endswith("filter_cap.json"):
        roots = [os.path.dirname(os.path.abspath(args.data))]
    if not os.path.isfile(args.data):
        p.error(f"--data {args.data}: no such file")
    for root in roots:
        if not os.path.isdir(root):
            p.error(f"--image-root {root}: no such directory")
    result = build(args.data, roots, args.out, check_images=args.check_images, seed=args.seed,
                   overwrite=args.overwrite)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
