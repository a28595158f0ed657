"""The round engine: what every runtime does in a federated round (in-process: ``fgrpo.runner``;
Flower: ``fgrpo.flower``). Formulas: docs/algorithm.md.

    client side   train_client      local GRPO from the global adapter -> ClientUpdate (delta_k, statistics)
    server side   finish_round      screen_updates -> weigh (the strategy) -> apply (DP, server optimizer)
                                    -> client_rows -> eval_row when due

ONE base model is in memory; a client's adapter weights are swapped into it for its local training,
so memory grows with the number of clients only by adapter size. ``ServerState`` is the server's
whole state (global adapter, client baselines, server optimizer moments, local-only adapters): what a
checkpoint holds. The runtimes add only who takes part in a round (``sample_participants``) and the loop.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from fgrpo import aggregation, privacy, tasks
from fgrpo.aggregation import Adapter, ClientBaseline, ClientStats, RoundWeights, update_norm
from fgrpo.config import ConfigError, RunConfig
from fgrpo.evaluation import Accuracy, evaluate
from fgrpo.grpo import GRPOSettings, kl_to_reference, local_grpo, prompt_batches
from fgrpo.model import add_lora, autocast_context, load_base, resolve_device, resolve_prompt_style
from fgrpo.seeds import derived_seed
from fgrpo.strategies import STRATEGIES


@dataclass
class ClientUpdate:
    """What one client sends back after a round (docs/algorithm.md, section 2), plus labels for the metrics."""

    stats: ClientStats
    delta: Adapter
    metrics: dict[str, float]
    seconds: float
    task: str = ""  # what the client trains on, for the metric rows
    reward_scale: str = ""


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
                 "server_step": self.optimizer.step}
        return tensors, state

    @classmethod
    def from_tensors_and_json(cls, tensors: Adapter, state: dict, local_ids: list[str]) -> ServerState:
        def part(prefix: str) -> Adapter:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        return cls(part("global/"),
                   {k: ClientBaseline(**v) for k, v in state["client_baselines"].items()},
                   aggregation.ServerOptimizerState(state["server_step"], part("server_m/") or None,
                                                    part("server_v/") or None),
                   {c: part(f"local/{c}/") for c in local_ids})


class RoundFailed(ConfigError):
    """Too few usable client updates for a round; the message says which failed and why."""


class Federation:
    """The base model with its LoRA adapter, this side's clients and test sets, and the server state.

    ``remote_clients``: a Flower server whose SuperNodes bring their own data (user-data with no
    ``data`` here): no client data and no test sets on this side; clients evaluate."""

    def __init__(self, cfg: RunConfig, progress=None, remote_clients: bool = False):
        self.cfg = cfg
        self.strategy = STRATEGIES[cfg.strategy]
        self.device = resolve_device(cfg.device)
        self.autocast = autocast_context(self.device, cfg.mixed_precision)
        base, self.tokenizer = load_base(cfg.model, self.device, cfg.warm_start_steps, cfg.cache_dir, progress,
                                         cfg.prompt_style)
        self.prompt_style = resolve_prompt_style(cfg.prompt_style, cfg.model, self.tokenizer)
        self.cfg = cfg = replace(cfg, prompt_style=self.prompt_style)  # config.toml records the resolved style
        self.model = add_lora(base, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, seed=cfg.seed,
                              freeze_a=cfg.lora_aggregation == "ffa")
        self.clients, self.test_sets, self.notes = (([], {}, []) if remote_clients
                                                    else load_clients(cfg, self.prompt_style))
        extra = (("format", tasks.format_reward, cfg.format_reward),) if cfg.format_reward > 0 else ()
        for client in self.clients:  # the failure policy for every verifier, built-in or the owner's
            client.reward = tasks.GuardedReward(client.reward, extra)
        self.population = len(self.clients)  # clients that may take part (Flower: the connected nodes)
        self.completions_dir: Path | None = None  # where clients keep sample completions (set by the runtime)
        global_adapter = clone(get_peft_model_state_dict(self.model))
        self.state = ServerState(global_adapter, local_adapters={
            c.client_id: clone(global_adapter) for c in self.clients} if self.strategy.clients == "own" else {})
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = (torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
                          if cfg.local_optimizer == "adamw" else
                          torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.local_momentum,
                                          weight_decay=cfg.weight_decay))
        self.fgrpo_settings = aggregation.FGRPOSettings.from_config(cfg)
        self.server_optimizer = aggregation.ServerOptimizer.from_config(cfg)
        if self.strategy.clients == "pooled" and self.clients:
            steps = sum(self.local_steps(c) for c in self.clients) * self.clients_per_round() / len(self.clients)
            self.pooled = tasks.pooled_client(self.clients, max(1, round(steps)))
            self.pooled.reward = tasks.GuardedReward(self.pooled.reward, extra)

    # shorthands for the state the runtimes and tests read
    @property
    def global_adapter(self) -> Adapter:
        return self.state.global_adapter

    @global_adapter.setter
    def global_adapter(self, adapter: Adapter) -> None:
        self.state.global_adapter = adapter

    @property
    def client_baselines(self) -> dict[str, ClientBaseline]:
        return self.state.client_baselines

    def local_steps(self, client: tasks.ClientSpec) -> int:
        return client.local_steps or self.cfg.local_steps

    def clients_per_round(self, population: int | None = None) -> int:
        return max(1, round(self.cfg.fraction * (self.population if population is None else population)))

    # --- client side --------------------------------------------------------------------------
    def train_client(self, client: tasks.ClientSpec, rnd: int, start: Adapter | None = None) -> ClientUpdate:
        """Local GRPO from ``start`` (the global adapter by default); returns delta_k and the statistics."""
        start = self.global_adapter if start is None else start
        set_peft_model_state_dict(self.model, start)
        self.optimizer.state.clear()  # clients are stateless between rounds
        seed = derived_seed(self.cfg.seed, rnd, client.client_id)
        torch.manual_seed(seed)  # rollout sampling
        batches = prompt_batches(client.train, self.cfg.prompts_per_step, seed)
        settings = GRPOSettings.from_config(self.cfg, local_steps=self.local_steps(client))
        t0 = time.perf_counter()
        with self.autocast():
            result = local_grpo(self.model, self.tokenizer, self.optimizer, batches, client.reward,
                                settings, correctness_fn=tasks.correctness)
        seconds = time.perf_counter() - t0  # local training only: swapping counts as overhead
        with self.autocast():  # a diagnostic of the round, not part of a GRPO step
            result.metrics["kl_to_reference"] = kl_to_reference(self.model, result.last_rollouts, self.cfg.temperature)
        self.keep_samples(client.client_id, rnd, result.samples)
        failed, total = client.reward.take_failures()  # samples whose reward raised or was not finite
        result.metrics["reward_failures"] = failed / max(total, 1)
        result.metrics.update(client.reward.take_components())
        local = get_peft_model_state_dict(self.model)
        delta = {k: (local[k] - start[k]).detach().clone() for k in start}
        stats = ClientStats(client.client_id, result.num_prompts, result.reward_start, result.reward_end,
                            result.reward_std, client.reward.take_observed_range(), result.reward_pooled_std)
        delta, stats = self.privatize(delta, stats, seed, result.metrics, client.reward.declared_range)
        wire = getattr(torch, self.cfg.delta_dtype)  # what the client sends (float32 by default)
        return ClientUpdate(stats, {k: v.to(wire) for k, v in delta.items()}, result.metrics, seconds,
                            client.task, client.reward.name)

    def keep_samples(self, client_id: str, rnd: int, samples: list[dict]) -> None:
        """Append the round's sample completions to ``completions_dir/<client_id>.jsonl``, on the client's
        side (they are the owner's data: no message to the server carries them)."""
        if self.completions_dir is None or not samples:
            return
        self.completions_dir.mkdir(parents=True, exist_ok=True)
        with open(self.completions_dir / f"{client_id}.jsonl", "a") as fh:
            fh.writelines(json.dumps({"round": rnd, "client_id": client_id, **s}) + "\n" for s in samples)

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

    # --- server side --------------------------------------------------------------------------
    def finish_round(self, rnd: int, updates: list[ClientUpdate], failed: list[dict] | None = None,
                     secure_sum: Callable[[list[ClientUpdate], list[float]], Adapter] | None = None) -> list[dict]:
        """The server's half of a round: screening, weights from the statistics, the server step, the
        metric rows, and the evaluation when due. ``failed``: warning rows for clients that sent no
        update. ``secure_sum``: under secure aggregation the updates carry no delta, and this returns
        sum_k w_k delta_k for the weights."""
        updates, warnings = self.screen_updates(rnd, updates, failed or [], deltas=secure_sum is None)
        weights = self.weigh(updates)
        server = self.apply(rnd, updates, weights, secure_sum)
        self.state.client_baselines = weights.client_baselines
        if self.cfg.dp != "off":
            server["epsilon"] = self.epsilon(rnd)
        rows = warnings + self.client_rows(rnd, updates, weights)
        if server:
            rows.append({"round": rnd, "kind": "server", **server})
        if self.eval_due(rnd) and self.test_sets:
            rows.append(self.eval_row(rnd))
        return rows

    def screen_updates(self, rnd: int, updates: list[ClientUpdate], failed: list[dict], deltas: bool = True,
                       ) -> tuple[list[ClientUpdate], list[dict]]:
        """Accepted updates, and warning rows for the clients that ``failed`` (did not reply) and for
        rejected updates: over the time limit, tensors that differ from the global adapter in name,
        shape or dtype, non-finite values, or a norm above ``max_norm_ratio`` x the round's median non-zero norm.
        Without ``deltas`` (secure aggregation: the server never sees one) only the time limit is checked."""
        accepted, warnings = [], list(failed)
        adapter = next(iter(self.state.local_adapters.values()), self.global_adapter)
        wire = getattr(torch, self.cfg.delta_dtype)
        for u in updates:
            reason = delta_problem(u.delta, adapter, wire) if deltas else None
            if reason is None and self.cfg.client_timeout and u.seconds > self.cfg.client_timeout:
                reason = f"took {u.seconds:.1f} s, over client_timeout = {self.cfg.client_timeout}"
            if reason:
                warnings.append(warning_row(rnd, u.stats.client_id, reason))
            else:  # aggregate in full precision
                accepted.append(replace(u, delta={k: v.to(adapter[k].dtype) for k, v in u.delta.items()}))
        norms = [update_norm(u.delta) for u in accepted]
        moving = [n for n in norms if n > 0]  # a client whose groups all tied sends a zero update
        if self.cfg.max_norm_ratio and len(moving) > 2:
            limit = self.cfg.max_norm_ratio * statistics.median(moving)
            warnings += [warning_row(rnd, u.stats.client_id, f"update norm {n:.3g} > max_norm_ratio x median = "
                                     f"{limit:.3g}") for u, n in zip(accepted, norms) if n > limit]
            accepted = [u for u, n in zip(accepted, norms) if n <= limit]
        if len(accepted) < self.cfg.min_clients:
            why = "; ".join(f"{w['client_id']}: {w['reason']}" for w in warnings)
            raise RoundFailed(f"round {rnd}: {len(accepted)} accepted client update(s), fewer than min_clients = "
                              f"{self.cfg.min_clients} ({why}); the last checkpoint is intact: fix the clients and "
                              "--resume to retry the round")
        return accepted, warnings

    def weigh(self, updates: list[ClientUpdate]) -> RoundWeights:
        """The strategy's weights and gains, and the client baselines after this round; a strategy that
        combines nothing (local-only) has no weights (None) and keeps no baselines."""
        if self.strategy.weigh is None:
            return RoundWeights([None] * len(updates), [None] * len(updates), self.client_baselines)
        result = self.strategy.weigh([u.stats for u in updates], self.client_baselines, self.fgrpo_settings)
        if self.cfg.max_weight < 1:  # a bound on any client's influence (and on central DP's sensitivity)
            result.weights = aggregation.cap_weights(result.weights, self.cfg.max_weight)
        return result

    def apply(self, rnd: int, updates: list[ClientUpdate], weights: RoundWeights,
              secure_sum: Callable | None = None) -> dict:
        """The server step: theta <- theta + server optimizer(sum_k w_k delta_k), with central DP's
        clipping and noise (or, local-only, each delta to its own client's adapter). Returns the
        round's server metrics."""
        if self.strategy.weigh is None:
            for u in updates:
                own = self.state.local_adapters[u.stats.client_id]
                self.state.local_adapters[u.stats.client_id] = {k: own[k] + u.delta[k] for k in own}
            return {}
        w, deltas, server = weights.weights, [u.delta for u in updates], {}
        if self.cfg.dp == "server":  # the server clips what it received
            clipped = [privacy.clip_update(d, self.cfg.dp_clip) for d in deltas]
            deltas = [d for d, _ in clipped]
            server["dp_clipped_fraction"] = sum(c for _, c in clipped) / len(clipped)
        if secure_sum is None:
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

    def client_rows(self, rnd: int, updates: list[ClientUpdate], weights: RoundWeights) -> list[dict]:
        """One metrics row per accepted client: its statistics, weight, gain and baseline, local metrics."""
        rows = []
        for u, w, g in zip(updates, weights.weights, weights.gains):
            state = self.client_baselines.get(u.stats.client_id)
            rows.append({
                "round": rnd, "kind": "client", "client_id": u.stats.client_id, "task": u.task,
                "reward_scale": u.reward_scale, **asdict(u.stats), "weight": w, "gain": g,
                "baseline": state.baseline if state else None, **u.metrics,
                "update_norm": update_norm(u.delta) if u.delta else None, "train_seconds": u.seconds,
            })
        return rows

    def epsilon(self, rounds: int) -> float:
        """epsilon of (epsilon, dp_delta) spent after ``rounds`` rounds (docs/privacy.md); the sampling
        rate is clients per round over the clients that may take part (``population``)."""
        if self.population < 1:
            raise RoundFailed("privacy accounting needs the number of clients that take part; none is known")
        rate = 1.0 if self.cfg.dp == "local" else self.clients_per_round() / self.population
        return privacy.epsilon(rounds, self.cfg.dp_noise, rate, self.cfg.dp_delta, self.cfg.dp_stats_noise)

    def eval_due(self, rnd: int) -> bool:
        return rnd % self.cfg.eval_every == 0 or rnd == self.cfg.rounds

    # --- evaluation -------------------------------------------------------------------------------
    def evaluate(self) -> Accuracy:
        """Greedy accuracy per task: of the global model, or (a strategy whose clients keep their own
        adapters) the mean over the clients holding each task of that client's own model."""
        if self.strategy.clients != "own":
            set_peft_model_state_dict(self.model, self.global_adapter)
            with self.autocast():
                return evaluate(self.model, self.tokenizer, self.test_sets, self.cfg.max_new_tokens)
        results = []
        for client in self.clients:
            set_peft_model_state_dict(self.model, self.state.local_adapters[client.client_id])
            own = {t: self.test_sets[t] for t in tasks.scenario_tasks([client], tuple(self.test_sets))}
            with self.autocast():
                results.append(evaluate(self.model, self.tokenizer, own, self.cfg.max_new_tokens))
        mean = Accuracy.mean(results)
        parts = ("exact", "content", "formatted")
        return Accuracy(*({t: getattr(mean, part)[t] for t in self.test_sets} for part in parts))

    def eval_row(self, rnd: int, accuracy: Accuracy | None = None) -> dict:
        """The evaluation row of round ``rnd``: of this side's test sets, or of ``accuracy`` measured
        elsewhere (by Flower clients on their own held-out data)."""
        t0 = time.perf_counter()
        accuracy = self.evaluate() if accuracy is None else accuracy
        row = {"round": rnd, "kind": "eval", **accuracy.row()}
        row["eval_seconds"] = time.perf_counter() - t0
        row["clock_seconds"] = time.time()  # when this evaluation ended (Unix time): rounds' wall times
        return row

    # --- state ----------------------------------------------------------------------------------
    def load_state(self, tensors: Adapter, state: dict) -> None:
        self.state = ServerState.from_tensors_and_json(tensors, state, list(self.state.local_adapters))

    def save_adapter(self, path) -> None:
        """The global adapter, loadable with ``PeftModel.from_pretrained(base, path)``; with clients that
        keep their own adapters (local-only), each client's in ``path/<client_id>``."""
        if self.strategy.clients == "own":
            for client_id, adapter in self.state.local_adapters.items():
                set_peft_model_state_dict(self.model, adapter)
                self.model.save_pretrained(f"{path}/{client_id}")
            return
        set_peft_model_state_dict(self.model, self.global_adapter)
        self.model.save_pretrained(path)


def load_clients(cfg: RunConfig, prompt_style: str = "compact",
                 ) -> tuple[list[tasks.ClientSpec], dict[str, list[tasks.Example]], list[str]]:
    """(clients, held-out test sets per task, notes for the user) of a named scenario or of user data; with
    ``prompt_style = 'chat'``, every example as chat messages (``tasks.as_chat``)."""
    clients, test_sets, notes = _client_data(cfg)
    if prompt_style == "chat":
        for client in clients:
            client.train = [tasks.as_chat(e, cfg.system_prompt) for e in client.train]
        test_sets = {t: [tasks.as_chat(e, cfg.system_prompt) for e in examples] for t, examples in test_sets.items()}
    return clients, test_sets, notes


def _client_data(cfg: RunConfig) -> tuple[list[tasks.ClientSpec], dict[str, list[tasks.Example]], list[str]]:
    if cfg.scenario != "user-data":
        clients = tasks.build_scenario(cfg.scenario, cfg.num_clients, cfg.train_size, cfg.seed, cfg.task_list,
                                       cfg.dirichlet_alpha, cfg.local_steps, cfg.reward_noise)
        test_sets = {t: tasks.test_split(t, cfg.eval_size) for t in tasks.scenario_tasks(clients, cfg.task_list)}
        return clients, test_sets, []
    from fgrpo import userdata

    if not cfg.data.strip():
        raise ConfigError("scenario = 'user-data' needs data = FILE[,FILE...] in this runtime (on Flower, "
                          "each SuperNode names its own with --node-config 'data=\"FILE\" reward=\"NAME\"')")
    return userdata.build_clients(cfg.data_sources, cfg.reward_names, cfg.prompt_column, cfg.answer_column,
                                  cfg.skip_bad_rows, cfg.eval_size)


def sample_participants(candidates: list, fraction: float, seed: int, rnd: int) -> list:
    """This round's participants among ``candidates`` (clients or Flower node ids): a ``fraction`` of
    them, seeded per round, so no sampler state to checkpoint; in the candidates' order."""
    rng = random.Random(derived_seed(seed, "client-sampling", rnd))
    chosen = sorted(rng.sample(range(len(candidates)), max(1, round(fraction * len(candidates)))))
    return [candidates[i] for i in chosen]


def warning_row(rnd: int, client_id: str, reason: str) -> dict:
    """A metrics.jsonl row for a client left out of a round."""
    return {"round": rnd, "kind": "warning", "client_id": client_id, "reason": reason}


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
