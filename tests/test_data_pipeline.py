"""Grain pipeline: fixed-shape batches, exact resume, per-process slices, skips, ArrayRecord parity."""

import collections
import json

import numpy as np
import pytest

from llava_jax.data import build, images, pipeline, sources, synthetic
from llava_jax.data.conversation import IGNORE_INDEX
from llava_jax.tiny import build_tokenizer

N_IMG = 4
IMAGE_CFG = images.ImageConfig(size=16, crop_size=16)


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    synthetic.generate(out, num=24, seed=3, num_eval=5, image_size=32)
    return out


@pytest.fixture(scope="module")
def tok(syn):
    recs = json.loads((syn / "stage2.json").read_text()) + json.loads((syn / "stage1.json").read_text())
    return build_tokenizer([t["value"] for r in recs for t in r["conversations"]], vocab_size=300)


def _cfg(syn, **kw):
    cfg = {"data": str(syn / "stage2.json"), "image_root": str(syn / "images"), "template": "vicuna_v1",
           "system": "", "max_length": 96, "buckets": [48, 64], "read_threads": 2}
    cfg.update(kw)
    return cfg


def _iter(syn, tok, batch=4, seed=0, pi=0, pc=1, **kw):
    return pipeline.make_train_iterator(_cfg(syn, **kw), tok, IMAGE_CFG, N_IMG, tok.convert_tokens_to_ids("<image>"),
                                        batch, pi, pc, seed)


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_batches_have_fixed_bucketed_shapes_and_consistent_masks(syn, tok):
    it = _iter(syn, tok)
    img_id = tok.convert_tokens_to_ids("<image>")
    for _ in range(8):
        b = next(it)
        bsz, t = b["input_ids"].shape
        assert bsz == 4 and t in (48, 64, 96)
        assert b["labels"].shape == b["attention_mask"].shape == (4, t)
        assert b["pixel_values"].shape == (4, 16, 16, 3) and b["pixel_values"].dtype == np.float32
        assert b["has_image"].dtype == bool and b["has_image"].all()
        assert b["input_ids"].dtype == np.int32 and b["labels"].dtype == np.int32
        assert np.all(b["labels"][b["attention_mask"] == 0] == IGNORE_INDEX)
        assert np.all(b["input_ids"][b["attention_mask"] == 0] == tok.pad_token_id)
        assert np.all((b["input_ids"] == img_id).sum(1) == N_IMG)
        lengths = b["attention_mask"].sum(1)
        assert lengths.max() > {48: 0, 64: 48, 96: 64}[t]  # smallest bucket that fits
        sup = b["labels"] != IGNORE_INDEX
        assert np.array_equal(b["labels"][sup], b["input_ids"][sup])


def test_resume_gives_exactly_the_uninterrupted_batches(syn, tok):
    reference = _iter(syn, tok, seed=5)
    states, batches = [], []
    for _ in range(14):  # 24 records / 4 per batch: crosses two epoch boundaries
        states.append(json.loads(json.dumps(reference.get_state())))  # survives a JSON round trip
        batches.append(next(reference))
    for k in (0, 3, 6, 11):
        resumed = _iter(syn, tok, seed=5)
        resumed.set_state(states[k])
        for j in range(k, 14):
            assert _same(next(resumed), batches[j]), (k, j)


def test_each_epoch_is_a_new_permutation(syn):
    ds = pipeline.build_dataset(_cfg(syn), seed=1)
    n = len(json.loads((syn / "stage2.json").read_text()))
    ids = [ds[i]["record"]["id"] for i in range(3 * n)]
    epochs = [ids[e * n:(e + 1) * n] for e in range(3)]
    assert all(sorted(e) == sorted(epochs[0]) and len(set(e)) == n for e in epochs)
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    again = pipeline.build_dataset(_cfg(syn), seed=1)
    assert [again[i]["record"]["id"] for i in range(n)] == epochs[0]
    other = pipeline.build_dataset(_cfg(syn), seed=2)
    assert [other[i]["record"]["id"] for i in range(n)] != epochs[0]


def test_two_processes_get_disjoint_slices_that_cover_the_data(syn, tok):
    n = len(json.loads((syn / "stage2.json").read_text()))
    seen = []
    for pi in range(2):
        ds = pipeline.build_dataset(_cfg(syn, num_epochs=1), seed=0, process_index=pi, process_count=2)
        seen.append([ds[i]["record"]["id"] for i in range(len(ds))])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(r["id"] for r in json.loads((syn / "stage2.json").read_text()))
    assert len(seen[0]) == len(seen[1]) == n // 2
    a = next(_iter(syn, tok, batch=4, pi=0, pc=2))
    b = next(_iter(syn, tok, batch=4, pi=1, pc=2))
    assert a["input_ids"].shape[0] == b["input_ids"].shape[0] == 2
    assert not np.array_equal(a["pixel_values"], b["pixel_values"])


def test_bad_records_are_skipped_counted_and_capped(syn, tok, tmp_path):
    recs = json.loads((syn / "stage2.json").read_text())
    bad = [dict(recs[0], image="missing.jpg"), dict(recs[1], conversations=[]),
           dict(recs[2], image="../x.jpg")]
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps(recs[:9] + bad))
    it = _iter(syn, tok, batch=3, data=str(data), num_epochs=1, max_skip_fraction=0.5)
    batches = list(it)
    assert len(batches) == 3 and all(b["input_ids"].shape[0] == 3 for b in batches)
    assert it.stats()["seen"] == 12 and it.stats()["skipped"] == 3
    short = _iter(syn, tok, batch=5, data=str(data), num_epochs=1, max_skip_fraction=0.5)
    assert len(list(short)) == 1  # the partial second batch is dropped, its skips still counted
    assert short.stats()["seen"] == 12 and short.stats()["skipped"] == 3
    assert it.stats()["skip_reasons"] == {"missing_image_file": 1, "no_turns": 1, "image_path_escapes_root": 1}
    capped = _iter(syn, tok, batch=3, data=str(data), num_epochs=1, max_skip_fraction=0.1, min_records_for_ceiling=1)
    with pytest.raises(pipeline.SkipCeilingExceededError, match="max_skip_fraction"):
        list(capped)
    data.write_text(json.dumps(bad * 4))
    with pytest.raises(pipeline.SkipCeilingExceededError, match="in a row"):
        next(_iter(syn, tok, batch=3, data=str(data), max_consecutive_skips=5))


def test_json_and_arrayrecord_give_identical_batches(syn, tok, tmp_path):
    result = build.build(str(syn / "stage2.json"), [str(syn / "images")], str(tmp_path / "ar"))
    assert result["written"] == 24 and result["skipped"] == {}
    src = sources.ArrayRecordSource(tmp_path / "ar")
    assert [src[i]["record"]["id"] for i in range(3)] == [r["id"] for r in json.loads(
        (syn / "stage2.json").read_text())[:3]]
    from_json = _iter(syn, tok, seed=9)
    from_ar = _iter(syn, tok, seed=9, data=str(tmp_path / "ar"), image_root="")
    for _ in range(7):
        assert _same(next(from_json), next(from_ar))


def test_mixture_follows_weights_and_minigpt4_source(syn, tok):
    cfg = _cfg(syn, data=[{"path": str(syn / "stage2.json"), "image_root": str(syn / "images")},
                          {"path": str(syn / "cc_sbu_align")}], weights=[3, 1])
    ds = pipeline.build_dataset(cfg, seed=0)
    kinds = collections.Counter(ds[i]["record"]["image"].startswith("image/") for i in range(400))
    assert 80 <= kinds[True] <= 120  # a quarter from MiniGPT-4
    assert len(pipeline.build_dataset(dict(cfg, num_epochs=1), seed=0)) == 24 + 24
    b = next(pipeline.make_train_iterator(cfg, tok, IMAGE_CFG, N_IMG, tok.convert_tokens_to_ids("<image>"), 4))
    assert b["input_ids"].shape[0] == 4


def test_text_only_records_get_a_blank_image_and_false_flag(syn, tok, tmp_path):
    data = tmp_path / "text.jsonl"
    data.write_text("\n".join(json.dumps({"id": i, "conversations": [
        {"from": "human", "value": "Say a colour."}, {"from": "gpt", "value": "red"}]}) for i in range(4)))
    b = next(_iter(syn, tok, data=str(data)))
    assert not b["has_image"].any() and np.all(b["pixel_values"] == 0)
    assert np.all((b["input_ids"] == tok.convert_tokens_to_ids("<image>")).sum(1) == 0)


def test_llava_layouts_with_several_roots_and_configdict(tmp_path, tok):
    """CC3M chat.json (marker after text), blip_laion 558k (sub-folders), mix665k (source prefixes, text-only)."""
    import ml_collections
    from PIL import Image

    a, b = tmp_path / "root_a", tmp_path / "root_b"
    for p in (a / "00453", b / "coco" / "train2017", b / "gqa" / "images"):
        p.mkdir(parents=True)
    Image.new("RGB", (30, 20), (255, 0, 0)).save(a / "GCC_train_0001.jpg")
    Image.new("RGB", (20, 30), (0, 255, 0)).save(a / "00453" / "004539375.jpg")
    Image.new("RGB", (25, 25), (0, 0, 255)).save(b / "coco" / "train2017" / "000000033471.jpg")
    Image.new("L", (25, 15), 128).save(b / "gqa" / "images" / "2354786.jpg")
    recs = [
        {"id": "GCC_train_0001", "image": "GCC_train_0001.jpg", "conversations": [
            {"from": "human", "value": "Describe the image briefly.\n<image>"}, {"from": "gpt", "value": "red"}]},
        {"id": "004539375", "image": "00453/004539375.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWrite a caption."}, {"from": "gpt", "value": "green"}]},
        {"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "blue"},
            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "yes"}]},
        {"id": 2354786, "image": "gqa/images/2354786.jpg", "conversations": [
            {"from": "human", "value": "<image>\nGrey?"}, {"from": "gpt", "value": "yes"}]},
        {"id": "i6IyJda_0", "model": "", "conversations": [
            {"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi there"}]},
    ]
    data = tmp_path / "mix.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    cfg = ml_collections.ConfigDict({"data": str(data), "image_root": f"{a},{b}", "template": "vicuna_v1",
                                     "system": "", "max_length": 128, "num_epochs": 1, "shuffle": False, "read_threads": 1})
    it = pipeline.make_train_iterator(cfg, tok, IMAGE_CFG, N_IMG, tok.convert_tokens_to_ids("<image>"), 5)
    batch = next(it)
    assert it.stats()["skipped"] == 0
    assert batch["has_image"].tolist() == [True, True, True, True, False]
    red = images.normalize_uint8(np.array([[[255, 0, 0]]], np.uint8), IMAGE_CFG.mean, IMAGE_CFG.std)[0, 0]
    np.testing.assert_allclose(batch["pixel_values"][0, 8, 8], red, atol=0.05)  # JPEG-compressed red
