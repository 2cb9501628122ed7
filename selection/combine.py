"""Per-score normalisation and the weighted final score.

Each score column is normalised over the examples that have it (NaN stays NaN):
  raw     the value itself;
  minmax  (x - min) / (max - min), 0 when all values are equal;
  zscore  (x - mean) / std, 0 when std is 0;
  rank    average rank scaled to [0, 1] (ties share their mean rank), 0.5 for a single value.
The final score is sum_s weight_s * normalised_s over the scores with a non-zero weight.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

NORMALISATIONS = ("raw", "minmax", "zscore", "rank")


def average_ranks(x: np.ndarray) -> np.ndarray:
    """0-based ranks [N] of x [N]; tied values share the mean of their ranks."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(sorted_x)) + 1])
    ends = np.concatenate([starts[1:], [len(x)]])
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.repeat((starts + ends - 1) / 2.0, ends - starts)
    return ranks


def normalise(values: np.ndarray, method: str) -> np.ndarray:
    """Normalises a score column [N] (float, NaN = missing) by `method`; returns [N] float64 with NaNs kept."""
    if method not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {method!r}")
    values = np.asarray(values, np.float64)
    out = np.full_like(values, np.nan)
    ok = np.isfinite(values)
    x = values[ok]
    if x.size == 0 or method == "raw":
        out[ok] = x
        return out
    if method == "minmax":
        span = x.max() - x.min()
        out[ok] = (x - x.min()) / span if span > 0 else 0.0
    elif method == "zscore":
        std = x.std()
        out[ok] = (x - x.mean()) / std if std > 0 else 0.0
    else:
        out[ok] = average_ranks(x) / (x.size - 1) if x.size > 1 else 0.5
    return out


@dataclasses.dataclass
class Combined:
    """`normalised` name -> [N]; `final` [N] (NaN where a weighted score is missing and required);
    `weights` the non-zero weights used."""

    normalised: dict[str, np.ndarray]
    final: np.ndarray
    weights: dict[str, float]


def combine(
    raw: Mapping[str, np.ndarray],
    weights: Mapping[str, float],
    method: str,
    not_applicable: Mapping[str, np.ndarray] | None = None,
    size: int | None = None,
) -> Combined:
    """Normalises every column in `raw` and sums the weighted ones into the final score.

    Args:
      raw: score name -> [N] raw values (NaN = failed).
      weights: score name -> weight; names with weight 0 are left out of the sum; an unknown name raises.
      method: the normalisation (see module docstring).
      not_applicable: score name -> [N] bool marking examples for which that score does not exist by design
        (the CLIP score of a text-only record); their term is left out instead of making the final score NaN.
      size: N, needed when `raw` is empty (the final score is then all zeros).
    Returns:
      Combined, where final[i] is NaN when any weighted, applicable score of example i failed.
    """
    unknown = set(weights) - set(raw)
    active = {name: float(w) for name, w in weights.items() if float(w) != 0.0}
    if unknown & set(active):
        raise KeyError(f"weights name scores that were not computed: {sorted(unknown & set(active))}")
    normalised = {name: normalise(col, method) for name, col in raw.items()}
    n = len(next(iter(raw.values()))) if raw else int(size or 0)
    final = np.zeros(n, np.float64)
    for name, w in active.items():
        term = w * normalised[name]
        if not_applicable is not None and name in not_applicable:
            term = np.where(np.asarray(not_applicable[name], bool), 0.0, term)
        final = final + term
    return Combined(normalised, final, active)
