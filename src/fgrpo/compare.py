"""``fgrpo compare``: strategies x scenarios x seeds into one results directory.

    OUT/runs/<scenario>/<strategy>/seed-<s>-<config hash>/   one ordinary run directory per run
    OUT/table.csv, OUT/table.md                                 one row per scenario x strategy
    OUT/weights.md                                              weights and update norms per client and round
    OUT/plots/accuracy-<scenario>.png                           macro accuracy vs round, mean and seed band
    OUT/plots/weights-<scenario>.png                            aggregation weights per client per round

A run whose directory already holds summary.json is reused; one with checkpoints but no summary is
resumed; so an interrupted comparison continues where it stopped. The directory name carries a
hash of the run's whole config, so a changed setting never reuses a stale run.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import statistics
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fgrpo import strategies
from fgrpo.config import ConfigError, RunConfig
from fgrpo.config_sources import build_config, preset_data
from fgrpo.rundir import read_metrics

LAST_ROUNDS = 3  # "spread over the last rounds": std of macro accuracy over the last 3 evaluations
REFERENCE = "fedavg"  # every strategy's final content accuracy minus this one's, paired by seed
WEIGHTINGS = ("fgrpo", "fedavg", "uniform", "reward-weighted")  # compared by `separation`
RESOLVE_POINTS = 0.02  # "how many seeds would resolve a 2-point difference", printed when nothing separates


def recipe(name: str) -> dict[str, Any]:
    """Config overrides of a comparison's strategy name (``fgrpo+fedadam[tau=0.3]``; fgrpo.strategies.recipe)."""
    try:
        return strategies.recipe(name)
    except ValueError as err:
        raise ConfigError(f"strategies: {err}") from None


@dataclass
class Plan:
    strategies: list[str]
    scenarios: list[str]
    seeds: list[int]
    target: float = 0.8  # macro accuracy for "rounds to target"
    run: dict[str, Any] = field(default_factory=dict)  # config keys of the command line, shared by every run
    preset: str | None = None  # its [run] table: the layer under config_file and run (config_sources.build_config)
    config_file: str | None = None  # a TOML file of config keys shared by every run


def load_preset(name_or_path: str) -> Plan:
    """A preset TOML (a packaged name such as ``main`` or a file): a [compare] table with
    strategies, scenarios, seeds and target, and a [run] table of config keys."""
    data, source = preset_data(name_or_path)
    spec = data.get("compare", {})
    missing = [k for k in ("strategies", "scenarios", "seeds") if k not in spec]
    if missing:
        raise ConfigError(f"{source}: [compare] lacks {', '.join(missing)}")
    return Plan(list(spec["strategies"]), list(spec["scenarios"]), [int(s) for s in spec["seeds"]],
                float(spec.get("target", 0.8)), preset=name_or_path)


def config_hash(cfg: RunConfig) -> str:
    """Hash of the settings that differ from the defaults, except where the run is written or cached:
    a new option whose default keeps the old behaviour leaves finished runs reusable."""
    defaults = RunConfig().to_dict()
    values = {k: v for k, v in cfg.to_dict().items() if k not in ("out", "cache_dir") and v != defaults[k]}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:10]


def plan_runs(plan: Plan, out: Path) -> list[tuple[str, RunConfig]]:
    """(strategy name, validated config with its run directory) for every run of the plan."""
    runs = []
    for scenario in plan.scenarios:
        for strategy in plan.strategies:
            for seed in plan.seeds:
                cfg = build_config(plan.config_file, {**plan.run, **recipe(strategy), "scenario": scenario,
                                                      "seed": seed}, preset=plan.preset)
                run_dir = out / "runs" / scenario / strategy / f"seed-{seed}-{config_hash(cfg)}"
                runs.append((strategy, replace(cfg, out=str(run_dir))))
    return runs


def _run_one(cfg: RunConfig, threads: int) -> dict:
    """One run in a worker process, its terminal output in RUN_DIR/log.txt; reused or resumed if found."""
    import torch

    from fgrpo.checkpoint import latest_checkpoint
    from fgrpo.runner import run_experiment

    torch.set_num_threads(threads)
    run_dir = Path(cfg.out)
    summary = run_dir / "summary.json"
    if summary.exists():
        return json.loads(summary.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "log.txt", "a") as log:
        console = Console(file=log, width=120)
        return run_experiment(cfg, console, resume=latest_checkpoint(run_dir) is not None)


def run_comparison(plan: Plan, out: Path, jobs: int = 1, console: Console | None = None) -> list[dict]:
    """Run (or reuse) every run of the plan, then write the tables and plots; returns the table rows."""
    console = console or Console(stderr=True)
    out.mkdir(parents=True, exist_ok=True)
    runs = plan_runs(plan, out)
    (out / "plan.json").write_text(json.dumps({**plan.__dict__, "runs": [c.out for _, c in runs]}, indent=1))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    failures: list[str] = []
    done = sum((Path(c.out) / "summary.json").exists() for _, c in runs)
    console.print(f"[bold]fgrpo compare[/bold]: {len(plan.strategies)} strategies x {len(plan.scenarios)} "
                  f"scenarios x {len(plan.seeds)} seeds = {len(runs)} runs ({done} already done) -> {out}")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        bar = progress.add_task("runs", total=len(runs), completed=0)
        if jobs == 1:
            for name, cfg in runs:
                _collect(name, cfg, lambda c=cfg: _run_one(c, threads), failures, console)
                progress.advance(bar)
        else:
            import multiprocessing

            with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = {pool.submit(_run_one, cfg, threads): (name, cfg) for name, cfg in runs}
                for future in as_completed(futures):
                    name, cfg = futures[future]
                    _collect(name, cfg, future.result, failures, console)
                    progress.advance(bar)
    rows = summarize_runs(plan, runs)
    write_tables(rows, out)
    write_weights(plan, runs, out)
    for scenario in plan.scenarios:
        plot_scenario(plan, runs, scenario, out / "plots")
    console.print(f"table: {out / 'table.md'}")
    if failures:
        console.print(f"[red]{len(failures)} run(s) failed[/red]: " + "; ".join(failures))
    return rows


def _collect(name: str, cfg: RunConfig, result, failures: list[str], console: Console) -> None:
    try:
        summary = result()
        console.print(f"{cfg.scenario:16s} {escape(name):22s} seed {cfg.seed}: macro "
                      f"{summary['initial_macro_accuracy']:.3f} -> {summary['final_macro_accuracy']:.3f} "
                      f"({summary['wall_seconds']:.0f} s)")
    except Exception as err:  # one failed run must not cost the others; it is listed at the end
        failures.append(f"{cfg.out}: {type(err).__name__}: {err}")
        console.print(f"[red]{cfg.scenario} {escape(name)} seed {cfg.seed} failed[/red]: {escape(str(err))}")


def _evals(run_dir: str) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [r for r in read_metrics(path) if r["kind"] == "eval"] if path.exists() else []


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _final_content(summary: dict) -> float:
    """Final content macro accuracy (runs of older versions lack it: their macro accuracy)."""
    value = summary.get("final_content_macro_accuracy")
    return summary["final_macro_accuracy"] if value is None else value


def paired_difference(finals: dict[int, float], reference: dict[int, float]) -> tuple[float, float]:
    """Mean and std over the common seeds of finals[seed] - reference[seed] (nan without common seeds)."""
    return _mean_std([finals[s] - reference[s] for s in sorted(finals.keys() & reference.keys())])


def summarize_runs(plan: Plan, runs: list[tuple[str, RunConfig]]) -> list[dict]:
    """One row per scenario x strategy, over the seeds whose run finished."""
    rows, by_seed = [], {}
    for scenario in plan.scenarios:
        for strategy in plan.strategies:
            finals, worst, to_target, spreads, seconds, curve_means, spent = [], [], [], [], [], [], []
            seed_finals: dict[int, float] = {}  # seed -> final content accuracy
            for name, cfg in runs:
                summary_path = Path(cfg.out) / "summary.json"
                if name != strategy or cfg.scenario != scenario or not summary_path.exists():
                    continue
                summary = json.loads(summary_path.read_text())
                evals = _evals(cfg.out)
                finals.append(summary["final_macro_accuracy"])
                seed_finals[cfg.seed] = _final_content(summary)
                worst.append(summary["final_worst_task_accuracy"])
                reached = [e["round"] for e in evals if e["macro_accuracy"] >= plan.target]
                to_target.append(reached[0] if reached else None)
                trained = [e["macro_accuracy"] for e in evals if e["round"] > 0]
                curve_means.append(statistics.fmean(trained) if trained else math.nan)
                tail = [e["macro_accuracy"] for e in evals[-LAST_ROUNDS:]]
                spreads.append(statistics.pstdev(tail) if len(tail) > 1 else 0.0)
                seconds.append(summary["wall_seconds"])
                if "epsilon" in summary:  # differential privacy: (epsilon, dp_delta) spent by the run
                    spent.append(summary["epsilon"])
            mean, std = _mean_std(finals)
            content_mean, content_std = _mean_std(list(seed_finals.values()))
            hit = [r for r in to_target if r is not None]
            by_seed[scenario, strategy] = seed_finals
            rows.append({
                "scenario": scenario, "strategy": strategy, "seeds": len(finals),
                "final_macro_mean": mean, "final_macro_std": std,
                "final_content_mean": content_mean, "final_content_std": content_std,
                "worst_task_mean": _mean_std(worst)[0],
                "mean_over_rounds": _mean_std(curve_means)[0],
                "rounds_to_target_mean": statistics.fmean(hit) if hit else math.nan,
                "seeds_reaching_target": len(hit),
                "last_rounds_spread_mean": _mean_std(spreads)[0],
                "wall_seconds_mean": _mean_std(seconds)[0],
                "epsilon": max(spent) if spent else math.inf,
            })
    for row in rows:  # content accuracy minus the reference's, paired by seed
        reference = by_seed.get((row["scenario"], REFERENCE), {})
        diff = paired_difference(by_seed[row["scenario"], row["strategy"]], reference)
        row[f"minus_{REFERENCE}_mean"], row[f"minus_{REFERENCE}_std"] = diff
    return rows


def separation(rows: list[dict], scenario: str) -> dict | None:
    """Do the weightings (``WEIGHTINGS``) separate on ``scenario``? Best and worst final content accuracy,
    their gap and 3 x the larger seed std of the two; separated when the gap is larger. None with < 2."""
    rows = [r for r in rows if r["scenario"] == scenario and r["strategy"] in WEIGHTINGS and r["seeds"] > 1]
    if len(rows) < 2:
        return None
    best = max(rows, key=lambda r: r["final_content_mean"])
    worst = min(rows, key=lambda r: r["final_content_mean"])
    gap = best["final_content_mean"] - worst["final_content_mean"]
    threshold = 3 * max(best["final_content_std"], worst["final_content_std"])
    fgrpo = next((r for r in rows if r["strategy"] == "fgrpo"), None)
    paired_std = fgrpo[f"minus_{REFERENCE}_std"] if fgrpo else math.nan
    return {"best": best, "worst": worst, "gap": gap, "threshold": threshold, "separated": gap > threshold,
            "paired_std": paired_std, "seeds_to_resolve": seeds_to_resolve(paired_std)}


def seeds_to_resolve(paired_std: float, difference: float = RESOLVE_POINTS, z: float = 2.0) -> float:
    """Seeds for a paired mean difference of ``difference`` to lie z standard errors from zero, given the
    per-seed std of the paired differences: n = ceil((z * std / difference)^2), at least 2 (nan if unknown)."""
    if not math.isfinite(paired_std):
        return math.nan
    return max(2, math.ceil((z * paired_std / difference) ** 2))


def write_tables(rows: list[dict], out: Path) -> None:
    """table.csv (every field, full precision) and table.md (one table per scenario)."""
    with open(out / "table.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = []
    private = any(math.isfinite(r["epsilon"]) for r in rows)  # an epsilon column when any run used DP
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        header = ("| strategy | final macro accuracy (mean ± std) | final content accuracy | worst task | "
                  "mean over rounds 1..R | rounds to target (seeds reaching it) | spread, last rounds | seeds | "
                  f"content minus {REFERENCE}, paired (points) |")
        lines += [f"### {scenario}", "", header + (" epsilon |" if private else ""),
                  "|---|---|---|---|---|---|---|---|---|" + ("---|" if private else "")]
        for r in (r for r in rows if r["scenario"] == scenario):
            target = ("-" if math.isnan(r["rounds_to_target_mean"]) else f"{r['rounds_to_target_mean']:.1f}")
            epsilon = (f" {r['epsilon']:,.1f} |" if math.isfinite(r["epsilon"]) else " no DP |") if private else ""
            diff = r[f"minus_{REFERENCE}_mean"]
            diff = "-" if math.isnan(diff) else f"{100 * diff:+.1f} ± {100 * r[f'minus_{REFERENCE}_std']:.1f}"
            lines.append(f"| {r['strategy']} | {r['final_macro_mean']:.3f} ± {r['final_macro_std']:.3f} | "
                         f"{r['final_content_mean']:.3f} ± {r['final_content_std']:.3f} | "
                         f"{r['worst_task_mean']:.3f} | {r['mean_over_rounds']:.3f} | "
                         f"{target} ({r['seeds_reaching_target']}/{r['seeds']}) | "
                         f"{r['last_rounds_spread_mean']:.3f} | {r['seeds']} | {diff} |{epsilon}")
        lines.append("")
        sep = separation(rows, scenario)
        if sep is not None:
            b, w = sep["best"], sep["worst"]
            lines += [f"Weightings ({', '.join(WEIGHTINGS)}): best {b['strategy']} {b['final_content_mean']:.3f} ± "
                      f"{b['final_content_std']:.3f}, worst {w['strategy']} {w['final_content_mean']:.3f} ± "
                      f"{w['final_content_std']:.3f}; gap {sep['gap']:.3f} against 3 x the larger std = "
                      f"{sep['threshold']:.3f}: " + ("**separated**" if sep["separated"] else "not separated")
                      + ("" if sep["separated"] or math.isnan(sep["seeds_to_resolve"]) else
                         f"; {REFERENCE}-paired fgrpo std {100 * sep['paired_std']:.1f} points: about "
                         f"{sep['seeds_to_resolve']} seeds would put a {100 * RESOLVE_POINTS:.0f}-point difference "
                         "2 standard errors from zero"), ""]
    (out / "table.md").write_text("\n".join(lines))


def write_weights(plan: Plan, runs: list[tuple[str, RunConfig]], out: Path) -> None:
    """weights.md: per scenario and strategy, each client's aggregation weight per round and its mean
    update norm and gain, averaged over the seeds (what explains a gap between strategies). A client the
    server left out in a round (a warning row naming it and no client row: screened, rejected by the
    probes, or failed) counts with weight 0 in that round's mean."""
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
            tables.append("")
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
        curves = [_evals(c.out) for n, c in runs if n == strategy and c.scenario == scenario]
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
    weight_runs = [(s, d) for s, d in weight_runs if (Path(d) / "metrics.jsonl").exists()]
    if not weight_runs:
        return
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
