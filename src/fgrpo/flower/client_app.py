"""The ClientApp: one data owner's node. It answers the server's train and evaluate messages with the owner's
side (``fgrpo.flower.node``: local GRPO from the received adapter, the same as in process), either in its own
process, or, when the node config names ``owner-socket``, through the owner's resident process
(``fgrpo.flower.resident``), which keeps the model loaded across rounds. Then this process only adapts: it
passes the message on and returns the answer, and imports no torch.

No resident answering at the socket: this process loads the node side itself, with a warning. A resident
that refuses the message (another run, model, node config or config), dies or times out mid-round: the
round's update fails with that error (the server leaves the owner out for the round).
"""

from __future__ import annotations

import time
from logging import INFO, WARNING

from flwr.app import Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common.logger import log
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from fgrpo.flower import resident

app = ClientApp()


def secure_stage_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's secaggplus_mod for the messages of the SecAgg+ protocol; fgrpo's train message passes."""
    secagg = RECORD_KEY_CONFIGS in msg.content.config_records
    return secaggplus_mod(msg, context, call_next) if secagg else call_next(msg, context)


def answer(kind: str, msg: Message, context: Context, received: float) -> RecordDict:
    """The owner's reply content to a train or evaluate message: from its resident process, or built here."""
    run_config, node_config = dict(context.run_config), dict(context.node_config)
    path = node_config.get(resident.SOCKET_KEY)
    if path:
        timeout = float(run_config.get("client-timeout", 0.0)) or None  # the round's timeout (unset: none)
        try:
            header = resident.request(kind, context.run_id, run_config, node_config, received)
            reply = resident.ask(str(path), header, msg.content, timeout)
            log(INFO, "the owner process answered the %s message (received at %.3f) in %.2f s", kind, received,
                time.time() - received)
            return reply
        except resident.Unreachable as err:
            log(WARNING, "%s; this ClientApp loads the owner's model and data itself", err)
    from fgrpo.flower import node  # torch, the model and the owner's data: only without a resident process

    if kind == "train":
        return node.train_reply(msg.content, run_config, node_config, received)
    return node.evaluate_reply(msg.content, run_config, node_config)


@app.train(mods=[secure_stage_mod])
def train(msg: Message, context: Context) -> Message:
    """Local GRPO from the received adapter; replies with delta_k and the statistics, or, under secure
    aggregation, keeps delta_k and replies with the statistics (SecAgg+ later asks for w_k * delta_k)."""
    received = time.time()
    if "fitins.config" in msg.content.config_records:  # SecAgg+ collect stage (docs/privacy.md)
        from fgrpo.flower import secure

        return secure.masked_reply(msg, context)
    content = answer("train", msg, context, received)
    if bool(msg.content["round"].get("secure", False)):
        from fgrpo.flower import secure

        content = secure.kept_at_home(context, content)
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Greedy accuracy of the global adapter on this owner's held-out rows (counts per task)."""
    return Message(content=answer("evaluate", msg, context, time.time()), reply_to=msg)
