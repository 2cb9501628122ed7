"""Clusters image embeddings for diversity: spectral clustering for small sets, paths that scale for large ones.

Methods (embeddings are L2-normalised first, so distances are cosine distances):
  spectral         sklearn spectral clustering on a symmetric k-nearest-neighbour graph (n_neighbors, default 10),
                   as InstructionGPT-4 did; exact but its k-NN search is quadratic in N. The eigenvectors come
                   from LOBPCG (ARPACK on request: it is ~20x slower on near-uniform data).
  spectral_sample  the same on a seeded random sample of `sample_size` rows; every other row joins the cluster
                   whose (normalised) mean sample embedding is closest.
  kmeans           k-means on the normalised embeddings (spherical-style), linear in N: on large sets it is fitted
                   on a sample, then refined by Lloyd passes over every row in large matrix products.
  auto             spectral up to `spectral_max_n` rows, kmeans above.
`sample_size` is the sample of spectral_sample and of kmeans on more than 2 x sample_size rows.
Labels are renumbered by cluster size (0 = largest; ties by first member), so they do not depend on the solver's
arbitrary numbering.

    python -m selection.cluster --embeddings FILE.npy --k 10 --out LABELS.npy [--method auto] [--seed 0]
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings

import numpy as np

from llava_jax import cli
from llava_jax.io import atomic_open

log = logging.getLogger(__name__)

METHODS = ("auto", "spectral", "spectral_sample", "kmeans")


class ClusteringError(ValueError):
    """Clustering cannot run on this input (too few rows, bad shape, unknown method)."""


def l2_normalise(embeddings: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """A float32 copy of `embeddings` [N, D] with unit rows (zero rows stay zero), computed in chunks."""
    out = np.array(embeddings, dtype=np.float32, copy=True)
    for start in range(0, len(out), chunk):
        block = out[start : start + chunk]
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        np.divide(block, np.maximum(norms, 1e-12), out=block)
    return out


def relabel_by_size(labels: np.ndarray) -> np.ndarray:
    """Renumbers labels [N] so 0 is the largest cluster (ties: the cluster whose first member comes first)."""
    labels = np.asarray(labels)
    uniq, first, counts = np.unique(labels, return_index=True, return_counts=True)
    order = sorted(range(len(uniq)), key=lambda j: (-counts[j], first[j]))
    mapping = np.empty(uniq.max() + 1 if len(uniq) else 0, np.int64)
    for new, j in enumerate(order):
        mapping[uniq[j]] = new
    return mapping[labels].astype(np.int32)


def _spectral(x: np.ndarray, k: int, n_neighbors: int, seed: int, eigen_solver: str = "lobpcg") -> np.ndarray:
    from sklearn.cluster import SpectralClustering

    neighbours = min(n_neighbors, len(x) - 1)
    model = SpectralClustering(
        n_clusters=k,
        affinity="nearest_neighbors",
        n_neighbors=neighbours,
        assign_labels="kmeans",
        random_state=seed,
        n_init=10,
        n_jobs=1,
        eigen_solver=eigen_solver,
    )
    with warnings.catch_warnings():
        # A k-NN graph of a small or very clumpy set is often disconnected; sklearn warns and carries on.
        warnings.filterwarnings("ignore", message="Graph is not fully connected")
        # LOBPCG falls back to a dense solver on tiny problems and says so.
        warnings.filterwarnings("ignore", message="The problem size")
        return model.fit_predict(x)


def _kmeans(x: np.ndarray, k: int, seed: int, sample_size: int = 20_000, refine_iters: int = 20,
            max_iter: int = 100) -> np.ndarray:
    """k-means labels [N] for x [N, D]. Up to 2 x sample_size rows: sklearn's KMeans on all of them. Above: KMeans
    on a seeded sample of sample_size rows, then Lloyd passes over all rows in large BLAS chunks until fewer than
    0.01% of the labels change (at most refine_iters passes)."""
    from sklearn.cluster import KMeans

    if len(x) <= 2 * sample_size:
        model = KMeans(n_clusters=k, n_init=1, max_iter=max_iter, random_state=seed, algorithm="lloyd", copy_x=False)
        return model.fit_predict(x)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(x), size=sample_size, replace=False))
    model = KMeans(n_clusters=k, n_init=1, max_iter=max_iter, random_state=seed, algorithm="lloyd")
    centroids = model.fit(x[sample]).cluster_centers_.astype(np.float32)
    labels = np.full(len(x), -1, np.int64)
    for _ in range(refine_iters):
        new_labels = _nearest_centroid(x, centroids)
        changed = int((new_labels != labels).sum())
        labels = new_labels
        sums, counts = _centroid_sums(x, labels, k)
        nonempty = counts > 0
        centroids[nonempty] = sums[nonempty] / counts[nonempty, None]
        if changed <= 1e-4 * len(x):
            break
    return _nearest_centroid(x, centroids)


def _nearest_centroid(x: np.ndarray, centroids: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Index [N] of the Euclidean-nearest centroid [K, D] for each row of x [N, D], computed in chunks."""
    half_sq = 0.5 * (centroids.astype(np.float64) ** 2).sum(axis=1).astype(np.float32)
    out = np.empty(len(x), np.int64)
    for start in range(0, len(x), chunk):
        out[start : start + chunk] = np.argmax(x[start : start + chunk] @ centroids.T - half_sq, axis=1)
    return out


def _centroid_sums(x: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster row sums [K, D] and counts [K], as one sparse one-hot [K, N] times x [N, D] product."""
    from scipy import sparse

    n = len(labels)
    onehot = sparse.csr_matrix((np.ones(n, np.float32), (labels, np.arange(n))), shape=(k, n))
    return np.asarray(onehot @ x, np.float64), np.bincount(labels, minlength=k)


def _assign_to_centroids(x: np.ndarray, centroids: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Index [N] of the centroid [K, D] with the largest dot product for each row of x [N, D]."""
    out = np.empty(len(x), np.int64)
    for start in range(0, len(x), chunk):
        out[start : start + chunk] = np.argmax(x[start : start + chunk] @ centroids.T, axis=1)
    return out


def _spectral_sample(
    x: np.ndarray, k: int, n_neighbors: int, seed: int, sample_size: int, eigen_solver: str
) -> np.ndarray:
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(x), size=min(sample_size, len(x)), replace=False))
    sample_labels = _spectral(x[sample], k, n_neighbors, seed, eigen_solver)
    centroids = np.stack([x[sample[sample_labels == c]].mean(axis=0) for c in range(k)])
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    labels = _assign_to_centroids(x, centroids.astype(np.float32))
    labels[sample] = sample_labels
    return labels


def resolve_method(method: str, n: int, spectral_max_n: int) -> str:
    """The concrete method for `n` rows: `auto` is spectral up to spectral_max_n rows, kmeans above."""
    if method not in METHODS:
        raise ClusteringError(f"cluster method must be one of {METHODS}, got {method!r}")
    if method == "auto":
        return "spectral" if n <= spectral_max_n else "kmeans"
    return method


def cluster_embeddings(
    embeddings: np.ndarray,
    k: int = 10,
    method: str = "auto",
    n_neighbors: int = 10,
    seed: int = 0,
    spectral_max_n: int = 20000,
    sample_size: int = 20000,
    eigen_solver: str = "lobpcg",
) -> np.ndarray:
    """Cluster labels [N] int32 in [0, k) for embeddings [N, D] (see the module docstring for the methods).

    k=1 returns all zeros without running a solver.
    """
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2:
        raise ClusteringError(f"embeddings must be [N, D], got shape {embeddings.shape}")
    n = len(embeddings)
    if k < 1:
        raise ClusteringError(f"k must be >= 1, got {k}")
    if k == 1:
        return np.zeros(n, np.int32)
    if n < k:
        raise ClusteringError(f"cannot make {k} clusters from {n} embeddings")
    concrete = resolve_method(method, n, spectral_max_n)
    x = l2_normalise(embeddings)
    if concrete == "spectral":
        labels = _spectral(x, k, n_neighbors, seed, eigen_solver)
    elif concrete == "spectral_sample":
        labels = _spectral_sample(x, k, n_neighbors, seed, sample_size, eigen_solver)
    else:
        labels = _kmeans(x, k, seed, sample_size)
    return relabel_by_size(labels)


def main(argv: list[str] | None = None) -> int:
    """CLI: clusters an .npy of embeddings [N, D] and writes the labels [N] int32 as .npy; prints a JSON summary."""
    parser = cli.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--embeddings", required=True, help=".npy file with an [N, D] float array")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--out", required=True, help="where to write the labels (.npy, int32 [N])")
    parser.add_argument("--method", default="auto", choices=METHODS)
    parser.add_argument("--n-neighbors", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spectral-max-n", type=int, default=20000)
    parser.add_argument("--sample-size", type=int, default=20000)
    parser.add_argument("--eigen-solver", default="lobpcg", choices=("lobpcg", "arpack"))
    args = parser.parse_args(argv)
    embeddings = np.load(args.embeddings, mmap_mode="r")
    start = time.perf_counter()
    labels = cluster_embeddings(
        embeddings, args.k, args.method, args.n_neighbors, args.seed, args.spectral_max_n, args.sample_size,
        args.eigen_solver,
    )
    seconds = time.perf_counter() - start
    with atomic_open(args.out, "wb") as f:
        np.save(f, labels)
    summary = {
        "n": int(len(labels)),
        "k": args.k,
        "method": resolve_method(args.method, len(labels), args.spectral_max_n) if args.k > 1 else "none",
        "sizes": np.bincount(labels, minlength=args.k).tolist(),
        "seconds": round(seconds, 3),
        "out": args.out,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(cli.run(main))
