"""Learning check: `fgrpo run` on the default scenario over several seeds; prints each seed's
round-0 and final held-out macro accuracy and the mean gain, then one JSON line.

    python benchmarks/learning.py --seeds 0,1,2 [--strategy fgrpo] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from rich.console import Console

from fgrpo.config import build_config
from fgrpo.runner import run_experiment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--strategy", default="fgrpo")
    parser.add_argument("--scenario", default="scale-skew")
    parser.add_argument("--out", default="results/learning")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.set)
    console = Console(stderr=True, quiet=True)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        out = Path(args.out) / f"{args.scenario}-{args.strategy}-seed{seed}"
        cfg = build_config(overrides={**overrides, "seed": seed, "strategy": args.strategy,
                                      "scenario": args.scenario, "out": str(out)})
        start = time.perf_counter()
        summary = run_experiment(cfg, console=console)
        rows.append({"seed": seed, "initial": summary["initial_macro_accuracy"],
                     "final": summary["final_macro_accuracy"],
                     "final_worst": summary["final_worst_task_accuracy"],
                     "per_task": summary["per_task_accuracy"],
                     "initial_per_task": summary["initial_per_task_accuracy"],
                     "seconds": time.perf_counter() - start})
        r = rows[-1]
        print(f"seed {seed}: macro {r['initial']:.3f} -> {r['final']:.3f} "
              f"({100 * (r['final'] - r['initial']):+.1f} points) in {r['seconds']:.0f} s; per task "
              + ", ".join(f"{t} {r['initial_per_task'][t]:.2f}->{a:.2f}" for t, a in r["per_task"].items()),
              flush=True)
    gains = [100 * (r["final"] - r["initial"]) for r in rows]
    result = {"strategy": args.strategy, "scenario": args.scenario, "overrides": overrides,
              "gain_points_mean": statistics.mean(gains),
              "gain_points_std": statistics.stdev(gains) if len(gains) > 1 else 0.0,
              "runs": rows}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
