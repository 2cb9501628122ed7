"""Spreads a budget of `alpha` examples over clusters and picks the best examples inside each.

Each cluster's share is proportional to its size; the fractional parts are handed out largest first (ties to the
lower cluster id), so the shares sum to exactly alpha. A cluster with fewer eligible examples than its share
gives the rest back, and that rest is spread over the other clusters the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class BudgetError(ValueError):
    """The budget cannot be met (alpha larger than the eligible examples, or negative)."""


def proportional_shares(sizes: np.ndarray, capacity: np.ndarray, alpha: int) -> np.ndarray:
    """Shares [C] int64 of `alpha`, proportional to `sizes` [C], never above `capacity` [C], summing to alpha.

    Largest-remainder rounding; ties go to the lower index.
    """
    sizes = np.asarray(sizes, np.float64)
    capacity = np.asarray(capacity, np.int64)
    if alpha < 0:
        raise BudgetError(f"alpha must be >= 0, got {alpha}")
    if alpha > capacity.sum():
        raise BudgetError(f"alpha={alpha} exceeds the {int(capacity.sum())} eligible examples")
    shares = np.zeros(len(sizes), np.int64)
    remaining = alpha
    while remaining > 0:
        open_ = shares < capacity
        weight = np.where(open_, np.maximum(sizes, 1e-12), 0.0)
        quota = remaining * weight / weight.sum()
        base = np.floor(quota).astype(np.int64)
        leftover = remaining - int(base.sum())
        fraction = quota - base
        # Largest fraction first; among equal fractions the lower index (stable sort on -fraction).
        order = [i for i in np.argsort(-fraction, kind="stable") if open_[i]]
        for i in order[:leftover]:
            base[i] += 1
        add = np.minimum(base, capacity - shares)
        shares += add
        remaining -= int(add.sum())
    return shares


def pick_top(keys: Sequence[str], scores: np.ndarray, members: np.ndarray, count: int) -> list[int]:
    """The `count` members (indices into keys/scores) with the highest score; ties broken by key ascending."""
    members = list(members)
    members.sort(key=lambda i: (-scores[i], keys[i]))
    return members[:count]


def select_by_clusters(
    keys: Sequence[str], final: np.ndarray, labels: np.ndarray, eligible: np.ndarray, alpha: int
) -> tuple[list[int], dict[int, dict[str, int]]]:
    """Selects alpha examples: per-cluster shares by size, the best final scores inside each cluster.

    Args:
      keys: [N] example ids (tie-breaks).
      final: [N] final scores.
      labels: [N] int cluster labels; label -1 means "no cluster" and is never selected.
      eligible: [N] bool, examples that may be selected.
      alpha: the budget.
    Returns:
      (selected indices sorted ascending, {cluster: {"size", "eligible", "allocated"}}).
    """
    labels = np.asarray(labels)
    eligible = np.asarray(eligible, bool) & (labels >= 0)
    clusters = sorted(int(c) for c in np.unique(labels) if c >= 0)
    sizes = np.array([(labels == c).sum() for c in clusters])
    capacity = np.array([(eligible & (labels == c)).sum() for c in clusters])
    shares = proportional_shares(sizes, capacity, alpha) if clusters else np.zeros(0, np.int64)
    selected: list[int] = []
    table = {}
    for c, size, cap, share in zip(clusters, sizes, capacity, shares, strict=True):
        members = np.flatnonzero(eligible & (labels == c))
        selected.extend(pick_top(keys, final, members, int(share)))
        table[c] = {"size": int(size), "eligible": int(cap), "allocated": int(share)}
    if len(selected) != alpha:
        raise BudgetError(f"selected {len(selected)} examples, expected {alpha}")
    return sorted(selected), table


def select_random(eligible: np.ndarray, alpha: int, seed: int) -> list[int]:
    """alpha eligible indices drawn uniformly without replacement with numpy's generator seeded by `seed`."""
    pool = np.flatnonzero(np.asarray(eligible, bool))
    if alpha > pool.size:
        raise BudgetError(f"alpha={alpha} exceeds the {pool.size} eligible examples")
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(pool, size=alpha, replace=False))
