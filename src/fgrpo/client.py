"""The client side of a round, the same under every runtime (in-process: ``fgrpo.runner``; Flower:
``fgrpo.flower.client_app``): one data owner trains from the adapter the server sent.

    ClientTrainer.train   load theta_t -> local GRPO on the owner's prompts with its own verifier
                          -> delta_k = theta_k - theta_t -> (gain = paired: the owner's validation prompts scored
                             under theta_t and theta_k) -> privatize (DP clipping and noise, when asked)
                          -> report: the sent part (``report.ClientReport``) back to the server, the kept
                             part (exact statistics, every metric, sample completions) to the owner's folder

The owner's folder (``owner_dir``: RUN_DIR/completions in-process, a SuperNode's completions-dir) is on its own
side; no message carries what is written there. Clients keep no state between rounds (the local optimizer
starts afresh every round).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from fgrpo import privacy
from fgrpo.aggregation import Adapter, ClientStats
from fgrpo.config import ConfigError, RunConfig
from fgrpo.grpo import GRPOSettings, LocalResult, local_grpo, prompt_batches
from fgrpo.host import ModelHost
from fgrpo.paired import paired_difference
from fgrpo.report import ClientReport, append_owner_log, append_records, owner_log_row, sent_metrics, stats_of
from fgrpo.rewards import judged
from fgrpo.rollouts import kl_to_reference
from fgrpo.scenarios import ClientSpec
from fgrpo.seeds import derived_seed


class ClientTrainer:
    """Local GRPO on the host's model: the local optimizer over the trainable LoRA parameters."""

    def __init__(self, cfg: RunConfig, host: ModelHost):
        self.cfg, self.host = cfg, host
        params = [p for p in host.model.parameters() if p.requires_grad]
        self.optimizer = (torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
                          if cfg.local_optimizer == "adamw" else
                          torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.local_momentum,
                                          weight_decay=cfg.weight_decay))

    def train(self, client: ClientSpec, rnd: int, start: Adapter, owner_dir: Path | None = None) -> ClientReport:
        """One owner's round from ``start`` (theta_t); returns what it sends, keeps the rest in ``owner_dir``."""
        seed = derived_seed(self.cfg.seed, rnd, client.client_id)
        client, validation = held_out(client, self.cfg.validation_size if self.cfg.gain == "paired" else 0)
        self.host.load(start)
        t0 = time.perf_counter()
        before = self.validation_scores(client, validation)  # theta_t on the owner's validation prompts
        measuring = time.perf_counter() - t0
        result, seconds = self.local_training(client, rnd, seed)
        t0 = time.perf_counter()
        after = self.validation_scores(client, validation)  # theta_k on the same prompts
        measuring += time.perf_counter() - t0
        delta = {k: (self.host.slots[k] - start[k]).detach().clone() for k in start}  # delta_k = theta_k - theta_t
        exact = stats_of(client.client_id, client.reward.take_observed_range(), result)
        if validation:  # d_k, se_k: the paired gain, in units of the verifier's range
            exact = replace(exact, **dict(zip(("paired_gain", "paired_se"), paired_difference(before, after))),
                            validation_size=len(validation))
        metrics = {**result.metrics, **reward_metrics(client.reward),
                   **({"validation_seconds": measuring} if validation else {})}
        delta, stats = self.privatize(delta, exact, seed, metrics, client.reward.declared_range)
        keep_samples(owner_dir, client.client_id, rnd, result.samples, client.reward.take_round_log())
        append_owner_log(owner_dir, owner_log_row(rnd, exact, metrics, seconds))
        wire = getattr(torch, self.cfg.delta_dtype)  # what the client sends (float32 by default)
        sent = sent_metrics(metrics, stats_noised=self.cfg.dp_stats_noise > 0, local_dp=self.cfg.dp == "local")
        return ClientReport(stats, {k: v.to(wire) for k, v in delta.items()}, sent, seconds, client.task,
                            client.reward.name)

    def local_training(self, client: ClientSpec, rnd: int, seed: int) -> tuple[LocalResult, float]:
        """Local GRPO on the client's prompts from the loaded adapter, and the policy's KL to the base model;
        (the result, seconds of local training: the diagnostic counts as overhead)."""
        self.optimizer.state.clear()  # clients are stateless between rounds
        torch.manual_seed(seed)  # rollout sampling
        batches = prompt_batches(client.train, self.cfg.prompts_per_step, seed)
        settings = GRPOSettings.from_config(self.cfg, client.local_steps or self.cfg.local_steps,
                                            self.host.cfg.rollout_precision)
        client.reward.begin_round(rnd, self.cfg.reward_workers, self.cfg.reward_timeout)  # TRL's trainer_state
        t0 = time.perf_counter()
        with self.host.autocast():
            result = local_grpo(self.host.model, self.host.tokenizer, self.optimizer, batches, client.reward,
                                settings)
        seconds = time.perf_counter() - t0
        with self.host.autocast():  # a diagnostic of the round, not part of a GRPO step
            result.metrics["kl_to_reference"] = kl_to_reference(self.host.model, result.last_rollouts,
                                                                self.cfg.temperature, result.last_logps,
                                                                result.last_ref_logps)
        return result, seconds

    def validation_scores(self, client: ClientSpec, validation: list) -> list[float]:
        """The owner's verifier on the loaded adapter's greedy answers, / its declared range (none: [])."""
        if not validation:
            return []
        texts = self.host.greedy_texts(None, validation)
        scale = client.reward.declared_range
        return [judged(client.reward.reward, e, t).reward / scale for e, t in zip(validation, texts)]

    def privatize(self, delta: Adapter, stats: ClientStats, seed: int, metrics: dict, bound: float,
                  ) -> tuple[Adapter, ClientStats]:
        """What DP asks of the client before anything leaves it (docs/privacy.md):

            dp = client, local:   delta_k <- delta_k * min(1, C / ||delta_k||)
            dp = local:           delta_k <- delta_k + N(0, (sigma C)^2 I)
            dp_stats_noise > 0:   r_start, r_end, spread <- clip to [-R, R] + N(0, (sigma_s 2 sqrt(3) R)^2),
                                  R = ``bound``, the verifier's declared range (it depends on no data)"""
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


def held_out(client: ClientSpec, size: int) -> tuple[ClientSpec, list]:
    """(the client training on all but its first ``size`` prompts, those prompts): its validation split, never
    trained on and never sent (the same prompts every round). ``size`` 0: the client as it is, none."""
    if not size:
        return client, []
    if len(client.train) <= size:
        raise ConfigError(f"validation_size = {size}: client {client.client_id} has {len(client.train)} prompts; "
                          "it needs more than that to train on the rest")
    return replace(client, train=client.train[size:]), client.train[:size]


def reward_metrics(reward) -> dict[str, float]:
    """What the owner's reward observed this round: the share of samples whose reward raised or was not finite,
    and each reward component's mean (reward/<name>)."""
    failed, total = reward.take_failures()
    return {"reward_failures": failed / max(total, 1), **reward.take_components()}


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
    append_records(folder / f"{client_id}.jsonl", [{"round": rnd, "client_id": client_id, **s} for s in samples])
