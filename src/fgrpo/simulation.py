"""In-process federation: ONE base model in memory, the global LoRA adapter on the server, and
per-client adapter weights swapped in and out of that model for each client's local training.

One round:
    1. sample clients (``fraction`` of them, seeded);
    2. each client loads the global adapter, runs ``local_steps`` of local GRPO on its own data
       with its own reward, and returns delta_k = theta_k - theta_t and its statistics;
    3. the strategy turns the statistics into weights; the server applies the weighted
       pseudo-gradient sum_k w_k * delta_k with its optimizer (sgd, FedAdam or FedYogi);
    4. the global model is evaluated on every task's held-out split every ``eval_every`` rounds.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from fgrpo import aggregation, privacy, tasks
from fgrpo.aggregation import update_norm
from fgrpo.config import ConfigError, RunConfig
from fgrpo.evaluation import evaluate, summarize
from fgrpo.grpo import GRPOSettings, local_grpo
from fgrpo.model import add_lora, autocast_context, load_base, resolve_device
from fgrpo.tasks import derived_seed

Adapter = dict[str, torch.Tensor]


def prompt_batches(examples: list[tasks.Example], batch_size: int, seed: int,
                   ) -> Iterator[list[tasks.Example]]:
    """Endless batches of prompts, reshuffled each pass, deterministic for a seed."""
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            extra = list(range(len(examples)))
            rng.shuffle(extra)
            order += extra
        batch, order = order[:batch_size], order[batch_size:]
        yield [examples[i] for i in batch]


@dataclass
class ClientUpdate:
    """What one client sends back after a round (DESIGN section 3), plus labels for the metrics."""

    stats: aggregation.ClientStats
    delta: Adapter
    metrics: dict[str, float]
    seconds: float
    task: str = ""  # what the client trains on, for the metric rows
    reward_scale: str = ""


class Federation:
    """The in-process runtime; ``run_round`` advances one round and returns its metric rows.

    Strategies that weight clients (fgrpo, fedavg, ...) train the sampled clients from the global
    adapter and aggregate. Two references share the same client code: ``centralized`` trains one
    pooled client (every client's prompts, each scored by its owner's verifier) for as many steps
    per round as the sampled clients together; ``local-only`` keeps one adapter per client, never
    aggregates, and evaluates each client on the tasks in its own data.
    """

    def __init__(self, cfg: RunConfig, progress=None, remote_clients: bool = False):
        """``remote_clients``: a Flower server whose SuperNodes bring their own data (user-data with
        no ``data`` here): no client data and no test sets on this side; clients evaluate."""
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.autocast = autocast_context(self.device, cfg.mixed_precision)
        base, self.tokenizer = load_base(cfg.model, self.device, cfg.warm_start_steps, cfg.cache_dir,
                                         progress)
        self.model = add_lora(base, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, seed=cfg.seed,
                              freeze_a=cfg.lora_aggregation == "ffa")
        self.notes: list[str] = []  # what the user should know about the data (skipped rows)
        if remote_clients:
            self.clients, self.test_sets = [], {}
        elif cfg.scenario == "user-data":
            from fgrpo import userdata

            if not cfg.data.strip():
                raise ConfigError("scenario = 'user-data' needs data = FILE[,FILE...] in this runtime (on Flower, "
                                  "each SuperNode names its own with --node-config 'data=\"FILE\" reward=\"NAME\"')")

            self.clients, self.test_sets, self.notes = userdata.build_clients(
                cfg.data_sources, cfg.reward_names, cfg.prompt_column, cfg.answer_column, cfg.skip_bad_rows,
                cfg.eval_size)
        else:
            self.clients = tasks.build_scenario(cfg.scenario, cfg.num_clients, cfg.train_size, cfg.seed,
                                                cfg.task_list, cfg.dirichlet_alpha, cfg.local_steps)
            self.test_sets = {t: tasks.test_split(t, cfg.eval_size)
                              for t in tasks.scenario_tasks(self.clients, order=cfg.task_list)}
        self.global_adapter: Adapter = clone(get_peft_model_state_dict(self.model))
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.grpo = GRPOSettings(**{k: getattr(cfg, k) for k in GRPOSettings.__dataclass_fields__})
        self.fgrpo = aggregation.FGRPOSettings(
            **{k: getattr(cfg, k) for k in aggregation.FGRPOSettings.__dataclass_fields__})
        self.server_optimizer = aggregation.ServerOptimizer(cfg.server_optimizer, cfg.server_lr, cfg.server_beta1,
                                                            cfg.server_beta2, cfg.server_eps)
        self.server_state = aggregation.ServerOptimizerState()
        self.strategy = aggregation.STRATEGIES.get(cfg.strategy, aggregation.fedavg)
        self.client_baselines: dict[str, aggregation.ClientBaseline] = {}
        self.local_adapters: dict[str, Adapter] = {}  # local-only: each client's own adapter
        if cfg.strategy == "local-only":
            self.local_adapters = {c.client_id: clone(self.global_adapter) for c in self.clients}
        for client in self.clients:  # the failure policy for every verifier, built-in or the owner's
            client.reward = tasks.GuardedReward(client.reward)
        if cfg.strategy == "centralized" and self.clients:
            total_steps = sum(self.local_steps(c) for c in self.clients) * self.clients_per_round / len(self.clients)
            self.pooled = tasks.pooled_client(self.clients, max(1, round(total_steps)))
            self.pooled.reward = tasks.GuardedReward(self.pooled.reward)

    def local_steps(self, client: tasks.ClientSpec) -> int:
        return client.local_steps or self.cfg.local_steps

    # --- client side --------------------------------------------------------------------------
    def train_client(self, client: tasks.ClientSpec, rnd: int, start: Adapter | None = None) -> ClientUpdate:
        """Local GRPO from ``start`` (the global adapter by default); returns the delta and statistics
        (DESIGN sec. 3)."""
        start = self.global_adapter if start is None else start
        set_peft_model_state_dict(self.model, start)
        self.optimizer.state.clear()  # clients are stateless between rounds
        seed = derived_seed(self.cfg.seed, rnd, client.client_id)
        torch.manual_seed(seed)  # rollout sampling
        batches = prompt_batches(client.train, self.cfg.prompts_per_step, seed)
        settings = replace(self.grpo, local_steps=self.local_steps(client))
        t0 = time.perf_counter()
        with self.autocast():
            result = local_grpo(self.model, self.tokenizer, self.optimizer, batches, client.reward,
                                settings, correctness_fn=tasks.correctness)
        seconds = time.perf_counter() - t0  # local training only: swapping counts as overhead
        failed, total = client.reward.take_failures()  # samples whose reward raised or was not finite
        result.metrics["reward_failures"] = failed / max(total, 1)
        local = get_peft_model_state_dict(self.model)
        delta = {k: (local[k] - start[k]).detach().clone() for k in start}
        stats = aggregation.ClientStats(client.client_id, result.num_prompts, result.reward_start,
                                        result.reward_end, result.reward_std, client.reward.range)
        if self.cfg.dp in ("client", "local"):  # clipping (and local noise) before anything leaves
            delta, clipped = privacy.clip_update(delta, self.cfg.dp_clip)
            result.metrics["dp_clipped"] = float(clipped)
            if self.cfg.dp == "local":
                delta = privacy.add_gaussian_noise(delta, self.cfg.dp_noise * self.cfg.dp_clip,
                                                   derived_seed(seed, "dp-local"))
        if self.cfg.dp_stats_noise > 0:
            stats = privacy.privatize_stats(stats, self.cfg.dp_stats_noise, derived_seed(seed, "dp-stats"))
        wire = getattr(torch, self.cfg.delta_dtype)  # what the client sends (float32 by default)
        delta = {k: v.to(wire) for k, v in delta.items()}
        return ClientUpdate(stats, delta, result.metrics, seconds, client.task, client.reward.name)

    # --- server side --------------------------------------------------------------------------
    @property
    def clients_per_round(self) -> int:
        return max(1, round(self.cfg.fraction * len(self.clients)))

    def sample_clients(self, rnd: int) -> list[tasks.ClientSpec]:
        """This round's participants; seeded per round, so no sampler state to checkpoint."""
        if self.cfg.strategy == "centralized":
            return [self.pooled]
        rng = random.Random(derived_seed(self.cfg.seed, "client-sampling", rnd))
        chosen = sorted(rng.sample(range(len(self.clients)), self.clients_per_round))
        return [self.clients[i] for i in chosen]

    def evaluate(self) -> dict[str, float]:
        """Greedy accuracy per task: of the global model, or (local-only) the mean over the clients
        holding each task of that client's own model."""
        if self.cfg.strategy != "local-only":
            set_peft_model_state_dict(self.model, self.global_adapter)
            with self.autocast():
                return evaluate(self.model, self.tokenizer, self.test_sets, self.cfg.max_new_tokens)
        per_task: dict[str, list[float]] = {t: [] for t in self.test_sets}
        for client in self.clients:
            set_peft_model_state_dict(self.model, self.local_adapters[client.client_id])
            own = {t: self.test_sets[t] for t in tasks.scenario_tasks([client])}
            with self.autocast():
                for task, acc in evaluate(self.model, self.tokenizer, own, self.cfg.max_new_tokens).items():
                    per_task[task].append(acc)
        return {t: sum(accs) / len(accs) for t, accs in per_task.items()}

    def eval_row(self, rnd: int, accuracy: dict[str, float] | None = None) -> dict:
        """The evaluation row of round ``rnd``: of this side's test sets, or of ``accuracy`` measured
        elsewhere (by Flower clients on their own held-out data)."""
        t0 = time.perf_counter()
        accuracy = self.evaluate() if accuracy is None else accuracy
        row = {"round": rnd, "kind": "eval", **summarize(accuracy)}
        row.update({f"accuracy/{task}": acc for task, acc in accuracy.items()})
        row["eval_seconds"] = time.perf_counter() - t0
        row["clock_seconds"] = time.time()  # when this evaluation ended (Unix time): rounds' wall times
        return row

    def run_round(self, rnd: int, on_client_done=None) -> list[dict]:
        """Train the sampled clients, aggregate, evaluate if due; return the round's metric rows.
        A client that raises is left out of the round with a warning row."""
        updates: list[ClientUpdate] = []
        failed: list[dict] = []
        for client in self.sample_clients(rnd):
            try:
                updates.append(self.train_client(client, rnd, self.local_adapters.get(client.client_id)))
            except Exception as err:  # one data owner's failure must not end the round
                failed.append(warning_row(rnd, client.client_id, f"raised {type(err).__name__}: {err}"))
            if on_client_done:
                on_client_done(client)
        return self.finish_round(rnd, updates, failed)

    def screen_updates(self, rnd: int, updates: list[ClientUpdate], failed: list[dict], deltas: bool = True,
                       ) -> tuple[list[ClientUpdate], list[dict]]:
        """Accepted updates, and warning rows for the clients that ``failed`` (did not reply) and for
        rejected updates: over the time limit, tensors that differ from the global adapter in name,
        shape or dtype, non-finite values, or a norm above ``max_norm_ratio`` x the round's median non-zero norm.
        Without ``deltas`` (secure aggregation: the server never sees one) only the time limit is checked."""
        accepted, warnings = [], list(failed)
        reference = self.local_adapters or {None: self.global_adapter}
        adapter = next(iter(reference.values()))
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

    def finish_round(self, rnd: int, updates: list[ClientUpdate], failed: list[dict] | None = None,
                     secure_sum: Callable[[list[ClientUpdate], list[float]], Adapter] | None = None) -> list[dict]:
        """The server's half of a round (every runtime calls it): screening of the updates, weights
        from the statistics, the server step, the metric rows, and the evaluation when due.
        ``failed``: warning rows for clients that sent no update. ``secure_sum``: under secure
        aggregation the updates carry no delta, and this returns sum_k w_k delta_k for the weights."""
        updates, warnings = self.screen_updates(rnd, updates, failed or [], deltas=secure_sum is None)
        result = self.strategy([u.stats for u in updates], self.client_baselines, self.fgrpo)
        if self.cfg.strategy == "local-only":
            for u in updates:
                own = self.local_adapters[u.stats.client_id]
                self.local_adapters[u.stats.client_id] = {k: own[k] + u.delta[k] for k in own}
            result.weights = [1.0] * len(updates)  # each client's update goes to its own model only
            server = {}
        else:
            deltas = [u.delta for u in updates]
            server = {}
            if self.cfg.dp == "server":  # the server clips what it received
                clipped = [privacy.clip_update(d, self.cfg.dp_clip) for d in deltas]
                deltas = [d for d, _ in clipped]
                server["dp_clipped_fraction"] = sum(c for _, c in clipped) / len(clipped)
            if secure_sum is None:
                delta = aggregation.pseudo_gradient(deltas, result.weights)
                server["lora_product_error"] = aggregation.lora_product_error(self.global_adapter, deltas,
                                                                              result.weights)
            else:
                delta = secure_sum(updates, result.weights)
                if (problem := delta_problem(delta, self.global_adapter, torch.float32)) is not None:
                    raise RoundFailed(f"round {rnd}: the securely aggregated update is unusable ({problem}); "
                                      "the last checkpoint is intact")
            if self.cfg.dp in ("server", "client"):  # central DP: noise on the weighted sum
                server["dp_noise_std"] = privacy.central_noise_std(self.cfg.dp_noise, self.cfg.dp_clip,
                                                                   result.weights)
                delta = privacy.add_gaussian_noise(delta, server["dp_noise_std"],
                                                   derived_seed(self.cfg.seed, "dp-central", rnd))
            server["pseudo_gradient_norm"] = update_norm(delta)
            self.global_adapter, self.server_state = aggregation.server_step(
                self.global_adapter, delta, self.server_optimizer, self.server_state)
        self.client_baselines = result.client_baselines
        rows = warnings
        for u, w, g in zip(updates, result.weights, result.gains):
            state = self.client_baselines.get(u.stats.client_id)
            rows.append({
                "round": rnd, "kind": "client", "client_id": u.stats.client_id, "task": u.task,
                "reward_scale": u.reward_scale, **asdict(u.stats), "weight": w, "gain": g,
                "baseline": state.baseline if state else None, **u.metrics,
                "update_norm": update_norm(u.delta) if u.delta else None, "train_seconds": u.seconds,
            })
        if self.cfg.dp != "off":
            server["epsilon"] = self.epsilon(rnd)
        if server:
            rows.append({"round": rnd, "kind": "server", **server})
        if self.eval_due(rnd) and self.test_sets:
            rows.append(self.eval_row(rnd))
        return rows

    def epsilon(self, rounds: int) -> float:
        """(epsilon, dp_delta) spent after ``rounds`` rounds (docs/privacy.md)."""
        rate = 1.0 if self.cfg.dp == "local" else self.clients_per_round / len(self.clients)
        return privacy.epsilon(rounds, self.cfg.dp_noise, rate, self.cfg.dp_delta, self.cfg.dp_stats_noise)

    def eval_due(self, rnd: int) -> bool:
        return rnd % self.cfg.eval_every == 0 or rnd == self.cfg.rounds

    # --- state ----------------------------------------------------------------------------------
    def server_state_dict(self) -> tuple[Adapter, dict]:
        """Everything a resume needs besides the config: (tensors, JSON-able state)."""
        tensors = {f"global/{k}": v for k, v in self.global_adapter.items()}
        for moment in ("m", "v"):
            for k, v in (getattr(self.server_state, moment) or {}).items():
                tensors[f"server_{moment}/{k}"] = v
        for client_id, adapter in self.local_adapters.items():
            tensors.update({f"local/{client_id}/{k}": v for k, v in adapter.items()})
        state = {"client_baselines": {k: asdict(v) for k, v in self.client_baselines.items()},
                 "server_step": self.server_state.step}
        return tensors, state

    def load_server_state(self, tensors: Adapter, state: dict) -> None:
        def part(prefix: str) -> Adapter:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        self.global_adapter = part("global/")
        self.server_state = aggregation.ServerOptimizerState(
            state["server_step"], part("server_m/") or None, part("server_v/") or None)
        if self.local_adapters:
            self.local_adapters = {c: part(f"local/{c}/") for c in self.local_adapters}
        self.client_baselines = {k: aggregation.ClientBaseline(**v) for k, v in state["client_baselines"].items()}

    def save_adapter(self, path) -> None:
        """The global adapter, loadable with ``PeftModel.from_pretrained(base, path)``; local-only
        runs save each client's adapter in ``path/<client_id>``."""
        if self.cfg.strategy == "local-only":
            for client_id, adapter in self.local_adapters.items():
                set_peft_model_state_dict(self.model, adapter)
                self.model.save_pretrained(f"{path}/{client_id}")
            return
        set_peft_model_state_dict(self.model, self.global_adapter)
        self.model.save_pretrained(path)


class RoundFailed(ConfigError):
    """Too few usable client updates for a round; the message says which failed and why."""


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
