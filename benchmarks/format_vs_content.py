"""How much of a run's accuracy gain is answer format, and how much is content?

The embedded model's warm start writes half of its answers as "answer." (see
docs/embedded-default.md); the verifiers of spell_backward and letter_counting count "paos." as
wrong. This script re-evaluates the global model of finished runs before training (adapter
zeroed) and after (the saved adapter), once with the verifier as it is and once forgiving one
trailing period, and prints both, then one JSON line.

    python benchmarks/format_vs_content.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path

import torch
from peft import PeftModel

from fgrpo import tasks
from fgrpo.grpo import generate
from fgrpo.model import load_base


def accuracies(model, tokenizer, task_names, eval_size, max_new_tokens) -> dict[str, dict[str, float]]:
    out = {"verifier": {}, "content": {}}
    for task in task_names:
        examples = tasks.test_split(task, eval_size)
        texts = generate(model, tokenizer, [e.prompt for e in examples], 1, max_new_tokens, greedy=True).texts
        exact = [tasks.correctness(e, t) >= 1.0 for e, t in zip(examples, texts)]
        content = [tasks.correctness(e, t.strip().removesuffix(".")) >= 1.0 for e, t in zip(examples, texts)]
        out["verifier"][task] = sum(exact) / len(examples)
        out["content"][task] = sum(content) / len(examples)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    results = []
    for run in args.runs:
        cfg = tomllib.loads((run / "config.toml").read_text())
        base, tokenizer = load_base(cfg["model"], torch.device("cpu"), cfg["warm_start_steps"], cfg["cache_dir"])
        task_names = [t.strip() for t in cfg.get("tasks", ",".join(tasks.DEFAULT_TASKS)).split(",")]
        before = accuracies(base, tokenizer, task_names, cfg["eval_size"], cfg["max_new_tokens"])
        model = PeftModel.from_pretrained(base, run / "adapter")
        after = accuracies(model, tokenizer, task_names, cfg["eval_size"], cfg["max_new_tokens"])
        row = {"run": str(run), "before": before, "after": after}
        for kind in ("verifier", "content"):
            b = sum(before[kind].values()) / len(task_names)
            a = sum(after[kind].values()) / len(task_names)
            row[f"{kind}_macro_before"], row[f"{kind}_macro_after"] = b, a
            print(f"{run.name}: {kind:8s} macro {b:.3f} -> {a:.3f} ({100 * (a - b):+.1f}); "
                  + ", ".join(f"{t} {before[kind][t]:.3f}->{after[kind][t]:.3f}" for t in task_names))
        results.append(row)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
