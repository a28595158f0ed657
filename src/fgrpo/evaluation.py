"""Greedy evaluation of the global model: accuracy (correctness, not any client's reward scale),
content accuracy, the same answers forgiven their format (``tasks.content_correctness``), and the share
of answers in the documented form (``rewards.format_reward``). A built-in task's prompts are judged by
reasoning-gym's scorer, an owner's held-out rows by the verifier they carry (``Example.verifier``, set by
``userdata.load_owner``: the owner's first reward function), each called here, with no cache in between."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fgrpo.rewards import format_reward
from fgrpo.rollouts import generate, prompt_texts
from fgrpo.tasks import Example, content_correctness, correctness


@dataclass
class Accuracy:
    """Per task, counts of held-out prompts: answered right as the verifier judges it (``right``), right
    with the format forgiven (``right_content``), in the documented form (``in_form``), of ``total``.
    Counts, so that evaluations made in several places (Flower clients, local-only clients) add up exactly;
    ``exact``, ``content`` and ``formatted`` are the fractions."""

    right: dict[str, int]
    right_content: dict[str, int]
    in_form: dict[str, int]
    total: dict[str, int]

    @property
    def exact(self) -> dict[str, float]:
        return {t: self.right[t] / n for t, n in self.total.items()}

    @property
    def content(self) -> dict[str, float]:
        return {t: self.right_content[t] / n for t, n in self.total.items()}

    @property
    def formatted(self) -> dict[str, float]:
        return {t: self.in_form[t] / n for t, n in self.total.items()}

    def row(self) -> dict[str, float]:
        """The accuracy fields of an evaluation row (docs/algorithm.md, section 5)."""
        exact, content, formatted = self.exact, self.content, self.formatted
        out = {**summarize(exact), **{f"content_{k}": v for k, v in summarize(content).items()}}
        out.update({f"accuracy/{task}": acc for task, acc in exact.items()})
        out.update({f"content_accuracy/{task}": acc for task, acc in content.items()})
        out["formatted_macro"] = sum(formatted.values()) / len(formatted)
        out.update({f"formatted/{task}": share for task, share in formatted.items()})
        return out

    @staticmethod
    def total_of(results: list[Accuracy], order: list[str] | None = None) -> Accuracy:
        """The counts of several evaluations added up per task; tasks in ``order``, else in order of appearance
        (with no task left, every ``total`` is empty)."""
        tasks = order or list(dict.fromkeys(t for r in results for t in r.total))
        parts = ("right", "right_content", "in_form", "total")
        return Accuracy(*({t: sum(getattr(r, part).get(t, 0) for r in results) for t in tasks
                           if any(t in r.total for r in results)} for part in parts))


def eval_row(rnd: int, accuracy: Accuracy, seconds: float) -> dict:
    """The metrics.jsonl row of an evaluation of the global model after round ``rnd`` (0: before training)."""
    return {"round": rnd, "kind": "eval", **accuracy.row(), "eval_seconds": seconds,
            "clock_seconds": time.time()}  # when this evaluation ended (Unix time): rounds' wall times


def batch_size_for(max_new_tokens: int) -> int:
    """Prompts per generate call in evaluation: 256 for short answers, fewer for long ones (memory)."""
    return max(16, min(256, 8192 // max_new_tokens))


def evaluate(model, tokenizer, test_sets: dict[str, Sequence[Example]], max_new_tokens: int) -> Accuracy:
    """Per-task greedy accuracy: the fraction of held-out prompts answered exactly right, and the
    fraction right with the format forgiven (``content_correctness``)."""
    accuracy = Accuracy({}, {}, {}, {})
    for task, examples in test_sets.items():
        texts = greedy_texts(model, tokenizer, examples, max_new_tokens)
        accuracy.right[task] = int(sum(correctness(e, t) >= 1.0 for e, t in zip(examples, texts)))
        accuracy.right_content[task] = int(sum(content_correctness(e, t) >= 1.0 for e, t in zip(examples, texts)))
        accuracy.in_form[task], accuracy.total[task] = int(sum(map(format_reward, examples, texts))), len(examples)
    return accuracy


def greedy_texts(model, tokenizer, examples: Sequence[Example], max_new_tokens: int) -> list[str]:
    """Greedy completions for ``examples``, in batches of ``batch_size_for(max_new_tokens)``."""
    model.eval()
    size, texts = batch_size_for(max_new_tokens), []
    for i in range(0, len(examples), size):
        chunk = examples[i:i + size]
        texts += generate(model, tokenizer, prompt_texts(tokenizer, chunk), 1, max_new_tokens, greedy=True).texts
    return texts


def pass_at_k(model, tokenizer, test_sets: dict[str, Sequence[Example]], k: int, max_new_tokens: int,
              temperature: float = 1.0, seed: int = 0) -> dict[str, float]:
    """Per task, pass@k: the fraction of held-out prompts with at least one right answer among ``k``
    completions sampled at ``temperature`` (from the whole distribution: top_p 1, no top-k)."""
    model.eval()
    torch.manual_seed(seed)
    batch_size = max(1, batch_size_for(max_new_tokens) // k)
    out = {}
    for task, examples in test_sets.items():
        solved = 0
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            texts = generate(model, tokenizer, prompt_texts(tokenizer, chunk), k, max_new_tokens, temperature).texts
            solved += sum(any(correctness(e, texts[j * k + n]) >= 1.0 for n in range(k)) for j, e in enumerate(chunk))
        out[task] = solved / len(examples)
    return out


def summarize(accuracy: dict[str, float]) -> dict[str, float]:
    """Macro mean and worst task of a per-task accuracy table."""
    return {"macro_accuracy": sum(accuracy.values()) / len(accuracy),
            "worst_task_accuracy": min(accuracy.values())}
