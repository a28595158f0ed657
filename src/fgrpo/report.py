"""What a client reports after a round: ONE definition with two parts (docs/algorithm.md, section 2;
docs/privacy.md, "What the server learns").

    sent   ``ClientReport``: the statistics the server weighs with (``ClientStats``, STAT_KEYS), delta_k, and
           the training metrics of ``SENT_METRICS`` that the run's privacy settings allow (``sent_metrics``)
    kept   ``owner_log_row``: everything else, on the owner's side (its run log, RUN_DIR/completions/ or a
           SuperNode's completions-dir): the exact statistics, every local metric, the reward components

The wire keys (``fgrpo.flower.wire``), the in-process path and the metric rows (``client_row``) are all derived
from ``ClientReport``: a number that is not in it never reaches the server. Never prompts, completions or
per-sample rewards.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from fgrpo.aggregation import Adapter, ClientStats, update_norm

# the reported statistics, in order (the wire's metric keys); client_id travels as a label
STAT_KEYS: tuple[str, ...] = tuple(f.name for f in fields(ClientStats) if f.name != "client_id")
STAT_TYPES: dict[str, type] = {f.name: {"int": int, "float": float}[f.type] for f in fields(ClientStats)
                               if f.name != "client_id"}



def stats_of(client_id: str, reward_range: float, local_result) -> ClientStats:
    """The statistics of a local training result (``fgrpo.grpo.LocalResult``), taken by name, but for the id, the
    reward range (which the client's reward guard observed) and the paired gain (``ClientTrainer.train``)."""
    measured = ("reward_range", "paired_gain", "paired_se", "validation_size")  # not local GRPO's
    return ClientStats(client_id=client_id, reward_range=reward_range,
                       **{name: getattr(local_result, name) for name in STAT_KEYS if name not in measured})


# What a training metric is computed from decides when it may leave the owner:
POLICY = "policy"  # the policy on its own samples (no reward in it): always sent
REWARDS = "rewards"  # computed from the owner's rewards or verifier: sent only when the statistics are exact
UPDATE = "update"  # a property of the raw update: not sent under local DP (where the server must not see it)
RUNTIME = "runtime"  # seconds and protocol values: always sent

SENT_METRICS: dict[str, str] = {
    "completion_length": POLICY, "truncated_fraction": POLICY, "entropy": POLICY, "kl": POLICY,
    "kl_to_reference": POLICY, "sampler_logp_diff_mean": POLICY, "sampler_logp_diff_max": POLICY,
    "sampler_weight_mean": POLICY, "sampler_cut_fraction": POLICY,
    "train_accuracy": REWARDS, "frac_zero_std": REWARDS, "reward_failures": REWARDS, "loss": REWARDS,
    "grad_norm": REWARDS, "clip_ratio": REWARDS, "generations_per_step": REWARDS,
    "proximal_term": UPDATE, "dp_clipped": UPDATE,
    "max_abs_delta": RUNTIME, "clientapp_setup_seconds": RUNTIME, "model_load_seconds": RUNTIME,
    "ready_seconds": RUNTIME,
    "validation_seconds": RUNTIME,
}
# Everything else stays with the owner: reward_std and reward_pooled_std as the steps measured them (the server
# gets the spreads in ClientStats, noised under dp_stats_noise), each reward component (reward/<name>), and any
# metric added later until it is listed here.


def sent_metrics(metrics: dict[str, float], stats_noised: bool, local_dp: bool) -> dict[str, float]:
    """The training metrics a client may send: those of ``SENT_METRICS``, without the ones computed from rewards
    when the statistics are noised (``stats_noised``: dp_stats_noise > 0; an exact train accuracy or loss would
    give away what the noise hides) and without the raw update's properties under local DP (``local_dp``)."""
    withheld = {REWARDS} if stats_noised else set()
    withheld |= {UPDATE} if local_dp else set()
    return {k: v for k, v in metrics.items() if k in SENT_METRICS and SENT_METRICS[k] not in withheld}


@dataclass
class ClientReport:
    """What one client sends after a round (the sent part), plus labels for the metric rows."""

    stats: ClientStats
    delta: Adapter  # delta_k = theta_k - theta_start, adapter tensors only ({} under secure aggregation)
    metrics: dict[str, float]  # training metrics, ``sent_metrics`` only (the server adds probe_accuracy)
    seconds: float  # local training time
    task: str = ""  # what the client trains on, for the metric rows
    reward_scale: str = ""


def client_row(rnd: int, report: ClientReport, weight: float | None, gain: float | None,
               baseline: float | None) -> dict:
    """The metrics.jsonl row of one accepted client (docs/algorithm.md, section 5): what it sent, weighed."""
    return {"round": rnd, "kind": "client", "client_id": report.stats.client_id, "task": report.task,
            "reward_scale": report.reward_scale, **report.metrics, **stat_fields(report.stats), "weight": weight,
            "gain": gain, "baseline": baseline,
            "update_norm": update_norm(report.delta) if report.delta else None, "train_seconds": report.seconds}


def stat_fields(stats: ClientStats) -> dict:
    """The statistics as row fields; the paired gain's only when it was measured (validation_size > 0)."""
    fields_ = asdict(stats)
    if not stats.validation_size:
        for name in ("paired_gain", "paired_se", "validation_size"):
            fields_.pop(name)
    return fields_


def warning_row(rnd: int, client_id: str, reason: str) -> dict:
    """A metrics.jsonl row for a client left out of a round."""
    return {"round": rnd, "kind": "warning", "client_id": client_id, "reason": reason}


def owner_log_row(rnd: int, exact: ClientStats, metrics: dict[str, float], seconds: float) -> dict:
    """The kept part: one row of the owner's own log, with the exact statistics and every local metric."""
    return {"round": rnd, "client_id": exact.client_id, **metrics, **stat_fields(exact), "train_seconds": seconds}


def append_owner_log(folder: Path | None, row: dict) -> None:
    """Append ``row`` to ``folder/<client_id>.log.jsonl`` on the owner's side (no folder: not kept)."""
    if folder is not None:
        append_records(folder / f"{row['client_id']}.log.jsonl", [row])


def append_records(path: Path, records: list[dict]) -> None:
    """Append ``records`` as JSON lines in one write, so a process killed meanwhile leaves the file with all of
    them or none (never a torn line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, default=str) + "\n" for r in records).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        while data:
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)
