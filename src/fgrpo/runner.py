"""The in-process runtime: ``fgrpo run`` samples clients and loops over rounds of the client side
(``fgrpo.client``) and the server side (``fgrpo.server``) on one model host (``fgrpo.host``) in one
process, with progress on the terminal (``fgrpo.terminal``)."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from fgrpo.checkpoint import latest_checkpoint
from fgrpo.client import ClientTrainer
from fgrpo.config import ConfigError, RunConfig
from fgrpo.host import ModelHost
from fgrpo.probes import probe_judge
from fgrpo.report import warning_row
from fgrpo.rundir import RunRecorder, run_dir_path
from fgrpo.scenarios import ClientSpec, centralized_client, client_tasks, load_clients
from fgrpo.server import Server, sample_participants
from fgrpo.terminal import print_warnings, progress_bar, quiet_libraries, round_table, summary_table
from fgrpo.trust import trainer_of

__all__ = ["InProcessRun", "quiet_libraries", "run_experiment"]


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
        self.server = Server.for_config(self.cfg, self.host.adapter(), [c.client_id for c in self.clients], judge)
        self.pooled = centralized_client(self.clients, self.cfg) if self.server.mode.pooled else None
        self.samples_dir = samples_dir  # the owners' side: their sample completions and logs (None: nowhere)

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
                updates.append(trainer_of(client, self.trainer).train(client, rnd, start, self.samples_dir))
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
    with progress_bar(console) as progress:
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
            console.print(round_table(rnd, rows, time.perf_counter() - t0))
            print_warnings(console, run, rnd, rows)
            progress.advance(bar)
    summary = record.finish(time.perf_counter() - start)
    console.print(summary_table(summary))
    console.print(f"run directory: {run_dir}")
    return summary


def drop_samples_after(folder: Path, rnd: int) -> None:
    """Remove sample completions of rounds after ``rnd`` (written before a crash, trained again on resume)."""
    for path in folder.glob("*.jsonl"):
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["round"] <= rnd]
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        tmp.replace(path)


