"""A paired gain: the same prompts scored before and after an update, so that prompt difficulty cancels.

    d  = mean_i (after_i - before_i)                       the mean paired difference over n prompts
    se = std_i (after_i - before_i) / sqrt(n)              its standard error (unbiased std; 0 for n < 2)

With greedy decoding the scores of a prompt differ only through the update, so se measures how much of d the
choice of prompts could explain. Used by the owners (``gain = paired``: their validation prompts, their
verifier) and by the server (``gain = probe``: its probe prompts, correctness).
"""

from __future__ import annotations

import math
import statistics


def paired_difference(before: list[float], after: list[float]) -> tuple[float, float]:
    """(d, se) of the paired scores ``before`` and ``after`` of the same prompts."""
    if len(before) != len(after) or not before:
        raise ValueError(f"paired scores need the same prompts: {len(before)} before, {len(after)} after")
    diffs = [a - b for b, a in zip(before, after, strict=True)]
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
    return mean, se


def macro_paired_difference(before: dict[str, list[float]], after: dict[str, list[float]]) -> tuple[float, float]:
    """(d, se) of a macro mean over tasks: d = mean_t d_t, se = sqrt(sum_t se_t^2) / T."""
    parts = [paired_difference(before[t], after[t]) for t in before]
    return (statistics.fmean(d for d, _ in parts),
            math.sqrt(sum(se ** 2 for _, se in parts)) / len(parts))
