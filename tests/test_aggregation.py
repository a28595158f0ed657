"""Property tests of the aggregation weights (docs/algorithm.md, section 3), on hand-made statistics."""

import math

import pytest
import torch

from fgrpo import aggregation
from fgrpo.aggregation import (
    ClientBaseline,
    ClientStats,
    fedavg,
    fgrpo,
    gain_no_baseline,
    gain_weights,
    relative_gain,
    reward_weighted,
)
from fgrpo.config import RunConfig
from fgrpo.strategies import STRATEGIES as REGISTRY

STRATEGIES = {name: s.weigh for name, s in REGISTRY.items() if s.weigh is not None}


def fgrpo_settings(**overrides) -> aggregation.FGRPOSettings:
    return aggregation.FGRPOSettings.from_config(RunConfig(**overrides))


STATS = [
    ClientStats("a", 40, 0.2, 0.5, 0.3, 1.0, 0.45),
    ClientStats("b", 80, 3.0, 2.0, 2.5, 10.0, 4.0),
    ClientStats("c", 40, 0.6, 0.7, 0.2, 1.0, 0.3),
    ClientStats("d", 160, -0.8, -0.2, 0.6, 2.0, 0.9),
]
HISTORY = {
    "a": ClientBaseline(0.3, 0.25, 1.0, 3),
    "b": ClientBaseline(2.5, 3.0, 10.0, 3),
    "c": ClientBaseline(0.65, 0.1, 1.0, 3),
    "d": ClientBaseline(-0.5, 0.5, 2.0, 3),
}


def transformed(stats, history, client, scale=1.0, shift=0.0):
    """Client ``client``'s rewards multiplied by ``scale`` then shifted by ``shift``."""
    def s(x):
        return x.client_id == client

    stats = [ClientStats(x.client_id, x.num_prompts, x.reward_start * scale + shift,
                         x.reward_end * scale + shift, x.reward_std * scale, x.reward_range * scale,
                         x.reward_pooled_std * scale)
             if s(x) else x for x in stats]
    history = {k: (ClientBaseline(v.baseline * scale + shift, v.spread * scale, v.reward_range * scale,
                                  v.rounds) if k == client else v) for k, v in history.items()}
    return stats, history


@pytest.mark.parametrize("form", ["z", "ratio"])
@pytest.mark.parametrize("history", [{}, HISTORY], ids=["first-round", "with-history"])
def test_weights_sum_to_one_and_are_floored(form, history):
    settings = fgrpo_settings(gain_form=form, tau=0.5, uniform_mix=0.2, size_exponent=1.0)
    w = fgrpo(STATS, history, settings).weights
    assert math.isclose(sum(w), 1.0, abs_tol=1e-12)
    assert all(x >= 0.2 / len(STATS) - 1e-12 for x in w)


@pytest.mark.parametrize("form, spread", [("z", "group"), ("ratio", "group"), ("z", "pooled")])
@pytest.mark.parametrize("scale", [1e-3, 0.5, 7.0, 1e4])
@pytest.mark.parametrize("client", ["a", "b", "d"])
def test_weights_invariant_to_reward_scale(form, spread, scale, client):
    settings = fgrpo_settings(gain_form=form, gain_spread=spread, tau=0.7, size_exponent=0.5)
    for history in ({}, HISTORY):
        before = fgrpo(STATS, history, settings).weights
        after = fgrpo(*transformed(STATS, history, client, scale=scale), settings).weights
        assert after == pytest.approx(before, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("spread", ["group", "pooled"])
@pytest.mark.parametrize("shift", [-5.0, 0.3, 100.0])
def test_z_weights_invariant_to_reward_shift(shift, spread):
    settings = fgrpo_settings(gain_form="z", gain_spread=spread)
    for history in ({}, HISTORY):
        before = fgrpo(STATS, history, settings).weights
        after = fgrpo(*transformed(STATS, history, "b", shift=shift), settings).weights
        assert after == pytest.approx(before, rel=1e-9)


def test_ratio_weights_do_change_with_a_shift():
    """The ratio form is not shift invariant (documented); the test shows it can fail."""
    settings = fgrpo_settings(gain_form="ratio")
    before = fgrpo(STATS, HISTORY, settings).weights
    after = fgrpo(*transformed(STATS, HISTORY, "b", shift=50.0), settings).weights
    assert after != pytest.approx(before, rel=1e-3)


@pytest.mark.parametrize("strategy", [reward_weighted, gain_no_baseline])
def test_strawmen_are_scale_sensitive(strategy):
    """The invariance test would catch a scale-sensitive rule: these two are."""
    settings = fgrpo_settings()
    before = strategy(STATS, {}, settings).weights
    after = strategy(*transformed(STATS, {}, "b", scale=10.0), settings).weights
    assert after != pytest.approx(before, rel=1e-3)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_gives_a_distribution(name):
    for history in ({}, HISTORY):
        w = STRATEGIES[name](STATS, history, fgrpo_settings()).weights
        assert len(w) == len(STATS) and math.isclose(sum(w), 1.0, abs_tol=1e-12) and min(w) >= 0


def test_reward_weighted_by_hand():
    # r_end = 0.5, 2.0, 0.7, -0.2 -> clipped at 0 -> 0.5, 2.0, 0.7, 0
    w = reward_weighted(STATS, {}, fgrpo_settings()).weights
    assert w == pytest.approx([0.5 / 3.2, 2.0 / 3.2, 0.7 / 3.2, 0.0])
    zero = [ClientStats(s.client_id, s.num_prompts, 0, -1.0, 0, 1, 0) for s in STATS]
    assert reward_weighted(zero, {}, fgrpo_settings()).weights == pytest.approx([0.25] * 4)


def test_gain_no_baseline_by_hand():
    out = gain_no_baseline(STATS, {}, fgrpo_settings(tau=0.5))
    gains = [s.reward_end - s.reward_start for s in STATS]
    expected = torch.softmax(torch.tensor(gains, dtype=torch.float64) / 0.5, 0).tolist()
    assert out.gains == pytest.approx(gains) and out.weights == pytest.approx(expected)


def test_first_participation_initialises_baseline():
    settings = fgrpo_settings(baseline_momentum=0.5, gain_floor=0.05)
    out = fgrpo(STATS[:1], {}, settings)
    a = STATS[0]
    # b_a starts at r_start = 0.2, then EMA with r_end = 0.5 -> 0.35
    assert out.client_baselines["a"].baseline == pytest.approx(0.5 * 0.2 + 0.5 * 0.5)
    # gain computed against b = r_start and s = std: (0.5 - 0.2) / 0.3 = 1
    assert out.gains[0] == pytest.approx((a.reward_end - a.reward_start) / a.reward_std)
    assert out.client_baselines["a"].rounds == 1


def test_absent_clients_keep_their_state():
    out = fgrpo(STATS[:2], HISTORY, fgrpo_settings())
    assert out.client_baselines["c"] == HISTORY["c"]
    assert out.client_baselines["d"] == HISTORY["d"]
    assert out.client_baselines["a"] != HISTORY["a"]


def test_gain_uses_floor_relative_to_reward_range():
    state = ClientBaseline(0.0, 0.0, 2.0)
    stats = ClientStats("x", 8, 0.0, 0.1, 0.0, 2.0, 0.0)
    assert relative_gain(stats, state, "z", 0.05) == pytest.approx(0.1 / (0.05 * 2.0))
    assert relative_gain(stats, state, "ratio", 0.05) == pytest.approx(0.1 / (0.05 * 2.0))


def test_gain_weights_formula_by_hand():
    gains, shares = [1.0, 0.0, -1.0], [0.5, 0.25, 0.25]
    w = gain_weights(gains, shares, tau=2.0, size_exponent=1.0, uniform_mix=0.1)
    raw = [p * math.exp(g / 2.0) for g, p in zip(gains, shares)]
    expected = [0.9 * r / sum(raw) + 0.1 / 3 for r in raw]
    assert w == pytest.approx(expected, rel=1e-12)


def test_pooled_spread_keeps_batch_noise_from_looking_like_a_gain():
    """A client whose groups have collapsed (within-group std ~0) but whose mean reward moves with the
    batch of prompts: the group spread turns a +0.1 wobble into a z gain at the floor (0.1 / 0.05 = 2),
    the pooled spread (std over all its rewards, 0.4) into 0.25."""
    settled = ClientStats("settled", 8, 0.60, 0.70, 0.0, 1.0, 0.4)
    learner = ClientStats("learner", 8, 0.40, 0.70, 0.3, 1.0, 0.45)
    history = {"settled": ClientBaseline(0.6, 0.0, 1.0, 3), "learner": ClientBaseline(0.6, 0.3, 1.0, 3)}
    group = fgrpo([settled, learner], history, fgrpo_settings(gain_spread="group"))
    pooled = fgrpo([settled, learner], {**history, "settled": ClientBaseline(0.6, 0.4, 1.0, 3),
                                        "learner": ClientBaseline(0.6, 0.45, 1.0, 3)},
                   fgrpo_settings(gain_spread="pooled"))
    assert group.gains == pytest.approx([0.1 / 0.05, 0.1 / 0.3])
    assert pooled.gains == pytest.approx([0.1 / 0.4, 0.1 / 0.45])
    assert group.weights[0] > 0.75 and abs(pooled.weights[0] - 0.5) < 0.02
    # the EMA of the spread follows the chosen statistic
    assert pooled.client_baselines["settled"].spread == pytest.approx(0.4)
    assert group.client_baselines["learner"].spread == pytest.approx(0.3)


def test_higher_gain_gets_higher_weight():
    history = {k: ClientBaseline(0.5, 0.1, 1.0) for k in "xy"}
    stats = [ClientStats("x", 8, 0.5, 0.9, 0.1, 1.0, 0.2), ClientStats("y", 8, 0.5, 0.4, 0.1, 1.0, 0.2)]
    w = fgrpo(stats, history, fgrpo_settings()).weights
    assert w[0] > w[1]


def test_fedavg_is_data_share():
    w = fedavg(STATS, {}, fgrpo_settings()).weights
    total = sum(s.num_prompts for s in STATS)
    assert w == pytest.approx([s.num_prompts / total for s in STATS])


def test_apply_update_by_hand():
    theta = {"w": torch.tensor([1.0, 2.0])}
    deltas = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 4.0])}]
    sgd = aggregation.ServerOptimizer("sgd", 2.0, 0, 0, 1)  # theta + eta * sum_k w_k delta_k, eta = 2
    out, _ = aggregation.server_step(theta, aggregation.pseudo_gradient(deltas, [0.25, 0.75]), sgd,
                                     aggregation.ServerOptimizerState())
    assert torch.allclose(out["w"], torch.tensor([1.0 + 2 * 0.25, 2.0 + 2 * 3.0]))
    assert torch.equal(theta["w"], torch.tensor([1.0, 2.0]))  # input untouched


def test_server_sgd_is_the_weighted_sum():
    theta = {"a": torch.tensor([1.0, -1.0])}
    deltas = [{"a": torch.tensor([1.0, 0.0])}, {"a": torch.tensor([0.0, 2.0])}]
    delta = aggregation.pseudo_gradient(deltas, [0.25, 0.75])
    assert torch.allclose(delta["a"], torch.tensor([0.25, 1.5]))
    new, state = aggregation.server_step(theta, delta, aggregation.ServerOptimizer("sgd", 2.0, 0.9, 0.99, 1e-3),
                                         aggregation.ServerOptimizerState())
    assert torch.allclose(new["a"], torch.tensor([1.5, 2.0])) and state.step == 1
    assert torch.equal(theta["a"], torch.tensor([1.0, -1.0]))  # inputs untouched


def test_server_adam_bias_corrected_steps():
    """With a constant pseudo-gradient D, Adam's bias-corrected step is exactly
    lr * D / (|D| + eps / sqrt(1 - b2^t))."""
    opt = aggregation.ServerOptimizer("adam", lr=0.01, beta1=0.9, beta2=0.99, eps=1e-3)
    theta = {"a": torch.zeros(3)}
    delta = {"a": torch.tensor([0.5, -0.002, 0.0])}
    state = aggregation.ServerOptimizerState()
    for t in range(1, 6):
        new, state = aggregation.server_step(theta, delta, opt, state)
        expected = 0.01 * delta["a"] / (delta["a"].abs() + 1e-3 / math.sqrt(1 - 0.99**t))
        assert torch.allclose(new["a"] - theta["a"], expected, atol=1e-8)
        theta = new
    assert state.step == 5 and torch.allclose(state.m["a"], (1 - 0.9**5) * delta["a"])


def test_server_yogi_first_step_and_moment_rule():
    opt = aggregation.ServerOptimizer("yogi", lr=0.01, beta1=0.9, beta2=0.99, eps=1e-3)
    delta = {"a": torch.tensor([0.5, -0.5])}
    new, state = aggregation.server_step({"a": torch.zeros(2)}, delta, opt, aggregation.ServerOptimizerState())
    assert torch.allclose(state.v["a"], 0.01 * delta["a"] ** 2)  # v = 0 - (1-b2) D^2 sign(0 - D^2)
    assert torch.allclose(new["a"], 0.01 * 0.05 / (0.05 + 1e-3) * torch.tensor([1.0, -1.0]))
    small = {"a": torch.tensor([0.01, 0.01])}  # v > D^2: yogi shrinks v additively
    _, state2 = aggregation.server_step(new, small, opt, state)
    assert torch.allclose(state2.v["a"], state.v["a"] - 0.01 * small["a"] ** 2)


def test_lora_product_error_zero_when_a_is_shared_and_positive_otherwise():
    torch.manual_seed(0)
    glob = {"l.lora_A.weight": torch.randn(2, 3), "l.lora_B.weight": torch.zeros(3, 2)}
    d_b = [torch.randn(3, 2), torch.randn(3, 2)]
    frozen_a = [{"l.lora_A.weight": torch.zeros(2, 3), "l.lora_B.weight": db} for db in d_b]
    assert aggregation.lora_product_error(glob, frozen_a, [0.3, 0.7]) == pytest.approx(0.0, abs=1e-12)
    moving_a = [{"l.lora_A.weight": torch.randn(2, 3), "l.lora_B.weight": db} for db in d_b]
    assert aggregation.lora_product_error(glob, moving_a, [0.3, 0.7]) > 0.01
    same = [moving_a[0], moving_a[0]]  # identical clients: averaging factors is exact
    assert aggregation.lora_product_error(glob, same, [0.5, 0.5]) == pytest.approx(0.0, abs=1e-12)


def test_cap_weights_by_hand():
    assert aggregation.cap_weights([0.7, 0.2, 0.1], 0.4) == pytest.approx([0.4, 0.4, 0.2])  # 0.3 shared 2:1
    assert aggregation.cap_weights([0.5, 0.5], 0.1) == pytest.approx([0.5, 0.5])  # below 1/n: 1/n is used
    assert aggregation.cap_weights([0.9, 0.1, 0.0], 0.45) == pytest.approx([0.45, 0.45, 0.1])  # water-filling


@pytest.mark.parametrize("bound", [0.26, 0.3, 0.4])
def test_capped_weights_sum_to_one_respect_the_bound_and_keep_their_order(bound):
    w = fgrpo(STATS, HISTORY, fgrpo_settings(tau=0.2, uniform_mix=0.0)).weights
    assert max(w) > bound  # the bound binds
    capped = aggregation.cap_weights(w, bound)
    assert math.isclose(sum(capped), 1.0, abs_tol=1e-12) and max(capped) <= bound + 1e-12
    assert all((a - b) * (c - d) >= -1e-12 for a, c in zip(w, capped) for b, d in zip(w, capped))  # same order
    free = [(a, c) for a, c in zip(w, capped) if c < bound - 1e-12]
    assert len({round(c / a, 9) for a, c in free}) == 1  # the uncapped weights grow by one common factor


def measured(stats: list[ClientStats], gains: list[tuple[float, float]], size: int = 100) -> list[ClientStats]:
    """``stats`` with a measured (paired) gain d_k and its standard error se_k each."""
    from dataclasses import replace

    return [replace(s, paired_gain=d, paired_se=se, validation_size=size) for s, (d, se) in zip(stats, gains)]


def test_a_measured_gain_that_is_not_resolved_leaves_fedavgs_weights():
    settings = fgrpo_settings(gain="paired")
    unresolved = measured(STATS, [(0.0, 0.05), (0.0, 0.1), (0.0, 0.02), (0.0, 0.3)])
    out = fgrpo(unresolved, {}, settings)
    assert out.weights == pytest.approx(fedavg(STATS, {}, settings).weights) and out.gains == [0.0] * 4
    # the same improvement of 0.04 weighs by how well it is resolved: t = 0.04 / se
    out = fgrpo(measured(STATS, [(0.04, 0.01), (0.0, 0.1), (0.04, 0.04), (0.0, 0.3)]), {}, settings)
    assert out.gains == pytest.approx([4.0, 0.0, 1.0, 0.0])
    shares = [s.num_prompts / 320 for s in STATS]
    logits = [math.log(p) + min(t, 3.0) for p, t in zip(shares, out.gains)]  # clip(t, -3, 3) / tau, tau = 1
    expected = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0).tolist()
    assert out.weights == pytest.approx(expected) and out.weights[0] > out.weights[2] * 7.3  # e^(3 - 1)


def test_a_measured_gain_leaning_down_only_lowers_a_resolved_shortfall():
    """gain_lean = down: resolved gains above the owner's usual raise nobody (FedAvg's weights); a resolved
    shortfall lowers that owner alone, the others keep their FedAvg ratios."""
    settings = fgrpo_settings(gain="paired", gain_lean="down")
    base = fedavg(STATS, {}, settings).weights
    assert fgrpo(measured(STATS, [(0.04, 0.01), (0.0, 0.1), (0.04, 0.04), (0.0, 0.3)]), {}, settings).weights \
        == pytest.approx(base)
    out = fgrpo(measured(STATS, [(-0.04, 0.01), (0.0, 0.1), (0.04, 0.04), (0.0, 0.3)]), {}, settings)
    assert out.gains == pytest.approx([-4.0, 0.0, 1.0, 0.0])
    assert out.weights[0] == pytest.approx(base[0] * math.exp(-3) / (1 - base[0] + base[0] * math.exp(-3)))
    assert out.weights[2] / out.weights[1] == pytest.approx(base[2] / base[1])


def test_a_shortfall_of_decline_lowers_only_an_owner_its_update_made_worse():
    """gain_shortfall = decline: an improvement far below the owner's usual one is not a shortfall (t = 0);
    a decline is lowered by the smaller of its two shortfalls; a gain above the usual one still raises."""
    history = {c: aggregation.ClientBaseline(b, 0.0, 0.0, rounds=1)
               for c, b in zip("abcd", (0.25, 0.0, 0.05, -0.2))}
    stats = measured(STATS, [(0.1, 0.03), (0.0, 0.0), (-0.05, 0.02), (-0.1, 0.02)])
    by_history = fgrpo(stats, history, fgrpo_settings(gain="paired"))
    assert by_history.gains == pytest.approx([-5.0, 0.0, -5.0, 5.0])
    out = fgrpo(stats, history, fgrpo_settings(gain="paired", gain_shortfall="decline"))
    assert out.gains == pytest.approx([0.0, 0.0, -2.5, 5.0])
    shares = [s.num_prompts / 320 for s in STATS]
    logits = [math.log(p) + min(max(t, -3.0), 3.0) for p, t in zip(shares, out.gains)]
    assert out.weights == pytest.approx(torch.softmax(torch.tensor(logits, dtype=torch.float64), 0).tolist())
    assert out.weights[0] / out.weights[1] == pytest.approx(shares[0] / shares[1])  # FedAvg's ratio kept
    assert out.client_baselines == by_history.client_baselines  # the history is the same either way


def test_a_measured_gain_is_compared_with_the_owners_past_gains():
    settings = fgrpo_settings(gain="paired", baseline_momentum=0.5)
    first = fgrpo(measured(STATS[:2], [(0.1, 0.02), (0.0, 0.02)]), {}, settings)
    assert first.client_baselines["a"].baseline == pytest.approx(0.1)  # the first gain starts the history
    again = fgrpo(measured(STATS[:2], [(0.1, 0.02), (0.0, 0.02)]), first.client_baselines, settings)
    assert again.gains == pytest.approx([0.0, 0.0])  # as good as usual: FedAvg's weights again
    assert again.weights == pytest.approx([1 / 3, 2 / 3])
    assert again.client_baselines["a"].rounds == 2 and again.client_baselines["a"].baseline == pytest.approx(0.1)
    floored = fgrpo(measured(STATS[:1], [(0.05, 0.0)], size=20), {}, settings)
    assert floored.gains == pytest.approx([0.05 * 20])  # se 0 (every difference equal): floor 1 / V
