"""In-process federation overhead and bytes on the wire.

For each round: wall time of ``InProcessRun.run_round`` plus the round's checkpoint, divided by the
sum of the clients' local training time and the evaluation time (target <= 1.05; the rest is
adapter swapping, delta computation, aggregation and the checkpoint write), and the bytes one
client receives (the global adapter) and sends (its delta) per round, and the size of the delta as a
Flower ArrayRecord in float32, bfloat16 and float16 (``delta_dtype``). Median over rounds. Last line:
one JSON object.

    python benchmarks/federation.py --quick      # 6 rounds of the default, 3 local steps
    python benchmarks/federation.py              # 10 rounds of the default
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fgrpo.checkpoint import save_checkpoint
from fgrpo.config_sources import build_config
from fgrpo.flower.wire import adapter_record
from fgrpo.machine import cpu_name
from fgrpo.runner import InProcessRun, quiet_libraries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    quiet_libraries()
    overrides = {"rounds": 6, "local_steps": 3} if args.quick else {"rounds": 10}
    cfg = build_config(overrides=overrides)
    fed = InProcessRun(cfg)
    checkpoints = Path(tempfile.mkdtemp(prefix="fgrpo-bench-"))
    ratios = []
    for rnd in range(1, cfg.rounds + 1):
        start = time.perf_counter()
        rows = fed.run_round(rnd)
        save_checkpoint(checkpoints, rnd, *fed.server.state.tensors_and_json(), 0, keep=2)
        wall = time.perf_counter() - start
        work = sum(r.get("train_seconds", 0.0) + r.get("eval_seconds", 0.0) for r in rows)
        ratios.append(wall / work)
        print(f"round {rnd}: wall {wall:.2f} s, clients + eval {work:.2f} s, ratio {ratios[-1]:.4f}", flush=True)
    adapter_bytes = sum(t.numel() * t.element_size() for t in fed.global_adapter.values())
    # what one reply's delta weighs on Flower's wire (ArrayRecord), per delta_dtype
    wire_bytes = {dtype: adapter_record({k: v.to(getattr(torch, dtype)) for k, v in fed.global_adapter.items()})
                  .count_bytes() for dtype in ("float32", "bfloat16", "float16")}
    result = {
        "benchmark": "federation", "quick": args.quick, "rounds": cfg.rounds, "clients": cfg.num_clients,
        "local_steps": cfg.local_steps, "overhead_ratio_median": statistics.median(ratios),
        "overhead_ratio_max": max(ratios), "bytes_down_per_client_round": adapter_bytes,
        "bytes_up_per_client_round": adapter_bytes, "adapter_tensors": len(fed.global_adapter),
        **{f"flower_record_bytes_{dtype}": n for dtype, n in wire_bytes.items()},
        "torch_threads": torch.get_num_threads(), "machine": cpu_name(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
