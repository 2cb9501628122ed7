"""How the selector's clustering scales: random 768-d embeddings at MiniGPT-4 size (3,439) and LLaVA mix665k
size (665,000), clustered into 10 groups with the method `auto` picks (spectral up to 20,000 rows, k-means
above), timing each and recording the process's peak memory.

    python bench/selection_scale.py [--n 665000] [--small-n 3439] [--dim 768] [--k 10] [--method auto]

Prints one JSON object as its last line. Target: the large case in <= 10 minutes and <= 8 GB on a 2-core machine.
Embeddings are drawn in float32 chunks so generating them costs no float64 copy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time

import numpy as np

from selection.cluster import cluster_embeddings, resolve_method


def random_embeddings(n: int, dim: int, seed: int, chunk: int = 100_000) -> np.ndarray:
    """[n, dim] float32 standard normal rows."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, chunk):
        out[start : start + chunk] = rng.standard_normal((min(chunk, n - start), dim), dtype=np.float32)
    return out


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, in GB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def run_case(n: int, dim: int, k: int, method: str, seed: int) -> dict:
    """Clusters n random embeddings; returns timings, sizes and peak memory after the case."""
    t0 = time.perf_counter()
    x = random_embeddings(n, dim, seed)
    t1 = time.perf_counter()
    labels = cluster_embeddings(x, k=k, method=method, seed=seed)
    t2 = time.perf_counter()
    sizes = np.bincount(labels, minlength=k)
    return {
        "n": n,
        "dim": dim,
        "k": k,
        "method": resolve_method(method, n, 20000),
        "generate_s": round(t1 - t0, 2),
        "cluster_s": round(t2 - t1, 2),
        "sizes": sizes.tolist(),
        "peak_rss_gb_so_far": round(peak_rss_gb(), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=665_000)
    parser.add_argument("--small-n", type=int, default=3_439)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--method", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    small = run_case(args.small_n, args.dim, args.k, args.method, args.seed)
    print(json.dumps({"case": "small", **small}), flush=True)
    large = run_case(args.n, args.dim, args.k, args.method, args.seed)
    print(json.dumps({"case": "large", **large}), flush=True)
    result = {
        "benchmark": "selection_scale",
        "small": small,
        "large": large,
        "peak_rss_gb": round(peak_rss_gb(), 2),
        "within_target": large["cluster_s"] <= 600 and peak_rss_gb() <= 8.0,
        "machine": {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
                    "python": platform.python_version(), "numpy": np.__version__},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
