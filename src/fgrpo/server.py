"""The server side of a round, the same under every runtime (in-process: ``fgrpo.runner``; Flower:
``fgrpo.flower.server_app``). Formulas: docs/algorithm.md.

    Server.start_adapter   what a client trains from: the global adapter, or (local-only) its own
    Server.finish_round    screen_updates -> weigh (the strategy) -> apply (central DP, server optimizer)
                           -> one metrics row per client, a server row
    Server.epsilon         privacy accounting over the clients that may take part (``population``)

``ServerState`` is the server's whole state (global adapter, client baselines, server optimizer
moments, local-only clients' adapters): what a checkpoint holds. The server holds no model: evaluation
and saving are the model host's (``fgrpo.host``).
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from fgrpo import aggregation, privacy
from fgrpo.aggregation import Adapter, ClientBaseline, RoundWeights, update_norm
from fgrpo.config import ConfigError, RunConfig
from fgrpo.report import ClientUpdate, client_row, warning_row
from fgrpo.seeds import derived_seed
from fgrpo.strategies import STRATEGIES, Mode
from fgrpo.trust import ReportRules, report_problem

if TYPE_CHECKING:
    from fgrpo.probes import ProbeJudge

SecureSum = Callable[[list[ClientUpdate], list[float]], Adapter]  # (accepted updates, weights) -> sum_k w_k delta_k


class RoundFailed(ConfigError):
    """Too few usable client updates for a round; the message says which failed and why."""


@dataclass
class ServerState:
    """Everything the server keeps between rounds; ``tensors_and_json`` is its checkpoint."""

    global_adapter: Adapter
    client_baselines: dict[str, ClientBaseline] = field(default_factory=dict)
    optimizer: aggregation.ServerOptimizerState = field(default_factory=aggregation.ServerOptimizerState)
    local_adapters: dict[str, Adapter] = field(default_factory=dict)  # local-only: each client's own adapter

    def tensors_and_json(self) -> tuple[Adapter, dict]:
        tensors = {f"global/{k}": v for k, v in self.global_adapter.items()}
        for moment in ("m", "v"):
            tensors.update({f"server_{moment}/{k}": v for k, v in (getattr(self.optimizer, moment) or {}).items()})
        for client_id, adapter in self.local_adapters.items():
            tensors.update({f"local/{client_id}/{k}": v for k, v in adapter.items()})
        state = {"client_baselines": {k: asdict(v) for k, v in self.client_baselines.items()},
                 "server_step": self.optimizer.step, "local_clients": list(self.local_adapters)}
        return tensors, state

    @classmethod
    def from_tensors_and_json(cls, tensors: Adapter, state: dict) -> ServerState:
        def part(prefix: str) -> Adapter:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        return cls(part("global/"),
                   {k: ClientBaseline(**v) for k, v in state["client_baselines"].items()},
                   aggregation.ServerOptimizerState(state["server_step"], part("server_m/") or None,
                                                    part("server_v/") or None),
                   {c: part(f"local/{c}/") for c in state.get("local_clients", [])})


class Server:
    """Server state and the server's half of every round, for ``cfg.strategy``. ``client_ids``: the
    clients known at the start (their own adapters, under local-only); ``population``: how many clients
    may take part (privacy accounting; a Flower server sets it to the connected SuperNodes)."""

    def __init__(self, cfg: RunConfig, initial_adapter: Adapter, client_ids: list[str] = (),
                 judge: ProbeJudge | None = None):
        self.cfg, self.judge = cfg, judge  # judge: the server's probes (``probes`` > 0), or None
        self.strategy = STRATEGIES[cfg.strategy]
        self.mode: Mode = self.strategy.mode
        own = {c: clone(initial_adapter) for c in client_ids} if self.mode.start == "own" else {}
        self.state = ServerState(clone(initial_adapter), local_adapters=own)
        self.fgrpo_settings = aggregation.FGRPOSettings.from_config(cfg)
        self.server_optimizer = aggregation.ServerOptimizer.from_config(cfg)
        self.population = len(client_ids)

    @property
    def global_adapter(self) -> Adapter:
        return self.state.global_adapter

    def start_adapter(self, client_id: str | None) -> Adapter:
        """What ``client_id`` trains from this round: the global adapter, or under local-only its own
        (a client the server has not heard from yet still holds the initial adapter, which is the global one)."""
        if self.mode.start == "own" and client_id in self.state.local_adapters:
            return self.state.local_adapters[client_id]
        return self.global_adapter

    def clients_per_round(self, population: int | None = None) -> int:
        return max(1, round(self.cfg.fraction * (self.population if population is None else population)))

    def eval_due(self, rnd: int) -> bool:
        return rnd % self.cfg.eval_every == 0 or rnd == self.cfg.rounds

    def load_state(self, tensors: Adapter, state: dict) -> None:
        self.state = ServerState.from_tensors_and_json(tensors, state)

    def finish_round(self, rnd: int, updates: list[ClientUpdate], failed: list[dict] | None = None,
                     secure_sum: SecureSum | None = None) -> list[dict]:
        """The server's half of a round: screening, weights from the statistics, the server step and the
        metric rows. ``failed``: warning rows for clients that sent no update. ``secure_sum``: under
        secure aggregation the updates carry no delta, and this returns sum_k w_k delta_k for the weights."""
        updates, warnings = self.screen_updates(rnd, updates, failed or [], deltas=secure_sum is None)
        probed = {}
        if self.judge is not None and updates:  # "do no harm" on the server's own probe prompts
            updates, harmful, probed = self.judge.screen(rnd, self.global_adapter, updates)
            warnings += harmful
        if not updates:  # every update did harm: the global adapter stays as it is this round
            return warnings + [{"round": rnd, "kind": "server", **probed}]
        weights = self.weigh(updates)
        server = {**probed, **self.apply(rnd, updates, weights, secure_sum)}
        self.state.client_baselines = weights.client_baselines
        if self.cfg.dp != "off":
            server["epsilon"] = self.epsilon(rnd)
        rows = warnings + [client_row(rnd, u, w, g, self._baseline(u.stats.client_id))
                           for u, w, g in zip(updates, weights.weights, weights.gains)]
        if server:
            rows.append({"round": rnd, "kind": "server", **server})
        return rows

    def _baseline(self, client_id: str) -> float | None:
        state = self.state.client_baselines.get(client_id)
        return state.baseline if state else None

    def screen_updates(self, rnd: int, updates: list[ClientUpdate], failed: list[dict], deltas: bool = True,
                       ) -> tuple[list[ClientUpdate], list[dict]]:
        """Accepted updates, and warning rows for the clients that ``failed`` (did not reply) and for
        rejected updates: over the time limit, tensors that differ from the global adapter in name, shape or
        dtype, non-finite values, or a norm above ``max_norm_ratio`` x the round's median non-zero norm.
        With ``check_reports``, the client's report too (``trust.report_problem``). Without ``deltas`` (secure
        aggregation: the server never sees one) no tensor is checked."""
        accepted, warnings = [], list(failed)
        wire = getattr(torch, self.cfg.delta_dtype)
        for u in updates:
            reason = delta_problem(u.delta, self.global_adapter, wire) if deltas else None
            if reason is None and self.cfg.client_timeout and u.seconds > self.cfg.client_timeout:
                reason = f"took {u.seconds:.1f} s, over client_timeout = {self.cfg.client_timeout}"
            if reason:
                warnings.append(warning_row(rnd, u.stats.client_id, reason))
            else:  # aggregate in full precision
                accepted.append(replace(u, delta={k: v.to(self.global_adapter[k].dtype) for k, v in u.delta.items()}))
        accepted, warnings = self._screen_norms(rnd, accepted, warnings)
        if self.cfg.check_reports:
            accepted, warnings = self._screen_reports(rnd, accepted, warnings, deltas)
        if len(accepted) < self.cfg.min_clients:
            why = "; ".join(f"{w['client_id']}: {w['reason']}" for w in warnings)
            raise RoundFailed(f"round {rnd}: {len(accepted)} accepted client update(s), fewer than min_clients = "
                              f"{self.cfg.min_clients} ({why}); the last checkpoint is intact: fix the clients and "
                              "--resume to retry the round")
        return accepted, warnings

    def _screen_norms(self, rnd: int, accepted: list[ClientUpdate], warnings: list[dict],
                      ) -> tuple[list[ClientUpdate], list[dict]]:
        """Leave out updates whose norm exceeds max_norm_ratio x the median non-zero norm (3 or more non-zero)."""
        norms = [update_norm(u.delta) for u in accepted]
        moving = [n for n in norms if n > 0]  # a client whose groups all tied sends a zero update
        if not self.cfg.max_norm_ratio or len(moving) <= 2:
            return accepted, warnings
        limit = self.cfg.max_norm_ratio * statistics.median(moving)
        warnings = warnings + [warning_row(rnd, u.stats.client_id, f"update norm {n:.3g} > max_norm_ratio x median = "
                                           f"{limit:.3g}") for u, n in zip(accepted, norms) if n > limit]
        return [u for u, n in zip(accepted, norms) if n <= limit], warnings

    def _screen_reports(self, rnd: int, accepted: list[ClientUpdate], warnings: list[dict], deltas: bool,
                        ) -> tuple[list[ClientUpdate], list[dict]]:
        """Leave out updates whose report no honest round can produce (``trust.report_problem``)."""
        rules = ReportRules.from_config(self.cfg, self.cfg.local_steps * (self.clients_per_round()
                                                                         if self.mode.pooled else 1))
        kept = []
        for u in accepted:
            reason = report_problem(u.stats, rules, update_norm(u.delta) if deltas else None)
            if reason:
                warnings = [*warnings, warning_row(rnd, u.stats.client_id, reason)]
            else:
                kept.append(u)
        return kept, warnings

    def weigh(self, updates: list[ClientUpdate]) -> RoundWeights:
        """The strategy's weights and gains, and the client baselines after this round; a strategy that
        combines nothing (local-only) has no weights (None) and keeps no baselines."""
        if not self.mode.weighted:
            return RoundWeights([None] * len(updates), [None] * len(updates), self.state.client_baselines)
        result = self.strategy.weigh([u.stats for u in updates], self.state.client_baselines, self.fgrpo_settings)
        bound = weight_bound(self.cfg, len(updates))
        if bound < 1:  # a bound on any client's influence (max_weight: also on central DP's sensitivity)
            result.weights = aggregation.cap_weights(result.weights, bound)
        return result

    def apply(self, rnd: int, updates: list[ClientUpdate], weights: RoundWeights,
              secure_sum: SecureSum | None = None) -> dict:
        """The server step: theta <- theta + server optimizer(sum_k w_k delta_k), with central DP's clipping
        and noise (or, local-only, each delta to its own client's adapter). Returns the round's server metrics."""
        if not self.mode.weighted:
            for u in updates:
                own = self.start_adapter(u.stats.client_id)
                self.state.local_adapters[u.stats.client_id] = {k: own[k] + u.delta[k] for k in own}
            return {}
        w, deltas, server = weights.weights, [u.delta for u in updates], {}
        if self.cfg.dp == "server":  # the server clips what it received
            clipped = [privacy.clip_update(d, self.cfg.dp_clip) for d in deltas]
            deltas = [d for d, _ in clipped]
            server["dp_clipped_fraction"] = sum(c for _, c in clipped) / len(clipped)
        if self.strategy.combine == "median":
            delta = aggregation.coordinate_median(deltas)
            server["lora_product_error"] = aggregation.lora_product_error(self.global_adapter, deltas, w)
        elif secure_sum is None:
            delta = aggregation.pseudo_gradient(deltas, w)
            server["lora_product_error"] = aggregation.lora_product_error(self.global_adapter, deltas, w)
        else:
            delta = secure_sum(updates, w)
            if (problem := delta_problem(delta, self.global_adapter, torch.float32)) is not None:
                raise RoundFailed(f"round {rnd}: the securely aggregated update is unusable ({problem}); "
                                  "the last checkpoint is intact")
        if self.cfg.dp in ("server", "client"):  # central DP: noise on the weighted sum
            server["dp_noise_std"] = privacy.central_noise_std(self.cfg.dp_noise, self.cfg.dp_clip, w,
                                                               self.cfg.max_weight)
            delta = privacy.add_gaussian_noise(delta, server["dp_noise_std"],
                                               derived_seed(self.cfg.seed, "dp-central", rnd))
        server["pseudo_gradient_norm"] = update_norm(delta)
        self.state.global_adapter, self.state.optimizer = aggregation.server_step(
            self.global_adapter, delta, self.server_optimizer, self.state.optimizer)
        return server

    def epsilon(self, rounds: int) -> float:
        """epsilon of (epsilon, dp_delta) spent after ``rounds`` rounds (docs/privacy.md); the sampling
        rate is clients per round over the clients that may take part (``population``)."""
        if self.population < 1:
            raise RoundFailed("privacy accounting needs the number of clients that take part; none is known")
        rate = 1.0 if self.cfg.dp == "local" else self.clients_per_round() / self.population
        return privacy.epsilon(rounds, self.cfg.dp_noise, rate, self.cfg.dp_delta, self.cfg.dp_stats_noise)


def weight_bound(cfg: RunConfig, participants: int) -> float:
    """The largest weight one of ``participants`` clients may get: min(max_weight, max_weight_ratio / |S|)."""
    ratio = cfg.max_weight_ratio / participants if cfg.max_weight_ratio > 0 else 1.0
    return min(cfg.max_weight, ratio)


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


def clone(adapter: Adapter) -> Adapter:
    return {k: v.detach().clone() for k, v in adapter.items()}
