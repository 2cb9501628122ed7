"""Stage-1 data: image-caption pairs -> single-turn LLaVA records with a brief-description instruction.

    python -m data_gen.captions --captions captions_train2017.json --out stage1.json [--seed S] [--all-captions]
    python -m data_gen.captions --captions pairs.tsv --out stage1.json        # two columns: image, caption

Input: a COCO captions JSON, or a two-column file (.tsv tab-separated, .csv comma-separated; an optional header row
whose first cell is "image", "file_name", "filename" or "path" is skipped). Output (atomic): a JSON list in the
layout of LLaVA's CC3M-595K chat.json: {"id", "image", "conversations": [{"from": "human", "value": <instruction
with "<image>" before or after it>}, {"from": "gpt", "value": <caption>}]}. The instruction comes from our own list
of brief-description phrasings (data_gen/prompts/brief_questions.txt); it and the side of "<image>" are drawn
from a generator seeded by (seed, image, caption index). COCO images have several captions: by default one is
drawn per image; --all-captions makes one record per caption. Rows without an image or caption are skipped and
counted in the log.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_gen import prompts
from data_gen.context import load_contexts
from llava_jax import cli
from llava_jax.io import atomic_write_json

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
_HEADER_NAMES = {"image", "file_name", "filename", "path", "image_path"}


class CaptionInputError(ValueError):
    """The captions file is neither COCO captions JSON nor a two-column table."""


def read_pairs(path: str | os.PathLike, all_captions: bool = False, seed: int = 0
               ) -> tuple[list[tuple[str, str, int]], Counter]:
    """[(image, caption, caption index)] from COCO JSON or a two-column file, and skip counts by reason."""
    from llava_jax.io import as_path

    path = as_path(path)  # local or gs://
    skipped: Counter = Counter()
    if path.suffix.lower() == ".json":
        contexts, skipped = load_contexts(path)
        pairs = []
        for context in contexts:
            if all_captions:
                pairs += [(context.file_name, c, i) for i, c in enumerate(context.captions)]
            else:
                index = random.Random(f"{seed}|{context.file_name}|pick").randrange(len(context.captions))
                pairs.append((context.file_name, context.captions[index], index))
        return pairs, skipped
    if path.suffix.lower() not in (".tsv", ".csv", ".txt"):
        raise CaptionInputError(f"{path}: expected COCO captions .json or a two-column .tsv/.csv file")
    delimiter = "," if path.suffix.lower() == ".csv" else "\t"
    pairs = []
    with io.StringIO(path.read_bytes().decode("utf-8"), newline="") as f:  # as open(newline=""), for gs:// too
        for row_number, row in enumerate(csv.reader(f, delimiter=delimiter)):
            if row_number == 0 and row and row[0].strip().lower() in _HEADER_NAMES:
                continue
            if not row or not any(cell.strip() for cell in row):
                continue
            if len(row) != 2:
                skipped["wrong_column_count"] += 1
                continue
            image, caption = row[0].strip(), " ".join(row[1].split())
            if not image or not caption:
                skipped["empty_image_or_caption"] += 1
                continue
            pairs.append((image, caption, 0))
    if not pairs:
        raise CaptionInputError(f"{path}: no usable image-caption rows ({dict(skipped)})")
    return pairs, skipped


def make_record(image: str, caption: str, index: int, seed: int, with_index: bool) -> dict[str, Any]:
    """One CC3M-style single-turn record."""
    rng = random.Random(f"{seed}|{image}|{index}")
    instruction = rng.choice(prompts.brief_questions())
    human = f"{instruction}\n{IMAGE_TOKEN}" if rng.random() < 0.5 else f"{IMAGE_TOKEN}\n{instruction}"
    stem = Path(image).with_suffix("").as_posix().replace("/", "_")
    return {
        "id": f"{stem}_{index}" if with_index else stem,
        "image": image,
        "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": caption}],
    }


def build(captions: str | os.PathLike, out: str | os.PathLike, seed: int = 0, all_captions: bool = False
          ) -> dict[str, Any]:
    """Writes the stage-1 records; returns {"records": n, "skipped": {...}}."""
    pairs, skipped = read_pairs(captions, all_captions=all_captions, seed=seed)
    records = [make_record(image, caption, index, seed, all_captions) for image, caption, index in pairs]
    atomic_write_json(out, records, indent=None)
    if skipped:
        log.warning("skipped %s", dict(skipped))
    log.info("wrote %d records to %s", len(records), out)
    return {"records": len(records), "skipped": dict(skipped)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captions", required=True, help="COCO captions JSON or a two-column .tsv/.csv")
    parser.add_argument("--out", required=True, help="output JSON (CC3M chat.json layout)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--all-captions", action="store_true", help="one record per caption, not per image")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    build(args.captions, args.out, seed=args.seed, all_captions=args.all_captions)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
