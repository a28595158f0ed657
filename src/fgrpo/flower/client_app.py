"""The ClientApp: one data owner. It trains the received global adapter with the same local GRPO as
the in-process runtime (the round engine's ``Federation.train_client``) and replies with its delta and statistics.

Which data it holds comes from the SuperNode's ``node_config``: either the owner's own source and
verifier (``--node-config 'data="/path/owner.jsonl" reward="math"'``, with ``scenario = "user-data"``
in the run config; the client id is the file's name unless ``client-id`` names it), or
``partition-id``, which selects that client of the run's named scenario (Flower's simulation sets
it). With its own data, the client also evaluates the global model on its held-out rows, since
only it has them.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from fgrpo.flower import secure, wire

app = ClientApp()


def owner(context: Context):
    """(this process's Federation, this node's client) from the run config and the node config.
    ``client-id`` in the node config names the client for the server (its baseline is kept under
    that name, so it survives a SuperNode restart, when Flower's node id changes)."""
    cfg = wire.config_from_run_config(dict(context.run_config))
    node = dict(context.node_config)
    if "data" in node:
        cfg = replace(cfg, scenario="user-data", data=str(node["data"]), rewards=str(node.get("reward", cfg.rewards)))
        fed = wire.cached_federation(cfg)
        client = fed.clients[0]
    else:
        fed = wire.cached_federation(cfg)
        partition = int(node["partition-id"])
        if not 0 <= partition < len(fed.clients):
            raise ValueError(f"node_config partition-id = {partition}: this scenario has {len(fed.clients)} clients")
        client = fed.clients[partition]
    if "client-id" in node:
        client = replace(client, client_id=str(node["client-id"]))
    # sample completions stay on this node, where its operator says (none written without completions-dir)
    fed.completions_dir = Path(str(node["completions-dir"])) if "completions-dir" in node else None
    return fed, client


def secure_stage_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's secaggplus_mod for the messages of the SecAgg+ protocol; fgrpo's train message passes."""
    return secaggplus_mod(msg, context, call_next) if secure.is_secagg_stage(msg) else call_next(msg, context)


@app.train(mods=[secure_stage_mod])
def train(msg: Message, context: Context) -> Message:
    """Local GRPO from the received global adapter; replies with delta_k and the statistics, or, under
    secure aggregation, keeps delta_k and replies with the statistics (SecAgg+ later asks for w_k * delta_k)."""
    if "fitins.config" in msg.content.config_records:  # SecAgg+ collect stage (docs/privacy.md)
        return secure.masked_reply(msg, context)
    fed, client = owner(context)
    fed.global_adapter = wire.record_adapter(msg.content["global"])
    update = fed.train_client(client, int(msg.content["round"]["server-round"]))
    if bool(msg.content["round"].get("secure", False)):
        update.metrics["max_abs_delta"] = secure.keep_delta(context, update.delta)
        update = replace(update, delta={})
    return Message(content=wire.update_content(update), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Greedy accuracy of the global adapter on this owner's held-out rows: per task, the answers right as
    the verifier judges them, right with the format forgiven, and the total."""
    fed, client = owner(context)
    fed.global_adapter = wire.record_adapter(msg.content["global"])
    accuracy = fed.evaluate()
    counts = {}
    for name, acc in accuracy.exact.items():
        total = len(fed.test_sets[name])
        counts[f"correct/{name}"], counts[f"total/{name}"] = round(acc * total), total
        counts[f"content/{name}"] = round(accuracy.content[name] * total)
        counts[f"formatted/{name}"] = round(accuracy.formatted[name] * total)
    return Message(content=RecordDict({"accuracy": MetricRecord(counts)}), reply_to=msg)
