"""Greedy evaluation of the global model: accuracy (correctness, not any client's reward scale), and
content accuracy, the same answers forgiven their format (``content_answer``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fgrpo.grpo import generate
from fgrpo.tasks import Example, content_answer, correctness


@dataclass
class Accuracy:
    """Per-task greedy accuracy as the verifier judges it (``exact``) and with the format forgiven (``content``)."""

    exact: dict[str, float]
    content: dict[str, float]

    def row(self) -> dict[str, float]:
        """The accuracy fields of an evaluation row (docs/algorithm.md, section 5)."""
        out = {**summarize(self.exact), **{f"content_{k}": v for k, v in summarize(self.content).items()}}
        out.update({f"accuracy/{task}": acc for task, acc in self.exact.items()})
        out.update({f"content_accuracy/{task}": acc for task, acc in self.content.items()})
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

        return Accuracy(average("exact"), average("content"))


def evaluate(model, tokenizer, test_sets: dict[str, Sequence[Example]], max_new_tokens: int,
             batch_size: int = 256) -> Accuracy:
    """Per-task greedy accuracy: the fraction of held-out prompts answered exactly right, and the
    fraction whose ``content_answer`` is right."""
    model.eval()
    exact, content = {}, {}
    for task, examples in test_sets.items():
        right = right_content = 0
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            texts = generate(model, tokenizer, [e.prompt for e in chunk], 1, max_new_tokens, greedy=True).texts
            right += sum(correctness(e, t) >= 1.0 for e, t in zip(chunk, texts))
            right_content += sum(correctness(e, content_answer(t)) >= 1.0 for e, t in zip(chunk, texts))
        exact[task], content[task] = right / len(examples), right_content / len(examples)
    return Accuracy(exact, content)


def summarize(accuracy: dict[str, float]) -> dict[str, float]:
    """Macro mean and worst task of a per-task accuracy table."""
    return {"macro_accuracy": sum(accuracy.values()) / len(accuracy),
            "worst_task_accuracy": min(accuracy.values())}
