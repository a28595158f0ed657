"""Learning check: `fgrpo run` on the default scenario over several seeds; prints each seed's
held-out macro accuracy and content macro accuracy (format forgiven) at round 0, round 3 and the
last round, and the mean gains, then one JSON line.

    python benchmarks/learning.py --seeds 0,1,2 [--strategy fgrpo] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from rich.console import Console

from fgrpo.config_sources import build_config
from fgrpo.runner import run_experiment


def content_per_round(run_dir: Path) -> list[float]:
    """The global model's content macro accuracy at each evaluation, from the run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["content_macro_accuracy"] for r in rows if r["kind"] == "eval"]


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
                     "content_per_round": content_per_round(out),
                     "seconds": time.perf_counter() - start})
        r = rows[-1]
        content = r["content_per_round"]
        print(f"seed {seed}: macro {r['initial']:.3f} -> {r['final']:.3f} "
              f"({100 * (r['final'] - r['initial']):+.1f} points), content "
              + " ".join(f"{c:.3f}" for c in content)
              + f" in {r['seconds']:.0f} s; per task "
              + ", ".join(f"{t} {r['initial_per_task'][t]:.2f}->{a:.2f}" for t, a in r["per_task"].items()),
              flush=True)
    gains = [100 * (r["final"] - r["initial"]) for r in rows]
    content_gains = [100 * (r["content_per_round"][-1] - r["content_per_round"][0]) for r in rows]
    late_gains = [100 * (r["content_per_round"][-1] - r["content_per_round"][3]) for r in rows
                  if len(r["content_per_round"]) > 4]
    result = {"strategy": args.strategy, "scenario": args.scenario, "overrides": overrides,
              "gain_points_mean": statistics.mean(gains),
              "gain_points_std": statistics.stdev(gains) if len(gains) > 1 else 0.0,
              "content_gain_points_mean": statistics.mean(content_gains),
              "content_gain_round3_to_last_mean": statistics.mean(late_gains) if late_gains else None,
              "runs": rows}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
