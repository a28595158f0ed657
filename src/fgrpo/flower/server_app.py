"""The ServerApp: holds the global adapter and every client's baseline, and aggregates with the round
engine's ``Federation.finish_round`` (the same as the in-process runtime), inside a Flower Strategy.

It writes the same run directory as ``fgrpo run`` (``RunRecorder``: metrics.jsonl, summary.json,
adapter/, plots/, checkpoints/) and evaluates the global model on the held-out splits after every round.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fgrpo.evaluation import Accuracy
from fgrpo.federation import Federation, RoundFailed, sample_participants, warning_row
from fgrpo.flower import secure, wire
from fgrpo.rundir import RunRecorder, run_dir_path

app = ServerApp()


class FGRPOStrategy(Strategy):
    """Flower Strategy whose aggregation is fgrpo's (any ``--strategy``); one run directory."""

    def __init__(self, fed: Federation, record: RunRecorder):
        self.fed, self.record = fed, record
        self.cfg = fed.cfg
        self.remote = not fed.test_sets  # data owners bring their own data and evaluate on it

    def node_ids(self, grid: Grid, wait: bool = True) -> list[int]:
        """The connected SuperNodes; with ``wait`` (the start of the run), after waiting up to 10
        minutes for as many as the run expects. Later rounds go on with the nodes that remain."""
        expected = len(self.fed.clients) or self.cfg.num_clients
        deadline = time.time() + (600 if wait else 0)
        node_ids = sorted(grid.get_node_ids())
        while len(node_ids) < expected and time.time() < deadline:
            time.sleep(0.5)
            node_ids = sorted(grid.get_node_ids())
        return node_ids

    def participants(self, server_round: int, grid: Grid) -> list[int]:
        """This round's sampled SuperNodes; the connected ones are the population that privacy
        accounting's sampling rate is taken over."""
        node_ids = self.node_ids(grid, wait=server_round == 1)
        self.fed.population = len(node_ids)
        return sample_participants(node_ids, self.cfg.fraction, self.cfg.seed, server_round)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        chosen = self.participants(server_round, grid)
        round_config = {"server-round": server_round, "secure": self.cfg.secure_aggregation}
        content = RecordDict({"global": arrays, "round": ConfigRecord(round_config)})
        return [Message(content=content, message_type="train", dst_node_id=node) for node in chosen]

    def read_replies(self, server_round: int, replies: Iterable[Message]) -> tuple[list, list[dict], dict[str, int]]:
        """(updates in the in-process client order, warning rows, node id of each client id)."""
        updates, failed, nodes = [], [], {}
        for reply in replies:
            node = f"node-{reply.metadata.src_node_id}"
            if reply.has_error():
                failed.append(warning_row(server_round, node, f"failed: {reply.error.reason}"))
                continue
            try:
                updates.append(wire.content_update(reply.content))
                nodes[updates[-1].stats.client_id] = reply.metadata.src_node_id
            except (KeyError, TypeError, ValueError) as err:
                failed.append(warning_row(server_round, node, f"unreadable reply: {err}"))
        order = {c.client_id: i for i, c in enumerate(self.fed.clients)}  # the in-process order
        updates.sort(key=lambda u: (order.get(u.stats.client_id, len(order)), u.stats.client_id))
        return updates, failed, nodes

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None,
                                                                                      MetricRecord | None]:
        updates, failed, _ = self.read_replies(server_round, replies)
        rows = self.fed.finish_round(server_round, updates, failed)  # screens the updates; may raise RoundFailed
        return self.record_round(server_round, rows, len(updates))

    def secure_round(self, server_round: int, grid: Grid, context: Context) -> None:
        """One round under secure aggregation (fgrpo.flower.secure): statistics first, then SecAgg+."""
        arrays = wire.adapter_record(self.fed.global_adapter)
        timeout = self.cfg.client_timeout or 3600
        replies = grid.send_and_receive(list(self.configure_train(server_round, arrays, ConfigRecord(), grid)),
                                        timeout=timeout)
        updates, failed, nodes = self.read_replies(server_round, replies)

        def weighted_sum(accepted, weights):
            total = secure.secure_weighted_sum(
                grid, context, server_round, {nodes[u.stats.client_id]: w for u, w in zip(accepted, weights)},
                self.fed.global_adapter, self.cfg.secagg_clip_range, timeout)
            if total is None:
                raise RoundFailed(f"round {server_round}: secure aggregation could not finish (too many clients "
                                  "dropped out); the last checkpoint is intact")
            return total

        rows = self.fed.finish_round(server_round, updates, failed, secure_sum=weighted_sum)
        self.record_round(server_round, rows, len(updates))
        evaluate = list(self.configure_evaluate(server_round, wire.adapter_record(self.fed.global_adapter),
                                                ConfigRecord(), grid))
        if evaluate:
            self.aggregate_evaluate(server_round, grid.send_and_receive(evaluate, timeout=timeout))

    def record_round(self, server_round: int, rows: list[dict], clients: int) -> tuple[ArrayRecord, MetricRecord]:
        """Log warnings, write the rows and the checkpoint; Flower's view of the round."""
        for row in rows:
            if row["kind"] == "warning":
                log(WARNING, "round %s: %s left out: %s", server_round, row["client_id"], row["reason"])
        self.record.end_round(server_round, rows)
        evals = [r for r in rows if r["kind"] == "eval"]
        summary = {"clients": float(clients)}
        if evals:
            summary["macro_accuracy"] = evals[0]["macro_accuracy"]
            log(INFO, "round %s: macro accuracy %.3f", server_round, evals[0]["macro_accuracy"])
        return wire.adapter_record(self.fed.global_adapter), MetricRecord(summary)

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        """Named scenarios: none (the server evaluates the global model itself, as in-process). Own
        data: every SuperNode evaluates the global model on its held-out rows when an evaluation is due."""
        if not self.remote or not self.fed.eval_due(server_round):
            return []
        content = RecordDict({"global": arrays})
        return [Message(content=content, message_type="evaluate", dst_node_id=n)
                for n in self.node_ids(grid, wait=server_round == 0)]

    def aggregate_evaluate(self, server_round, replies) -> MetricRecord | None:
        replies = list(replies)
        if not replies:
            return None
        counts: dict[str, dict[str, int]] = {"correct": {}, "content": {}, "formatted": {}, "total": {}}
        for reply in replies:
            if reply.has_error():
                log(WARNING, "round %s: a client's evaluation failed: %s", server_round, reply.error.reason)
                continue
            for key, value in reply.content["accuracy"].items():
                kind, name = key.split("/", 1)
                counts[kind][name] = counts[kind].get(name, 0) + int(value)
        totals = {name: n for name, n in sorted(counts["total"].items()) if n}
        if not totals:
            return None
        accuracy = Accuracy(*({name: counts[kind].get(name, 0) / n for name, n in totals.items()}
                              for kind in ("correct", "content", "formatted")))
        row = self.fed.eval_row(server_round, accuracy)
        self.record.write([row])
        log(INFO, "round %s: macro accuracy %.3f (evaluated by the clients)", server_round, row["macro_accuracy"])
        return MetricRecord({"macro_accuracy": row["macro_accuracy"]})

    def summary(self) -> None:
        log(INFO, "fgrpo %s on %s, %s clients, %s rounds", self.cfg.strategy, self.cfg.scenario,
            len(self.fed.clients), self.cfg.rounds)


@app.main()
def main(grid: Grid, context: Context) -> None:
    start = time.perf_counter()
    cfg = wire.config_from_run_config(dict(context.run_config))
    run_dir = run_dir_path(cfg)
    fed = Federation(cfg, remote_clients=cfg.scenario == "user-data" and not cfg.data.strip())
    record = RunRecorder(run_dir, fed)
    strategy = FGRPOStrategy(fed, record)
    arrays = wire.adapter_record(fed.global_adapter)
    if strategy.remote:  # round 0 on the owners' held-out rows
        replies = grid.send_and_receive(strategy.configure_evaluate(0, arrays, ConfigRecord(), grid))
        strategy.aggregate_evaluate(0, replies)
        record.end_round(0, [])
    else:
        record.end_round(0, [fed.eval_row(0)])
    if cfg.secure_aggregation:
        for server_round in range(1, cfg.rounds + 1):
            strategy.secure_round(server_round, grid, context)
    else:  # a round waits for its replies at most client_timeout seconds (an hour when unset)
        strategy.start(grid, arrays, num_rounds=cfg.rounds, timeout=cfg.client_timeout or 3600)
    record.finish(time.perf_counter() - start)
    log(INFO, "run directory: %s", run_dir)
