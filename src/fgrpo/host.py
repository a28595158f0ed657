"""The model host: ONE base model in memory with one LoRA adapter slot, which the client side (local
training) and the server side (evaluation, saving) both use by swapping adapter weights into it, so
memory grows with the number of clients only by adapter size.

    ModelHost.adapter()          the adapter's current weights (the seeded initial adapter, at first)
    ModelHost.load(adapter)      swap an adapter's weights in
    ModelHost.evaluate(...)      greedy held-out accuracy (counts per task) of an adapter
    ModelHost.save(adapter, p)   a PEFT adapter folder, loadable with PeftModel.from_pretrained(base, p)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import torch
from peft import get_peft_model_state_dict

from fgrpo.aggregation import Adapter
from fgrpo.config import RunConfig
from fgrpo.evaluation import Accuracy, eval_row, evaluate, greedy_texts
from fgrpo.model import add_lora, autocast_context, load_base, resolve_device, resolve_prompt_style
from fgrpo.sampler import resolve_rollout_precision
from fgrpo.server_state import ServerState
from fgrpo.tasks import Example


class ModelHost:
    """The base model with its LoRA adapter, the tokenizer and the device; ``cfg`` is the run's config
    with its prompt style and rollout precision resolved for this model and machine (what config.toml records)."""

    loads: ClassVar[int] = 0  # base models this process has loaded (a resident owner process reports it)

    def __init__(self, cfg: RunConfig, progress=None):
        ModelHost.loads += 1
        self.device = resolve_device(cfg.device)
        self.autocast = autocast_context(self.device, cfg.mixed_precision)
        base, self.tokenizer = load_base(cfg.model, self.device, cfg.warm_start_steps, cfg.cache_dir, progress,
                                         cfg.prompt_style)
        precision = resolve_rollout_precision(cfg.rollout_precision, self.device,
                                              sum(p.numel() for p in base.parameters()))
        self.cfg = replace(cfg, prompt_style=resolve_prompt_style(cfg.prompt_style, cfg.model, self.tokenizer),
                           rollout_precision=precision)
        self.model = add_lora(base, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, seed=cfg.seed,
                              freeze_a=cfg.lora_aggregation == "ffa")
        self.slots = adapter_slots(self.model)

    @property
    def prompt_style(self) -> str:
        return self.cfg.prompt_style

    def adapter(self) -> Adapter:
        """A copy of the adapter weights now in the model (keyed as PEFT's ``get_peft_model_state_dict``)."""
        return {key: p.detach().clone() for key, p in self.slots.items()}

    def load(self, adapter: Adapter) -> None:
        """Copy ``adapter``'s weights into the model (what ``set_peft_model_state_dict`` does, without its scan
        of the whole model on every call)."""
        with torch.no_grad():
            for key, p in self.slots.items():
                p.copy_(adapter[key])

    def evaluate(self, adapter: Adapter, test_sets: dict[str, Sequence[Example]]) -> Accuracy:
        """Greedy accuracy of ``adapter`` on ``test_sets`` (counts per task)."""
        self.load(adapter)
        with self.autocast():
            return evaluate(self.model, self.tokenizer, test_sets, self.cfg.max_new_tokens)

    def greedy_texts(self, adapter: Adapter | None, examples: Sequence[Example]) -> list[str]:
        """Greedy completions of ``adapter`` (None: the adapter now loaded) for ``examples``, in the evaluation's
        batches (so the same texts)."""
        if adapter is not None:
            self.load(adapter)
        with self.autocast():
            return greedy_texts(self.model, self.tokenizer, examples, self.cfg.max_new_tokens)

    def evaluate_own(self, adapters: dict[str, Adapter], client_tasks: dict[str, list[str]],
                     test_sets: dict[str, Sequence[Example]]) -> Accuracy:
        """Clients that keep their own adapters (local-only): each client's adapter on its own tasks,
        the counts added up per task (so a task's accuracy is the mean over the clients holding it)."""
        results = [self.evaluate(adapters[c], {t: test_sets[t] for t in tasks}) for c, tasks in client_tasks.items()]
        return Accuracy.total_of(results, order=list(test_sets))

    def evaluate_state(self, state: ServerState, test_sets: dict[str, Sequence[Example]],
                       client_tasks: dict[str, list[str]]) -> Accuracy:
        """Accuracy of what the server holds: the global adapter, or (a strategy whose clients keep their own
        adapters) each client's own on its ``client_tasks``."""
        if state.local_adapters:
            return self.evaluate_own(state.local_adapters, client_tasks, test_sets)
        return self.evaluate(state.global_adapter, test_sets)

    def eval_row(self, rnd: int, state: ServerState, test_sets: dict[str, Sequence[Example]],
                 client_tasks: dict[str, list[str]]) -> dict:
        """The evaluation row of round ``rnd`` (``evaluate_state``, timed)."""
        t0 = time.perf_counter()
        accuracy = self.evaluate_state(state, test_sets, client_tasks)
        return eval_row(rnd, accuracy, time.perf_counter() - t0)

    def save(self, adapter: Adapter, path: str | Path) -> None:
        self.load(adapter)
        self.model.save_pretrained(str(path))

    def save_state(self, state: ServerState, path: Path) -> None:
        """The global adapter as a PEFT folder at ``path``; with clients that keep their own adapters
        (local-only), each client's in ``path/<client_id>``."""
        for client_id, adapter in state.local_adapters.items():
            self.save(adapter, path / client_id)
        if not state.local_adapters:
            self.save(state.global_adapter, path)


def adapter_slots(model) -> dict[str, torch.nn.Parameter]:
    """The model's adapter parameters under the keys of PEFT's ``get_peft_model_state_dict`` (the adapter's name
    dropped from the parameter's name), in that order; checked against PEFT once."""
    params = dict(model.named_parameters())
    adapter = model.active_adapter
    slots = {key: params[key.replace(".weight", f".{adapter}.weight")] for key in get_peft_model_state_dict(model)}
    assert all(p.data_ptr() == t.data_ptr() for p, t in zip(slots.values(), get_peft_model_state_dict(model).values()))
    return slots
