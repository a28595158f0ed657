"""Server probes (``probes`` > 0; docs/trust.md): the server judges each client's update on verifiable
prompts of its own, never an owner's data.

    probe_sets   ``probes`` prompts per public task: the held-out prompts that follow the ``eval_size``
                 evaluation prompts in each task's fixed held-out split. That split is excluded from every
                 training split by construction (``tasks.train_split``), so the probes are disjoint from
                 every owner's generated prompts and from the evaluation prompts.
    ProbeJudge   "do no harm": each update is applied alone to the global adapter (theta_t + delta_k) and
                 left out when the probes' greedy accuracy falls by more than ``probe_margin`` below the
                 global adapter's. Cost per round: (|S| + 1) greedy evaluations of the probe prompts. The
                 same scores give each update's probe gain, paired prompt by prompt (``gain = probe``).

Its limit: it judges only what the server can generate (the run's public tasks); an owner whose task the
server cannot generate is judged on the others' tasks, which says little about its own.
"""

from __future__ import annotations

from collections.abc import Sequence

from fgrpo.aggregation import Adapter
from fgrpo.config import RunConfig
from fgrpo.host import ModelHost
from fgrpo.paired import macro_paired_difference
from fgrpo.report import ClientReport, warning_row
from fgrpo.tasks import Example, as_chat, correctness, test_split


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
    """The server's "do no harm" screen on its probe prompts, with the model host it evaluates on; it also
    measures each update's probe gain (``gain = probe``)."""

    def __init__(self, host: ModelHost, probes: dict[str, list[Example]], margin: float):
        self.host, self.probes, self.margin = host, probes, margin

    def scores(self, adapter: Adapter) -> dict[str, list[float]]:
        """Per task, 1.0 for each probe prompt ``adapter`` answers right (greedy), else 0.0."""
        return {task: [float(correctness(e, t) >= 1.0) for e, t in zip(examples, self.host.greedy_texts(adapter,
                                                                                                       examples))]
                for task, examples in self.probes.items()}

    def screen(self, rnd: int, global_adapter: Adapter, reports: list[ClientReport],
               ) -> tuple[list[ClientReport], list[dict], dict]:
        """(reports whose update does no harm, warning rows for the others, the server's probe metrics). The global
        adapter is scored once; each update alone (theta_t + delta_k) once, and its probe accuracy and its paired
        probe gain (d, se: ``paired.macro_paired_difference``) go into its metrics."""
        before = self.scores(global_adapter)
        accuracy_before = macro(before)
        kept, warnings = [], []
        for r in reports:
            after = self.scores({k: global_adapter[k] + r.delta[k] for k in global_adapter})
            accuracy = macro(after)
            d, se = macro_paired_difference(before, after)
            r.metrics.update(probe_accuracy=accuracy, probe_gain=d, probe_se=se)
            if accuracy < accuracy_before - self.margin:
                warnings.append(warning_row(rnd, r.stats.client_id, f"lowers the server's probe accuracy from "
                                            f"{accuracy_before:.3f} to {accuracy:.3f} (probe_margin = {self.margin})"))
            else:
                kept.append(r)
        return kept, warnings, {"probe_accuracy_before": accuracy_before, "probes_rejected": len(warnings)}

    @property
    def size(self) -> int:
        """The probe prompts, over all tasks."""
        return sum(len(v) for v in self.probes.values())


def macro(scores: dict[str, list[float]]) -> float:
    """The macro mean over tasks of the per-task mean score (the evaluation's macro accuracy)."""
    return sum(sum(v) / len(v) for v in scores.values()) / len(scores)
