"""fgrpo compare: the table has the right shape, its numbers come from the run directories, and an
interrupted comparison continues without redoing finished runs."""

import csv
import json
import math
import statistics
from importlib import resources

import pytest

from fgrpo.cli import main
from fgrpo.compare import (
    Plan,
    load_preset,
    plan_runs,
    recipe,
    seeds_to_resolve,
    separation,
    summarize_runs,
    write_weights,
)
from fgrpo.config import ConfigError
from fgrpo.config_sources import build_config


def test_recipes_compose_weighting_and_modifiers():
    assert recipe("fgrpo") == {"strategy": "fgrpo"}
    assert recipe("fedprox")["strategy"] == "fedavg" and recipe("fedprox")["proximal_mu"] > 0
    both = recipe("fgrpo+fedadam")
    assert both["strategy"] == "fgrpo" and both["server_optimizer"] == "adam"
    assert recipe("fedyogi")["server_optimizer"] == "yogi"
    assert recipe("fgrpo[tau=0.3, gain_form=ratio]") == {"strategy": "fgrpo", "tau": "0.3", "gain_form": "ratio"}
    with pytest.raises(ConfigError, match="not key=value"):
        recipe("fgrpo[tau]")
    with pytest.raises(ConfigError, match="not known"):
        recipe("fgrpo+fedmagic")


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    out = root / "results"
    args = ["compare", "--preset", "tiny", "--jobs", "2", "--out", str(out), "--cache-dir", str(root / "cache")]
    assert main(args) == 0
    return out, args


def test_table_shape_and_values_match_the_run_directories(compared):
    out, _ = compared
    rows = list(csv.DictReader(open(out / "table.csv")))
    assert [(r["scenario"], r["strategy"]) for r in rows] == [("scale-skew", "fgrpo"), ("scale-skew", "fedavg")]
    for row in rows:
        runs = sorted((out / "runs" / "scale-skew" / row["strategy"]).glob("seed-*"))
        assert [r.name.split("-")[1] for r in runs] == ["0", "1"]
        finals = [json.loads((r / "summary.json").read_text())["final_macro_accuracy"] for r in runs]
        assert int(row["seeds"]) == 2
        assert float(row["final_macro_mean"]) == pytest.approx(statistics.fmean(finals))
        assert float(row["final_macro_std"]) == pytest.approx(statistics.stdev(finals))
        assert all(json.loads((r / "summary.json").read_text())["rounds"] == 2 for r in runs)
    md = (out / "table.md").read_text()
    assert "### scale-skew" in md and md.count("\n| fgrpo |") == 1 and md.count("\n| fedavg |") == 1
    assert (out / "plots" / "accuracy-scale-skew.png").stat().st_size > 0
    assert (out / "plots" / "weights-scale-skew.png").stat().st_size > 0  # fgrpo's weights vary
    assert "| fedavg | " in md and "| +0.0 ± 0.0 |" in md  # fedavg minus itself
    weights = (out / "weights.md").read_text()
    assert "## scale-skew" in weights and "**fgrpo**" in weights and "**fedavg**" in weights
    fedavg_rows = weights.split("**fedavg**")[1].split("**")[0]
    assert fedavg_rows.count("| 0.25 | 0.25 |") == 4  # four clients with equal data, two rounds


def test_rerun_reuses_finished_runs_and_finishes_an_interrupted_one(compared, capsys):
    out, args = compared
    summaries = sorted(out.glob("runs/*/*/*/summary.json"))
    stamps = {p: p.stat().st_mtime_ns for p in summaries}
    interrupted = summaries[0]
    interrupted.unlink()  # as if killed after its last checkpoint
    assert main(args) == 0
    assert "(3 already done)" in " ".join(capsys.readouterr().err.split())
    assert interrupted.exists()
    assert all(p.stat().st_mtime_ns == stamps[p] for p in summaries[1:])  # not redone


def test_summary_statistics_by_hand(tmp_path):
    plan = Plan(["fgrpo"], ["task-skew"], [0, 1, 2], target=0.5, run={"rounds": 4})
    runs = plan_runs(plan, tmp_path)
    curves = {0: [0.1, 0.4, 0.6, 0.5, 0.7], 1: [0.1, 0.5, 0.5, 0.5, 0.5], 2: [0.1, 0.2, 0.3, 0.4, 0.4]}
    for _, cfg in runs:
        run_dir = tmp_path / cfg.out
        run_dir.mkdir(parents=True)
        curve = curves[cfg.seed]
        rows = [{"round": r, "kind": "eval", "macro_accuracy": a, "worst_task_accuracy": a / 2}
                for r, a in enumerate(curve)]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (run_dir / "summary.json").write_text(json.dumps(
            {"final_macro_accuracy": curve[-1], "final_worst_task_accuracy": curve[-1] / 2, "wall_seconds": 1.0}))
    (row,) = summarize_runs(plan, runs)
    assert row["final_macro_mean"] == pytest.approx((0.7 + 0.5 + 0.4) / 3)
    assert row["final_macro_std"] == pytest.approx(statistics.stdev([0.7, 0.5, 0.4]))
    assert row["worst_task_mean"] == pytest.approx((0.35 + 0.25 + 0.2) / 3)
    assert row["mean_over_rounds"] == pytest.approx(statistics.fmean(statistics.fmean(c[1:]) for c in curves.values()))
    assert row["rounds_to_target_mean"] == pytest.approx((2 + 1) / 2) and row["seeds_reaching_target"] == 2
    spreads = [statistics.pstdev(c[-3:]) for c in curves.values()]
    assert row["last_rounds_spread_mean"] == pytest.approx(statistics.fmean(spreads))


def test_paired_difference_and_separation_by_hand(tmp_path):
    plan = Plan(["fgrpo", "fedavg", "reward-weighted"], ["task-skew"], [0, 1, 2], target=0.5, run={"rounds": 1})
    runs = plan_runs(plan, tmp_path)
    finals = {"fgrpo": [0.50, 0.60, 0.55], "fedavg": [0.52, 0.58, 0.57], "reward-weighted": [0.40, 0.41, 0.42]}
    for name, cfg in runs:
        run_dir = tmp_path / cfg.out
        run_dir.mkdir(parents=True)
        final = finals[name][cfg.seed]
        (run_dir / "metrics.jsonl").write_text(json.dumps({"round": 1, "kind": "eval", "macro_accuracy": final}) + "\n")
        (run_dir / "summary.json").write_text(json.dumps({
            "final_macro_accuracy": final + 0.1, "final_content_macro_accuracy": final,  # content is what counts
            "final_worst_task_accuracy": 0.0, "wall_seconds": 1.0}))
    rows = summarize_runs(plan, runs)
    fgrpo = rows[0]
    assert fgrpo["minus_fedavg_mean"] == pytest.approx(statistics.fmean([-0.02, 0.02, -0.02]))
    assert fgrpo["minus_fedavg_std"] == pytest.approx(statistics.stdev([-0.02, 0.02, -0.02]))
    sep = separation(rows, "task-skew")
    assert sep["best"]["strategy"] == "fedavg" and sep["worst"]["strategy"] == "reward-weighted"
    assert sep["gap"] == pytest.approx(statistics.fmean(finals["fedavg"]) - 0.41)
    assert sep["threshold"] == pytest.approx(3 * statistics.stdev(finals["fedavg"])) and sep["separated"]
    finals["reward-weighted"] = [0.45, 0.60, 0.50]  # within the seed spread: not separated
    for name, cfg in runs:
        if name == "reward-weighted":
            summary = json.loads((tmp_path / cfg.out / "summary.json").read_text())
            summary["final_content_macro_accuracy"] = finals[name][cfg.seed]
            (tmp_path / cfg.out / "summary.json").write_text(json.dumps(summary))
    sep = separation(summarize_runs(plan, runs), "task-skew")
    assert not sep["separated"]
    # paired fgrpo - fedavg std 0.0231: (2 x 0.0231 / 0.02)^2 = 5.33 -> 6 seeds resolve a 2-point difference
    assert sep["paired_std"] == pytest.approx(statistics.stdev([-0.02, 0.02, -0.02]))
    assert sep["seeds_to_resolve"] == 6
    assert seeds_to_resolve(0.001) == 2 and seeds_to_resolve(0.05) == 25 and math.isnan(seeds_to_resolve(math.nan))


def test_weights_count_a_left_out_client_as_zero(tmp_path):
    plan = Plan(["fgrpo"], ["noisy-verifiers"], [0, 1], run={"rounds": 2})
    runs = plan_runs(plan, tmp_path)
    for _, cfg in runs:
        rows = [{"round": rnd, "kind": "client", "client_id": f"client-{k}", "task": "t", "reward_scale": "x1",
                 "weight": 0.5, "update_norm": 1.0} for rnd in (1, 2) for k in (0, 1)]
        if cfg.seed == 1:  # client-1 rejected in round 2: a warning, no client row
            rows = [r for r in rows if (r["round"], r["client_id"]) != (2, "client-1")]
            rows[2]["weight"] = 1.0
            rows.append({"round": 2, "kind": "warning", "client_id": "client-1", "reason": "lowers the probes"})
        rows.append({"round": 1, "kind": "warning", "client_id": "client-0", "reason": "cut at max_new_tokens"})
        run_dir = tmp_path / cfg.out
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_weights(plan, runs, tmp_path)
    table = (tmp_path / "weights.md").read_text()
    assert "| client-0 (t, x1) | 0.50 | 0.75 |" in table  # a warning beside a client row changes nothing
    assert "| client-1 (t, x1) | 0.50 | 0.25 |" in table  # (0.5 + 0) / 2, not 0.5 over the one seed


@pytest.mark.parametrize("preset", sorted(p.name[:-5] for p in (resources.files("fgrpo") / "presets").iterdir()
                                          if p.name.endswith(".toml")))
def test_every_shipped_preset_loads_and_its_run_config_is_valid(preset):
    plan = load_preset(preset)
    cfg = build_config(preset=preset)  # validates every key and task (one line naming it if not)
    assert plan.strategies and plan.scenarios and len(plan.seeds) >= 1 and cfg.num_clients >= 1
