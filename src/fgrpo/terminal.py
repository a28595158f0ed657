"""What ``fgrpo`` prints on the terminal: the progress bar, a round's table and warnings, the final per-task
table (``fgrpo.runner``), and the table of ``fgrpo eval`` (``fgrpo.commands``)."""

from __future__ import annotations

import warnings

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fgrpo.config import RunConfig

TRUNCATION_WARNING = 0.5  # warn when more than this share of a client's completions hit max_new_tokens


def quiet_libraries() -> None:
    """Keep the terminal for our own progress: no library progress bars or deprecation chatter."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*generation flags are not valid.*")


def print_warnings(console: Console, run, rnd: int, rows: list[dict]) -> None:
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


def progress_bar(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=True)


def round_table(rnd: int, rows: list[dict], seconds: float) -> Table:
    table = Table(title=f"round {rnd} ({seconds:.1f} s)", title_justify="left", box=None)
    for col in ("client", "task", "scale", "r_start", "r_end", "train acc", "gain", "weight"):
        table.add_column(col, justify="right" if col not in ("client", "task", "scale") else "left")
    for r in rows:
        if r["kind"] != "client":
            continue
        gain = "-" if r["gain"] is None else f"{r['gain']:+.2f}"
        weight = "-" if r["weight"] is None else f"{r['weight']:.2f}"
        train_accuracy = f"{r['train_accuracy']:.2f}" if "train_accuracy" in r else "-"  # not sent under DP
        table.add_row(r["client_id"], r["task"], r["reward_scale"], f"{r['reward_start']:.2f}",
                      f"{r['reward_end']:.2f}", train_accuracy, gain, weight)
    evals = [r for r in rows if r["kind"] == "eval"]
    if evals:
        e = evals[0]
        table.caption = (f"global model: macro accuracy {e['macro_accuracy']:.3f} (content "
                         f"{e['content_macro_accuracy']:.3f}), worst task {e['worst_task_accuracy']:.3f}")
        table.caption_justify = "left"
    return table


def summary_table(summary: dict) -> Table:
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


def eval_table(accuracy, passed: dict[str, float], pass_k: int, cfg: RunConfig, style: str) -> Table:
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
