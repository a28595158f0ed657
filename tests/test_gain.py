"""Measured gains (docs/algorithm.md, section 3): the owner's paired validation gain (gain = paired) and the
server's probe gain (gain = probe), end to end on the tiny moving model."""

import json
import math

import pytest

from fgrpo.cli import main
from fgrpo.client import held_out
from fgrpo.scenarios import ClientSpec
from tiny import MOVING_ARGS, TINY

SMALL = [*TINY, *MOVING_ARGS, "--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "8",
         "--train-size", "40", "--num-clients", "2", "--rounds", "2"]


def client_rows(out) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "client"]


def test_the_validation_split_is_held_out_of_training():
    client = ClientSpec("c", "t", None, list(range(10)))
    trained, validation = held_out(client, 4)
    assert validation == [0, 1, 2, 3] and trained.train == [4, 5, 6, 7, 8, 9] and client.train == list(range(10))
    assert held_out(client, 0) == (client, [])
    with pytest.raises(Exception, match="validation_size = 10: client c has 10 prompts"):
        held_out(client, 10)


def test_paired_gain_is_measured_by_each_owner_and_weighs_as_documented(tmp_path):
    out = tmp_path / "run"
    assert main(["run", *SMALL, "--gain", "paired", "--validation-size", "8", "--out", str(out)]) == 0
    rows = client_rows(out)
    assert len(rows) == 4 and all(r["validation_size"] == 8 and abs(r["paired_gain"]) <= 1 for r in rows)
    assert all(0 <= r["paired_se"] <= 1 / math.sqrt(7) and r["validation_seconds"] > 0 for r in rows)
    first = [r for r in rows if r["round"] == 1]  # no history yet: t = d / max(se, 1 / V)
    assert [r["gain"] for r in first] == pytest.approx([r["paired_gain"] / max(r["paired_se"], 1 / 8)
                                                        for r in first])
    logs = [json.loads(line) for p in (out / "completions").glob("*.log.jsonl") for line in p.read_text().splitlines()]
    assert {(r["round"], r["client_id"], r["paired_gain"]) for r in rows} == {
        (r["round"], r["client_id"], r["paired_gain"]) for r in logs}  # no DP: sent as measured


def test_probe_gain_is_the_servers_paired_probe_change_of_each_update(tmp_path):
    out = tmp_path / "run"
    assert main(["run", *SMALL, "--gain", "probe", "--probes", "8", "--probe-margin", "1", "--out", str(out)]) == 0
    rows = client_rows(out)
    assert len(rows) == 4 and all("paired_gain" not in r for r in rows)  # nothing measured by the clients
    first = [r for r in rows if r["round"] == 1]
    size = 8 * 3  # probes per task x the run's three tasks
    assert [r["gain"] for r in first] == pytest.approx([r["probe_gain"] / max(r["probe_se"], 1 / size)
                                                        for r in first])
    assert all(-1 <= r["probe_gain"] <= 1 and r["probe_se"] >= 0 for r in rows)
