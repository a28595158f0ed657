"""Why strategies tie or differ: per-client diagnostics of a `fgrpo compare` results directory.

For every scenario x strategy of a preset (all seeds, all rounds): each client's mean aggregation
weight, mean update norm ||delta_k|| and mean r_start -> r_end, grouped by client and reward
scale, plus the mean `lora_product_error` of the server rows. Prints Markdown tables. Only the
preset's own runs are read (several presets may share one results directory).

    python benchmarks/diagnostics.py results/main --preset main [--scenarios scale-skew] [--strategies fgrpo,fedavg]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from fgrpo.compare import load_preset, plan_runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results")
    parser.add_argument("--scenarios", default="")
    parser.add_argument("--strategies", default="")
    parser.add_argument("--preset", default="main")
    args = parser.parse_args()
    plan = load_preset(args.preset)
    keep = lambda value, allowed: not allowed or value in allowed.split(",")
    runs = [(name, cfg) for name, cfg in plan_runs(plan, Path(args.results))
            if keep(cfg.scenario, args.scenarios) and keep(name, args.strategies)]
    for scenario in dict.fromkeys(cfg.scenario for _, cfg in runs):
        print(f"### {scenario}\n")
        print("| strategy | client (task, scale) | mean weight | mean update norm | mean r_start -> r_end |")
        print("|---|---|---|---|---|")
        for strategy in dict.fromkeys(name for name, cfg in runs if cfg.scenario == scenario):
            per_client: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
            lora_errors = []
            for name, cfg in runs:
                metrics = Path(cfg.out) / "metrics.jsonl"
                if name != strategy or cfg.scenario != scenario or not metrics.exists():
                    continue
                for line in metrics.read_text().splitlines():
                    row = json.loads(line)
                    if row["kind"] == "client":
                        label = f"{row['client_id']} ({row['task'][:24]}, {row['reward_scale']})"
                        for key in ("weight", "update_norm", "reward_start", "reward_end"):
                            per_client[label][key].append(row[key])
                    elif row["kind"] == "server":
                        lora_errors.append(row["lora_product_error"])
            for label, values in sorted(per_client.items()):
                mean = {k: statistics.fmean(v) for k, v in values.items()}
                print(f"| {strategy} | {label} | {mean['weight']:.3f} | {mean['update_norm']:.3f} | "
                      f"{mean['reward_start']:.2f} -> {mean['reward_end']:.2f} |")
            if lora_errors:
                print(f"| {strategy} | server: mean lora_product_error | {statistics.fmean(lora_errors):.4f} | | |")
        print()


if __name__ == "__main__":
    main()
