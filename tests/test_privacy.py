"""Differential privacy: clipping, noise where Flower puts it, privatized statistics, and epsilon
from Opacus' RDP accountant."""

import csv
import json
import math
import statistics

import pytest
import torch
from opacus.accountants import RDPAccountant

from fgrpo import privacy
from fgrpo.aggregation import ClientStats, update_norm
from fgrpo.cli import main
from fgrpo.config import ConfigError
from fgrpo.config_sources import build_config
from fgrpo.runner import InProcessRun
from tiny import TINY

OPTIONS = {TINY[i][2:].replace("-", "_"): TINY[i + 1] for i in range(0, len(TINY), 2)}


def test_clip_update_bounds_the_norm_and_keeps_small_updates():
    big = {"a": torch.full((10, 10), 1.0), "b": torch.full((5,), 2.0)}
    clipped, was = privacy.clip_update(big, 0.5)
    assert was and abs(update_norm(clipped) - 0.5) < 1e-6
    assert torch.allclose(clipped["a"] / clipped["a"].norm(), big["a"] / big["a"].norm())  # direction kept
    small = {"a": torch.full((2,), 0.1)}
    same, was = privacy.clip_update(small, 1.0)
    assert not was and torch.equal(same["a"], small["a"])


def test_gaussian_noise_has_the_requested_std_and_is_reproducible():
    zero = {"a": torch.zeros(200, 500)}
    noisy = privacy.add_gaussian_noise(zero, 0.3, seed=7)
    assert abs(noisy["a"].std().item() - 0.3) < 0.01 and abs(noisy["a"].mean().item()) < 0.01
    assert torch.equal(noisy["a"], privacy.add_gaussian_noise(zero, 0.3, seed=7)["a"])
    assert not torch.equal(noisy["a"], privacy.add_gaussian_noise(zero, 0.3, seed=8)["a"])


def test_central_noise_is_sigma_c_times_the_weight_bound():
    assert privacy.central_noise_std(2.0, 0.5, 0.25) == pytest.approx(0.25)  # Flower's sigma C / m
    assert privacy.central_noise_std(2.0, 0.5, 0.4) == pytest.approx(0.4)


@pytest.mark.parametrize("strategy, ratio, expected", [
    ("fgrpo", 1.6, 0.4),  # adaptive: the bound in force, whatever the round's weights are
    ("fgrpo", 1.04, 0.26),
    ("fgrpo", 0.0, 1.0),  # no bound: one client could get all the weight
    ("fedavg", 1.6, 0.25),  # weights set by the config alone: the largest of them
])
def test_central_noise_is_calibrated_to_the_bound_in_force(strategy, ratio, expected):
    from fgrpo.server import Server

    cfg = build_config(overrides={"strategy": strategy, "max_weight_ratio": ratio, "dp": "client", "dp_noise": 2.0,
                                  "dp_clip": 0.5})
    server = Server(cfg, {"a": torch.zeros(3)}, ["c0", "c1", "c2", "c3"])
    _, metrics = server.noise(1, {"a": torch.zeros(3)}, [0.3, 0.3, 0.3, 0.1] if strategy == "fgrpo" else [0.25] * 4)
    assert metrics["dp_noise_std"] == pytest.approx(2.0 * 0.5 * expected)


def test_the_absolute_weight_bound_is_gone_with_a_pointer_to_the_ratio():
    assert build_config(overrides={"max_weight": 1.0}) == build_config()  # an old config.toml's no-op value loads
    with pytest.raises(ConfigError, match="'max_weight' was replaced by max_weight_ratio"):
        build_config(overrides={"max_weight": 0.4})


def test_statistics_are_clipped_to_the_reward_range_then_noised():
    stats = ClientStats("c", 8, -30.0, 25.0, 4.0, 10.0, 5.0)  # r_start below -range, r_end above the range
    draws = [privacy.privatize_stats(stats, 0.5, seed) for seed in range(4000)]
    starts = torch.tensor([d.reward_start for d in draws])
    ends = torch.tensor([d.reward_end for d in draws])
    expected_std = 0.5 * 2 * math.sqrt(3) * 10.0  # two clipped 3-vectors are <= 2 sqrt(3) range apart
    assert abs(starts.mean().item() + 10.0) < 1.0 and abs(ends.mean().item() - 10.0) < 1.0  # clipped first
    assert abs(starts.std().item() - expected_std) < 0.05 * expected_std
    assert all(d.reward_std >= 0 and d.num_prompts == 8 and d.reward_range == 10.0 for d in draws)
    signed = [privacy.privatize_stats(ClientStats("s", 8, -0.6, 0.2, 0.5, 2.0, 0.7), 0.01, seed) for seed in range(200)]
    assert abs(statistics.fmean(d.reward_start for d in signed) + 0.6) < 0.02  # a -1/+1 verifier's mean survives
    # only the spread the server uses is sent (noised); the other field carries the same value
    pooled = [privacy.privatize_stats(ClientStats("p", 8, 0.1, 0.2, 0.1, 2.0, 1.5), 0.01, seed, gain_spread="pooled")
              for seed in range(200)]
    assert abs(statistics.fmean(d.reward_pooled_std for d in pooled) - 1.5) < 0.02
    assert all(d.reward_std == d.reward_pooled_std for d in pooled)


def accountant_epsilon(rounds, sigma, rate, delta, stats_sigma=0.0):
    accountant = RDPAccountant()
    for _ in range(rounds):
        accountant.step(noise_multiplier=sigma, sample_rate=rate)
        if stats_sigma:
            accountant.step(noise_multiplier=stats_sigma, sample_rate=rate)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("dp, stats_noise", [("server", 0.0), ("client", 2.0), ("local", 0.0)])
def test_dp_run_reports_the_accountants_epsilon_every_round(tmp_path, dp, stats_noise):
    cfg = build_config(overrides={**OPTIONS, "num_clients": 4, "fraction": 0.5, "rounds": 3, "dp": dp,
                                  "dp_noise": 0.9, "dp_clip": 0.05, "dp_stats_noise": stats_noise,
                                  "cache_dir": str(tmp_path)})
    fed = InProcessRun(cfg)
    sent = []
    train = fed.trainer.train

    def record(client, rnd, start, owner_dir=None):
        sent.append(train(client, rnd, start, owner_dir))
        return sent[-1]

    fed.trainer.train = record
    rate = 1.0 if dp == "local" else 0.5
    for rnd in (1, 2, 3):
        before = {k: v.clone() for k, v in fed.global_adapter.items()}
        rows = fed.run_round(rnd)
        server = next(r for r in rows if r["kind"] == "server")
        expected = accountant_epsilon(rnd, 0.9, rate, cfg.dp_delta, stats_noise)
        assert server["epsilon"] == pytest.approx(expected, rel=1e-9)
        round_updates = sent[-2:]
        if dp == "client":  # clipped before leaving the client
            assert all(update_norm(u.delta) <= 0.05 + 1e-6 for u in round_updates)
        if dp == "local":  # clipped and noised on the client: its norm is dominated by the noise
            dim = sum(v.numel() for v in before.values())
            assert all(update_norm(u.delta) > 0.5 * 0.9 * 0.05 * math.sqrt(dim) for u in round_updates)
            assert "dp_noise_std" not in server
        else:
            assert server["dp_noise_std"] == pytest.approx(0.9 * 0.05 * 0.8)  # fgrpo: the bound 1.6 / 2 clients
            applied = torch.cat([(fed.global_adapter[k] - before[k]).flatten() for k in before])
            # the clipped signal has norm <= 0.05; the rest is noise of the stated std
            assert abs(applied.std().item() - server["dp_noise_std"]) < 0.1 * server["dp_noise_std"]
    assert sent and len(sent) == 6


def test_dp_options_are_checked():
    with pytest.raises(ConfigError, match="dp_stats_noise"):
        build_config(overrides={"dp_stats_noise": 1.0})
    with pytest.raises(ConfigError, match="local-only"):
        build_config(overrides={"dp": "server", "strategy": "local-only"})
    with pytest.raises(ConfigError, match="dp_clip"):
        build_config(overrides={"dp": "server", "dp_clip": 0})
    with pytest.raises(ConfigError, match="dp = 'server' clips each update at the server"):
        build_config(overrides={"dp": "server", "secure_aggregation": True})


def test_secure_aggregation_is_refused_in_process(tmp_path, capsys):
    assert main(["run", *TINY, "--secure-aggregation", "true", "--out", str(tmp_path / "run")]) != 0
    assert "needs the Flower runtime" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_compare_reports_epsilon_per_strategy(tmp_path):
    out = tmp_path / "results"
    assert main(["compare", "--strategies", "fedavg,fedavg[dp=client,dp_noise=2.0]", "--scenarios", "task-skew",
                 "--seeds", "0", *TINY, "--rounds", "2", "--cache-dir", str(tmp_path / "c"), "--out", str(out)]) == 0
    rows = {r["strategy"]: r for r in csv.DictReader(open(out / "table.csv"))}
    assert float(rows["fedavg"]["epsilon"]) == math.inf
    private = float(rows["fedavg[dp=client,dp_noise=2.0]"]["epsilon"])
    assert private == pytest.approx(accountant_epsilon(2, 2.0, 1.0, 1e-5), rel=1e-9)
    table = (out / "table.md").read_text()
    assert "epsilon |" in table and "no DP" in table and f"{private:,.1f}" in table


def test_weight_bound_caps_every_logged_weight_and_calibrates_the_noise(tmp_path):
    out = tmp_path / "run"
    assert main(["run", *TINY, "--rounds", "2", "--num-clients", "4", "--dp", "client", "--dp-noise", "0.5",
                 "--max-weight-ratio", "1.04", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for rnd in (1, 2):
        weights = [r["weight"] for r in rows if r["kind"] == "client" and r["round"] == rnd]
        assert len(weights) == 4 and math.isclose(sum(weights), 1.0, abs_tol=1e-9) and max(weights) <= 0.26 + 1e-9
        server = next(r for r in rows if r["kind"] == "server" and r["round"] == rnd)
        assert server["dp_noise_std"] == pytest.approx(0.5 * 1.0 * 0.26)  # the bound, not the round's weights


REWARD_STATISTICS = ("reward_start", "reward_end", "reward_std", "reward_pooled_std")


def received_and_exact(tmp_path, stats_noise: float) -> tuple[list, list[dict]]:
    """One in-process round of 2 moving clients: (the reports the server received, the owners' exact logs)."""
    from tiny import MOVING

    cfg = build_config(overrides={**OPTIONS, **MOVING, "num_clients": 2, "rounds": 1, "dp": "client",
                                  "dp_noise": 0.01, "dp_stats_noise": stats_noise, "format_reward": 0.5})
    fed = InProcessRun(cfg, samples_dir=tmp_path / "owners")
    received = []
    finish = fed.server.finish_round
    fed.server.finish_round = lambda rnd, reports, *rest: received.extend(reports) or finish(rnd, reports, *rest)
    fed.run_round(1)
    logs = [json.loads(p.read_text().splitlines()[0]) for p in sorted((tmp_path / "owners").glob("*.log.jsonl"))]
    return received, logs


def test_under_dp_no_number_the_server_receives_is_an_exact_reward_statistic(tmp_path):
    """dp_stats_noise > 0: the statistics arrive noised, and nothing computed from rewards (train accuracy, loss,
    groups without signal, reward components) arrives at all; the owner's own log keeps every exact number."""
    from fgrpo.report import REWARDS, SENT_METRICS

    received, logs = received_and_exact(tmp_path, stats_noise=0.5)
    assert len(received) == len(logs) == 2
    for report, log in zip(received, logs):
        assert report.stats.client_id == log["client_id"]
        sent = [getattr(report.stats, k) for k in REWARD_STATISTICS] + list(report.metrics.values())
        exact = [log[k] for k in (*REWARD_STATISTICS, "train_accuracy", "frac_zero_std", "loss", "grad_norm")]
        exact += [v for k, v in log.items() if k.startswith("reward/")]
        assert {"reward/verifier", "reward/format", "train_accuracy"} <= set(log)  # the owner sees them all
        assert not any(SENT_METRICS.get(k) == REWARDS or k.startswith("reward") for k in report.metrics)
        own = {log[k] for k in report.metrics if SENT_METRICS.get(k) != REWARDS}  # sent values not from rewards
        assert not [v for v in sent if v in exact and v not in own | {0.0, 1.0}], (sent, exact)
        assert all(getattr(report.stats, k) != log[k] for k in ("reward_start", "reward_end"))


def test_without_dp_on_the_statistics_the_exact_numbers_arrive(tmp_path):
    received, logs = received_and_exact(tmp_path, stats_noise=0.0)
    for report, log in zip(received, logs):
        assert all(getattr(report.stats, k) == log[k] for k in REWARD_STATISTICS)
        assert report.metrics["train_accuracy"] == log["train_accuracy"] and report.metrics["loss"] == log["loss"]
        assert not any(k.startswith("reward/") for k in report.metrics)  # components stay with the owner anyway


def test_a_paired_gain_is_clipped_and_noised_with_the_statistics():
    from dataclasses import replace

    stats = replace(ClientStats("c", 8, 0.2, 0.4, 0.3, 10.0, 0.3), paired_gain=0.05, paired_se=0.02,
                    validation_size=100)
    draws = [privacy.privatize_stats(stats, 0.1, seed, bound=10.0) for seed in range(2000)]
    gains = torch.tensor([d.paired_gain for d in draws])
    expected_std = 0.1 * 2 * math.sqrt(5) * 1.0  # the clipped 5-vector's diameter, d and se in units of the range
    assert abs(gains.mean().item() - 0.05) < 0.04 and abs(gains.std().item() - expected_std) < 0.05 * expected_std
    assert all(d.paired_se >= 0 and d.validation_size == 100 for d in draws)
    starts = torch.tensor([d.reward_start for d in draws])
    assert abs(starts.std().item() - 0.1 * 2 * math.sqrt(5) * 10.0) < 0.05 * 0.1 * 2 * math.sqrt(5) * 10.0
    plain = privacy.privatize_stats(replace(stats, validation_size=0, paired_gain=0.0, paired_se=0.0), 0.1, 0)
    assert plain.paired_gain == 0.0 and plain.validation_size == 0  # no paired gain: the 3-vector as before
