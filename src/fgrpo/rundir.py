"""The run directory: resolved config, metrics.jsonl, summary.json, plots, checkpoints (README,
"What `fgrpo run` does"); ``RunRecorder`` fills it the same way under every runtime."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from fgrpo.checkpoint import load_checkpoint, save_checkpoint
from fgrpo.config import ConfigError, RunConfig
from fgrpo.config_sources import to_toml

if TYPE_CHECKING:
    from fgrpo.host import ModelHost
    from fgrpo.server import Server


def run_dir_path(cfg: RunConfig) -> Path:
    """``cfg.out`` or runs/<date-time>-<scenario>-<strategy>."""
    if cfg.out:
        return Path(cfg.out)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.scenario}-{cfg.strategy}"


def make_run_dir(path: Path, cfg: RunConfig) -> Path:
    """Create the run directory and write the resolved config.toml into it."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.toml").write_text(to_toml(cfg))
    return path


class MetricsLog:
    """Append-only metrics.jsonl: one JSON object per line, flushed and fsynced per write."""

    def __init__(self, path: Path, keep_lines: int | None = None):
        """A new log, or (``keep_lines`` given) an existing one cut back to its first
        ``keep_lines`` lines: the rows of the rounds a checkpoint covers, nothing torn or repeated."""
        self.path = path
        self.rows: list[dict] = []
        if keep_lines is not None:
            lines = path.read_text().splitlines()[:keep_lines] if path.exists() else []
            if len(lines) < keep_lines:
                raise ConfigError(f"{path} has {len(lines)} lines but its checkpoint covers {keep_lines}; "
                                  "the run directory was changed by hand and cannot be resumed")
            self.rows = [json.loads(line) for line in lines]
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in lines))
            os.replace(tmp, path)

    def write(self, rows: list[dict]) -> None:
        with self.path.open("a") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.rows.extend(rows)


class RunRecorder:
    """A run's start, per-round record and end, the same for every runtime: the resolved config,
    metrics.jsonl, a checkpoint after every ``checkpoint_every`` rounds, and at the end the adapter,
    the plot and summary.json. From a ``checkpoint`` the server state and the metrics it covers are
    restored (``done`` is its round)."""

    def __init__(self, run_dir: Path, cfg: RunConfig, server: Server, host: ModelHost,
                 checkpoint: Path | None = None):
        self.run_dir, self.cfg, self.server, self.host = run_dir, cfg, server, host
        make_run_dir(run_dir, self.cfg)
        self.board = tensorboard_writer(run_dir / "tensorboard") if self.cfg.tensorboard else None
        if checkpoint is None:
            self.done, self.metrics = 0, MetricsLog(run_dir / "metrics.jsonl")
        else:
            tensors, state = load_checkpoint(checkpoint)
            server.load_state(tensors, state)
            self.done = state["round"]
            self.metrics = MetricsLog(run_dir / "metrics.jsonl", keep_lines=state["metrics_lines"])

    def write(self, rows: list[dict]) -> None:
        self.metrics.write(rows)
        if self.board is not None:  # numbers only; warnings have none
            for row in rows:
                prefix = f"client/{row['client_id']}" if row["kind"] == "client" else row["kind"]
                for key, value in row.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "round":
                        self.board.add_scalar(f"{prefix}/{key}", value, row["round"])
            self.board.flush()

    def end_round(self, rnd: int, rows: list[dict]) -> None:
        """Write round ``rnd``'s rows (round 0: the evaluation before training), then its checkpoint when due."""
        self.write(rows)
        if rnd % self.cfg.checkpoint_every == 0 or rnd == self.cfg.rounds:
            tensors, state = self.server.state.tensors_and_json()
            save_checkpoint(self.run_dir, rnd, tensors, state, len(self.metrics.rows), self.cfg.checkpoint_keep)

    def finish(self, wall_seconds: float) -> dict:
        """The final adapter, plots/accuracy.png and summary.json; returns the summary."""
        adapter_path = self.run_dir / "adapter"
        self.host.save_state(self.server.state, adapter_path)
        plot_accuracy(self.metrics.rows, self.run_dir / "plots" / "accuracy.png")
        summary = build_summary(self.cfg, self.metrics.rows, wall_seconds, adapter_path)
        write_json_atomic(self.run_dir / "summary.json", summary)
        if self.board is not None:
            self.board.close()
        return summary


def tensorboard_writer(path: Path):
    """torch's SummaryWriter on ``path``; a clear error when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("tensorboard = true needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(log_dir=str(path))


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def build_summary(cfg: RunConfig, rows: list[dict], wall_seconds: float, adapter_path: Path) -> dict:
    evals = [r for r in rows if r["kind"] == "eval"]
    first, last = evals[0], evals[-1]
    per_task = {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("accuracy/")}
    initial = {k.split("/", 1)[1]: v for k, v in first.items() if k.startswith("accuracy/")}
    content = {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("content_accuracy/")}
    spent = [r["epsilon"] for r in rows if r["kind"] == "server" and "epsilon" in r]
    privacy = {"dp": cfg.dp, "epsilon": spent[-1], "dp_delta": cfg.dp_delta} if spent else {}
    return {
        "strategy": cfg.strategy, "scenario": cfg.scenario, "seed": cfg.seed, "rounds": cfg.rounds,
        "model": cfg.model,
        "initial_macro_accuracy": first["macro_accuracy"],
        "final_macro_accuracy": last["macro_accuracy"],
        "final_worst_task_accuracy": last["worst_task_accuracy"],
        "initial_per_task_accuracy": initial,
        "per_task_accuracy": per_task,
        # the same answers forgiven their format (tasks.content_answer); absent in rows of older runs
        "initial_content_macro_accuracy": first.get("content_macro_accuracy"),
        "final_content_macro_accuracy": last.get("content_macro_accuracy"),
        "per_task_content_accuracy": content,
        "wall_seconds": wall_seconds,
        "adapter_path": str(adapter_path),
        **privacy,
    }


def plot_accuracy(rows: list[dict], path: Path) -> None:
    """Accuracy per task and macro mean vs round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [r for r in rows if r["kind"] == "eval"]
    rounds = [r["round"] for r in evals]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key in sorted(k for k in evals[0] if k.startswith("accuracy/")):
        ax.plot(rounds, [r[key] for r in evals], marker=".", alpha=0.8, label=key.split("/", 1)[1])
    ax.plot(rounds, [r["macro_accuracy"] for r in evals], color="black", linewidth=2.5, label="macro")
    ax.set_xlabel("round")
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
