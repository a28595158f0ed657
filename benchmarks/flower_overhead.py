"""Round wall time under Flower (simulation and deployment runtimes) / in-process, same work.

The same config runs up to four ways, one after the other on this machine: ``fgrpo run`` (in-process),
``flwr run`` on a simulation SuperLink, ``scripts/local-deployment.sh`` (a SuperLink and one SuperNode per
client as separate processes), and the same with each owner's resident process. A round's wall time is
the difference between the ``clock_seconds`` of consecutive evaluation rows (training, aggregation and
evaluation). Round 1 includes each ClientApp loading its model, so the steady-state figure is the median over rounds
2..R; both are printed. Targets: the simulation <= 1.25; the deployment with resident processes <= 1.2
on SmolLM2 and <= 2 on the embedded default.

    python benchmarks/flower_overhead.py            # full: 2 clients, 6 rounds, embedded default
    python benchmarks/flower_overhead.py --quick    # 2 clients, 3 rounds, fewer local steps
    python benchmarks/flower_overhead.py --model smollm2 --runtimes deployment,resident
        # the real model (the smollm2 preset's owners and sizes, 2 rounds of 2 local steps, 20 held-out
        # prompts per task): in-process against the deployment runtime, without and with resident processes

With ``resident`` (``FGRPO_RESIDENT=1 scripts/local-deployment.sh``), each owner's resident process
(``fgrpo owner serve``) keeps its model loaded and each round's ClientApp only passes the message on;
``ready_seconds`` is the time from the ClientApp receiving the message to the owner's round starting
(per round, summed over its clients), and the slowest client's local training is printed beside it.

Each ClientApp process reports, with its first update, the seconds from its start to having its model
and data (``clientapp_setup_seconds``) and the part of that spent loading them (``model_load_seconds``);
their sum over a round's clients is printed per runtime and round (0 where a process was reused).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


SMOLLM2 = {"model": "smollm2", "tasks": "basic_arithmetic:max_terms=2,min_digits=1,max_digits=1,allow_negation=False,"
           "allow_parentheses=False,chain_sum:max_terms=2,max_digits=1", "prompts-per-step": 4, "group-size": 8,
           "max-new-tokens": 64, "temperature": 0.7, "lr": 2e-4, "train-size": 200}  # the smollm2 preset's


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def round_seconds(run_dir: Path) -> list[float]:
    clock = [r["clock_seconds"] for r in metric_rows(run_dir) if r["kind"] == "eval"]
    return [b - a for a, b in zip(clock, clock[1:])]


def setup_seconds(run_dir: Path, key: str) -> list[float]:
    """Per round, the sum over its clients of ``key`` (what ClientApp processes spent starting and loading)."""
    rows = [r for r in metric_rows(run_dir) if r["kind"] == "client"]
    return [sum(r.get(key, 0.0) for r in rows if r["round"] == rnd) for rnd in sorted({r["round"] for r in rows})]


def slowest_training(run_dir: Path) -> list[float]:
    """Per round, the longest local training of its clients (``train_seconds``): the part of a round that the
    owners' own work takes; the rest is the runtime's (messages, process starts) and the server's."""
    rows = [r for r in metric_rows(run_dir) if r["kind"] == "client"]
    return [max(r["train_seconds"] for r in rows if r["round"] == rnd) for rnd in sorted({r["round"] for r in rows})]


def config_text(options: dict) -> str:
    return " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in options.items())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_simulation(options: dict, out: Path, clients: int, work: Path) -> None:
    port = free_port()
    home = work / "flwr-home"
    home.mkdir(exist_ok=True)
    link = subprocess.Popen(["flower-superlink", "--insecure", "--simulation", "--port", str(port),
                             "--disable-runtime-dependency-installation", "--database", str(work / "sim.db")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "FLWR_HOME": str(home)})
    (home / "config.toml").write_text(f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\n'
                                      f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    try:
        for _ in range(150):
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.2)
        run_config = config_text(options)
        subprocess.run(["flwr", "run", ".", "sim", "--stream", "--run-config", f"{run_config} out='{out}'",
                        "--federation-config", f"num-supernodes={clients}"], cwd=ROOT, check=True,
                       env={**os.environ, "FLWR_HOME": str(home)}, stdout=subprocess.DEVNULL)
    finally:
        os.killpg(link.pid, signal.SIGTERM)
        link.wait(timeout=60)


def run_deployment(options: dict, out: Path, clients: int, rounds: int, work: Path, resident: bool) -> None:
    """scripts/local-deployment.sh (SuperLink + one SuperNode per client); ``resident``: with each owner's
    resident process (``fgrpo owner serve``) beside its SuperNode."""
    overrides = config_text({k: v for k, v in options.items() if k not in ("num-clients", "rounds")})
    subprocess.run([str(ROOT / "scripts" / "local-deployment.sh"), str(clients), str(rounds),
                    f"{overrides} out='{out}'"], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "FGRPO_DEPLOY_DIR": str(work), "FGRPO_RESIDENT": "1" if resident else "0"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="embedded", help="'embedded' (default) or 'smollm2'")
    parser.add_argument("--runtimes", default="simulation,deployment,resident", help="Flower runtimes to run "
                        "beside in-process, comma-separated: simulation, deployment, resident (the deployment "
                        "with each owner's resident process); default: all three")
    args = parser.parse_args()
    runtimes = args.runtimes.split(",")
    clients = 2
    if args.model == "smollm2":
        rounds, options = 2, {**SMOLLM2, "num-clients": clients, "rounds": 2, "local-steps": 2, "eval-size": 20}
    else:
        rounds = 3 if args.quick else 6
        options = {"num-clients": clients, "rounds": rounds, "local-steps": 2 if args.quick else 5,
                   "eval-size": 50}
    options["checkpoint-every"] = 1
    work = Path(tempfile.mkdtemp(prefix="fgrpo-flower-bench-"))
    flags = [x for k, v in options.items() for x in (f"--{k}", str(v))]
    subprocess.run([sys.executable, "-m", "fgrpo.cli", "run", *flags, "--out", str(work / "in-process")],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if "simulation" in runtimes:
        run_simulation(options, work / "simulation", clients, work)
    for name in ("deployment", "resident"):
        if name in runtimes:
            run_deployment(options, work / name, clients, rounds, work / f"{name}-work", resident=name == "resident")
    names = ["in-process", *runtimes]
    times = {name: round_seconds(work / name) for name in names}
    base = times["in-process"]
    result = {"benchmark": "flower_overhead", "model": args.model, "quick": args.quick, "clients": clients,
              "rounds": rounds, "local_steps": options["local-steps"],
              "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    for name in runtimes:
        if len(base) > 1:
            result[f"{name}_steady_ratio"] = statistics.median(times[name][1:]) / statistics.median(base[1:])
        result[f"{name}_first_round_ratio"] = times[name][0] / base[0]
        result[f"{name}_slowest_training_per_round"] = [round(x, 2) for x in slowest_training(work / name)]
        for key in ("clientapp_setup_seconds", "model_load_seconds", "ready_seconds"):
            result[f"{name}_{key}_per_round"] = [round(x, 2) for x in setup_seconds(work / name, key)]
    result["in-process_training_per_round"] = [round(x, 2) for x in slowest_training(work / "in-process")]
    result["round_seconds"] = {k: [round(x, 2) for x in v] for k, v in times.items()}
    for name, values in times.items():
        print(f"{name:11s} round seconds: " + " ".join(f"{x:6.2f}" for x in values))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
