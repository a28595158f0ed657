"""The ClientApp: one data owner. It trains the received global adapter with the same local GRPO as
the in-process runtime (``Federation.train_client``) and replies with its delta and statistics.

Which data it holds comes from the SuperNode's ``node_config``: ``partition-id`` selects client
``partition-id`` of the run's named scenario (Flower's simulation sets it; a deployment passes
``--node-config "partition-id=0"``).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fgrpo.flower import task

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = task.config_from_run_config(dict(context.run_config))
    fed = task.cached_federation(cfg)
    partition = int(context.node_config["partition-id"])
    if not 0 <= partition < len(fed.clients):
        raise ValueError(f"node_config partition-id = {partition}: this scenario has {len(fed.clients)} clients")
    client = fed.clients[partition]
    fed.global_adapter = task.record_adapter(msg.content["global"])
    update = fed.train_client(client, int(msg.content["round"]["server-round"]))
    return Message(content=task.update_content(update), reply_to=msg)
