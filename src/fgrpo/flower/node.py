"""One data owner's side of a Flower message: the node side (model host, client trainer, the owner's data and
verifiers), built once per process from the run config and the node config, and the replies to the server's
train and evaluate messages. The ClientApp calls it in its own process, or the owner's resident process
(``fgrpo.flower.resident``) does, which keeps the node side loaded across rounds.

Which data the node holds comes from its ``node_config``: either the owner's own source and verifier
(``data="/path/owner.jsonl" reward="math"``, with ``scenario = "user-data"`` in the run config; the client
id is the file's name unless ``client-id`` names it), or ``partition-id``, which selects that client of the
run's named scenario (Flower's simulation sets it). With its own data, the owner also evaluates the global
model on its held-out rows, since only it has them, and replies with counts.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

from flwr.app import RecordDict

from fgrpo.client import ClientTrainer
from fgrpo.config import RunConfig
from fgrpo.flower import wire
from fgrpo.flower.run_config import node_run_config
from fgrpo.host import ModelHost
from fgrpo.scenarios import ClientSpec, centralized_client, load_clients
from fgrpo.trust import trainer_of


@dataclass
class NodeSide:
    """What a process keeps between messages: the model host, the client trainer and the clients' data of one
    config."""

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


def owner(run_config: dict, node_config: dict, pooled: bool = False) -> tuple[NodeSide, ClientSpec]:
    """(this process's node side, this node's client) from the run config and the node config.
    ``client-id`` in the node config names the client for the server (its baseline is kept under
    that name, so it survives a SuperNode restart, when Flower's node id changes). ``pooled``: the
    centralized reference's one client, which holds every client's prompts of the named scenario."""
    cfg = node_run_config(run_config, node_config)
    side = _node_side(tuple(sorted(cfg.to_dict().items())))
    if pooled:
        return side, centralized_client(side.clients, side.host.cfg)
    if "data" in node_config:
        client = side.clients[0]
    else:
        partition = int(node_config["partition-id"])
        if not 0 <= partition < len(side.clients):
            raise ValueError(f"node_config partition-id = {partition}: this scenario has {len(side.clients)} clients")
        client = side.clients[partition]
    if "client-id" in node_config:
        client = replace(client, client_id=str(node_config["client-id"]))
    return side, client


def train_reply(content: RecordDict, run_config: dict, node_config: dict, received: float) -> RecordDict:
    """Local GRPO from the received adapter: the reply's content (``wire.report_content``: delta_k and the
    statistics). ``received``: when the ClientApp got the message (time.time()); the seconds from then to the
    start of the owner's round are reported as ``ready_seconds``."""
    config = content["round"]
    side, client = owner(run_config, node_config, pooled=bool(config.get("pooled", False)))
    # sample completions and the owner's log stay on this node, where its operator says (none without completions-dir)
    samples_dir = Path(str(node_config["completions-dir"])) if "completions-dir" in node_config else None
    trainer = trainer_of(client, side.trainer)  # the lying-owner scenario's liar: a test double of this side
    start = wire.record_adapter(content["global"])
    ready = time.time() - received
    update = trainer.train(client, int(config["server-round"]), start, samples_dir)
    update.metrics.update({**side.setup, "ready_seconds": ready})  # setup: once per process
    side.setup = {k: 0.0 for k in side.setup}
    return wire.report_content(update)


def evaluate_reply(content: RecordDict, run_config: dict, node_config: dict) -> RecordDict:
    """Greedy accuracy of the global adapter on this owner's held-out rows: per task, the counts of answers
    right as the verifier judges them, right with the format forgiven, in the documented form, and the total."""
    side, _ = owner(run_config, node_config)
    accuracy = side.host.evaluate(wire.record_adapter(content["global"]), side.test_sets)
    return RecordDict({"accuracy": wire.accuracy_record(accuracy)})


def load_count() -> int:
    """How many times this process has loaded a base model (the resident process reports it)."""
    return ModelHost.loads
