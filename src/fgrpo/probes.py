"""Server probes (``probes`` > 0; docs/trust.md): the server judges each client's update on verifiable
prompts of its own, never an owner's data.

    probe_sets   ``probes`` prompts per public task: the held-out prompts that follow the ``eval_size``
                 evaluation prompts in each task's fixed held-out split. That split is excluded from every
                 training split by construction (``tasks.train_split``), so the probes are disjoint from
                 every owner's generated prompts and from the evaluation prompts.
    ProbeJudge   "do no harm": each update is applied alone to the global adapter (theta_t + delta_k) and
                 left out when the probes' greedy accuracy falls by more than ``probe_margin`` below the
                 global adapter's. Cost per round: (|S| + 1) greedy evaluations of the probe prompts.

Its limit: it judges only what the server can generate (the run's public tasks); an owner whose task the
server cannot generate is judged on the others' tasks, which says little about its own.
"""

from __future__ import annotations

from collections.abc import Sequence

from fgrpo.aggregation import Adapter
from fgrpo.config import RunConfig
from fgrpo.host import ModelHost
from fgrpo.report import ClientUpdate, warning_row
from fgrpo.tasks import Example, as_chat, test_split


def probe_sets(cfg: RunConfig, tasks: Sequence[str], prompt_style: str) -> dict[str, list[Example]]:
    """``cfg.probes`` probe prompts per task of ``tasks`` (fewer where a task's held-out split is smaller)."""
    out = {}
    for task in tasks:
        held_out = test_split(task, min(200, cfg.eval_size + cfg.probes))
        probes = list(held_out[cfg.eval_size:cfg.eval_size + cfg.probes])
        if probes:
            out[task] = [as_chat(e, cfg.system_prompt) for e in probes] if prompt_style == "chat" else probes
    return out


def probe_judge(cfg: RunConfig, host: ModelHost, tasks: Sequence[str]) -> ProbeJudge | None:
    """The judge of a run with ``probes`` > 0 (on ``tasks``: the held-out tasks, else the run's), else None."""
    return ProbeJudge(host, probe_sets(cfg, tasks, host.prompt_style), cfg.probe_margin) if cfg.probes else None


class ProbeJudge:
    """The server's "do no harm" screen on its probe prompts, with the model host it evaluates on."""

    def __init__(self, host: ModelHost, probes: dict[str, list[Example]], margin: float):
        self.host, self.probes, self.margin = host, probes, margin

    def accuracy(self, adapter: Adapter) -> float:
        """Macro greedy accuracy of ``adapter`` on the probes."""
        return self.host.evaluate(adapter, self.probes).row()["macro_accuracy"]

    def screen(self, rnd: int, global_adapter: Adapter, updates: list[ClientUpdate],
               ) -> tuple[list[ClientUpdate], list[dict], dict]:
        """(updates that do no harm, warning rows for the others, the server's probe metrics); each update's
        probe accuracy goes into its metrics (``probe_accuracy``)."""
        before = self.accuracy(global_adapter)
        kept, warnings = [], []
        for u in updates:
            after = self.accuracy({k: global_adapter[k] + u.delta[k] for k in global_adapter})
            u.metrics["probe_accuracy"] = after
            if after < before - self.margin:
                warnings.append(warning_row(rnd, u.stats.client_id, f"lowers the server's probe accuracy from "
                                            f"{before:.3f} to {after:.3f} (probe_margin = {self.margin})"))
            else:
                kept.append(u)
        return kept, warnings, {"probe_accuracy_before": before, "probes_rejected": len(warnings)}
