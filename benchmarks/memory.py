"""Peak RSS of the in-process simulation against the number of clients.

Each size runs in its own process: build the federation (ONE base model, K clients' data), run
one round in which min(K, 4) sampled clients train, and report the peak RSS. The growth per
client (least-squares slope over K = 4, 16, 64) is compared with one adapter plus one client's
data (its training examples, measured as their pickled size). K = 1 holds one task family only,
so its step to K = 4 also contains loading the other families' generators and test splits; the
slope over all four sizes is reported too. Last line: one JSON object.

    python benchmarks/memory.py --quick     # K = 1, 4, 16, 64; 500 prompts per client
    python benchmarks/memory.py             # K = 1, 4, 16, 64; 2000 prompts per client (default)
    python benchmarks/memory.py --quick --model 24M   # the 23.9 M-parameter config of step_vs_trl.py
    python benchmarks/memory.py --quick --model smollm2 --clients 1,8 --max-new-tokens 64
        # the real SmolLM2-135M-Instruct (chat prompts, 1-digit arithmetic): 8 clients against 1
"""

from __future__ import annotations

import argparse
import gc
import json
import pickle
import resource
import subprocess
import sys
import tempfile

import psutil

ARITHMETIC = ("basic_arithmetic:max_terms=2,min_digits=1,max_digits=1,allow_negation=False,allow_parentheses=False,"
              "chain_sum:max_terms=2,max_digits=1")


def measure(clients: int, train_size: int, model: str, max_new_tokens: int | None) -> dict:
    """Run in a child process: peak RSS (bytes) after one round with ``clients`` clients."""
    from fgrpo.config_sources import build_config
    from fgrpo.runner import InProcessRun, quiet_libraries

    quiet_libraries()
    chat_model = model == "smollm2" or model.endswith(".gguf")  # a real model: its tasks, smaller steps
    small = {"tasks": ARITHMETIC, "prompts_per_step": 4, "group_size": 4, "eval_size": 8} if chat_model else {}
    cfg = build_config(overrides={"num_clients": clients, "fraction": min(1.0, 4 / clients),
                                  "local_steps": 2, "train_size": train_size, "rounds": 1,
                                  "model": model, **small,
                                  **({"max_new_tokens": max_new_tokens} if max_new_tokens else {})})
    fed = InProcessRun(cfg)
    gc.collect()
    setup = psutil.Process().memory_info().rss  # base model + every client's data, before training
    fed.run_round(1)
    adapter = sum(t.numel() * t.element_size() for t in fed.global_adapter.values())
    data = len(pickle.dumps(fed.clients[0].train))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"clients": clients, "setup_rss": setup, "peak_rss": peak, "adapter_bytes": adapter,
            "client_data_bytes": data}


def fitted_slope(rows: list[dict], key: str = "peak_rss") -> float:
    """Least-squares slope of an RSS figure (bytes) against the number of clients."""
    xs, ys = [r["clients"] for r in rows], [r[key] for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--train-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model", default="embedded", help="'embedded', '24M' (step_vs_trl.py's larger config, "
                        "to see that the base model is held once: its size does not enter the per-client slope), "
                        "'smollm2', a GGUF file, or a model folder")
    parser.add_argument("--clients", default="1,4,16,64", help="client counts (default: 1,4,16,64)")
    parser.add_argument("--max-new-tokens", type=int, help="completion length (default: the run default)")
    args = parser.parse_args()
    if args.model == "24M" and not args.child:
        from step_vs_trl import large_model_path

        args.model = large_model_path(tempfile.mkdtemp(prefix="fgrpo-24m-"))
    if args.child:
        print(json.dumps(measure(args.child, args.train_size, args.model, args.max_new_tokens)))
        return
    train_size = 500 if args.quick else 2000
    rows = []
    for k in (int(x) for x in args.clients.split(",")):
        out = subprocess.run([sys.executable, __file__, "--child", str(k), "--train-size", str(train_size),
                              "--model", args.model, *(["--max-new-tokens", str(args.max_new_tokens)]
                                                       if args.max_new_tokens else [])],
                             capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{k:3d} clients: RSS after setup {r['setup_rss'] / 2**20:8.1f} MiB, peak RSS "
              f"{r['peak_rss'] / 2**20:8.1f} MiB", flush=True)
    if len(rows) < 3:  # too few sizes for a slope: the ratio of the largest to the smallest
        ratio = rows[-1]["peak_rss"] / rows[0]["peak_rss"]
        print(f"{rows[-1]['clients']} clients / {rows[0]['clients']} client(s): peak RSS ratio {ratio:.3f}")
        print(json.dumps({"benchmark": "memory", "quick": args.quick, "model": args.model, "rows": rows,
                          "max_new_tokens": args.max_new_tokens, "peak_rss_ratio": ratio}))
        return
    slope = fitted_slope(rows[1:])
    per_client_budget = rows[0]["adapter_bytes"] + rows[0]["client_data_bytes"]
    result = {
        "benchmark": "memory", "quick": args.quick, "model": args.model, "train_size": train_size, "rows": rows,
        "slope_bytes_per_client": slope, "slope_all_sizes": fitted_slope(rows),
        "setup_slope_bytes_per_client": fitted_slope(rows[1:], "setup_rss"),
        "adapter_bytes": rows[0]["adapter_bytes"],
        "client_data_bytes": rows[0]["client_data_bytes"],
        "slope_over_adapter_plus_data": slope / per_client_budget,
        "rss_64_over_rss_1": rows[-1]["peak_rss"] / rows[0]["peak_rss"],
    }
    print(f"setup RSS slope (4..64 clients) {result['setup_slope_bytes_per_client'] / 2**20:.2f} MiB per client; "
          f"peak RSS slope (4..64 clients) {slope / 2**20:.2f} MiB per client = "
          f"{result['slope_over_adapter_plus_data']:.2f} x (adapter {rows[0]['adapter_bytes'] / 2**20:.2f} MiB + data "
          f"{rows[0]['client_data_bytes'] / 2**20:.2f} MiB); 64 clients / 1 client = {result['rss_64_over_rss_1']:.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
