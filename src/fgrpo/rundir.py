"""The run directory: resolved config, metrics.jsonl, summary.json, plots (DESIGN section 9)."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

from fgrpo.config import ConfigError, RunConfig, to_toml


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
