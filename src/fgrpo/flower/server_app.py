"""The ServerApp: the server side (``fgrpo.server.Server``: global adapter, every client's baseline,
screening, weights, the server step) inside a Flower Strategy, the same as the in-process runtime.

It writes the same run directory as ``fgrpo run`` (``RunRecorder``: metrics.jsonl, summary.json,
adapter/, plots/, checkpoints/). On a named scenario it holds a model host and evaluates the global
model on the held-out splits itself; when the SuperNodes bring their own data, they evaluate it on
their held-out rows and reply with counts. Under secure aggregation the round takes the same path,
and the weighted sum of the deltas comes from Flower's SecAgg+ (``fgrpo.flower.secure``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fgrpo.checks import check_flower_runtime
from fgrpo.config import RunConfig
from fgrpo.evaluation import Accuracy, eval_row
from fgrpo.flower import secure, wire
from fgrpo.flower.run_config import config_from_run_config
from fgrpo.host import ModelHost
from fgrpo.probes import probe_judge
from fgrpo.report import ClientReport, warning_row
from fgrpo.rundir import RunRecorder, run_dir_path
from fgrpo.scenarios import ClientSpec, client_tasks, load_clients
from fgrpo.server import RoundFailed, SecureSum, Server, sample_participants

app = ServerApp()
REPLY_POLL_SECONDS = 0.1


class PromptGrid(Grid):
    """Flower's Grid, with a round's replies pulled every ``REPLY_POLL_SECONDS``: flwr 1.42's deployment Grid
    (``HttpGrid.send_and_receive``) sleeps 3 s between pulls, so a deployed round waited up to 3 s after its
    last reply. Everything else is the wrapped Grid's."""

    def __init__(self, grid: Grid):
        self.grid = grid

    def __getattr__(self, name: str):
        return getattr(self.grid, name)

    def get_nodes(self):
        return self.grid.get_nodes()

    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        waiting, replies = set(self.push_messages(messages)), []
        end = None if timeout is None else time.time() + timeout
        while waiting and (end is None or time.time() < end):
            pulled = list(self.pull_messages(waiting))
            replies += pulled
            waiting -= {m.metadata.reply_to_message_id for m in pulled}
            if waiting:
                time.sleep(REPLY_POLL_SECONDS)
        return replies


class FGRPOStrategy(Strategy):
    """Flower Strategy whose aggregation is fgrpo's (any ``--strategy``); one run directory.
    ``clients``/``test_sets``: the named scenario's (empty when the SuperNodes bring their own data)."""

    def __init__(self, cfg: RunConfig, server: Server, host: ModelHost, record: RunRecorder,
                 clients: list[ClientSpec], test_sets: dict, grid: Grid, context: Context):
        self.cfg, self.server, self.host, self.record = cfg, server, host, record
        self.clients, self.test_sets, self.grid, self.context = clients, test_sets, grid, context
        self.remote = not test_sets  # data owners bring their own data and evaluate on it
        self.client_of_node: dict[int, str] = {}  # learned from the replies (local-only sends each its own adapter)

    def node_ids(self, grid: Grid, wait: bool = True) -> list[int]:
        """The connected SuperNodes; with ``wait`` (the start of the run), after waiting up to 10
        minutes for as many as the run expects. Later rounds go on with the nodes that remain."""
        expected = len(self.clients) or self.cfg.num_clients
        deadline = time.time() + (600 if wait else 0)
        node_ids = sorted(grid.get_node_ids())
        while len(node_ids) < expected and time.time() < deadline:
            time.sleep(0.5)
            node_ids = sorted(grid.get_node_ids())
        return node_ids

    def participants(self, server_round: int, grid: Grid) -> list[int]:
        """This round's SuperNodes: a sample of the connected ones (the population that privacy accounting's
        sampling rate is taken over), or the one that trains the pooled client (centralized)."""
        node_ids = self.node_ids(grid, wait=server_round == 1)
        self.server.population = len(node_ids)
        if self.server.mode.pooled:
            return node_ids[:1]
        return sample_participants(node_ids, self.cfg.fraction, self.cfg.seed, server_round)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        round_config = ConfigRecord({"server-round": server_round, "secure": self.cfg.secure_aggregation,
                                     "pooled": self.server.mode.pooled})
        messages = []
        for node in self.participants(server_round, grid):
            start = wire.adapter_record(self.server.start_adapter(self.client_of_node.get(node)))
            messages.append(Message(content=RecordDict({"global": start, "round": round_config}),
                                    message_type="train", dst_node_id=node))
        return messages

    def read_replies(self, server_round: int, replies: Iterable[Message]) -> tuple[list[ClientReport], list[dict]]:
        """(updates in the in-process client order, warning rows); remembers each client's node."""
        updates, failed = [], []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                owner = self.client_of_node.get(node, f"node-{node}")  # named once it has replied
                failed.append(warning_row(server_round, owner, f"failed: {reply.error.reason}"))
                continue
            try:
                updates.append(wire.content_report(reply.content))
            except (KeyError, TypeError, ValueError) as err:
                failed.append(warning_row(server_round, f"node-{node}", f"unreadable reply: {err}"))
                continue
            self.client_of_node[node] = updates[-1].stats.client_id
        order = {c.client_id: i for i, c in enumerate(self.clients)}  # the in-process order
        updates.sort(key=lambda u: (order.get(u.stats.client_id, len(order)), u.stats.client_id))
        return updates, failed

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None,
                                                                                      MetricRecord | None]:
        updates, failed = self.read_replies(server_round, replies)
        secure_sum = self.secure_sum(server_round) if self.cfg.secure_aggregation else None
        rows = self.server.finish_round(server_round, updates, failed, secure_sum)  # may raise RoundFailed
        if not self.remote and self.server.eval_due(server_round):
            rows.append(self.evaluate_here(server_round))
        for row in rows:
            if row["kind"] == "warning":
                log(WARNING, "round %s: %s left out: %s", server_round, row["client_id"], row["reason"])
        self.record.end_round(server_round, rows)
        summary = {"clients": float(len(updates))}
        for row in rows:
            if row["kind"] == "eval":
                summary["macro_accuracy"] = row["macro_accuracy"]
                log(INFO, "round %s: macro accuracy %.3f", server_round, row["macro_accuracy"])
        return wire.adapter_record(self.server.global_adapter), MetricRecord(summary)

    def secure_sum(self, server_round: int) -> SecureSum:
        """sum_k w_k delta_k of the accepted clients through SecAgg+ (the deltas stayed on their nodes)."""
        node_of = {client: node for node, client in self.client_of_node.items()}

        def weighted_sum(accepted: list[ClientReport], weights: list[float]):
            node_weights = {node_of[u.stats.client_id]: w for u, w in zip(accepted, weights)}
            total = secure.secure_weighted_sum(self.grid, self.context, server_round, node_weights,
                                               self.server.global_adapter, self.cfg.secagg_clip_range,
                                               self.cfg.client_timeout or 3600)
            if total is None:
                raise RoundFailed(f"round {server_round}: secure aggregation could not finish (too many clients "
                                  "dropped out); the last checkpoint is intact")
            return total

        return weighted_sum

    def evaluate_here(self, server_round: int) -> dict:
        """The evaluation row of the server's own held-out splits (named scenarios)."""
        return self.host.eval_row(server_round, self.server.state, self.test_sets,
                                  client_tasks(self.clients, self.test_sets))

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        """Named scenarios: none (the server evaluates). Own data: every SuperNode evaluates the global
        model on its held-out rows when an evaluation is due."""
        if not self.remote or not self.server.eval_due(server_round):
            return []
        content = RecordDict({"global": arrays})
        return [Message(content=content, message_type="evaluate", dst_node_id=n)
                for n in self.node_ids(grid, wait=server_round == 0)]

    def aggregate_evaluate(self, server_round, replies) -> MetricRecord | None:
        """The counts of every SuperNode's evaluation added up per task: one evaluation row."""
        t0, parts = time.perf_counter(), []
        for reply in replies:
            if reply.has_error():
                log(WARNING, "round %s: a client's evaluation failed: %s", server_round, reply.error.reason)
                continue
            parts.append(wire.record_accuracy(reply.content["accuracy"]))
        tasks = sorted({task for part in parts for task, n in part.total.items() if n})
        if not tasks:
            return None
        accuracy = Accuracy.total_of(parts, order=tasks)
        row = eval_row(server_round, accuracy, time.perf_counter() - t0)
        self.record.write([row])
        log(INFO, "round %s: macro accuracy %.3f (evaluated by the clients)", server_round, row["macro_accuracy"])
        return MetricRecord({"macro_accuracy": row["macro_accuracy"]})

    def summary(self) -> None:
        log(INFO, "fgrpo %s on %s, %s clients, %s rounds", self.cfg.strategy, self.cfg.scenario,
            len(self.clients), self.cfg.rounds)


@app.main()
def main(grid: Grid, context: Context) -> None:
    start = time.perf_counter()
    grid = PromptGrid(grid)
    cfg = config_from_run_config(dict(context.run_config))
    remote = cfg.scenario == "user-data" and not cfg.data.strip()  # each SuperNode brings its own data
    check_flower_runtime(cfg, owners_bring_data=remote)
    host = ModelHost(cfg)  # evaluation (named scenarios) and saving the adapter
    cfg = host.cfg
    clients, test_sets, _ = ([], {}, []) if remote else load_clients(cfg, host.prompt_style)
    judge = probe_judge(cfg, host, list(test_sets) or cfg.task_list)  # the server's own probes (server side only)
    server = Server.for_config(cfg, host.adapter(), [c.client_id for c in clients], judge)
    run_dir = run_dir_path(cfg)
    record = RunRecorder(run_dir, cfg, server, host)
    strategy = FGRPOStrategy(cfg, server, host, record, clients, test_sets, grid, context)
    arrays = wire.adapter_record(server.global_adapter)
    if remote:  # round 0 on the owners' held-out rows
        strategy.aggregate_evaluate(0, grid.send_and_receive(strategy.configure_evaluate(0, arrays, ConfigRecord(),
                                                                                         grid)))
        record.end_round(0, [])
    else:
        record.end_round(0, [strategy.evaluate_here(0)])
    # a round waits for its replies at most client_timeout seconds (an hour when unset)
    strategy.start(grid, arrays, num_rounds=cfg.rounds, timeout=cfg.client_timeout or 3600)
    record.finish(time.perf_counter() - start)
    log(INFO, "run directory: %s", run_dir)
