"""What a client reports after a round: ONE definition, from which the wire keys (``fgrpo.flower.wire``)
and the metric rows (``client_row``) are derived (docs/algorithm.md, section 2).

    ClientStats    the numbers the server weighs with (``fgrpo.aggregation``, the weights' input): n_k,
                   r_start, r_end, the spreads and the reward range; STAT_KEYS are its fields
    ClientUpdate   ClientStats + delta_k + the local training metrics + labels for the metric rows

Never prompts, completions or per-sample rewards: those stay with the client (its sample completions
are written on its own side).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from fgrpo.aggregation import Adapter, ClientStats, update_norm

# the reported numbers, in order (the wire's metric keys); client_id travels as a label
STAT_KEYS: tuple[str, ...] = tuple(f.name for f in fields(ClientStats) if f.name != "client_id")
STAT_TYPES: dict[str, type] = {f.name: {"int": int, "float": float}[f.type] for f in fields(ClientStats)
                               if f.name != "client_id"}


def stats_of(client_id: str, reward_range: float, local_result) -> ClientStats:
    """The statistics of a local training result (``fgrpo.grpo.LocalResult``): every field but the id and the
    reward range (which the client's reward guard observed) taken by name."""
    return ClientStats(client_id=client_id, reward_range=reward_range,
                       **{name: getattr(local_result, name) for name in STAT_KEYS if name != "reward_range"})


@dataclass
class ClientUpdate:
    """What one client sends back after a round, plus labels for the metric rows."""

    stats: ClientStats
    delta: Adapter  # delta_k = theta_k - theta_start, adapter tensors only ({} under secure aggregation)
    metrics: dict[str, float]  # local training metrics (fgrpo.grpo.rollout_metrics and the round's signals)
    seconds: float  # local training time
    task: str = ""  # what the client trains on, for the metric rows
    reward_scale: str = ""


def client_row(rnd: int, update: ClientUpdate, weight: float | None, gain: float | None,
               baseline: float | None) -> dict:
    """The metrics.jsonl row of one accepted client (docs/algorithm.md, section 5)."""
    return {"round": rnd, "kind": "client", "client_id": update.stats.client_id, "task": update.task,
            "reward_scale": update.reward_scale, **asdict(update.stats), "weight": weight, "gain": gain,
            "baseline": baseline, **update.metrics,
            "update_norm": update_norm(update.delta) if update.delta else None, "train_seconds": update.seconds}


def warning_row(rnd: int, client_id: str, reason: str) -> dict:
    """A metrics.jsonl row for a client left out of a round."""
    return {"round": rnd, "kind": "warning", "client_id": client_id, "reason": reason}
