"""Greedy evaluation of the global model: accuracy (correctness, not any client's reward scale)."""

from __future__ import annotations

from collections.abc import Sequence

from fgrpo.grpo import generate
from fgrpo.tasks import Example, correctness


def evaluate(model, tokenizer, test_sets: dict[str, Sequence[Example]], max_new_tokens: int,
             batch_size: int = 256) -> dict[str, float]:
    """Per-task greedy accuracy: the fraction of held-out prompts answered exactly right."""
    model.eval()
    accuracy = {}
    for task, examples in test_sets.items():
        correct = 0
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            texts = generate(model, tokenizer, [e.prompt for e in chunk], 1, max_new_tokens,
                             greedy=True).texts
            correct += sum(correctness(e, t) >= 1.0 for e, t in zip(chunk, texts))
        accuracy[task] = correct / len(examples)
    return accuracy


def summarize(accuracy: dict[str, float]) -> dict[str, float]:
    """Macro mean and worst task of a per-task accuracy table."""
    return {"macro_accuracy": sum(accuracy.values()) / len(accuracy),
            "worst_task_accuracy": min(accuracy.values())}
