"""Secure aggregation that keeps FGRPO's adaptive weights, on Flower's SecAgg+ (``secure_aggregation``).

A round has two phases:

    1. train    server -> clients: the global adapter. Each client trains, keeps delta_k at home (in its
                Flower context state) and replies with its statistics only (n_k, r_start, r_end, std).
    2. SecAgg+  the server computes the weights w_k from the statistics (any strategy) and runs
                Flower's ``SecAggPlusWorkflow``. Each client's fit reply carries delta_k with
                num_examples = round(w_k * WEIGHT_SCALE); Flower's ``secaggplus_mod`` masks
                [w_k, w_k * delta_k], so the server unmasks only sum_k w_k delta_k / sum_k w_k, which
                is sum_k w_k delta_k since the weights sum to 1.

The server never sees a single client's delta; it sees the statistics (docs/privacy.md: with
``dp_stats_noise`` they are noised at the client) and the weighted sum.

Quantization: SecAgg+ clips every value to [-c, c] (c = ``secagg_clip_range``) and rounds it
stochastically to a grid of Q = 2^22 levels (step 2c / Q); the weight w_k goes through the same
levels. The unmasked sum of K clients differs from the exact one by less than K * 2c / Q per value
(tests/test_flower.py).
Values beyond c are clipped: a client reports its largest |delta| as ``max_abs_delta``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common.recorddict_compat import fitres_to_recorddict
from flwr.server import ServerConfig
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from fgrpo.aggregation import Adapter
from fgrpo.flower import wire

WEIGHT_SCALE = 1_000_000  # num_examples = round(w_k * WEIGHT_SCALE); SecAgg+'s max_weight
PENDING = "fgrpo-pending-delta"  # where a client keeps delta_k between the two phases
QUANTIZATION_RANGE = 2**22  # Flower's default


# --- client side ----------------------------------------------------------------------------------
def masked_reply(msg: Message, context: Context) -> Message:
    """The fit reply SecAgg+ masks: this client's kept delta_k, num_examples encoding w_k."""
    weight = float(msg.content.config_records["fitins.config"]["weight"])
    delta = context.state.array_records[PENDING].to_torch_state_dict()
    arrays = [delta[name].float().numpy() for name in sorted(delta)]
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), round(weight * WEIGHT_SCALE), {})
    del context.state.array_records[PENDING]
    return Message(content=fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


def kept_at_home(context: Context, content: RecordDict) -> RecordDict:
    """A train reply's content under secure aggregation: delta_k stays in this node's context state for phase 2;
    the reply carries the statistics and max |delta| (SecAgg+ clips beyond secagg_clip_range)."""
    update = wire.content_report(content)
    update.metrics["max_abs_delta"] = keep_delta(context, update.delta)
    return wire.report_content(replace(update, delta={}))


def keep_delta(context: Context, delta: Adapter) -> float:
    """Store delta_k for phase 2; returns max |delta| (SecAgg+ clips beyond secagg_clip_range)."""
    context.state.array_records[PENDING] = ArrayRecord({k: v.float().contiguous() for k, v in delta.items()})
    return max(float(v.abs().max()) for v in delta.values())


# --- server side ----------------------------------------------------------------------------------
class WeightedFit(Strategy):
    """The legacy Strategy that SecAggPlusWorkflow drives: each fit instruction carries its client's
    w_k; ``aggregate_fit`` receives the unmasked weighted mean."""

    def __init__(self, grid: Grid, run_id: int, weights: dict[int, float]):
        self.grid, self.run_id, self.weights = grid, run_id, weights
        self.result: list[np.ndarray] | None = None

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        empty = Parameters(tensors=[], tensor_type="")  # the clients already hold their deltas
        return [(GridClientProxy(node, self.grid, self.run_id),
                 FitIns(empty, {"weight": w, "server-round": server_round})) for node, w in self.weights.items()]

    def aggregate_fit(self, server_round, results, failures):
        if results and not failures:
            self.result = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def secure_weighted_sum(grid: Grid, context: Context, server_round: int, weights: dict[int, float],
                        reference: Adapter, clip_range: float, timeout: float) -> Adapter | None:
    """sum_k w_k delta_k over the nodes in ``weights`` through SecAgg+, as tensors shaped like
    ``reference``; None when the protocol did not finish or a client failed in it (the weights of the
    round's rows would then not be the ones applied)."""
    strategy = WeightedFit(grid, context.run_id, weights)
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=server_round), strategy=strategy)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: server_round})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow = SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=0.5, max_weight=WEIGHT_SCALE,
                                  clipping_range=clip_range, quantization_range=QUANTIZATION_RANGE,
                                  timeout=timeout)
    workflow(grid, legacy)
    if strategy.result is None:
        return None
    names = sorted(reference)
    return {name: torch.from_numpy(np.asarray(a, dtype=np.float32)).reshape(reference[name].shape)
            for name, a in zip(names, strategy.result)}
