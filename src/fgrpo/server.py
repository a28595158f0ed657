"""The server side of a round, the same under every runtime (in-process: ``fgrpo.runner``; Flower:
``fgrpo.flower.server_app``). Formulas: docs/algorithm.md, section 3; privacy: docs/privacy.md.

    Server.finish_round   screen -> check -> probe -> weigh -> bound -> combine -> noise -> step
                          -> one metrics row per client, a server row
    LocalOnlyServer       the local-only reference: screen -> check -> probe -> each delta to its own adapter
    Server.epsilon        privacy accounting over the clients that may take part (``population``)

The server's whole state is a ``ServerState`` (``fgrpo.server_state``): what a checkpoint holds. The server
holds no model: evaluation and saving are the model host's (``fgrpo.host``).
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from fgrpo import aggregation, privacy
from fgrpo.aggregation import Adapter, ClientStats, RoundWeights, update_norm
from fgrpo.config import ConfigError, RunConfig
from fgrpo.report import ClientReport, client_row, warning_row
from fgrpo.seeds import derived_seed
from fgrpo.server_state import ServerState, clone
from fgrpo.strategies import STRATEGIES
from fgrpo.trust import ReportRules, report_problem

if TYPE_CHECKING:
    from fgrpo.probes import ProbeJudge

SecureSum = Callable[[list[ClientReport], list[float]], Adapter]  # (accepted reports, weights) -> sum_k w_k delta_k
Combine = Callable[[Adapter, list[Adapter], list[float]], tuple[Adapter, dict]]  # (theta_t, deltas, w) -> Delta


class RoundFailed(ConfigError):
    """Too few usable client updates for a round; the message says which failed and why."""


def weighted_sum(global_adapter: Adapter, deltas: list[Adapter], weights: list[float]) -> tuple[Adapter, dict]:
    """Delta = sum_k w_k delta_k, and how far averaging LoRA factors is from averaging their products."""
    return (aggregation.pseudo_gradient(deltas, weights),
            {"lora_product_error": aggregation.lora_product_error(global_adapter, deltas, weights)})


def median(global_adapter: Adapter, deltas: list[Adapter], weights: list[float]) -> tuple[Adapter, dict]:
    """The ``median`` reference: Delta = the coordinate-wise median of the deltas (no weights)."""
    return aggregation.coordinate_median(deltas), {}


COMBINE: dict[str, Combine] = {"weighted": weighted_sum, "median": median}


class Server:
    """Server state and the server's half of every round, for ``cfg.strategy``; ``Server.for_config`` picks the
    class. ``client_ids``: the clients known at the start; ``population``: how many clients may take part
    (privacy accounting; a Flower server sets it to the connected SuperNodes)."""

    def __init__(self, cfg: RunConfig, initial_adapter: Adapter, client_ids: list[str] = (),
                 judge: ProbeJudge | None = None):
        self.cfg, self.judge = cfg, judge  # judge: the server's probes (``probes`` > 0), or None
        self.strategy = STRATEGIES[cfg.strategy]
        self.mode = self.strategy.mode
        self.state = ServerState(clone(initial_adapter))
        self.fgrpo_settings = aggregation.FGRPOSettings.from_config(cfg)
        self.server_optimizer = aggregation.ServerOptimizer.from_config(cfg)
        self.population = len(client_ids)

    @staticmethod
    def for_config(cfg: RunConfig, initial_adapter: Adapter, client_ids: list[str] = (),
                   judge: ProbeJudge | None = None) -> Server:
        """The server of ``cfg.strategy``: a ``LocalOnlyServer`` for the local-only reference, else a ``Server``."""
        kind = LocalOnlyServer if STRATEGIES[cfg.strategy].combine == "own" else Server
        return kind(cfg, initial_adapter, client_ids, judge)

    @property
    def global_adapter(self) -> Adapter:
        return self.state.global_adapter

    def start_adapter(self, client_id: str | None) -> Adapter:
        """What ``client_id`` trains from this round: the global adapter."""
        return self.global_adapter

    def clients_per_round(self, population: int | None = None) -> int:
        return max(1, round(self.cfg.fraction * (self.population if population is None else population)))

    def eval_due(self, rnd: int) -> bool:
        return rnd % self.cfg.eval_every == 0 or rnd == self.cfg.rounds

    def load_state(self, tensors: Adapter, state: dict) -> None:
        self.state = ServerState.from_tensors_and_json(tensors, state)

    def finish_round(self, rnd: int, reports: list[ClientReport], failed: list[dict] | None = None,
                     secure_sum: SecureSum | None = None) -> list[dict]:
        """The server's half of a round; ``failed``: warning rows for clients that sent nothing. ``secure_sum``:
        under secure aggregation the reports carry no delta, and it returns sum_k w_k delta_k for the weights."""
        accepted, warnings, server = self.accept(rnd, reports, failed or [], deltas_seen=secure_sum is None)
        if not accepted:  # every update did harm: the global adapter stays as it is this round
            return warnings + [{"round": rnd, "kind": "server", **server}]
        weights = self.weigh(accepted)  # w_k from the statistics; bound: w_k <= max_weight_ratio / |S|
        deltas = [r.delta for r in accepted]
        if self.cfg.dp == "server":  # the server clips what it received: delta_k <- delta_k min(1, C / ||delta_k||)
            clipped = [privacy.clip_update(d, self.cfg.dp_clip) for d in deltas]
            deltas, server["dp_clipped_fraction"] = [d for d, _ in clipped], sum(c for _, c in clipped) / len(clipped)
        if secure_sum is None:  # combine: Delta = sum_k w_k delta_k (median: the coordinate-wise median)
            delta, merged = COMBINE[self.strategy.combine](self.global_adapter, deltas, weights.weights)
        else:
            delta, merged = self.secure_delta(rnd, secure_sum(accepted, weights.weights)), {}
        delta, noised = self.noise(rnd, delta, weights.weights)  # central DP: + N(0, (sigma C w_max)^2 I)
        self.state.global_adapter, self.state.optimizer = aggregation.server_step(  # theta <- opt(theta, Delta)
            self.global_adapter, delta, self.server_optimizer, self.state.optimizer)
        self.state.client_baselines = weights.client_baselines
        server.update({**merged, **noised, "pseudo_gradient_norm": update_norm(delta)})
        if self.cfg.dp != "off":
            server["epsilon"] = self.epsilon(rnd)
        return warnings + self.client_rows(rnd, accepted, weights) + [{"round": rnd, "kind": "server", **server}]

    def accept(self, rnd: int, reports: list[ClientReport], failed: list[dict], deltas_seen: bool = True,
               ) -> tuple[list[ClientReport], list[dict], dict]:
        """(accepted reports, warning rows, the probes' server metrics): screen the tensors, the time and the
        norms, check the reports, require min_clients, then let the probes leave out updates that do harm."""
        accepted, warnings = self.screen(rnd, reports, list(failed), deltas_seen)
        if self.cfg.check_reports:
            accepted, warnings = self.check(rnd, accepted, warnings, deltas_seen)
        if len(accepted) < self.cfg.min_clients:
            why = "; ".join(f"{w['client_id']}: {w['reason']}" for w in warnings)
            raise RoundFailed(f"round {rnd}: {len(accepted)} accepted client update(s), fewer than min_clients = "
                              f"{self.cfg.min_clients} ({why}); the last checkpoint is intact: fix the clients and "
                              "--resume to retry the round")
        if self.judge is None or not accepted:
            return accepted, warnings, {}
        accepted, harmful, probed = self.judge.screen(rnd, self.global_adapter, accepted)  # "do no harm"
        return accepted, warnings + harmful, probed

    def screen(self, rnd: int, reports: list[ClientReport], warnings: list[dict], deltas_seen: bool = True,
               ) -> tuple[list[ClientReport], list[dict]]:
        """Leave out reports over the time limit, with tensors that differ from the global adapter in name, shape
        or dtype, non-finite values, or a norm above ``max_norm_ratio`` x the round's median non-zero norm.
        Without ``deltas_seen`` (secure aggregation: the server never sees a delta) no tensor is checked."""
        accepted = []
        wire = getattr(torch, self.cfg.delta_dtype)
        for r in reports:
            reason = delta_problem(r.delta, self.global_adapter, wire) if deltas_seen else None
            if reason is None and self.cfg.client_timeout and r.seconds > self.cfg.client_timeout:
                reason = f"took {r.seconds:.1f} s, over client_timeout = {self.cfg.client_timeout}"
            if reason:
                warnings.append(warning_row(rnd, r.stats.client_id, reason))
            else:  # aggregate in full precision
                accepted.append(replace(r, delta={k: v.to(self.global_adapter[k].dtype) for k, v in r.delta.items()}))
        norms = [update_norm(r.delta) for r in accepted]
        moving = [n for n in norms if n > 0]  # a client whose groups all tied sends a zero update
        if not self.cfg.max_norm_ratio or len(moving) <= 2:  # the median needs 3 or more non-zero norms
            return accepted, warnings
        limit = self.cfg.max_norm_ratio * statistics.median(moving)
        warnings += [warning_row(rnd, r.stats.client_id, f"update norm {n:.3g} > max_norm_ratio x median = "
                                 f"{limit:.3g}") for r, n in zip(accepted, norms) if n > limit]
        return [r for r, n in zip(accepted, norms) if n <= limit], warnings

    def check(self, rnd: int, accepted: list[ClientReport], warnings: list[dict], deltas_seen: bool,
              ) -> tuple[list[ClientReport], list[dict]]:
        """Leave out reports that no honest round can produce (``trust.report_problem``)."""
        pooled_steps = self.cfg.local_steps * (self.clients_per_round() if self.mode.pooled else 1)
        rules = ReportRules.from_config(self.cfg, pooled_steps)
        kept = []
        for r in accepted:
            reason = report_problem(r.stats, rules, update_norm(r.delta) if deltas_seen else None)
            if reason:
                warnings = [*warnings, warning_row(rnd, r.stats.client_id, reason)]
            else:
                kept.append(r)
        return kept, warnings

    def weigh(self, accepted: list[ClientReport]) -> RoundWeights:
        """The strategy's weights, gains and client baselines after this round; then the bound: no weight above
        w_max = max_weight_ratio / |S| (water-filling, ``aggregation.cap_weights``). The median has no weights."""
        if self.strategy.weigh is None:
            return RoundWeights([None] * len(accepted), [None] * len(accepted), self.state.client_baselines)
        result = self.strategy.weigh([self.gain_stats(r) for r in accepted], self.state.client_baselines,
                                     self.fgrpo_settings)
        bound = weight_bound(self.cfg, len(accepted))
        if bound < 1:
            result.weights = aggregation.cap_weights(result.weights, bound)
        return result

    def gain_stats(self, report: ClientReport) -> ClientStats:
        """The statistics the weights are made of: the client's, or under gain = probe, with the server's own
        paired probe gain of the update in place of a client-measured one (no client can lie about it)."""
        if self.cfg.gain != "probe":
            return report.stats
        return replace(report.stats, paired_gain=report.metrics["probe_gain"], paired_se=report.metrics["probe_se"],
                       validation_size=self.judge.size)

    def secure_delta(self, rnd: int, delta: Adapter) -> Adapter:
        """The securely aggregated sum, checked as a delta is (names, shapes, finiteness)."""
        if (problem := delta_problem(delta, self.global_adapter, torch.float32)) is not None:
            raise RoundFailed(f"round {rnd}: the securely aggregated update is unusable ({problem}); "
                              "the last checkpoint is intact")
        return delta

    def noise(self, rnd: int, delta: Adapter, weights: list[float]) -> tuple[Adapter, dict]:
        """Central DP (dp = server or client): Delta + N(0, (sigma C w_max)^2 I), w_max the largest weight any
        client could get this round without looking at data: the bound in force for an adaptive strategy, the
        largest of the round's weights for one whose weights depend only on the run config (fedavg, uniform)."""
        if self.cfg.dp not in ("server", "client"):
            return delta, {}
        w_max = weight_bound(self.cfg, len(weights)) if self.strategy.adaptive else max(weights)
        std = privacy.central_noise_std(self.cfg.dp_noise, self.cfg.dp_clip, w_max)
        return privacy.add_gaussian_noise(delta, std, derived_seed(self.cfg.seed, "dp-central", rnd)), {
            "dp_noise_std": std}

    def client_rows(self, rnd: int, accepted: list[ClientReport], weights: RoundWeights) -> list[dict]:
        baselines = self.state.client_baselines
        return [client_row(rnd, r, w, g, baselines[r.stats.client_id].baseline
                           if r.stats.client_id in baselines else None)
                for r, w, g in zip(accepted, weights.weights, weights.gains)]

    def epsilon(self, rounds: int) -> float:
        """epsilon of (epsilon, dp_delta) spent after ``rounds`` rounds (docs/privacy.md); the sampling
        rate is clients per round over the clients that may take part (``population``)."""
        if self.population < 1:
            raise RoundFailed("privacy accounting needs the number of clients that take part; none is known")
        rate = 1.0 if self.cfg.dp == "local" else self.clients_per_round() / self.population
        return privacy.epsilon(rounds, self.cfg.dp_noise, rate, self.cfg.dp_delta, self.cfg.dp_stats_noise)


class LocalOnlyServer(Server):
    """The local-only reference: each client trains its own adapter from round to round, never merged (no
    weights, no baselines, no server step); the host evaluates each on its own tasks."""

    def __init__(self, cfg: RunConfig, initial_adapter: Adapter, client_ids: list[str] = (),
                 judge: ProbeJudge | None = None):
        super().__init__(cfg, initial_adapter, client_ids, judge)
        self.state.local_adapters = {c: clone(initial_adapter) for c in client_ids}

    def start_adapter(self, client_id: str | None) -> Adapter:
        """The client's own adapter (a client the server has not heard from yet holds the initial one)."""
        return self.state.local_adapters.get(client_id, self.global_adapter)

    def finish_round(self, rnd: int, reports: list[ClientReport], failed: list[dict] | None = None,
                     secure_sum: SecureSum | None = None) -> list[dict]:
        """Accept as every strategy does, then theta_k <- theta_k + delta_k for each accepted client."""
        accepted, warnings, server = self.accept(rnd, reports, failed or [])
        for r in accepted:
            own = self.start_adapter(r.stats.client_id)
            self.state.local_adapters[r.stats.client_id] = {k: own[k] + r.delta[k] for k in own}
        rows = [client_row(rnd, r, None, None, None) for r in accepted]
        return warnings + rows + ([{"round": rnd, "kind": "server", **server}] if server or not accepted else [])


def weight_bound(cfg: RunConfig, participants: int) -> float:
    """w_max = max_weight_ratio / |S|, the largest weight one of ``participants`` clients may get (at most 1;
    max_weight_ratio = 0: no bound, 1)."""
    return min(1.0, cfg.max_weight_ratio / participants) if cfg.max_weight_ratio > 0 else 1.0


def sample_participants(candidates: list, fraction: float, seed: int, rnd: int) -> list:
    """This round's participants among ``candidates`` (clients or Flower node ids): a ``fraction`` of
    them, seeded per round, so no sampler state to checkpoint; in the candidates' order."""
    rng = random.Random(derived_seed(seed, "client-sampling", rnd))
    chosen = sorted(rng.sample(range(len(candidates)), max(1, round(fraction * len(candidates)))))
    return [candidates[i] for i in chosen]


def delta_problem(delta: Adapter, reference: Adapter, dtype: torch.dtype) -> str | None:
    """Why ``delta`` (sent in ``dtype``) cannot be applied to ``reference`` (names, shapes, dtypes,
    finiteness), or None."""
    if delta.keys() != reference.keys():
        missing, extra = sorted(reference.keys() - delta.keys()), sorted(delta.keys() - reference.keys())
        return f"tensors differ from the global adapter (missing {missing[:2]}, unexpected {extra[:2]})"
    for name, value in delta.items():
        ref = reference[name]
        if value.shape != ref.shape or value.dtype != dtype:
            return f"tensor {name}: {tuple(value.shape)} {value.dtype}, expected {tuple(ref.shape)} {dtype}"
        if not torch.isfinite(value).all():
            return f"tensor {name} has non-finite values"
    return None
