"""Why strategies tie or differ: per-client diagnostics of a `fgrpo compare` results directory.

For every scenario x strategy (all seeds, all rounds): each client's mean aggregation weight, mean
update norm ||delta_k|| and mean r_start -> r_end, grouped by client and reward scale, plus the
mean `lora_product_error` of the server rows. Prints Markdown tables.

    python benchmarks/diagnostics.py results/main [--scenarios scale-skew] [--strategies fgrpo,fedavg]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results")
    parser.add_argument("--scenarios", default="")
    parser.add_argument("--strategies", default="")
    args = parser.parse_args()
    root = Path(args.results) / "runs"
    keep = lambda value, allowed: not allowed or value in allowed.split(",")
    for scenario_dir in sorted(p for p in root.iterdir() if keep(p.name, args.scenarios)):
        print(f"### {scenario_dir.name}\n")
        print("| strategy | client (task, scale) | mean weight | mean update norm | mean r_start -> r_end |")
        print("|---|---|---|---|---|")
        for strategy_dir in sorted(p for p in scenario_dir.iterdir() if keep(p.name, args.strategies)):
            per_client: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
            lora_errors = []
            for metrics in strategy_dir.glob("seed-*/metrics.jsonl"):
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
                print(f"| {strategy_dir.name} | {label} | {mean['weight']:.3f} | {mean['update_norm']:.3f} | "
                      f"{mean['reward_start']:.2f} -> {mean['reward_end']:.2f} |")
            if lora_errors:
                print(f"| {strategy_dir.name} | server: mean lora_product_error | {statistics.fmean(lora_errors):.4f} "
                      "| | |")
        print()


if __name__ == "__main__":
    main()
