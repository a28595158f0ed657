"""Round wall time under Flower (simulation and deployment runtimes) / in-process, same work.

The same config runs three ways, one after the other on this machine: ``fgrpo run`` (in-process),
``flwr run`` on a simulation SuperLink, and ``scripts/local-deployment.sh`` (a SuperLink and one
SuperNode per client as separate processes). A round's wall time is the difference between the
``clock_seconds`` of consecutive evaluation rows (training, aggregation and evaluation). Round 1
includes each ClientApp loading its model, so the steady-state figure is the median over rounds
2..R; both are printed. Target: steady-state ratio <= 1.25.

    python benchmarks/flower_overhead.py            # full: 2 clients, 6 rounds, embedded default
    python benchmarks/flower_overhead.py --quick    # 2 clients, 3 rounds, fewer local steps
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


def round_seconds(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    clock = [r["clock_seconds"] for r in rows if r["kind"] == "eval"]
    return [b - a for a, b in zip(clock, clock[1:])]


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
        run_config = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in options.items())
        subprocess.run(["flwr", "run", ".", "sim", "--stream", "--run-config", f"{run_config} out='{out}'",
                        "--federation-config", f"num-supernodes={clients}"], cwd=ROOT, check=True,
                       env={**os.environ, "FLWR_HOME": str(home)}, stdout=subprocess.DEVNULL)
    finally:
        os.killpg(link.pid, signal.SIGTERM)
        link.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    clients, rounds = 2, (3 if args.quick else 6)
    options = {"num-clients": clients, "rounds": rounds, "local-steps": 2 if args.quick else 5,
               "eval-size": 50, "checkpoint-every": 1}
    work = Path(tempfile.mkdtemp(prefix="fgrpo-flower-bench-"))
    flags = [x for k, v in options.items() for x in (f"--{k}", str(v))]
    subprocess.run([sys.executable, "-m", "fgrpo.cli", "run", *flags, "--out", str(work / "in-process")],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_simulation(options, work / "simulation", clients, work)
    overrides = " ".join(f"{k}={v}" for k, v in options.items() if k not in ("num-clients", "rounds"))
    subprocess.run([str(ROOT / "scripts" / "local-deployment.sh"), str(clients), str(rounds),
                    f"{overrides} out='{work / 'deployment'}'"], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "FGRPO_DEPLOY_DIR": str(work / "deploy")})
    times = {name: round_seconds(work / name) for name in ("in-process", "simulation", "deployment")}
    base = times["in-process"]
    result = {"benchmark": "flower_overhead", "quick": args.quick, "clients": clients, "rounds": rounds,
              "local_steps": options["local-steps"], "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    for name in ("simulation", "deployment"):
        result[f"{name}_steady_ratio"] = statistics.median(times[name][1:]) / statistics.median(base[1:])
        result[f"{name}_first_round_ratio"] = times[name][0] / base[0]
    result["round_seconds"] = {k: [round(x, 2) for x in v] for k, v in times.items()}
    for name, values in times.items():
        print(f"{name:11s} round seconds: " + " ".join(f"{x:6.2f}" for x in values))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
