"""The in-process runtime: ``fgrpo run`` samples clients and loops over rounds of the client side
(``fgrpo.client``) and the server side (``fgrpo.server``) on one model host (``fgrpo.host``) in one
process, with progress on the terminal; ``fgrpo report``, ``fgrpo completions`` and ``fgrpo eval``."""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fgrpo.checkpoint import latest_checkpoint
from fgrpo.client import ClientTrainer
from fgrpo.config import ConfigError, RunConfig
from fgrpo.config_sources import build_config
from fgrpo.host import ModelHost
from fgrpo.probes import probe_judge
from fgrpo.report import warning_row
from fgrpo.rundir import RunRecorder, build_summary, plot_accuracy, run_dir_path, write_json_atomic
from fgrpo.scenarios import ClientSpec, centralized_client, client_tasks, load_clients
from fgrpo.server import Server, sample_participants


def quiet_libraries() -> None:
    """Keep the terminal for our own progress: no library progress bars or deprecation chatter."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*generation flags are not valid.*")


class InProcessRun:
    """The in-process runtime: one model host that the client side and the server side share, every
    client's data and the held-out splits, and the loop of a round over them."""

    def __init__(self, cfg: RunConfig, progress=None, samples_dir: Path | None = None):
        self.host = ModelHost(cfg, progress)
        self.cfg = self.host.cfg  # the prompt style resolved for the model
        self.clients, self.test_sets, self.notes = load_clients(self.cfg, self.host.prompt_style)
        self.client_tasks = client_tasks(self.clients, self.test_sets)
        self.trainer = ClientTrainer(self.cfg, self.host)
        judge = probe_judge(self.cfg, self.host, list(self.test_sets) or self.cfg.task_list)
        self.server = Server(self.cfg, self.host.adapter(), [c.client_id for c in self.clients], judge)
        self.pooled = centralized_client(self.clients, self.cfg) if self.server.mode.pooled else None
        self.samples_dir = samples_dir  # where clients keep their sample completions (None: nowhere)

    @property
    def global_adapter(self):
        return self.server.global_adapter

    @property
    def client_baselines(self):
        return self.server.state.client_baselines

    def participants(self, rnd: int) -> list[ClientSpec]:
        """This round's clients (the pooled client, for a strategy that pools every client's data)."""
        if self.pooled is not None:
            return [self.pooled]
        return sample_participants(self.clients, self.cfg.fraction, self.cfg.seed, rnd)

    def run_round(self, rnd: int, on_client_done=None) -> list[dict]:
        """Train the sampled clients, aggregate, evaluate if due; return the round's metric rows.
        A client that raises is left out of the round with a warning row."""
        updates, failed = [], []
        for client in self.participants(rnd):
            try:
                start = self.server.start_adapter(client.client_id)
                updates.append(self.trainer.train(client, rnd, start, self.samples_dir))
            except Exception as err:  # one data owner's failure must not end the round
                failed.append(warning_row(rnd, client.client_id, f"raised {type(err).__name__}: {err}"))
            if on_client_done:
                on_client_done(client)
        rows = self.server.finish_round(rnd, updates, failed)
        if self.server.eval_due(rnd) and self.test_sets:
            rows.append(self.eval_row(rnd))
        return rows

    def eval_row(self, rnd: int) -> dict:
        return self.host.eval_row(rnd, self.server.state, self.test_sets, self.client_tasks)


def run_experiment(cfg: RunConfig, console: Console | None = None, resume: bool = False) -> dict:
    """Run ``cfg`` to completion; with ``resume``, continue the run in ``cfg.out`` from its last
    checkpoint. Returns summary.json's content."""
    quiet_libraries()
    if cfg.secure_aggregation:
        raise ConfigError("secure_aggregation = true needs the Flower runtime (flwr run . --run-config "
                          "\"secure-aggregation=true\"; docs/privacy.md): in one process there is no one to hide from")
    console = console or Console(stderr=True)
    start = time.perf_counter()
    run_dir = run_dir_path(cfg)
    cfg = replace(cfg, out=str(run_dir))
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if resume and checkpoint is None:
        raise ConfigError(f"resume = {str(run_dir)!r}: no checkpoint there (checkpoints/round-*)")
    if not resume and (run_dir / "metrics.jsonl").exists():
        raise ConfigError(f"out = {str(run_dir)!r} already holds a run; continue it with --resume "
                          f"{run_dir} or choose another --out")
    with _progress(console) as progress:
        run = InProcessRun(cfg, progress=progress, samples_dir=run_dir / "completions")  # the clients' side
        console.print(f"[bold]fgrpo run[/bold]: {cfg.strategy} on {cfg.scenario}, model {cfg.model}, "
                      f"{len(run.clients)} clients, {cfg.rounds} rounds, seed {cfg.seed} -> {run_dir}")
        for note in run.notes:
            console.print(f"[yellow]data[/yellow]: {note}")
        record = RunRecorder(run_dir, run.cfg, run.server, run.host, checkpoint)
        if checkpoint is not None:
            drop_samples_after(run.samples_dir, record.done)  # rounds the resumed run trains again
            console.print(f"resumed from {checkpoint} (round {record.done} of {cfg.rounds})")
        else:
            row = run.eval_row(0)
            record.end_round(0, [row])
            console.print(f"round 0: macro accuracy {row['macro_accuracy']:.3f}  "
                          + "  ".join(f"{k.split('/')[1]} {v:.2f}" for k, v in row.items()
                                      if k.startswith("accuracy/")))
        bar = progress.add_task("rounds", total=cfg.rounds, completed=record.done)
        clients_bar = progress.add_task("clients", total=len(run.participants(1)))
        for rnd in range(record.done + 1, cfg.rounds + 1):
            progress.reset(clients_bar)
            t0 = time.perf_counter()
            rows = run.run_round(rnd, on_client_done=lambda c: progress.advance(clients_bar))
            record.end_round(rnd, rows)
            console.print(_round_table(rnd, rows, time.perf_counter() - t0))
            _print_warnings(console, run, rnd, rows)
            progress.advance(bar)
    summary = record.finish(time.perf_counter() - start)
    console.print(_summary_table(summary))
    console.print(f"run directory: {run_dir}")
    return summary


TRUNCATION_WARNING = 0.5  # warn when more than this share of a client's completions hit max_new_tokens


def drop_samples_after(folder: Path, rnd: int) -> None:
    """Remove sample completions of rounds after ``rnd`` (written before a crash, trained again on resume)."""
    for path in folder.glob("*.jsonl"):
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["round"] <= rnd]
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        tmp.replace(path)


def _print_warnings(console: Console, run: InProcessRun, rnd: int, rows: list[dict]) -> None:
    """Clients left out of the round, verifiers that failed on every sample, and clients whose
    completions were mostly cut at max_new_tokens (their rewards then say little about the task)."""
    for r in rows:
        if r.get("truncated_fraction", 0.0) > TRUNCATION_WARNING:
            console.print(f"[yellow]warning[/yellow]: round {rnd}: client {r['client_id']}: "
                          f"{100 * r['truncated_fraction']:.0f}% of its completions were cut at max_new_tokens = "
                          f"{run.cfg.max_new_tokens} (a cut answer usually scores 0); raise --max-new-tokens")
        if r["kind"] == "warning":
            console.print(f"[yellow]warning[/yellow]: round {rnd}: {r['client_id']} left out: {r['reason']}")
        if r.get("reward_failures") == 1.0:
            reward = next(c.reward for c in [*run.clients, *run.participants(rnd)] if c.client_id == r["client_id"])
            console.print(f"[red]warning[/red]: client {r['client_id']}: its reward {reward.name!r} failed on "
                          f"every sample this round (all scored 0), last error: {reward.last_error}")


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=True)


def _round_table(rnd: int, rows: list[dict], seconds: float) -> Table:
    table = Table(title=f"round {rnd} ({seconds:.1f} s)", title_justify="left", box=None)
    for col in ("client", "task", "scale", "r_start", "r_end", "train acc", "gain", "weight"):
        table.add_column(col, justify="right" if col not in ("client", "task", "scale") else "left")
    for r in rows:
        if r["kind"] != "client":
            continue
        gain = "-" if r["gain"] is None else f"{r['gain']:+.2f}"
        weight = "-" if r["weight"] is None else f"{r['weight']:.2f}"
        table.add_row(r["client_id"], r["task"], r["reward_scale"], f"{r['reward_start']:.2f}",
                      f"{r['reward_end']:.2f}", f"{r['train_accuracy']:.2f}", gain, weight)
    evals = [r for r in rows if r["kind"] == "eval"]
    if evals:
        e = evals[0]
        table.caption = (f"global model: macro accuracy {e['macro_accuracy']:.3f} (content "
                         f"{e['content_macro_accuracy']:.3f}), worst task {e['worst_task_accuracy']:.3f}")
        table.caption_justify = "left"
    return table


def _summary_table(summary: dict) -> Table:
    table = Table(title="final held-out accuracy (greedy; content: format forgiven)", title_justify="left")
    for column in ("task", "round 0", "final", "final content"):
        table.add_column(column, justify="left" if column == "task" else "right")
    content = summary.get("per_task_content_accuracy", {})
    for task, acc in summary["per_task_accuracy"].items():
        table.add_row(task, f"{summary['initial_per_task_accuracy'][task]:.3f}", f"{acc:.3f}",
                      f"{content[task]:.3f}" if task in content else "-")
    final_content = summary.get("final_content_macro_accuracy")
    table.add_row("[bold]macro[/bold]", f"{summary['initial_macro_accuracy']:.3f}",
                  f"[bold]{summary['final_macro_accuracy']:.3f}[/bold]",
                  "-" if final_content is None else f"{final_content:.3f}")
    table.caption = f"{summary['wall_seconds']:.0f} s"
    return table


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
    console.print(_summary_table(summary))
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
    files = sorted(folder.glob("*.jsonl"))
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
    console.print(_eval_table(accuracy, passed, pass_k, cfg, style))
    return {"accuracy": accuracy.exact, "content": accuracy.content, f"pass@{pass_k}": passed}


def _eval_table(accuracy, passed: dict[str, float], pass_k: int, cfg: RunConfig, style: str) -> Table:
    table = Table(title=f"held-out accuracy of {cfg.model} (greedy; {style} prompts)", title_justify="left",
                  caption=f"at most {cfg.eval_size} held-out prompts per task; content: format forgiven"
                  + (f"; pass@{pass_k}: {pass_k} samples at temperature {cfg.temperature}" if pass_k else ""),
                  caption_justify="left")
    columns = ["task", "accuracy", "content"] + ([f"pass@{pass_k}"] if pass_k else [])
    for column in columns:
        table.add_column(column, justify="left" if column == "task" else "right")
    for task, acc in accuracy.exact.items():
        table.add_row(task, f"{acc:.3f}", f"{accuracy.content[task]:.3f}",
                      *([f"{passed[task]:.3f}"] if pass_k else []))
    row = accuracy.row()
    macro_pass = [f"{sum(passed.values()) / len(passed):.3f}"] if pass_k else []
    table.add_row("[bold]macro[/bold]", f"[bold]{row['macro_accuracy']:.3f}[/bold]",
                  f"{row['content_macro_accuracy']:.3f}", *macro_pass)
    table.add_row("worst task", f"{row['worst_task_accuracy']:.3f}", f"{row['content_worst_task_accuracy']:.3f}",
                  *([f"{min(passed.values()):.3f}"] if pass_k else []))
    return table
