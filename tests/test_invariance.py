"""FGRPO's weights do not depend on any verifier's reward scale (z form: nor on its shift), for an
owner's own verifier too: each client's reward range is what its rewards actually span."""

import json

import pytest

from fgrpo import tasks
from fgrpo.aggregation import ClientStats, FGRPOSettings, cap_weights, fgrpo
from fgrpo.cli import main
from fgrpo.config import RunConfig
from fgrpo.server import weight_bound
from tiny import MOVING_ARGS

ROUNDS = 3


def owner_files(folder) -> tuple[str, str]:
    """Two owners holding compact prompts the warm-started test model sometimes answers."""
    paths = []
    for task in ("spell_backward", "letter_counting"):
        rows = tasks.train_split(task, 40, seed=0, salt="invariance")
        path = folder / f"{task}-owner.jsonl"
        path.write_text("".join(json.dumps({"prompt": e.prompt, "answer": e.answer}) + "\n" for e in rows))
        paths.append(str(path))
    return paths[0], paths[1]


def client_rows(tmp_path, second_verifier: str) -> list[dict]:
    first, second = owner_files(tmp_path)
    out = tmp_path / f"run-{second_verifier.split(':')[-1]}"
    args = ["run", *MOVING_ARGS, "--rounds", str(ROUNDS), "--local-steps", "3", "--prompts-per-step", "4",
            "--group-size", "4", "--max-new-tokens", "8", "--eval-size", "4", "--data", f"{first},{second}",
            "--rewards", f"userdata_helpers:exact,{second_verifier}", "--out", str(out)]
    assert main(args) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "client"]


def replay(rows: list[dict], owner: str = "", scale: float = 1.0, shift: float = 0.0) -> list[float]:
    """FGRPO's weights of every round recomputed from logged statistics, one owner's rewards transformed."""
    settings, baselines, weights = FGRPOSettings.from_config(RunConfig()), {}, []
    for rnd in range(1, ROUNDS + 1):
        stats = []
        for r in (r for r in rows if r["round"] == rnd):
            a, b = (scale, shift) if r["client_id"] == owner else (1.0, 0.0)
            stats.append(ClientStats(r["client_id"], r["num_prompts"], a * r["reward_start"] + b,
                                     a * r["reward_end"] + b, a * r["reward_std"], a * r["reward_range"],
                                     a * r["reward_pooled_std"]))
        result = fgrpo(stats, baselines, settings)
        baselines = result.client_baselines
        weights += cap_weights(result.weights, weight_bound(RunConfig(), len(stats)))  # the run's bound, as the server
    return weights


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("invariance")
    return {name: client_rows(folder, name) for name in
            ("userdata_helpers:exact", "userdata_helpers:exact_x001", "userdata_helpers:exact_x100")}


def test_round_one_weights_do_not_depend_on_an_owners_verifier_scale(runs):
    x1 = [r for r in runs["userdata_helpers:exact"] if r["round"] == 1]
    assert any(r["gain"] != 0 for r in x1) and len({round(r["weight"], 6) for r in x1}) > 1  # not trivially equal
    for name in ("userdata_helpers:exact_x001", "userdata_helpers:exact_x100"):
        other = [r for r in runs[name] if r["round"] == 1]
        assert [r["weight"] for r in other] == pytest.approx([r["weight"] for r in x1], abs=1e-6)
        assert other[1]["reward_range"] != pytest.approx(x1[1]["reward_range"])  # the ranges differ: observed


@pytest.mark.parametrize("scale", [1e-3, 0.1, 7.0, 1e3])
@pytest.mark.parametrize("shift", [0.0, -50.0])
def test_weights_from_logged_statistics_ignore_any_owners_scale_and_shift(runs, scale, shift):
    rows = runs["userdata_helpers:exact"]
    logged = [r["weight"] for r in sorted(rows, key=lambda r: r["round"])]
    assert replay(rows) == pytest.approx(logged, abs=1e-12)  # the replay is the run's own aggregation
    for owner in ("letter_counting-owner", "spell_backward-owner"):
        assert replay(rows, owner, scale, shift) == pytest.approx(logged, abs=1e-9)
