"""The ClientApp: one data owner, the client side only (``fgrpo.client.ClientTrainer`` on a model host):
it trains the received adapter with the same local GRPO as the in-process runtime and replies with
its delta and statistics.

Which data it holds comes from the SuperNode's ``node_config``: either the owner's own source and
verifier (``--node-config 'data="/path/owner.jsonl" reward="math"'``, with ``scenario = "user-data"``
in the run config; the client id is the file's name unless ``client-id`` names it), or
``partition-id``, which selects that client of the run's named scenario (Flower's simulation sets
it). With its own data, the client also evaluates the global model on its held-out rows, since
only it has them, and replies with counts.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from fgrpo.client import ClientTrainer
from fgrpo.config import RunConfig
from fgrpo.flower import secure, wire
from fgrpo.host import ModelHost
from fgrpo.scenarios import ClientSpec, centralized_client, load_clients
from fgrpo.trust import trainer_of

app = ClientApp()


@dataclass
class NodeSide:
    """What a ClientApp process keeps between messages (Flower may start one per message): the model
    host, the client trainer and the clients' data of one config."""

    host: ModelHost
    trainer: ClientTrainer
    clients: list[ClientSpec]
    test_sets: dict
    setup: dict[str, float]  # how long this process took to get here, reported with its first update


def process_age() -> float:
    """Seconds since this process started (Linux: /proc/self/stat; 0 elsewhere)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


@cache
def _node_side(cfg_items: tuple) -> NodeSide:
    start = time.perf_counter()
    host = ModelHost(RunConfig(**dict(cfg_items)))
    clients, test_sets, _ = load_clients(host.cfg, host.prompt_style)
    # Flower's deployment runtime starts a ClientApp process per message: then every round pays for this
    setup = {"clientapp_setup_seconds": process_age(), "model_load_seconds": time.perf_counter() - start}
    return NodeSide(host, ClientTrainer(host.cfg, host), clients, test_sets, setup)


def owner(context: Context, pooled: bool = False) -> tuple[NodeSide, ClientSpec]:
    """(this process's node side, this node's client) from the run config and the node config.
    ``client-id`` in the node config names the client for the server (its baseline is kept under
    that name, so it survives a SuperNode restart, when Flower's node id changes). ``pooled``: the
    centralized reference's one client, which holds every client's prompts of the named scenario."""
    cfg = wire.config_from_run_config(dict(context.run_config))
    node = dict(context.node_config)
    if "data" in node:
        cfg = replace(cfg, scenario="user-data", data=str(node["data"]), rewards=str(node.get("reward", cfg.rewards)))
    side = _node_side(tuple(sorted(cfg.to_dict().items())))
    if pooled:
        return side, centralized_client(side.clients, side.host.cfg)
    if "data" in node:
        client = side.clients[0]
    else:
        partition = int(node["partition-id"])
        if not 0 <= partition < len(side.clients):
            raise ValueError(f"node_config partition-id = {partition}: this scenario has {len(side.clients)} clients")
        client = side.clients[partition]
    if "client-id" in node:
        client = replace(client, client_id=str(node["client-id"]))
    return side, client


def secure_stage_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's secaggplus_mod for the messages of the SecAgg+ protocol; fgrpo's train message passes."""
    return secaggplus_mod(msg, context, call_next) if secure.is_secagg_stage(msg) else call_next(msg, context)


@app.train(mods=[secure_stage_mod])
def train(msg: Message, context: Context) -> Message:
    """Local GRPO from the received adapter; replies with delta_k and the statistics, or, under secure
    aggregation, keeps delta_k and replies with the statistics (SecAgg+ later asks for w_k * delta_k)."""
    if "fitins.config" in msg.content.config_records:  # SecAgg+ collect stage (docs/privacy.md)
        return secure.masked_reply(msg, context)
    config = msg.content["round"]
    side, client = owner(context, pooled=bool(config.get("pooled", False)))
    node = dict(context.node_config)
    # sample completions and the owner's log stay on this node, where its operator says (none without completions-dir)
    samples_dir = Path(str(node["completions-dir"])) if "completions-dir" in node else None
    trainer = trainer_of(client, side.trainer)  # the lying-owner scenario's liar: a test double of this side
    update = trainer.train(client, int(config["server-round"]), wire.record_adapter(msg.content["global"]),
                           samples_dir)
    update.metrics.update(side.setup)  # the seconds this process spent starting and loading, once per process
    side.setup = {k: 0.0 for k in side.setup}
    if bool(config.get("secure", False)):
        update.metrics["max_abs_delta"] = secure.keep_delta(context, update.delta)
        update = replace(update, delta={})
    return Message(content=wire.report_content(update), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Greedy accuracy of the global adapter on this owner's held-out rows: per task, the counts of answers
    right as the verifier judges them, right with the format forgiven, in the documented form, and the total."""
    side, _ = owner(context)
    accuracy = side.host.evaluate(wire.record_adapter(msg.content["global"]), side.test_sets)
    return Message(content=RecordDict({"accuracy": wire.accuracy_record(accuracy)}), reply_to=msg)
