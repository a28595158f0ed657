"""The yardstick of a gain signal: does the gain a strategy weighs by say how much the round improved the owner?

For each client-round with a gain g_k,t (a client row of metrics.jsonl), the change that round produced in the
global model's held-out accuracy on that owner's task,

    d_k,t = acc_t(task_k) - acc_{t-1}(task_k)          (content accuracy, from the evaluation rows)

and over all such pairs of a run (or of several runs pooled):

    pearson   the linear correlation of g and d
    spearman  the correlation of their ranks (ties get the mean rank)
    sign      the share of pairs with d != 0 and g != 0 whose signs agree (0.5: a coin)

A gain that measures improvement correlates clearly above 0; weights built on a gain near 0 are noise.
Pairs need an evaluation in both rounds (``eval_every = 1``) and a task the evaluation scores (a client on a
mixture of tasks has none).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class GainSignal:
    pairs: int  # client-rounds with a gain and a measured change
    pearson: float
    spearman: float
    sign_agreement: float  # over the pairs where both are non-zero (nan when none)

    def line(self) -> str:
        return (f"gain vs the owner's held-out change: r = {self.pearson:+.2f}, rank r = {self.spearman:+.2f}, "
                f"signs agree {self.sign_agreement:.2f}, {self.pairs} client-rounds")


def task_accuracy(row: dict, task: str) -> float | None:
    """The evaluation row's content accuracy on ``task`` (its accuracy in runs without content accuracy)."""
    return row.get(f"content_accuracy/{task}", row.get(f"accuracy/{task}"))


def gain_pairs(rows: list[dict]) -> list[tuple[float, float]]:
    """(g_k,t, d_k,t) for every client row of one run's metrics with a gain whose task was evaluated in rounds
    t - 1 and t."""
    evals = {r["round"]: r for r in rows if r["kind"] == "eval"}
    pairs = []
    for r in rows:
        if r["kind"] != "client" or r.get("gain") is None or r["round"] not in evals or r["round"] - 1 not in evals:
            continue
        now, before = task_accuracy(evals[r["round"]], r["task"]), task_accuracy(evals[r["round"] - 1], r["task"])
        if now is not None and before is not None:
            pairs.append((float(r["gain"]), now - before))
    return pairs


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in order[i:j + 1]:
            out[k] = (i + j) / 2 + 1
        i = j + 1
    return out


def correlation(x: list[float], y: list[float]) -> float:
    """Pearson's r; nan with fewer than 3 pairs or a constant side."""
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return math.nan
    return statistics.correlation(x, y)


def gain_signal(pairs: list[tuple[float, float]]) -> GainSignal:
    """The yardstick over ``pairs`` of (gain, held-out change)."""
    gains, changes = [g for g, _ in pairs], [d for _, d in pairs]
    signed = [(g, d) for g, d in pairs if g != 0 and d != 0]
    agree = statistics.fmean((g > 0) == (d > 0) for g, d in signed) if signed else math.nan
    return GainSignal(len(pairs), correlation(gains, changes), correlation(ranks(gains), ranks(changes)), agree)
