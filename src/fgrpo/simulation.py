"""In-process federation: ONE base model in memory, the global LoRA adapter on the server, and
per-client adapter weights swapped in and out of that model for each client's local training.

One round:
    1. sample clients (``fraction`` of them, seeded);
    2. each client loads the global adapter, runs ``local_steps`` of local GRPO on its own data
       with its own reward, and returns delta_k = theta_k - theta_t and its statistics;
    3. the strategy turns the statistics into weights, the server applies the weighted update;
    4. the global model is evaluated on every task's held-out split every ``eval_every`` rounds.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from fgrpo import aggregation, tasks
from fgrpo.config import RunConfig
from fgrpo.evaluation import evaluate, summarize
from fgrpo.grpo import GRPOSettings, local_grpo
from fgrpo.model import add_lora, load_base, resolve_device
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
    stats: aggregation.ClientStats
    delta: Adapter
    metrics: dict[str, float]
    seconds: float


class Federation:
    """The in-process runtime; ``run_round`` advances one round and returns its metric rows."""

    def __init__(self, cfg: RunConfig, progress=None):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        base, self.tokenizer = load_base(cfg.model, self.device, cfg.warm_start_steps, cfg.cache_dir,
                                         progress)
        self.model = add_lora(base, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, seed=cfg.seed)
        self.clients = tasks.build_scenario(cfg.scenario, cfg.num_clients, cfg.train_size, cfg.seed,
                                            cfg.task_list)
        self.test_sets = {t: tasks.test_split(t, cfg.eval_size) for t in tasks.scenario_tasks(self.clients)}
        self.global_adapter: Adapter = clone(get_peft_model_state_dict(self.model))
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.grpo = GRPOSettings(**{k: getattr(cfg, k) for k in GRPOSettings.__dataclass_fields__})
        self.fgrpo = aggregation.FGRPOSettings(
            **{k: getattr(cfg, k) for k in aggregation.FGRPOSettings.__dataclass_fields__})
        self.strategy = aggregation.STRATEGIES[cfg.strategy]
        self.client_baselines: dict[str, aggregation.ClientBaseline] = {}

    # --- client side --------------------------------------------------------------------------
    def train_client(self, client: tasks.ClientSpec, rnd: int) -> ClientUpdate:
        """Local GRPO from the global adapter; returns the delta and statistics (DESIGN sec. 3)."""
        set_peft_model_state_dict(self.model, self.global_adapter)
        self.optimizer.state.clear()  # clients are stateless between rounds
        seed = derived_seed(self.cfg.seed, rnd, client.client_id)
        torch.manual_seed(seed)  # rollout sampling
        batches = prompt_batches(client.train, self.cfg.prompts_per_step, seed)
        start = time.perf_counter()
        result = local_grpo(self.model, self.tokenizer, self.optimizer, batches, client.reward,
                            self.grpo, correctness_fn=tasks.correctness)
        seconds = time.perf_counter() - start  # local training only: swapping counts as overhead
        local = get_peft_model_state_dict(self.model)
        delta = {k: (local[k] - self.global_adapter[k]).detach().clone() for k in self.global_adapter}
        stats = aggregation.ClientStats(client.client_id, result.num_prompts, result.reward_start,
                                        result.reward_end, result.reward_std, client.reward.range)
        return ClientUpdate(stats, delta, result.metrics, seconds)

    # --- server side --------------------------------------------------------------------------
    @property
    def clients_per_round(self) -> int:
        return max(1, round(self.cfg.fraction * len(self.clients)))

    def sample_clients(self, rnd: int) -> list[tasks.ClientSpec]:
        """This round's participants; seeded per round, so no sampler state to checkpoint."""
        rng = random.Random(derived_seed(self.cfg.seed, "client-sampling", rnd))
        chosen = sorted(rng.sample(range(len(self.clients)), self.clients_per_round))
        return [self.clients[i] for i in chosen]

    def evaluate(self) -> dict[str, float]:
        set_peft_model_state_dict(self.model, self.global_adapter)
        return evaluate(self.model, self.tokenizer, self.test_sets, self.cfg.max_new_tokens)

    def eval_row(self, rnd: int) -> dict:
        start = time.perf_counter()
        accuracy = self.evaluate()
        row = {"round": rnd, "kind": "eval", **summarize(accuracy)}
        row.update({f"accuracy/{task}": acc for task, acc in accuracy.items()})
        row["eval_seconds"] = time.perf_counter() - start
        return row

    def run_round(self, rnd: int, on_client_done=None) -> list[dict]:
        """Train the sampled clients, aggregate, evaluate if due; return the round's metric rows."""
        participants = self.sample_clients(rnd)
        updates = []
        for client in participants:
            updates.append(self.train_client(client, rnd))
            if on_client_done:
                on_client_done(client)
        stats = [u.stats for u in updates]
        result = self.strategy(stats, self.client_baselines, self.fgrpo)
        self.global_adapter = aggregation.apply_update(
            self.global_adapter, [u.delta for u in updates], result.weights, self.cfg.server_lr)
        self.client_baselines = result.client_baselines
        rows = []
        for client, u, w, g in zip(participants, updates, result.weights, result.gains):
            state = self.client_baselines.get(client.client_id)
            rows.append({
                "round": rnd, "kind": "client", "client_id": client.client_id, "task": client.task,
                "reward_scale": client.reward.name, **asdict(u.stats), "weight": w, "gain": g,
                "baseline": state.baseline if state else None, **u.metrics,
                "train_seconds": u.seconds,
            })
        if rnd % self.cfg.eval_every == 0 or rnd == self.cfg.rounds:
            rows.append(self.eval_row(rnd))
        return rows

    def save_adapter(self, path) -> None:
        """The global adapter, loadable with ``PeftModel.from_pretrained(base, path)``."""
        set_peft_model_state_dict(self.model, self.global_adapter)
        self.model.save_pretrained(path)


def clone(adapter: Adapter) -> Adapter:
    return {k: v.detach().clone() for k, v in adapter.items()}
