"""Checkpoints and --resume: a resumed run ends exactly where an uninterrupted one does."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fgrpo.cli import main
from tiny import TINY as TINY_ARGS

TINY = [*TINY_ARGS, "--num-clients", "3"]
TIMINGS = {"train_seconds", "eval_seconds", "clock_seconds"}


def rows(run_dir):
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        out.append({k: v for k, v in json.loads(line).items() if k not in TIMINGS})
    return out


def state(run_dir):
    latest = sorted((run_dir / "checkpoints").glob("round-*"))[-1]
    return json.loads((latest / "state.json").read_text())


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    run_dir = root / "run"
    assert main(["run", *TINY, "--rounds", "4", "--cache-dir", str(root / "cache"), "--out", str(run_dir)]) == 0
    return run_dir, root / "cache"


def test_stop_then_resume_equals_straight_run(straight, tmp_path):
    straight_dir, cache = straight
    run_dir = tmp_path / "run"
    assert main(["run", *TINY, "--rounds", "2", "--cache-dir", str(cache), "--out", str(run_dir)]) == 0
    assert main(["run", "--resume", str(run_dir), "--rounds", "4"]) == 0
    a = load_file(straight_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    assert rows(run_dir) == rows(straight_dir)
    assert state(run_dir)["client_baselines"] == state(straight_dir)["client_baselines"]
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 4
    assert len(list((run_dir / "checkpoints").glob("round-*"))) == 2  # checkpoint_keep


def test_resume_without_checkpoint_is_a_clear_error(straight, tmp_path, capsys):
    _, cache = straight
    run_dir = tmp_path / "run"
    assert main(["run", *TINY, "--rounds", "1", "--cache-dir", str(cache), "--out", str(run_dir)]) == 0
    for checkpoint in (run_dir / "checkpoints").glob("round-*"):
        for f in checkpoint.iterdir():
            f.unlink()
        checkpoint.rmdir()
    assert main(["run", "--resume", str(run_dir)]) == 2
    assert "no checkpoint there" in capsys.readouterr().err


def test_resume_after_a_crash_mid_round(straight, tmp_path):
    straight_dir, cache = straight
    run_dir = tmp_path / "run"
    assert main(["run", *TINY, "--rounds", "2", "--cache-dir", str(cache), "--out", str(run_dir)]) == 0
    with (run_dir / "metrics.jsonl").open("a") as fh:  # round 3 half written when the process died
        fh.write(json.dumps({"round": 3, "kind": "client", "client_id": "client-0"}) + "\n")
        fh.write('{"round": 3, "kind": "cl')
    assert main(["run", "--resume", str(run_dir), "--rounds", "4"]) == 0
    assert rows(run_dir) == rows(straight_dir)


def test_resume_refuses_other_changes_and_missing_runs(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path), "--lr", "0.1"]) == 2
    assert "only --rounds may change, not: lr" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "no config.toml there" in capsys.readouterr().err


def test_sigkill_mid_run_then_resume(tmp_path):
    """Kill the process with SIGKILL during round 3, resume: same adapter, no torn or repeated rows."""
    import os
    import signal
    import subprocess
    import sys
    import time

    args = [*TINY, "--local-steps", "4", "--rounds", "5", "--cache-dir", str(tmp_path / "cache")]
    straight = tmp_path / "straight"
    assert main(["run", *args, "--out", str(straight)]) == 0  # also builds the model cache
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "fgrpo.cli", "run", *args, "--out", str(run_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any('"round": 2, "kind": "eval"' in line for line in metrics.read_text().splitlines()):
            time.sleep(0.3)  # into round 3
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "summary.json").exists()
    assert main(["run", "--resume", str(run_dir)]) == 0
    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert rows(run_dir) == rows(straight)  # every line parses, none repeated or missing


@pytest.mark.parametrize("extra", [["--server-optimizer", "adam", "--server-lr", "0.01"],
                                   ["--strategy", "local-only"]], ids=["fedadam-moments", "local-only-adapters"])
def test_resume_restores_server_optimizer_and_local_adapters(straight, tmp_path, extra):
    """Adam's moments and local-only clients' own adapters are part of the checkpoint."""
    _, cache = straight
    common = ["run", *TINY, *extra, "--cache-dir", str(cache)]
    assert main([*common, "--rounds", "3", "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--rounds", "1", "--out", str(tmp_path / "b")]) == 0
    assert main(["run", "--resume", str(tmp_path / "b"), "--rounds", "3"]) == 0
    a = sorted((tmp_path / "a" / "adapter").rglob("*.safetensors"))
    b = sorted((tmp_path / "b" / "adapter").rglob("*.safetensors"))
    assert len(a) == len(b) == (3 if "local-only" in extra else 1)  # one adapter per client
    for fa, fb in zip(a, b):
        ta, tb = load_file(fa), load_file(fb)
        assert all(torch.equal(ta[k], tb[k]) for k in ta)  # bitwise
    assert rows(tmp_path / "a") == rows(tmp_path / "b")
