"""Unit tests of the selector's parts that need no model: allocation, normalisation, length, clustering, records,
caching."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from selection import allocate
from selection.cache import ScoreCache
from selection.cluster import ClusteringError, cluster_embeddings, relabel_by_size
from selection.combine import combine, normalise
from selection.records import InputFormatError, load_dataset, write_subset
from selection.scores import Failure, LengthScorer, compute_scores, distinct_sentences, split_sentences

# ------------------------------------------------------------------------------------------------ allocation


@pytest.mark.parametrize("alpha", [0, 1, 7, 10, 33, 100])
def test_shares_sum_to_alpha_and_are_proportional(alpha):
    sizes = np.array([50, 30, 15, 4, 1])
    shares = allocate.proportional_shares(sizes, sizes, alpha)
    assert shares.sum() == alpha
    exact = alpha * sizes / sizes.sum()
    assert np.all(shares >= np.floor(exact)) and np.all(shares <= np.ceil(exact))


def test_shares_largest_remainder_and_tie_to_lower_index():
    # 10 * [1/3, 1/3, 1/3] = 3.33 each: the one leftover goes to cluster 0.
    assert allocate.proportional_shares(np.array([5, 5, 5]), np.array([5, 5, 5]), 10).tolist() == [4, 3, 3]
    # 5 * [0.55, 0.3, 0.15] = 2.75, 1.5, 0.75 -> floors 2, 1, 0; leftovers to 0.75 and 0.75 (index 0 first).
    assert allocate.proportional_shares(np.array([55, 30, 15]), np.array([55, 30, 15]), 5).tolist() == [3, 1, 1]


def test_shares_respect_capacity_and_redistribute():
    shares = allocate.proportional_shares(np.array([80, 20]), np.array([3, 20]), 10)
    assert shares.tolist() == [3, 7]
    with pytest.raises(allocate.BudgetError, match="exceeds"):
        allocate.proportional_shares(np.array([5, 5]), np.array([2, 2]), 5)


def test_select_by_clusters_takes_best_with_key_tiebreak():
    keys = ["e", "d", "c", "b", "a", "f"]
    final = np.array([1.0, 5.0, 5.0, 2.0, 0.5, 9.0])
    labels = np.array([0, 0, 0, 1, 1, -1])
    eligible = np.ones(6, bool)
    selected, table = allocate.select_by_clusters(keys, final, labels, eligible, 3)
    # Cluster 0 (3 of 5 examples) gets 2: scores 5.0 tie between "d" (1) and "c" (2) -> both; cluster 1 gets 1: "b".
    assert selected == [1, 2, 3]
    assert table[0]["allocated"] == 2 and table[1]["allocated"] == 1
    assert 5 not in selected  # label -1 is never selected
    selected, _ = allocate.select_by_clusters(keys, final, labels, eligible, 1)
    assert selected == [2]  # one slot in cluster 0; the 5.0 tie goes to key "c" < "d"


def test_select_random_is_seeded():
    eligible = np.ones(50, bool)
    eligible[:10] = False
    a = allocate.select_random(eligible, 12, seed=3)
    assert a == allocate.select_random(eligible, 12, seed=3)
    assert a != allocate.select_random(eligible, 12, seed=4)
    assert len(set(a)) == 12 and min(a) >= 10


# ------------------------------------------------------------------------------------------------ normalisation


def test_normalisations_keep_nan_and_scale():
    x = np.array([1.0, 3.0, np.nan, 5.0, 3.0])
    mm = normalise(x, "minmax")
    assert np.isnan(mm[2]) and mm[0] == 0 and mm[3] == 1 and mm[1] == pytest.approx(0.5)
    z = normalise(x, "zscore")
    assert np.nanmean(z) == pytest.approx(0.0) and np.nanstd(z) == pytest.approx(1.0)
    r = normalise(x, "rank")
    assert r[0] == 0 and r[3] == 1 and r[1] == r[4] == pytest.approx(0.5)
    assert np.array_equal(normalise(x, "raw"), x, equal_nan=True)
    assert np.all(normalise(np.array([2.0, 2.0]), "minmax") == 0)
    with pytest.raises(ValueError, match="normalisation"):
        normalise(x, "softmax")


def test_average_ranks_match_scipy():
    from scipy.stats import rankdata

    from selection.combine import average_ranks

    x = np.random.default_rng(0).integers(0, 6, size=40).astype(float)
    assert np.allclose(average_ranks(x), rankdata(x) - 1)


def test_combine_weights_and_not_applicable():
    raw = {"clip": np.array([10.0, 20.0, np.nan]), "length": np.array([1.0, 3.0, 2.0])}
    out = combine(raw, {"clip": 2.0, "length": 1.0}, "minmax", not_applicable={"clip": np.array([0, 0, 1], bool)})
    assert out.final.tolist() == pytest.approx([0.0, 3.0, 0.5])
    failed = combine(raw, {"clip": 1.0, "length": 1.0}, "minmax")
    assert np.isnan(failed.final[2])  # a failed weighted score is never filled in
    zero = combine(raw, {"clip": 0.0, "length": 1.0}, "minmax")
    assert zero.final.tolist() == pytest.approx([0.0, 1.0, 0.5]) and zero.weights == {"length": 1.0}
    with pytest.raises(KeyError):
        combine(raw, {"gpt": 1.0}, "minmax")


# ------------------------------------------------------------------------------------------------ length


def test_split_and_distinct_sentences():
    text = "A dog runs. A cat sits!\nIs it raining? a dog runs."
    assert split_sentences(text) == ["A dog runs.", "A cat sits!", "Is it raining?", "a dog runs."]
    assert distinct_sentences(text) == ["A dog runs.", "A cat sits!", "Is it raining?"]


def _ex(key, answer, image="x.jpg", instruction="Describe this image in detail."):
    from selection.records import Example

    return Example(0, key, image, instruction, answer)


def test_length_ranks_planted_low_quality_below_intact():
    intact = "A red bus waits at a stop. Two people board it while a cyclist passes on the left."
    planted = [_ex("empty", ""), _ex("truncated", intact[:25]),
               _ex("repeated", "A red bus waits at a stop. " * 6)]
    scores = LengthScorer().score([_ex("intact", intact), *planted])
    assert all(scores[0] > s for s in scores[1:])
    assert LengthScorer(dedupe_sentences=False).score([_ex("r", "Hi. Hi.")]) == [7.0]
    assert LengthScorer(unit="words").score([_ex("w", "one two  three")]) == [3.0]
    with pytest.raises(ValueError, match="tokenizer_dir"):
        LengthScorer(unit="tokens")


# ------------------------------------------------------------------------------------------------ caching


class CountingScorer:
    name = "counting"

    def __init__(self, version=1):
        self.calls: list[str] = []
        self.version = version

    def settings(self):
        return {"version": self.version}

    def score(self, examples):
        self.calls.extend(ex.key for ex in examples)
        return [Failure("bad: empty") if not ex.answer else float(len(ex.answer)) for ex in examples]


def test_compute_scores_caches_per_example_and_settings(tmp_path):
    examples = [_ex("a", "xx"), _ex("b", "yyyy"), _ex("c", "")]
    scorer = CountingScorer()
    first = compute_scores(scorer, examples, tmp_path)
    assert first.values[:2].tolist() == [2.0, 4.0] and np.isnan(first.values[2])
    assert first.errors == {"c": "bad: empty"} and first.error_counts() == {"bad": 1}
    again = CountingScorer()
    second = compute_scores(again, examples, tmp_path)
    assert again.calls == ["c"]  # only the failure is retried
    assert second.cached == 2 and second.computed == 1
    edited = [_ex("a", "xx"), _ex("b", "changed"), _ex("c", "")]
    third_scorer = CountingScorer()
    third = compute_scores(third_scorer, edited, tmp_path)
    assert third_scorer.calls == ["b", "c"] and third.values[1] == 7.0
    other = CountingScorer(version=2)
    compute_scores(other, examples, tmp_path)
    assert other.calls == ["a", "b", "c"]  # new settings, new cache file
    assert len(ScoreCache(tmp_path, "counting", {"version": 1})) == 2


# ------------------------------------------------------------------------------------------------ clustering


def _blobs(n_per, centers, seed=0, noise=0.05):
    rng = np.random.default_rng(seed)
    d = centers.shape[1]
    x = np.concatenate([c + noise * rng.standard_normal((n, d)) for c, n in zip(centers, n_per, strict=True)])
    truth = np.repeat(np.arange(len(n_per)), n_per)
    return x.astype(np.float32), truth


@pytest.mark.parametrize("method", ["spectral", "kmeans", "spectral_sample"])
def test_clusters_recover_separated_directions(method):
    centers = np.eye(16)[:4] * 3.0
    x, truth = _blobs([40, 30, 20, 10], centers)
    labels = cluster_embeddings(x, k=4, method=method, seed=0, sample_size=60)
    # relabelled by size: the largest blob is cluster 0, etc.
    assert np.array_equal(labels, truth)
    assert np.array_equal(labels, cluster_embeddings(x, k=4, method=method, seed=0, sample_size=60))


def test_kmeans_sample_then_refine_path():
    centers = np.eye(16)[:3] * 3.0
    x, truth = _blobs([120, 80, 40], centers, seed=2, noise=0.2)
    labels = cluster_embeddings(x, k=3, method="kmeans", seed=0, sample_size=30)  # 240 > 2 x 30: sampled path
    assert np.array_equal(labels, truth)


def test_cluster_edge_cases():
    x, _ = _blobs([5, 5], np.eye(4)[:2])
    assert cluster_embeddings(x, k=1).tolist() == [0] * 10
    with pytest.raises(ClusteringError, match="cannot make"):
        cluster_embeddings(x[:3], k=4)
    with pytest.raises(ClusteringError, match="method"):
        cluster_embeddings(x, k=2, method="dbscan")
    assert relabel_by_size(np.array([7, 3, 3, 7, 3])).tolist() == [1, 0, 0, 1, 0]


def test_cluster_cli(tmp_path):
    x, truth = _blobs([30, 20, 10], np.eye(8)[:3] * 2.0, seed=1)
    np.save(tmp_path / "emb.npy", x)
    proc = subprocess.run(
        [sys.executable, "-m", "selection.cluster", "--embeddings", str(tmp_path / "emb.npy"), "--k", "3",
         "--out", str(tmp_path / "labels.npy")],
        capture_output=True, text=True, check=True,
    )
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["method"] == "spectral" and summary["sizes"] == [30, 20, 10]
    assert np.array_equal(np.load(tmp_path / "labels.npy"), truth)


# ------------------------------------------------------------------------------------------------ records


def test_llava_records_roundtrip_and_duplicate_ids(tmp_path):
    records = [
        {"id": "1", "image": "a.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Grey."}]},
        {"id": "1", "image": "b.jpg", "conversations": [
            {"from": "human", "value": "Describe.\n<image>"}, {"from": "gpt", "value": "A dog."}]},
        {"id": "3", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
        {"id": "4", "image": "../escape.jpg", "conversations": [
            {"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]},
        {"id": "5", "conversations": [{"from": "robot", "value": "x"}]},
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    ds = load_dataset(path)
    assert ds.format == "llava"
    assert [ex.key for ex in ds.examples] == ["1", "1#2", "3"]
    assert ds.examples[0].instruction == "What is it?\n\nColour?" and ds.examples[0].answer == "A cat.\n\nGrey."
    assert ds.examples[1].instruction == "Describe." and ds.examples[2].image is None
    assert sum(ds.skipped.values()) == 2 and ds.duplicate_ids == 1
    write_subset(tmp_path / "out.json", ds, [2, 0])
    assert json.loads((tmp_path / "out.json").read_text()) == [records[0], records[2]]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records[:3]) + "\n")
    ds2 = load_dataset(jsonl)
    write_subset(tmp_path / "out.jsonl", ds2, [1])
    assert [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()] == [records[1]]


def test_minigpt4_records_roundtrip(tmp_path):
    data = {"annotations": [{"image_id": "2", "caption": "A tree. "}, {"image_id": "7", "caption": "A car."}]}
    path = tmp_path / "filter_cap.json"
    path.write_text(json.dumps(data))
    ds = load_dataset(path, instruction="Describe this image in detail.")
    assert ds.format == "minigpt4"
    assert [(ex.key, ex.image, ex.answer) for ex in ds.examples] == [("2", "2.jpg", "A tree."), ("7", "7.jpg", "A car.")]
    assert ds.examples[0].instruction == "Describe this image in detail."
    write_subset(tmp_path / "sub.json", ds, [1])
    assert json.loads((tmp_path / "sub.json").read_text()) == {"annotations": [data["annotations"][1]]}
    (tmp_path / "bad.json").write_text(json.dumps({"annotations": [{"nope": 1}]}))
    with pytest.raises(InputFormatError, match="no usable records"):
        load_dataset(tmp_path / "bad.json")
