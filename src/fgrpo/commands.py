"""The commands that read a finished (or running) run: ``fgrpo report`` (plots and summary.json again),
``fgrpo completions`` (what the owners kept on their side) and ``fgrpo eval`` (a saved adapter re-evaluated)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fgrpo.config import ConfigError
from fgrpo.config_sources import build_config
from fgrpo.rundir import build_summary, plot_accuracy, write_json_atomic
from fgrpo.terminal import eval_table, quiet_libraries, summary_table


def report(run_dir: str | Path, console: Console | None = None) -> dict:
    """``fgrpo report``: redraw a run's plots and summary.json from its config.toml and metrics.jsonl."""
    from fgrpo.rundir import read_metrics

    console = console or Console()
    run_dir = Path(run_dir)
    for needed in ("config.toml", "metrics.jsonl"):
        if not (run_dir / needed).exists():
            raise ConfigError(f"report: {str(run_dir)!r} has no {needed}; give a run directory")
    cfg = build_config(run_dir / "config.toml")
    rows = read_metrics(run_dir / "metrics.jsonl")
    if not any(r["kind"] == "eval" for r in rows):
        raise ConfigError(f"report: {str(run_dir / 'metrics.jsonl')!r} has no evaluation row yet")
    old = run_dir / "summary.json"
    # wall time is not in metrics.jsonl: keep the recorded one, else the sum of the logged work
    wall = (json.loads(old.read_text())["wall_seconds"] if old.exists() else
            sum(r.get("train_seconds", 0) + r.get("eval_seconds", 0) for r in rows))
    plot_accuracy(rows, run_dir / "plots" / "accuracy.png")
    summary = build_summary(cfg, rows, wall, run_dir / "adapter")
    write_json_atomic(old, summary)
    console.print(summary_table(summary))
    console.print(f"wrote {old} and {run_dir / 'plots' / 'accuracy.png'}")
    return summary


def show_completions(folder: str | Path, rnd: int | None = None, client: str | None = None,
                     console: Console | None = None) -> int:
    """``fgrpo completions``: the sample completions kept on the clients' side (RUN_DIR/completions/*.jsonl,
    or a Flower node's completions-dir) as a table, with what the owners' reward functions logged (TRL's
    ``log_extra`` columns as "extra", ``log_metric`` numbers under the table); returns how many completions it
    showed."""
    folder = Path(folder)
    folder = folder / "completions" if (folder / "completions").is_dir() else folder
    files = sorted(p for p in folder.glob("*.jsonl") if not p.name.endswith(".log.jsonl"))  # not the owner logs
    if not files:
        raise ConfigError(f"completions: {str(folder)!r} holds no <client>.jsonl; give a run directory or a "
                          "node's completions-dir")
    console = console or Console()
    rows, logged = [], []
    for path in files:
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if (rnd is not None and record["round"] != rnd) or (client is not None and record["client_id"] != client):
                continue
            for c in record["completions"]:
                extra = "; ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in c.get("extra", {}).items())
                rows.append((str(record["round"]), record["client_id"], escape(record["prompt"]),
                             escape(record["answer"]), escape(c["text"]), f"{c['reward']:.3g}",
                             f"{c['advantage']:+.2f}", escape(extra)))
            metrics = record.get("reward_metrics", {})
            note = f"round {record['round']} {record['client_id']}: " + ", ".join(f"{k} = {v:.4g}"
                                                                                  for k, v in metrics.items())
            logged += [note] if metrics and note not in logged else []
    columns = ["round", "client", "prompt", "answer", "completion", "reward", "advantage"]
    columns += ["extra"] if any(r[-1] for r in rows) else []
    table = Table(title=f"sample completions ({folder})", title_justify="left", show_lines=True)
    for column in columns:
        table.add_column(column, justify="right" if column in ("round", "reward", "advantage") else "left")
    for row in rows:
        table.add_row(*row[:len(columns)])
    console.print(table)
    for note in logged:
        console.print(f"logged by the reward functions, {escape(note)}")
    return len(rows)


def evaluate_saved(adapter: str | None, overrides: dict, pass_k: int = 0,
                   console: Console | None = None) -> dict[str, dict[str, float]]:
    """``fgrpo eval``: per-task greedy accuracy (and pass@k with ``pass_k`` > 0) of a saved adapter or of a
    base model alone. ``overrides``: config keys given on the command line (None: the run's, else default)."""
    from peft import PeftModel

    from fgrpo.evaluation import evaluate, pass_at_k
    from fgrpo.model import load_base, resolve_device, resolve_prompt_style
    from fgrpo.scenarios import load_clients

    quiet_libraries()
    console = console or Console()
    run_config = Path(adapter).parent / "config.toml" if adapter else None
    run_config = run_config if run_config is not None and run_config.exists() else None
    if overrides.get("model") is None and adapter is not None:
        config_path = Path(adapter) / "adapter_config.json"
        if not config_path.exists():
            raise ConfigError(f"adapter = {adapter!r}: no adapter_config.json there; give the folder a run "
                              "saved as RUN_DIR/adapter")
        if run_config is None:  # an adapter saved elsewhere: its own base model
            overrides = {**overrides, "model": json.loads(config_path.read_text())["base_model_name_or_path"]}
    cfg = build_config(run_config, overrides)  # defaults < the run's config.toml < the command line
    if pass_k < 0:
        raise ConfigError(f"pass_k = {pass_k} is out of range; valid: 0 (off) or an integer >= 1")
    base, tokenizer = load_base(cfg.model, resolve_device(cfg.device), cfg.warm_start_steps, cfg.cache_dir,
                                prompt_style=cfg.prompt_style)
    style = resolve_prompt_style(cfg.prompt_style, cfg.model, tokenizer)
    net = PeftModel.from_pretrained(base, adapter) if adapter else base
    if cfg.scenario == "user-data" and cfg.data.strip():  # the owners' held-out rows, as in the run
        test_sets = load_clients(cfg, style)[1]
    else:
        test_sets = load_clients(replace(cfg, scenario="task-skew", num_clients=len(cfg.task_list), train_size=1),
                                 style)[1]
    accuracy = evaluate(net, tokenizer, test_sets, cfg.max_new_tokens)
    passed = pass_at_k(net, tokenizer, test_sets, pass_k, cfg.max_new_tokens, cfg.temperature) if pass_k else {}
    console.print(eval_table(accuracy, passed, pass_k, cfg, style))
    return {"accuracy": accuracy.exact, "content": accuracy.content, f"pass@{pass_k}": passed}


