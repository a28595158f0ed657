"""A failing client is left out of its round with a warning row; the round goes on while at least
min_clients updates remain; a rejected client's baseline is not updated."""

import pytest
import torch

from fgrpo.config_sources import build_config
from fgrpo.runner import InProcessRun
from fgrpo.server import RoundFailed
from tiny import MOVING, TINY

OPTIONS = {TINY[i][2:].replace("-", "_"): TINY[i + 1] for i in range(0, len(TINY), 2)}


def federation(tmp_path, **extra) -> InProcessRun:
    return InProcessRun(build_config(overrides={**OPTIONS, "num_clients": 3, **MOVING, **extra}))


def corrupt(fed: InProcessRun, client_id: str, change) -> None:
    """Make one client's training misbehave as ``change`` says."""
    train = fed.trainer.train

    def patched(client, rnd, start, samples_dir=None):
        update = train(client, rnd, start, samples_dir)
        return change(update) if client.client_id == client_id else update

    fed.trainer.train = patched


def raise_error(update):
    raise RuntimeError("GPU fell off")


def nan_delta(update):
    name = next(iter(update.delta))
    update.delta[name] = torch.full_like(update.delta[name], float("nan"))
    return update


def wrong_shape(update):
    name = next(iter(update.delta))
    update.delta[name] = torch.zeros(7, 3)
    return update


def wrong_dtype(update):
    update.delta = {k: v.double() for k, v in update.delta.items()}
    return update


def missing_tensor(update):
    update.delta.pop(next(iter(update.delta)))
    return update


def huge_norm(update):
    update.delta = {k: torch.ones_like(v) * 100.0 for k, v in update.delta.items()}
    return update


def slow(update):
    update.seconds = 1e6
    return update


@pytest.mark.parametrize("change, reason", [
    (raise_error, "raised RuntimeError: GPU fell off"), (nan_delta, "non-finite"), (wrong_shape, "(7, 3)"),
    (wrong_dtype, "torch.float64"), (missing_tensor, "missing"), (huge_norm, "median"),
    (slow, "client_timeout"),
])
def test_bad_client_is_left_out_and_the_round_goes_on(tmp_path, change, reason):
    fed = federation(tmp_path, client_timeout=3600.0)
    corrupt(fed, "client-1", change)
    before = {k: v.clone() for k, v in fed.global_adapter.items()}
    rows = fed.run_round(1)
    (warning,) = [r for r in rows if r["kind"] == "warning"]
    assert warning["client_id"] == "client-1" and reason in warning["reason"]
    clients = [r for r in rows if r["kind"] == "client"]
    assert [r["client_id"] for r in clients] == ["client-0", "client-2"]
    assert sum(r["weight"] for r in clients) == pytest.approx(1.0)
    assert "client-1" not in fed.client_baselines  # no baseline from a rejected update
    assert all(torch.isfinite(v).all() for v in fed.global_adapter.values())
    assert any(not torch.equal(before[k], v) for k, v in fed.global_adapter.items())
    assert any(r["kind"] == "eval" for r in rows)


def test_too_few_clients_stops_the_run_with_a_clear_message(tmp_path):
    fed = federation(tmp_path, min_clients=3)
    corrupt(fed, "client-2", raise_error)
    before = {k: v.clone() for k, v in fed.global_adapter.items()}
    with pytest.raises(RoundFailed, match=r"round 1: 2 accepted client update\(s\), fewer than min_clients = 3 "
                                          r"\(client-2: raised RuntimeError"):
        fed.run_round(1)
    assert all(torch.equal(before[k], v) for k, v in fed.global_adapter.items())  # nothing applied
