"""The client side of a round, the same under every runtime (in-process: ``fgrpo.runner``; Flower:
``fgrpo.flower.client_app``): one data owner trains from the adapter the server sent.

    ClientTrainer.train   start adapter -> local GRPO on the owner's prompts with its own verifier
                          -> privatize (DP clipping and noise, when asked) -> ClientUpdate (delta_k, statistics)

The owner's sample completions are written on its own side (``samples_dir``); no message carries
them. Clients keep no state between rounds (the local optimizer starts afresh every round).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from fgrpo import privacy
from fgrpo.aggregation import Adapter, ClientStats
from fgrpo.config import RunConfig
from fgrpo.grpo import GRPOSettings, local_grpo, prompt_batches
from fgrpo.host import ModelHost
from fgrpo.report import ClientUpdate, stats_of
from fgrpo.rollouts import kl_to_reference
from fgrpo.scenarios import ClientSpec
from fgrpo.seeds import derived_seed
from fgrpo.tasks import correctness
from fgrpo.trust import fabricated


class ClientTrainer:
    """Local GRPO on the host's model: the local optimizer over the trainable LoRA parameters."""

    def __init__(self, cfg: RunConfig, host: ModelHost):
        self.cfg, self.host = cfg, host
        params = [p for p in host.model.parameters() if p.requires_grad]
        self.optimizer = (torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
                          if cfg.local_optimizer == "adamw" else
                          torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.local_momentum,
                                          weight_decay=cfg.weight_decay))

    def train(self, client: ClientSpec, rnd: int, start: Adapter, samples_dir: Path | None = None) -> ClientUpdate:
        """Local GRPO from ``start``; returns delta_k and the statistics (sample completions to ``samples_dir``)."""
        model = self.host.model
        self.host.load(start)
        self.optimizer.state.clear()  # clients are stateless between rounds
        seed = derived_seed(self.cfg.seed, rnd, client.client_id)
        torch.manual_seed(seed)  # rollout sampling
        batches = prompt_batches(client.train, self.cfg.prompts_per_step, seed)
        settings = GRPOSettings.from_config(self.cfg, client.local_steps or self.cfg.local_steps,
                                            self.host.cfg.rollout_precision)
        client.reward.begin_round(rnd, self.cfg.reward_workers, self.cfg.reward_timeout)  # TRL's trainer_state
        t0 = time.perf_counter()
        with self.host.autocast():
            result = local_grpo(model, self.host.tokenizer, self.optimizer, batches, client.reward,
                                settings, correctness_fn=correctness)
        seconds = time.perf_counter() - t0  # local training only: swapping counts as overhead
        with self.host.autocast():  # a diagnostic of the round, not part of a GRPO step
            result.metrics["kl_to_reference"] = kl_to_reference(model, result.last_rollouts, self.cfg.temperature,
                                                                result.last_logps, result.last_ref_logps)
        keep_samples(samples_dir, client.client_id, rnd, result.samples, client.reward.take_round_log())
        failed, total = client.reward.take_failures()  # samples whose reward raised or was not finite
        result.metrics["reward_failures"] = failed / max(total, 1)
        result.metrics.update(client.reward.take_components())
        local = self.host.slots
        delta = {k: (local[k] - start[k]).detach().clone() for k in start}
        stats = stats_of(client.client_id, client.reward.take_observed_range(), result)
        if client.lies:  # the lying-owner scenario: a fabricated report with an ordinary update
            stats = fabricated(stats)
        delta, stats = self.privatize(delta, stats, seed, result.metrics, client.reward.declared_range)
        wire = getattr(torch, self.cfg.delta_dtype)  # what the client sends (float32 by default)
        return ClientUpdate(stats, {k: v.to(wire) for k, v in delta.items()}, result.metrics, seconds,
                            client.task, client.reward.name)

    def privatize(self, delta: Adapter, stats: ClientStats, seed: int, metrics: dict, bound: float,
                  ) -> tuple[Adapter, ClientStats]:
        """What DP asks of the client before anything leaves it: clipping (dp = client or local), noise
        on the delta (local) and on the statistics (dp_stats_noise > 0, clipped to the verifier's declared
        range ``bound``, which depends on no data); docs/privacy.md."""
        if self.cfg.dp in ("client", "local"):
            delta, clipped = privacy.clip_update(delta, self.cfg.dp_clip)
            metrics["dp_clipped"] = float(clipped)
            if self.cfg.dp == "local":
                delta = privacy.add_gaussian_noise(delta, self.cfg.dp_noise * self.cfg.dp_clip,
                                                   derived_seed(seed, "dp-local"))
        if self.cfg.dp_stats_noise > 0:
            stats = privacy.privatize_stats(stats, self.cfg.dp_stats_noise, derived_seed(seed, "dp-stats"), bound,
                                            self.cfg.gain_spread)
        return delta, stats


def keep_samples(folder: Path | None, client_id: str, rnd: int, samples: list[dict],
                 reward_log: tuple[dict[str, list], dict[str, float]] = ({}, {})) -> None:
    """Append the round's sample completions to ``folder/<client_id>.jsonl``, on the client's side
    (they are the owner's data: no message to the server carries them). No folder: none kept.
    ``reward_log``: what the owner's reward functions logged (``GuardedReward.take_round_log``): columns with a
    value per sample of the round's first batch, kept as each completion's "extra", and metrics, kept as each
    record's "reward_metrics"; neither is added to the metrics the server receives."""
    if folder is None or not samples:
        return
    columns, metrics = reward_log
    index = 0  # the samples are the first batch's first prompts, G completions each, in order
    for record in samples:
        for completion in record["completions"]:
            extra = {k: v[index] for k, v in columns.items() if index < len(v)}
            completion.update({"extra": extra} if extra else {})
            index += 1
        record.update({"reward_metrics": metrics} if metrics else {})
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{client_id}.jsonl", "a") as fh:
        fh.writelines(json.dumps({"round": rnd, "client_id": client_id, **s}, default=str) + "\n" for s in samples)
