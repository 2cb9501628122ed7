"""data_gen.captions: stage-1 single-turn records in the CC3M chat.json layout."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from data_gen import prompts
from data_gen.captions import CaptionInputError, build, read_pairs

ROOT = Path(__file__).resolve().parents[1]


def coco_captions(tmp_path, n_images=40, per_image=3):
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 64, "height": 48} for i in range(n_images)]
    anns = [{"image_id": i, "caption": f"caption {k} of image {i}"} for i in range(n_images) for k in range(per_image)]
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return path


def check_record(record):
    human, gpt = record["conversations"]
    assert human["from"] == "human" and gpt["from"] == "gpt"
    assert human["value"].count("<image>") == 1
    instruction = human["value"].replace("<image>", "").strip()
    assert instruction in prompts.brief_questions()
    return human["value"].startswith("<image>"), instruction


def test_coco_one_record_per_image_seeded(tmp_path):
    path = coco_captions(tmp_path)
    out = tmp_path / "stage1.json"
    assert build(path, out, seed=3) == {"records": 40, "skipped": {}}
    records = json.loads(out.read_text())
    assert [r["id"] for r in records] == [f"{i:012d}" for i in range(40)]
    sides = Counter()
    instructions = set()
    for i, record in enumerate(records):
        assert record["image"] == f"{i:012d}.jpg"
        assert record["conversations"][1]["value"].endswith(f"of image {i}")
        before, instruction = check_record(record)
        sides[before] += 1
        instructions.add(instruction)
    assert sides[True] >= 5 and sides[False] >= 5 and len(instructions) >= 6
    build(path, tmp_path / "again.json", seed=3)
    assert json.loads((tmp_path / "again.json").read_text()) == records
    build(path, tmp_path / "other.json", seed=4)
    assert json.loads((tmp_path / "other.json").read_text()) != records


def test_all_captions_and_two_column_files(tmp_path):
    records_path = tmp_path / "all.json"
    build(coco_captions(tmp_path, n_images=2, per_image=3), records_path, all_captions=True)
    records = json.loads(records_path.read_text())
    assert [r["id"] for r in records] == [f"{i:012d}_{k}" for i in range(2) for k in range(3)]

    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("image\tcaption\n00453/004539375.jpg\ta red  bus\n\nbad-row-without-caption\n"
                   "00001/1.jpg\t \n00002/2.jpg\ta cat\n")
    pairs, skipped = read_pairs(tsv)
    assert pairs == [("00453/004539375.jpg", "a red bus", 0), ("00002/2.jpg", "a cat", 0)]
    assert skipped == {"wrong_column_count": 1, "empty_image_or_caption": 1}
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text('a.jpg,"a dog, running"\n')
    build(csv_path, tmp_path / "csv.json")
    (record,) = json.loads((tmp_path / "csv.json").read_text())
    assert record["id"] == "a" and record["conversations"][1]["value"] == "a dog, running"
    check_record(record)


def test_bad_inputs_raise(tmp_path):
    (tmp_path / "x.parquet").write_text("")
    with pytest.raises(CaptionInputError, match="two-column"):
        read_pairs(tmp_path / "x.parquet")
    (tmp_path / "empty.tsv").write_text("only-one-column\n")
    with pytest.raises(CaptionInputError, match="no usable"):
        read_pairs(tmp_path / "empty.tsv")


def test_cli(tmp_path):
    out = tmp_path / "cli.json"
    subprocess.run([sys.executable, "-m", "data_gen.captions", "--captions", str(coco_captions(tmp_path, 3)),
                    "--out", str(out)], check=True, cwd=ROOT, capture_output=True)
    assert len(json.loads(out.read_text())) == 3
