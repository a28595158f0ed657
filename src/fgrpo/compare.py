"""``fgrpo compare``: strategies x scenarios x seeds into one results directory.

    OUT/runs/<scenario>/<strategy>/seed-<s>-<config hash>/   one ordinary run directory per run
    OUT/table.csv, OUT/table.md                                 one row per scenario x strategy
    OUT/weights.md                                              weights and update norms per client and round
    OUT/plots/accuracy-<scenario>.png                           macro accuracy vs round, mean and seed band
    OUT/plots/weights-<scenario>.png                            aggregation weights per client per round

A run whose directory holds summary.json is reused, one with checkpoints but no summary resumed: an interrupted
comparison continues where it stopped. The directory name hashes the run's config: no stale run is reused.
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
from fgrpo.compare_report import evals_of, plot_scenario, signal_of, write_weights
from fgrpo.config import ConfigError, RunConfig
from fgrpo.config_sources import build_config, preset_data

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
    """A preset TOML (packaged name or file): [compare] strategies, scenarios, seeds, target; [run] config keys."""
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
    for scenario in plan.scenarios:  # the yardstick of every gain the weights were made of
        for strategy in plan.strategies:
            if (signal := signal_of(runs, strategy, scenario)).pairs:
                console.print(f"{scenario} {escape(strategy)}: {signal.line()}")
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
                evals = evals_of(cfg.out)
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
