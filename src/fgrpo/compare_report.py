"""What ``fgrpo compare`` writes besides its table: weights.md (each client's weight per round, its update norm
and gain, and the gain's signal) and the plots (accuracy per round, weights per round)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

from fgrpo import strategies
from fgrpo.config import RunConfig
from fgrpo.gain_signal import GainSignal, gain_pairs, gain_signal
from fgrpo.rundir import read_metrics

if TYPE_CHECKING:
    from fgrpo.compare import Plan


def signal_of(runs: list[tuple[str, RunConfig]], strategy: str, scenario: str) -> GainSignal:
    """The gain's signal of ``strategy`` on ``scenario``, over the client-rounds of all its finished seeds."""
    paths = [Path(c.out) / "metrics.jsonl" for n, c in runs if n == strategy and c.scenario == scenario]
    return gain_signal([pair for path in paths if path.exists() for pair in gain_pairs(read_metrics(path))])


def evals_of(run_dir: str) -> list[dict]:
    """The evaluation rows of a run directory (none when it has no metrics yet)."""
    path = Path(run_dir) / "metrics.jsonl"
    return [r for r in read_metrics(path) if r["kind"] == "eval"] if path.exists() else []


def write_weights(plan: Plan, runs: list[tuple[str, RunConfig]], out: Path) -> None:
    """weights.md: per scenario and strategy, each client's aggregation weight per round and its mean
    update norm and gain, averaged over the seeds (what explains a gap between strategies). A client the
    server left out in a round (a warning row naming it and no client row: screened, rejected by the
    probes, or failed) counts with weight 0 in that round's mean. Under each table, the gain's signal over the
    seeds' client-rounds (``fgrpo.gain_signal``): does the gain follow the owner's held-out change?"""
    lines = ["# Aggregation weights and update norms per client (mean over seeds)", ""]
    for scenario in plan.scenarios:
        tables = []
        for strategy in plan.strategies:
            cells: dict[str, dict[int, list[float]]] = {}  # client label -> round -> weights over seeds
            norms: dict[str, list[float]] = {}
            gains: dict[str, list[float]] = {}
            for name, cfg in runs:
                path = Path(cfg.out) / "metrics.jsonl"
                if name != strategy or cfg.scenario != scenario or not path.exists():
                    continue
                rows = read_metrics(path)
                labels: dict[str, str] = {}  # client id -> label, for the clients this run weighted
                for r in rows:
                    if r["kind"] != "client" or r.get("weight") is None:
                        continue
                    label = labels[r["client_id"]] = f"{r['client_id']} ({r['task'][:18]}, {r['reward_scale']})"
                    cells.setdefault(label, {}).setdefault(r["round"], []).append(r["weight"])
                    norms.setdefault(label, []).append(r.get("update_norm", math.nan))
                    if r.get("gain") is not None:
                        gains.setdefault(label, []).append(r["gain"])
                weighted = {(r["client_id"], r["round"]) for r in rows if r["kind"] == "client"}
                left_out = {(r["client_id"], r["round"]) for r in rows
                            if r["kind"] == "warning" and r.get("client_id") in labels} - weighted
                for client_id, rnd in left_out:
                    cells[labels[client_id]].setdefault(rnd, []).append(0.0)
            if not cells:
                continue
            rounds = sorted({rnd for by_round in cells.values() for rnd in by_round})
            tables += [f"**{strategy}**", "",
                       "| client | " + " | ".join(f"w round {rnd}" for rnd in rounds) + " | update norm | gain |",
                       "|---|" + "---|" * (len(rounds) + 2)]
            for label in sorted(cells):
                weights = [f"{statistics.fmean(cells[label][rnd]):.2f}" if rnd in cells[label] else "-"
                           for rnd in rounds]
                gain = f"{statistics.fmean(gains[label]):+.2f}" if label in gains else "-"
                tables.append(f"| {label} | " + " | ".join(weights) +
                              f" | {statistics.fmean(norms[label]):.2f} | {gain} |")
            signal = signal_of(runs, strategy, scenario)
            tables += [f"{signal.line()}.", ""] if signal.pairs else [""]
        if tables:
            lines += [f"## {scenario}", ""] + tables
    (out / "weights.md").write_text("\n".join(lines))


def plot_scenario(plan: Plan, runs: list[tuple[str, RunConfig]], scenario: str, plots: Path) -> None:
    """Macro accuracy vs round (mean over seeds, band = min..max over seeds) per strategy, and the
    aggregation weights per client per round (first seed) of every strategy whose weights vary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    weight_runs = []
    for strategy in plan.strategies:
        curves = [evals_of(c.out) for n, c in runs if n == strategy and c.scenario == scenario]
        curves = [c for c in curves if c]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        rounds = [e["round"] for e in curves[0][:n]]
        values = [[c[i]["macro_accuracy"] for c in curves] for i in range(n)]
        line, = ax.plot(rounds, [statistics.fmean(v) for v in values], marker=".", label=strategy)
        ax.fill_between(rounds, [min(v) for v in values], [max(v) for v in values], color=line.get_color(),
                        alpha=0.15)
        first = next(c for n_, c in runs if n_ == strategy and c.scenario == scenario)
        if strategies.STRATEGIES[first.strategy].adaptive:
            weight_runs.append((strategy, first.out))
    ax.set_xlabel("round")
    ax.set_ylabel("held-out macro accuracy (greedy)")
    ax.set_title(f"{scenario}: mean over seeds, band = min..max")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(plots / f"accuracy-{scenario}.png", dpi=120)
    plt.close(fig)
    plot_weights(plan, [(s, d) for s, d in weight_runs if (Path(d) / "metrics.jsonl").exists()], scenario, plots)


def plot_weights(plan: Plan, weight_runs: list[tuple[str, str]], scenario: str, plots: Path) -> None:
    """The aggregation weights per client per round of each (strategy, run directory) in ``weight_runs``."""
    if not weight_runs:
        return
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(weight_runs), figsize=(4.2 * len(weight_runs), 3.6), squeeze=False)
    for ax, (strategy, run_dir) in zip(axes[0], weight_runs):
        clients: dict[str, list[tuple[int, float]]] = {}
        for r in read_metrics(Path(run_dir) / "metrics.jsonl"):
            if r["kind"] == "client":
                clients.setdefault(f"{r['client_id']} ({r['task'][:18]}, {r['reward_scale']})", []).append(
                    (r["round"], r["weight"]))
        for label, points in clients.items():
            ax.plot(*zip(*points), marker=".", label=label)
        ax.set_title(f"{strategy} (seed {plan.seeds[0]})", fontsize=10)
        ax.set_xlabel("round")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("aggregation weight w_k")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"{scenario}: aggregation weights per client")
    fig.tight_layout()
    fig.savefig(plots / f"weights-{scenario}.png", dpi=120)
    plt.close(fig)
