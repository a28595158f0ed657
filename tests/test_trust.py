"""Owners that cannot be trusted (docs/trust.md): the plausibility checks of a report, by hand and on the
reports of honest runs; a lying owner screened; the weight bound; the server's probes; the robust median."""

import json
import math
from dataclasses import replace

import pytest
import torch

from fgrpo import aggregation
from fgrpo.aggregation import ClientStats
from fgrpo.cli import main
from fgrpo.config_sources import build_config
from fgrpo.server import weight_bound
from fgrpo.trust import ReportRules, fabricated, report_problem
from tiny import MOVING_ARGS, TINY

RULES = ReportRules(prompts_per_step=16, max_steps=10, group_size=8, values_checked=True,
                    still_groups_cannot_move=True)
HONEST = ClientStats("c", 160, 0.5, 0.55, 0.2, 1.0, 0.3)


@pytest.mark.parametrize("change, reason", [
    ({"reward_end": math.nan}, "reward_end = nan is not finite"),
    ({"reward_std": math.inf}, "reward_std = inf is not finite"),
    ({"num_prompts": 10**6}, "num_prompts = 1000000"),
    ({"num_prompts": 170}, "num_prompts = 170"),  # not a whole number of steps
    ({"num_prompts": 0}, "num_prompts = 0"),
    ({"reward_range": -1.0}, "reward_range = -1.0 is negative"),
    ({"reward_end": 1.6}, "|r_end - r_start| = 1.1 exceeds its own reward_range = 1"),
    ({"reward_std": 0.6}, "reward_std = 0.6 is outside"),  # > 1/2 * sqrt(8/7) = 0.535
    ({"reward_pooled_std": -0.1}, "reward_pooled_std = -0.1 is outside"),
    ({"reward_std": 0.0}, "every group tied"),  # with a non-zero update
    ({"reward_range": 0.0, "reward_end": 0.5, "reward_std": 0.0, "reward_pooled_std": 0.0}, "every group tied"),
])
def test_each_check_rejects_what_it_should(change, reason):
    assert report_problem(HONEST, RULES, update_norm=0.3) is None
    problem = report_problem(replace(HONEST, **change), RULES, update_norm=0.3)
    assert problem is not None and reason in problem, problem


def test_what_the_checks_let_through():
    assert report_problem(replace(HONEST, reward_end=HONEST.reward_start + 1.0), RULES, 0.3) is None  # at the edge
    assert report_problem(replace(HONEST, reward_std=0.5 * math.sqrt(8 / 7)), RULES, 0.3) is None  # the largest std
    assert report_problem(replace(HONEST, reward_std=0.0), RULES, update_norm=0.0) is None  # tied and still
    assert report_problem(replace(HONEST, reward_std=0.0), RULES, update_norm=None) is None  # secure aggregation
    kl = replace(RULES, still_groups_cannot_move=False)  # beta > 0: the KL term moves the adapter
    assert report_problem(replace(HONEST, reward_std=0.0), kl, update_norm=0.3) is None
    noised = replace(RULES, values_checked=False)  # dp_stats_noise: only finiteness and the count
    assert report_problem(replace(HONEST, reward_end=9.0, reward_std=-1.0), noised, 0.3) is None
    assert "num_prompts" in report_problem(replace(HONEST, num_prompts=10**6), noised, 0.3)


def test_rules_follow_the_config():
    rules = ReportRules.from_config(build_config(overrides={"local_steps": 5, "prompts_per_step": 4}))
    assert (rules.prompts_per_step, rules.max_steps, rules.group_size) == (4, 5, 8)
    assert rules.values_checked and rules.still_groups_cannot_move
    assert not ReportRules.from_config(build_config(overrides={"beta": 0.1})).still_groups_cannot_move
    assert not ReportRules.from_config(build_config(overrides={"dynamic_sampling": 2})).still_groups_cannot_move
    assert not ReportRules.from_config(build_config(overrides={"dp": "client", "dp_stats_noise": 1.0})).values_checked


def test_the_fabricated_report_is_the_largest_gain_a_collapsed_spread_and_a_million_prompts():
    lie = fabricated(HONEST)
    assert lie.reward_end == HONEST.reward_start + HONEST.reward_range
    assert lie.reward_std == lie.reward_pooled_std == 0.0 and lie.num_prompts == 10**6


def test_a_liars_weight_before_and_after_the_defences():
    """Four clients, three honest (r_start 0.5, r_end 0.55, spread 0.2, range 1), the fourth reporting the top
    of its range: without a bound FGRPO gives it 0.709 (0.925 with spread 0 too), FedAvg with 10^6 prompts
    1.000; with the default bound no weight exceeds it, and the crude liar's report is rejected outright."""
    settings = aggregation.FGRPOSettings.from_config(build_config())
    honest = [ClientStats(f"h{k}", 160, 0.5, 0.55, 0.2, 1.0, 0.2) for k in range(3)]
    liar = ClientStats("liar", 160, 0.5, 1.0, 0.2, 1.0, 0.2)
    weights = aggregation.fgrpo([*honest, liar], {}, settings).weights
    assert weights[-1] == pytest.approx(0.709, abs=1e-3)
    bound = weight_bound(build_config(), 4)
    assert bound == pytest.approx(0.4) and max(aggregation.cap_weights(weights, bound)) == pytest.approx(bound)
    crude = fabricated(ClientStats("liar", 160, 0.5, 0.55, 0.2, 1.0, 0.2))
    assert aggregation.fedavg([*honest, crude], {}, settings).weights[-1] == pytest.approx(1.0, abs=1e-3)
    assert report_problem(crude, ReportRules.from_config(build_config(overrides={"prompts_per_step": 16})), 0.3)


def test_coordinate_median_is_robust_to_one_outlier():
    deltas = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([1.5, 2.5])}, {"w": torch.tensor([100.0, -50.0])}]
    assert torch.equal(aggregation.coordinate_median(deltas)["w"], torch.tensor([1.5, 2.0]))


def run_rows(tmp_path, name: str, *args: str) -> list[dict]:
    out = tmp_path / name
    assert main(["run", *TINY, *MOVING_ARGS, "--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "8",
                 "--rounds", "2", "--out", str(out), *args]) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_honest_runs_pass_every_check_and_the_liar_is_screened(tmp_path):
    """Every report of honest runs (scale-skew, noisy-verifiers) passes the checks; in lying-owner the liar
    (the last client) is left out of every round with the reason, the others are not."""
    for scenario in ("scale-skew", "noisy-verifiers"):
        rows = run_rows(tmp_path, scenario, "--scenario", scenario)
        assert not [r for r in rows if r["kind"] == "warning"], scenario
        assert len([r for r in rows if r["kind"] == "client"]) == 8
    rows = run_rows(tmp_path, "liar", "--scenario", "lying-owner")
    warnings = [r for r in rows if r["kind"] == "warning"]
    assert [(r["round"], r["client_id"]) for r in warnings] == [(1, "client-3"), (2, "client-3")]
    assert all("num_prompts = 1000000" in r["reason"] for r in warnings)
    assert sorted({r["client_id"] for r in rows if r["kind"] == "client"}) == ["client-0", "client-1", "client-2"]


def test_probes_are_disjoint_from_every_owners_prompts_and_from_evaluation():
    """The server's probe prompts come from the config alone (no client data reaches probe_sets) and are the
    held-out prompts after the evaluation ones: disjoint from every owner's training prompts and the eval set."""
    from fgrpo.probes import probe_sets
    from fgrpo.scenarios import load_clients

    for scenario in ("scale-skew", "noisy-verifiers", "dirichlet"):
        cfg = build_config(overrides={"scenario": scenario, "eval_size": 100, "probes": 64, "train_size": 2000})
        clients, test_sets, _ = load_clients(cfg)
        probes = probe_sets(cfg, list(test_sets), "compact")
        assert sorted(probes) == sorted(test_sets) and all(len(p) == 64 for p in probes.values())
        probe_prompts = {e.prompt for examples in probes.values() for e in examples}
        owners = {e.prompt for c in clients for e in c.train}
        evaluated = {e.prompt for examples in test_sets.values() for e in examples}
        assert not probe_prompts & owners and not probe_prompts & evaluated, scenario
    with pytest.raises(Exception, match="probes = 150 with eval_size = 100"):
        build_config(overrides={"eval_size": 100, "probes": 150})


def test_a_paired_gain_is_checked_against_what_its_validation_size_allows():
    paired = replace(RULES, validation_size=50)
    good = replace(HONEST, paired_gain=0.1, paired_se=0.03, validation_size=50)
    assert report_problem(good, paired, 0.3) is None
    assert "paired_gain = 1.5 is outside [-1, 1]" in report_problem(replace(good, paired_gain=1.5), paired, 0.3)
    assert "paired_se = 0.2 is outside [0, 0.1429]" in report_problem(replace(good, paired_se=0.2), paired, 0.3)
    assert "validation_size = 10; the server asked for 50" in report_problem(replace(good, validation_size=10),
                                                                            paired, 0.3)
    assert "validation_size = 50; the server asked for 0" in report_problem(good, RULES, 0.3)  # not asked for
    assert "not finite" in report_problem(replace(good, paired_se=math.nan), paired, 0.3)
