"""Command line: ``fgrpo run`` (every config key is also an option; see ``fgrpo run --help``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fgrpo.config import ConfigError, RunConfig, comma_list, config_fields
from fgrpo.config_sources import build_config
from fgrpo.strategies import MODIFIERS, STRATEGIES

# the config keys that `fgrpo eval` takes (what is evaluated and how); the rest of a run's config does not matter
EVAL_KEYS = ("model", "tasks", "eval_size", "max_new_tokens", "prompt_style", "system_prompt", "temperature",
             "device", "cache_dir")


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fgrpo", description="Federated GRPO with adaptive "
                                     "aggregation by relative performance gain.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one federated GRPO experiment",
                         description="Run one federated GRPO experiment. Every option is also a "
                         "TOML key (snake_case) of --config; the command line wins.")
    run.add_argument("--config", metavar="FILE.toml", help="TOML file with config keys (default: none)")
    run.add_argument("--preset", help="packaged preset name (smollm2, main, ...) or a preset .toml file: its [run] "
                     "table (and its first scenario) are the defaults; --config and options win")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint "
                     "to its configured number of rounds (only --rounds may be given with it, to extend it)")
    _add_config_options(run)
    run.set_defaults(func=cmd_run)

    cmp = sub.add_parser("compare", help="strategies x scenarios x seeds into one results directory",
                         description="Run every strategy on every scenario with every seed (finished runs "
                         "are reused, interrupted ones resumed), then write table.csv, table.md and plots. "
                         f"Strategy names: any --strategy value ({', '.join(STRATEGIES)}), a modifier "
                         f"({', '.join(MODIFIERS)}), or weighting+modifier such as fgrpo+fedadam.")
    cmp.add_argument("--preset", help="packaged preset name (main, tiny, ...) or a preset .toml file")
    cmp.add_argument("--strategies", help="comma-separated strategy names (overrides the preset)")
    cmp.add_argument("--scenarios", help="comma-separated scenarios (overrides the preset)")
    cmp.add_argument("--seeds", help="comma-separated seeds (default: the preset's, else 0,1,2)")
    cmp.add_argument("--target", type=float, help="macro accuracy for 'rounds to target' (default 0.8)")
    cmp.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (default: 1)")
    cmp.add_argument("--out", help="results directory (default: compare/<date-time>)")
    cmp.add_argument("--config", metavar="FILE.toml", help="TOML file with config keys shared by every run")
    _add_config_options(cmp, skip=("out", "seed", "strategy", "scenario"))
    cmp.set_defaults(func=cmd_compare)

    ev = sub.add_parser("eval", help="evaluate a saved adapter (or a base model) on held-out tasks",
                        description="Greedy held-out accuracy per task of a saved LoRA adapter or of a "
                        "base model alone. With --adapter RUN_DIR/adapter, the run's config.toml supplies "
                        "the defaults, so the run's final per-task accuracy is reproduced.")
    ev.add_argument("--adapter", help="adapter folder (PEFT save_pretrained); omit to evaluate the base model")
    ev.add_argument("--pass-k", type=int, default=0, metavar="K",
                    help="also report pass@K: K completions sampled per prompt (default: 0, off)")
    _add_config_options(ev, only=EVAL_KEYS, default_from="the run's, else ")
    ev.set_defaults(func=cmd_eval)

    _add_reading_commands(sub)
    _add_owner_commands(sub)
    return parser


def _add_owner_commands(sub) -> None:
    """``fgrpo owner serve`` and ``fgrpo owner status``: a data owner's resident process on a Flower SuperNode."""
    own = sub.add_parser("owner", help="a data owner's resident process beside a Flower SuperNode",
                         description="Keep one data owner's model, data and verifiers loaded across the rounds of "
                         "a Flower deployment (docs/distributed.md).")
    owner_sub = own.add_subparsers(dest="owner_command", required=True)
    serve = owner_sub.add_parser("serve", help="load the owner's side once and train each round its ClientApp asks",
                                 description="Load the base model, the owner's data and verifiers once, then "
                                 "answer the ClientApp of the SuperNode whose node config has owner-socket=PATH.")
    serve.add_argument("--socket", required=True, metavar="PATH", help="the Unix socket to listen on (mode 0600)")
    serve.add_argument("--run-config", default="", help="the run's config, as given to `flwr run --run-config`")
    serve.add_argument("--node-config", default="", help="the SuperNode's --node-config (partition-id=0, or "
                       'data="/path/owner.jsonl" reward="math"; completions-dir, client-id)')
    serve.set_defaults(func=cmd_owner_serve)
    status = owner_sub.add_parser("status", help="print a resident process's status (exit 1: none answers)")
    status.add_argument("--socket", required=True, metavar="PATH")
    status.set_defaults(func=cmd_owner_status)


def _add_reading_commands(sub) -> None:
    """The commands that read a run: report and completions."""
    rep = sub.add_parser("report", help="redraw a run's plots and summary from metrics.jsonl",
                         description="Rebuild RUN_DIR/summary.json and RUN_DIR/plots/ from RUN_DIR/config.toml "
                         "and RUN_DIR/metrics.jsonl alone, and print the final per-task table.")
    rep.add_argument("run_dir", metavar="RUN_DIR")
    rep.set_defaults(func=cmd_report)

    comp = sub.add_parser("completions", help="show the sample completions the clients kept",
                          description="Show, as a table, the prompts, completions, rewards and advantages that "
                          "each client kept on its own side (RUN_DIR/completions/, or a Flower node's "
                          "completions-dir); the server never receives them.")
    comp.add_argument("run_dir", metavar="RUN_DIR_OR_FOLDER")
    comp.add_argument("--round", type=int, help="only this round")
    comp.add_argument("--client", help="only this client id")
    comp.set_defaults(func=cmd_completions)


def _add_config_options(parser: argparse.ArgumentParser, skip: tuple[str, ...] = (),
                        only: tuple[str, ...] | None = None, default_from: str = "") -> None:
    """One option per config key (``--local-steps`` for ``local_steps``), its help the key's doc."""
    defaults = RunConfig()
    for f in config_fields():
        if f.name in skip or (only is not None and f.name not in only):
            continue
        default = getattr(defaults, f.name)
        doc = f.metadata["doc"]
        if f.name == "strategy":  # the registry's own list (fgrpo.config cannot import it)
            doc += " Strategies: " + "; ".join(f"{s.name}: {s.summary}" for s in STRATEGIES.values()) + "."
        parser.add_argument(_option(f.name), dest=f.name, metavar=type(default).__name__.upper(),
                            default=None, help=f"{doc} (default: {default_from}{default!r})".replace("%", "%%"))


def _overrides(args: argparse.Namespace) -> dict:
    return {f.name: getattr(args, f.name) for f in config_fields() if getattr(args, f.name, None) is not None}


def cmd_run(args: argparse.Namespace) -> int:
    overrides = _overrides(args)
    if args.resume:
        extra = sorted(set(overrides) - {"rounds"}) + (["config"] if args.config else [])
        extra += ["preset"] if args.preset else []
        if extra:
            raise ConfigError(f"--resume continues a run as configured; only --rounds may change, not: "
                              f"{', '.join(extra)}")
        saved = Path(args.resume) / "config.toml"
        if not saved.exists():
            raise ConfigError(f"resume = {args.resume!r}: no config.toml there; give a run directory")
        cfg = build_config(saved, {**overrides, "out": args.resume})
    else:
        cfg = build_config(args.config, overrides, preset=args.preset)
    from fgrpo.runner import run_experiment  # torch and the models: only once the config is valid

    run_experiment(cfg, resume=bool(args.resume))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from datetime import datetime

    from fgrpo.compare import Plan, load_preset, run_comparison

    plan = load_preset(args.preset) if args.preset else Plan([], [], [0, 1, 2])
    if args.strategies:
        plan.strategies = comma_list(args.strategies)
    if args.scenarios:
        plan.scenarios = comma_list(args.scenarios)
    if args.seeds:
        try:
            plan.seeds = [int(s) for s in comma_list(args.seeds)]
        except ValueError:
            raise ConfigError(f"seeds = {args.seeds!r}: give comma-separated integers such as 0,1,2") from None
    if args.target is not None:
        plan.target = args.target
    if not plan.strategies or not plan.scenarios:
        raise ConfigError("compare needs --strategies and --scenarios (or a --preset that names them)")
    if args.jobs < 1:
        raise ConfigError(f"jobs = {args.jobs} is out of range; valid: an integer >= 1")
    plan.run, plan.config_file = _overrides(args), args.config
    out = Path(args.out) if args.out else Path("compare") / datetime.now().strftime("%Y%m%d-%H%M%S")
    run_comparison(plan, out, jobs=args.jobs)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from fgrpo.commands import evaluate_saved

    evaluate_saved(args.adapter, _overrides(args), args.pass_k)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fgrpo.commands import report

    report(args.run_dir)
    return 0


def cmd_completions(args: argparse.Namespace) -> int:
    from fgrpo.commands import show_completions

    show_completions(args.run_dir, args.round, args.client)
    return 0


def cmd_owner_serve(args: argparse.Namespace) -> int:
    from fgrpo.flower.resident import serve

    serve(args.socket, args.run_config, args.node_config)
    return 0


def cmd_owner_status(args: argparse.Namespace) -> int:
    from fgrpo.flower.resident import OwnerFailed, Unreachable, ask

    try:
        print(json.dumps(ask(args.socket, {"kind": "status"}, None, timeout=10)))
    except (Unreachable, OwnerFailed) as err:
        print(f"fgrpo: {err}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"fgrpo: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fgrpo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
