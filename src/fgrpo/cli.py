"""Command line: ``fgrpo run`` (every config key is also an option; see ``fgrpo run --help``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fgrpo.config import ConfigError, RunConfig, build_config, config_fields


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
    run.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint "
                     "to its configured number of rounds (only --rounds may be given with it, to extend it)")
    defaults = RunConfig()
    for f in config_fields():
        default = getattr(defaults, f.name)
        run.add_argument(_option(f.name), dest=f.name, metavar=type(default).__name__.upper(),
                         default=None, help=f"{f.metadata['doc']} (default: {default!r})")
    run.set_defaults(func=cmd_run)

    ev = sub.add_parser("eval", help="evaluate a saved adapter (or a base model) on held-out tasks",
                        description="Greedy held-out accuracy per task of a saved LoRA adapter or of a "
                        "base model alone. With --adapter RUN_DIR/adapter, the run's config.toml supplies "
                        "the defaults, so the run's final per-task accuracy is reproduced.")
    ev.add_argument("--adapter", help="adapter folder (PEFT save_pretrained); omit to evaluate the base model")
    ev.add_argument("--model", help="base model: 'embedded', a folder or a hub name (default: the "
                    "adapter's base model)")
    ev.add_argument("--tasks", help="comma-separated task families (default: the run's, else the defaults)")
    ev.add_argument("--eval-size", type=int,
                    help="held-out prompts per task, at most 200 (default: the run's, else 200)")
    ev.add_argument("--max-new-tokens", type=int, help="completion length (default: the run's, else 10)")
    ev.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda' (default: auto)")
    ev.set_defaults(func=cmd_eval)
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    overrides = {f.name: getattr(args, f.name) for f in config_fields() if getattr(args, f.name) is not None}
    from fgrpo.runner import run_experiment

    if args.resume:
        extra = sorted(set(overrides) - {"rounds"}) + (["config"] if args.config else [])
        if extra:
            raise ConfigError(f"--resume continues a run as configured; only --rounds may change, not: "
                              f"{', '.join(extra)}")
        saved = Path(args.resume) / "config.toml"
        if not saved.exists():
            raise ConfigError(f"resume = {args.resume!r}: no config.toml there; give a run directory")
        cfg = build_config(saved, {**overrides, "out": args.resume})
        run_experiment(cfg, resume=True)
        return 0
    run_experiment(build_config(args.config, overrides))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from fgrpo.runner import evaluate_saved

    evaluate_saved(args.adapter, args.model, args.tasks, args.eval_size, args.max_new_tokens, args.device)
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
