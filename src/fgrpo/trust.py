"""What the server checks in a client's report before it weighs it (docs/trust.md): pure functions over
the reported statistics, the round's settings and the update's norm.

A report is *plausible* when the numbers could have come from an honest local GRPO round:

    finite          every number is finite
    count           n_k = s * B for a whole number of local steps 1 <= s <= the most the server allows
                    (B = prompts_per_step; the most: local_steps, or the round's total for the pooled client)
    range           R_k >= 0, and r_start, r_end are means of rewards inside one interval of width R_k:
                    |r_end - r_start| <= R_k
    spreads         0 <= std <= R_k / 2 * sqrt(G / (G - 1)): the largest (unbiased) std of G rewards in an
                    interval of width R_k; the pooled std (over B * G >= G rewards) has the same bound
    still groups    a report whose groups all tied (std 0, or R_k 0) has zero advantages, so plain GRPO
                    (no KL, no proximal term, no weight decay, no dynamic sampling, no local DP noise)
                    cannot move the adapter: such a report with a non-zero update is implausible

Under ``dp_stats_noise`` the statistics carry noise by design, so only ``finite`` and ``count`` apply.
What a plausible liar can still get is bounded by ``max_weight_ratio`` (the water-filling cap of
``aggregation.cap_weights``).

The attack itself, for the ``lying-owner`` scenario: ``LyingOwner``, a test double of the client side that sends
an ordinary update with a ``fabricated`` report (the shared client code knows nothing of it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Protocol

from fgrpo.aggregation import ClientStats
from fgrpo.config import RunConfig
from fgrpo.report import ClientReport

TOLERANCE = 1e-6  # relative slack for float rounding in the bounds


@dataclass(frozen=True)
class ReportRules:
    """What the server asked of a round's clients, and which checks hold under the run's settings."""

    prompts_per_step: int  # B
    max_steps: int  # the most local steps a client may report
    group_size: int  # G
    values_checked: bool  # False under dp_stats_noise: the statistics are noised on purpose
    still_groups_cannot_move: bool  # plain GRPO: all groups tied -> zero update
    validation_size: int = 0  # gain = paired: the V every client must have scored (0: no paired gain asked)

    @classmethod
    def from_config(cls, cfg: RunConfig, max_steps: int | None = None) -> ReportRules:
        plain = (cfg.beta == 0 and cfg.proximal_mu == 0 and cfg.weight_decay == 0 and cfg.dynamic_sampling == 0
                 and cfg.dp != "local")
        return cls(cfg.prompts_per_step, max_steps or cfg.local_steps, cfg.group_size, cfg.dp_stats_noise == 0,
                   plain, cfg.validation_size if cfg.gain == "paired" else 0)


def report_problem(stats: ClientStats, rules: ReportRules, update_norm: float | None) -> str | None:
    """Why ``stats`` cannot be an honest report under ``rules`` (one line), or None. ``update_norm``:
    the norm of the client's update (None when the server does not see it: secure aggregation)."""
    numbers = {f: getattr(stats, f) for f in ("num_prompts", "reward_start", "reward_end", "reward_std", "reward_range",
                                              "reward_pooled_std", "paired_gain", "paired_se")}
    for name, value in numbers.items():
        if not math.isfinite(value):
            return f"reported {name} = {value} is not finite"
    steps, rest = divmod(stats.num_prompts, rules.prompts_per_step)
    if rest or not 1 <= steps <= rules.max_steps:
        return (f"reported num_prompts = {stats.num_prompts}; the server asked for 1 to {rules.max_steps} local "
                f"steps of {rules.prompts_per_step} prompts")
    if stats.validation_size != rules.validation_size:
        return (f"reported validation_size = {stats.validation_size}; the server asked for {rules.validation_size} "
                "validation prompts")
    if not rules.values_checked:
        return None
    return (_value_problem(stats, rules) or _paired_problem(stats) or
            _still_group_problem(stats, rules, update_norm))


def _paired_problem(stats: ClientStats) -> str | None:
    """gain = paired: a mean of V paired differences in [-1, 1] (units of the reward range): |d| <= 1, and its
    standard error at most 1 / sqrt(V - 1), the largest an (unbiased) std of V such values allows."""
    v = stats.validation_size
    if not v:
        return None
    if abs(stats.paired_gain) > 1 + TOLERANCE:
        return f"reported paired_gain = {stats.paired_gain:.4g} is outside [-1, 1] (units of its reward range)"
    if not 0 <= stats.paired_se <= 1 / math.sqrt(v - 1) * (1 + TOLERANCE):
        return (f"reported paired_se = {stats.paired_se:.4g} is outside [0, {1 / math.sqrt(v - 1):.4g}], what "
                f"{v} paired differences in [-1, 1] allow")
    return None


def _value_problem(stats: ClientStats, rules: ReportRules) -> str | None:
    """The reward statistics against the range the client itself reported."""
    r = stats.reward_range
    if r < 0:
        return f"reported reward_range = {r} is negative"
    if abs(stats.reward_end - stats.reward_start) > r * (1 + TOLERANCE) + TOLERANCE:
        return (f"reported |r_end - r_start| = {abs(stats.reward_end - stats.reward_start):.4g} exceeds its own "
                f"reward_range = {r:.4g}")
    most = r / 2 * math.sqrt(rules.group_size / (rules.group_size - 1)) * (1 + TOLERANCE) + TOLERANCE
    for name in ("reward_std", "reward_pooled_std"):
        value = getattr(stats, name)
        if not 0 <= value <= most:
            return (f"reported {name} = {value:.4g} is outside [0, {most:.4g}], the spreads that rewards within "
                    f"its reward_range = {r:.4g} allow")
    return None


def _still_group_problem(stats: ClientStats, rules: ReportRules, update_norm: float | None) -> str | None:
    if not rules.still_groups_cannot_move or update_norm is None or update_norm == 0:
        return None
    if stats.reward_std == 0 or stats.reward_range == 0:
        return (f"reported reward_std = {stats.reward_std:.4g} and reward_range = {stats.reward_range:.4g} (every "
                f"group tied: zero advantages) with a non-zero update (norm {update_norm:.3g})")
    return None


LIE_PROMPTS = 10**6  # the prompt count a lying owner reports (FedAvg would give it all the weight)


def fabricated(stats: ClientStats) -> ClientStats:
    """The report of the ``lying-owner`` scenario's liar, sent with its ordinary update: the largest gain its
    own range allows (r_end = r_start + R_k), a collapsed spread (0) and an inflated prompt count."""
    return replace(stats, reward_end=stats.reward_start + stats.reward_range, reward_std=0.0, reward_pooled_std=0.0,
                   num_prompts=LIE_PROMPTS)


class Trainer(Protocol):
    def train(self, client, rnd: int, start, owner_dir=None) -> ClientReport: ...


class LyingOwner:
    """The lying-owner scenario's liar: trains honestly with ``trainer``, then replaces its report with a
    ``fabricated`` one (after any DP noise: a liar follows no protocol)."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def train(self, client, rnd: int, start, owner_dir=None) -> ClientReport:
        report = self.trainer.train(client, rnd, start, owner_dir)
        return replace(report, stats=fabricated(report.stats))


def trainer_of(client, trainer: Trainer) -> Trainer:
    """How ``client`` trains: with ``trainer``, or, the scenario's liar (``client.lies``), as a ``LyingOwner``."""
    return LyingOwner(trainer) if getattr(client, "lies", False) else trainer
