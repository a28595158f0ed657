"""What the ServerApp and ClientApp exchange: the wire format of the messages (the run config:
``fgrpo.flower.run_config``).

Wire format (no pickle anywhere: tensors travel as Flower arrays):
    server -> client   train: arrays "global" (the adapter to start from: the global one, or under
                       local-only the client's own), config "round" {"server-round", "secure", "pooled"}
                       evaluate: arrays "global"
    client -> server   train: a ``report.ClientReport``: arrays "delta" (delta_k), metrics "stats"
                       (``report.STAT_KEYS``: n_k, r_start, r_end, the spreads, the range; train_seconds, and the
                       sent training metrics as "train/<name>", only names of ``report.SENT_METRICS``), config
                       "client" (client_id, task, reward_scale, delta_dtype)
                       evaluate: metrics "accuracy", counts per task ("right/<task>", "right_content/<task>",
                       "in_form/<task>", "total/<task>"), added up across clients exactly
bfloat16 deltas (delta_dtype = "bfloat16") travel as their int16 bit patterns (Flower arrays are
numpy arrays, and numpy has no bfloat16) and are viewed back on the server.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fgrpo.aggregation import Adapter, ClientStats
from fgrpo.evaluation import Accuracy
from fgrpo.report import SENT_METRICS, STAT_KEYS, STAT_TYPES, ClientReport


def adapter_record(adapter: Adapter) -> ArrayRecord:
    """Tensors as Flower arrays; bfloat16 as its int16 bit pattern (same bytes)."""
    return ArrayRecord({k: (v.view(torch.int16) if v.dtype == torch.bfloat16 else v).detach().cpu().contiguous()
                        for k, v in adapter.items()})


def record_adapter(record: ArrayRecord, dtype: str = "") -> Adapter:
    """Back to tensors; ``dtype = "bfloat16"`` views int16 arrays as the bfloat16 they carry."""
    tensors = dict(record.to_torch_state_dict())
    if dtype == "bfloat16":
        tensors = {k: v.view(torch.bfloat16) if v.dtype == torch.int16 else v for k, v in tensors.items()}
    return tensors


def report_content(update: ClientReport) -> RecordDict:
    """A client's report as the reply's content (exactly its fields: nothing else leaves the client)."""
    s = update.stats
    metrics = {**{k: getattr(s, k) for k in STAT_KEYS}, "train_seconds": update.seconds,
               **{f"train/{k}": v for k, v in update.metrics.items()}}
    dtype = str(next(iter(update.delta.values())).dtype).removeprefix("torch.") if update.delta else ""
    client = {"client_id": s.client_id, "task": update.task, "reward_scale": update.reward_scale,
              "delta_dtype": dtype}
    return RecordDict({"delta": adapter_record(update.delta), "stats": MetricRecord(metrics),
                       "client": ConfigRecord(client)})


def content_report(content: RecordDict) -> ClientReport:
    """A client's reply back into a ClientReport (the server screens it like any other: names, shapes, dtypes and
    finiteness against the global adapter, in ``Server.screen``); a metric not in SENT_METRICS is dropped."""
    m, c = content["stats"], content["client"]
    delta = record_adapter(content["delta"], str(c.get("delta_dtype", "")))
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
