"""The benchmark suite: which benchmarks `python -m llava_jax.eval.suite` runs and where their data lives.

    python -m llava_jax.data.synthetic --benchmarks runs/benchmarks      # the bundled synthetic layouts
    python -m llava_jax.eval.suite --model stage1=runs/demo/stage1 --model stage2=runs/demo/stage2 \
        --suite configs/eval_suite.py:runs/benchmarks --out runs/suite

The argument is the data root (default runs/benchmarks), optionally followed by ",bare": then the questions
go without the answer-format instruction LLaVA-1.5 appends ("Answer the question using a single word or
phrase.", VSR's "Answer with true or false."), for models never taught it -- the demo's. Every benchmark reads its public layout from
ROOT/<folder> (the names below); one whose files are absent is skipped and listed in the table. The synthetic
writer fills captioning, vsr, mme, gqa, mmbench and ehub (counting, multi-class identification); put the real
sets in the same places (Flickr30k / NoCaps as COCO caption JSON, MME_Benchmark_release_version's folders
under mme/, ...) to run them. Entry fields: llava_jax/eval/benchmarks.py.
"""

from __future__ import annotations

import os

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The suite config for `arg` = "ROOT[,bare]" (default runs/benchmarks)."""
    root, _, variant = (arg or "runs/benchmarks").partition(",")
    if variant not in ("", "bare"):
        raise ValueError(f"unknown suite variant {variant!r} (known: bare)")

    def p(*parts: str) -> str:
        return os.path.join(root, *parts)

    def captions(folder: str) -> dict:
        return {"kind": "captioning", "annotations": p(folder, "captions.json"), "image_root": p(folder, "images")}

    benchmarks = {
        "coco_caption": captions("captioning"),
        "flickr30k": captions("flickr30k"),
        "nocaps": captions("nocaps"),
        "vsr": {"kind": "vsr", "data": p("vsr", "test.jsonl"), "image_root": p("vsr", "images")},
        "mme": {"kind": "mme", "data_dir": p("mme")},
        "textvqa": {"kind": "textvqa", "annotations": p("textvqa", "TextVQA_0.5.1_val.json"),
                    "image_root": p("textvqa", "train_images")},
        "gqa": {"kind": "gqa", "questions": p("gqa", "testdev_balanced_questions.json"),
                "image_root": p("gqa", "images")},
        "mmbench": {"kind": "mmbench", "tsv": p("mmbench", "mmbench_dev.tsv")},
        "counting": {"kind": "ehub", "questions": p("ehub", "counting.jsonl"), "image_root": p("ehub", "images")},
        "multiclass": {"kind": "ehub", "questions": p("ehub", "multiclass.jsonl"), "image_root": p("ehub", "images")},
        "okvqa": {"kind": "vqa", "questions": p("okvqa", "questions.jsonl"),
                  "annotations": p("okvqa", "mscoco_val2014_annotations.json"), "image_root": p("okvqa", "images")},
        "pope": {"kind": "pope", "questions": p("pope", "llava_pope_test.jsonl"),
                 "labels": [p("pope", f"coco_pope_{s}.json") for s in ("random", "popular", "adversarial")],
                 "image_root": p("pope", "val2014")},
        "scienceqa": {"kind": "scienceqa", "data_dir": p("scienceqa")},
    }
    if variant == "bare":
        for entry in benchmarks.values():
            if entry["kind"] in ("mme", "textvqa", "gqa", "ehub", "vqa", "pope", "vsr"):
                entry["instruction"] = ""
    config = ml_collections.ConfigDict()
    config.benchmarks = benchmarks
    config.predict = {"batch_size": 8, "dtype": "auto", "template": ""}
    return config
