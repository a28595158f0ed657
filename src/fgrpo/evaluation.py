"""Greedy evaluation of the global model: accuracy (correctness, not any client's reward scale),
content accuracy, the same answers forgiven their format (``tasks.content_correctness``), and the share
of answers in the documented form (``tasks.format_reward``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from fgrpo.grpo import generate, prompt_texts
from fgrpo.tasks import Example, content_correctness, correctness, format_reward


@dataclass
class Accuracy:
    """Per-task greedy accuracy as the verifier judges it (``exact``), with the format forgiven (``content``),
    and the share of answers in the documented form (``formatted``)."""

    exact: dict[str, float]
    content: dict[str, float]
    formatted: dict[str, float] = field(default_factory=dict)

    def row(self) -> dict[str, float]:
        """The accuracy fields of an evaluation row (docs/algorithm.md, section 5)."""
        out = {**summarize(self.exact), **{f"content_{k}": v for k, v in summarize(self.content).items()}}
        out.update({f"accuracy/{task}": acc for task, acc in self.exact.items()})
        out.update({f"content_accuracy/{task}": acc for task, acc in self.content.items()})
        if self.formatted:
            out["formatted_macro"] = sum(self.formatted.values()) / len(self.formatted)
            out.update({f"formatted/{task}": share for task, share in self.formatted.items()})
        return out

    @staticmethod
    def mean(results: list[Accuracy]) -> Accuracy:
        """Per task, the mean over the results that have the task."""
        def average(part: str) -> dict[str, float]:
            values: dict[str, list[float]] = {}
            for result in results:
                for task, acc in getattr(result, part).items():
                    values.setdefault(task, []).append(acc)
            return {task: sum(v) / len(v) for task, v in values.items()}

        return Accuracy(average("exact"), average("content"), average("formatted"))


def batch_size_for(max_new_tokens: int) -> int:
    """Prompts per generate call in evaluation: 256 for short answers, fewer for long ones (memory)."""
    return max(16, min(256, 8192 // max_new_tokens))


def evaluate(model, tokenizer, test_sets: dict[str, Sequence[Example]], max_new_tokens: int) -> Accuracy:
    """Per-task greedy accuracy: the fraction of held-out prompts answered exactly right, and the
    fraction right with the format forgiven (``content_correctness``)."""
    model.eval()
    batch_size = batch_size_for(max_new_tokens)
    exact, content, formatted = {}, {}, {}
    for task, examples in test_sets.items():
        right = right_content = in_form = 0
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            texts = generate(model, tokenizer, prompt_texts(tokenizer, chunk), 1, max_new_tokens, greedy=True).texts
            right += sum(correctness(e, t) >= 1.0 for e, t in zip(chunk, texts))
            right_content += sum(content_correctness(e, t) >= 1.0 for e, t in zip(chunk, texts))
            in_form += sum(format_reward(e, t) for e, t in zip(chunk, texts))
        exact[task], content[task] = right / len(examples), right_content / len(examples)
        formatted[task] = in_form / len(examples)
    return Accuracy(exact, content, formatted)


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
