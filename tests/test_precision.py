"""delta_dtype: clients send half-precision updates (half the bytes); the server aggregates in float32."""

from contextlib import nullcontext

import pytest
import torch

from fgrpo.aggregation import ClientStats
from fgrpo.config_sources import build_config
from fgrpo.flower import wire
from fgrpo.model import autocast_context
from fgrpo.report import ClientReport
from fgrpo.runner import InProcessRun
from tiny import MOVING, TINY

OPTIONS = {TINY[i][2:].replace("-", "_"): TINY[i + 1] for i in range(0, len(TINY), 2)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_delta_crosses_the_wire_exactly_in_half_the_bytes(dtype):
    gen = torch.Generator().manual_seed(0)
    delta = {"a": torch.randn(256, 256, generator=gen), "b": torch.randn(256, generator=gen)}
    full = ClientReport(ClientStats("c", 4, 0.1, 0.5, 0.2, 1.0, 0.3), delta, {}, 1.0, "t", "x1")
    half = ClientReport(full.stats, {k: v.to(dtype) for k, v in delta.items()}, {}, 1.0, "t", "x1")
    full_bytes = wire.report_content(full)["delta"].count_bytes()
    half_bytes = wire.report_content(half)["delta"].count_bytes()
    assert half_bytes < 0.51 * full_bytes  # plus a few bytes of names and shapes
    back = wire.content_report(wire.report_content(half))
    assert all(back.delta[k].dtype == dtype and torch.equal(back.delta[k], half.delta[k]) for k in delta)


def test_half_precision_run_stays_close_to_float32(tmp_path):
    """Same seed, one round: the global adapter moves by the float32 update up to float16 rounding."""
    adapters = {}
    for dtype in ("float32", "float16"):
        fed = InProcessRun(build_config(overrides={**OPTIONS, "num_clients": 2, **MOVING,
                                                 "delta_dtype": dtype, "lr": 0.05}))
        start = {k: v.clone() for k, v in fed.global_adapter.items()}
        sent = []
        train = fed.trainer.train

        def record(client, rnd, start, samples_dir=None, train=train, sent=sent):
            sent.append(train(client, rnd, start, samples_dir))
            return sent[-1]

        fed.trainer.train = record
        fed.run_round(1)
        assert all(v.dtype == getattr(torch, dtype) for u in sent for v in u.delta.values())
        assert all(v.dtype == torch.float32 for v in fed.global_adapter.values())
        adapters[dtype] = {k: fed.global_adapter[k] - start[k] for k in start}
    moved = torch.cat([v.flatten() for v in adapters["float32"].values()])
    error = torch.cat([(adapters["float16"][k] - adapters["float32"][k]).flatten() for k in adapters["float32"]])
    assert moved.norm() > 0 and error.norm() > 0  # the rounding is real ...
    assert error.norm() < 2e-3 * moved.norm()  # ... and at float16's relative precision


def test_mixed_precision_resolves_by_device_and_bf16_runs():
    """'auto' is float32 on the CPU (so CPU runs stay bitwise reproducible) and bfloat16 autocast on a
    CUDA device; 'bf16' forces autocast, whose matmuls then really run in bfloat16."""
    cpu = torch.device("cpu")
    assert autocast_context(cpu, "auto") is nullcontext and autocast_context(cpu, "no") is nullcontext
    with autocast_context(cpu, "bf16")():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_bf16_autocast_round_trains_the_adapter(tmp_path):
    rounds = {}
    for precision in ("no", "bf16"):
        fed = InProcessRun(build_config(overrides={**OPTIONS, "num_clients": 3, **MOVING,
                                                          "mixed_precision": precision}))
        start = {k: v.clone() for k, v in fed.global_adapter.items()}
        fed.run_round(1)
        rounds[precision] = torch.cat([(fed.global_adapter[k] - start[k]).flatten() for k in start])
    assert torch.isfinite(rounds["bf16"]).all() and rounds["bf16"].norm() > 0
    assert not torch.equal(rounds["bf16"], rounds["no"])  # it really ran in another precision
