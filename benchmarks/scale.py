"""Many clients: 100 clients at 10% participation on the embedded default, seconds per round.

Two federations with the same work per round (10 clients train, then the evaluation): 100
registered clients sampling 10% each round, and 10 clients all taking part. Their rounds are
interleaved (one round of each in turn) so both see the same machine; the ratio of the median
round times shows what holding 90 idle clients costs (sampling, baselines, screening, memory).
Setup (building every client's data) is timed separately. Last line: one JSON object.

    python benchmarks/scale.py --quick     # 3 rounds each, 200 prompts per client
    python benchmarks/scale.py             # 6 rounds each, default 2000 prompts per client
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import psutil
import torch

from fgrpo.config_sources import build_config
from fgrpo.machine import cpu_name
from fgrpo.runner import InProcessRun, quiet_libraries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    quiet_libraries()
    rounds, extra = (3, {"train_size": 200}) if args.quick else (6, {})
    feds, setup = {}, {}
    for name, clients, fraction in (("100 clients, 10%", 100, 0.1), ("10 clients, 100%", 10, 1.0)):
        start = time.perf_counter()
        feds[name] = InProcessRun(build_config(overrides={"num_clients": clients, "fraction": fraction,
                                                        "rounds": rounds, **extra}))
        setup[name] = time.perf_counter() - start
    seconds: dict[str, list[float]] = {name: [] for name in feds}
    for rnd in range(1, rounds + 1):
        for name, fed in feds.items():
            start = time.perf_counter()
            rows = fed.run_round(rnd)
            seconds[name].append(time.perf_counter() - start)
            trained = sum(1 for r in rows if r.get("kind") == "client")
            print(f"round {rnd}, {name}: {seconds[name][-1]:.2f} s, {trained} clients trained", flush=True)
    many, few = (statistics.median(v) for v in seconds.values())
    print(f"100 clients at 10%: {many:.2f} s/round (setup {setup['100 clients, 10%']:.1f} s); "
          f"10 clients at 100%: {few:.2f} s/round; ratio {many / few:.3f}")
    print(json.dumps({"benchmark": "scale", "quick": args.quick, "rounds": rounds,
                      "seconds_per_round_100_clients": many, "seconds_per_round_10_clients": few,
                      "ratio": many / few, "setup_seconds_100_clients": setup["100 clients, 10%"],
                      "setup_seconds_10_clients": setup["10 clients, 100%"],
                      "rss_mib": psutil.Process().memory_info().rss / 2**20,
                      "torch_threads": torch.get_num_threads(),
                      "machine": cpu_name()}))


if __name__ == "__main__":
    main()
