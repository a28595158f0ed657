"""What the ServerApp and ClientApp exchange: the wire format of the messages (the run config:
``fgrpo.flower.run_config``).

Wire format (no pickle anywhere: tensors travel as Flower arrays):
    server -> client   train: arrays "global" (the adapter to start from: the global one, or under
                       local-only the client's own), config "round" {"server-round", "secure", "pooled"}
                       evaluate: arrays "global"
    client -> server   train: a ``report.ClientReport``: arrays "delta" (delta_k), metrics "stats"
                       (``report.STAT_KEYS``: n_k, r_start, r_end, the spreads, the range; train_seconds, and the
                       sent training metrics as "train/<name>", only names of ``report.SENT_METRICS``), config
                       "client" (client_id, task, reward_scale)
                       evaluate: metrics "accuracy", counts per task ("right/<task>", "right_content/<task>",
                       "in_form/<task>", "total/<task>"), added up across clients exactly
An adapter (the global one, a delta) travels as one packed array of its tensors' bytes and their layout
(``adapter_record``), in the tensors' own dtype (bfloat16 deltas too: numpy has no bfloat16, bytes do).
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fgrpo.aggregation import Adapter, ClientStats
from fgrpo.evaluation import Accuracy
from fgrpo.report import SENT_METRICS, STAT_KEYS, STAT_TYPES, ClientReport


def adapter_record(adapter: Adapter) -> ArrayRecord:
    """An adapter as two Flower arrays: "packed", every tensor's bytes one after the other (uint8), and "layout",
    the JSON list of [key, dtype, shape] that reads them back. One array, not one per tensor: Flower moves
    each array of a message as its own object, hop by hop (SuperLink, SuperNode, ClientApp), and SmolLM2's
    adapter has 420 tensors."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in adapter.items()}
    layout = [[k, str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in tensors.items()]
    packed = (torch.cat([v.reshape(-1).view(torch.uint8) for v in tensors.values()]) if tensors
              else torch.empty(0, dtype=torch.uint8))
    return ArrayRecord({"layout": Array(np.frombuffer(json.dumps(layout).encode(), dtype=np.uint8)),
                        "packed": Array(packed.numpy())})


def record_adapter(record: ArrayRecord) -> Adapter:
    """The tensors of an ``adapter_record`` back (ValueError where the layout and the bytes disagree)."""
    layout = json.loads(record["layout"].numpy().tobytes())
    packed = torch.from_numpy(record["packed"].numpy().copy())
    adapter, offset = {}, 0
    for key, dtype, shape in layout:
        dt = getattr(torch, str(dtype), None)
        if not isinstance(dt, torch.dtype):
            raise ValueError(f"adapter tensor {key!r}: unknown dtype {dtype!r}")
        size = math.prod(shape) * dt.itemsize
        if offset + size > len(packed):
            raise ValueError(f"adapter tensor {key!r}: the packed bytes end at {len(packed)}, it needs {offset + size}")
        adapter[str(key)] = packed[offset:offset + size].clone().view(dt).reshape(shape)
        offset += size
    if offset != len(packed):
        raise ValueError(f"the packed adapter has {len(packed) - offset} bytes no tensor of its layout reads")
    return adapter


def report_content(update: ClientReport) -> RecordDict:
    """A client's report as the reply's content (exactly its fields: nothing else leaves the client)."""
    s = update.stats
    metrics = {**{k: getattr(s, k) for k in STAT_KEYS}, "train_seconds": update.seconds,
               **{f"train/{k}": v for k, v in update.metrics.items()}}
    client = {"client_id": s.client_id, "task": update.task, "reward_scale": update.reward_scale}
    return RecordDict({"delta": adapter_record(update.delta), "stats": MetricRecord(metrics),
                       "client": ConfigRecord(client)})


def content_report(content: RecordDict) -> ClientReport:
    """A client's reply back into a ClientReport (the server screens it like any other: names, shapes, dtypes and
    finiteness against the global adapter, in ``Server.screen``); a metric not in SENT_METRICS is dropped."""
    m, c = content["stats"], content["client"]
    delta = record_adapter(content["delta"])
    stats = ClientStats(str(c["client_id"]), **{k: STAT_TYPES[k](m[k]) for k in STAT_KEYS})
    train = {k[len("train/"):]: float(v) for k, v in m.items()
             if k.startswith("train/") and k[len("train/"):] in SENT_METRICS}
    return ClientReport(stats, delta, train, float(m["train_seconds"]), str(c["task"]), str(c["reward_scale"]))


ACCURACY_COUNTS = ("right", "right_content", "in_form", "total")  # Accuracy's count fields, per task


def accuracy_record(accuracy: Accuracy) -> MetricRecord:
    """An evaluation's counts as ``<count>/<task>`` integers (they add up across clients exactly)."""
    return MetricRecord({f"{part}/{task}": int(n) for part in ACCURACY_COUNTS
                         for task, n in getattr(accuracy, part).items()})


def record_accuracy(record: MetricRecord) -> Accuracy:
    counts: dict[str, dict[str, int]] = {part: {} for part in ACCURACY_COUNTS}
    for key, value in record.items():
        part, task = key.split("/", 1)
        counts[part][task] = int(value)
    return Accuracy(**counts)
