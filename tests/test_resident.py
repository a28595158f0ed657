"""The owner's resident process (``fgrpo owner serve``): its socket answers a train message as the ClientApp's own
node side would, only its user can open it, and it refuses a message of another run, model, node or config with
a line that names the mismatch. The deployment tests (-m slow) run SuperLink + 2 SuperNodes + 2 resident
processes: the model is loaded once per owner, and a resident killed mid-round costs that owner one round."""

import json
import os
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict
from safetensors.torch import load_file

from fgrpo.flower import node, resident, wire
from fgrpo.host import ModelHost
from tiny import MOVING, TINY

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN_CONFIG = " ".join(f"{TINY[i][2:]}={TINY[i + 1]}" for i in range(0, len(TINY), 2))


def wait_for(path: Path, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        assert time.time() < deadline, f"{path} did not appear in {seconds} s"
        time.sleep(0.1)


def train_message(adapter: dict, rnd: int) -> RecordDict:
    return RecordDict({"global": wire.adapter_record(adapter),
                       "round": ConfigRecord({"server-round": rnd, "secure": False, "pooled": False})})


def test_resident_trains_as_the_clientapp_would_and_refuses_other_runs_and_configs(tmp_path):
    run_config = resident.parse_settings(f"{TINY_RUN_CONFIG} num-clients=2 cache-dir='{MOVING['cache_dir']}'", "")
    node_config = {"partition-id": 1, "num-partitions": 2}
    path = tmp_path / "owner.sock"
    loads = ModelHost.loads
    owner = resident.ResidentOwner(path, run_config, node_config)
    owner.load()
    threading.Thread(target=owner.serve_forever, daemon=True).start()
    wait_for(Path(f"{path}.status.json"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_ISSOCK(path.stat().st_mode)

    start = node.owner(run_config, node_config)[0].host.adapter()
    content = train_message(start, rnd=1)
    header = resident.request("train", 7, run_config, node_config, time.time())
    answered = wire.content_report(resident.ask(str(path), header, content, timeout=120))
    direct = wire.content_report(node.train_reply(content, run_config, node_config, time.time()))
    assert answered.stats == direct.stats and answered.stats.client_id == "client-1"
    assert all(torch.equal(answered.delta[k], direct.delta[k]) for k in direct.delta)

    with pytest.raises(resident.OwnerFailed, match="of run 8, this owner process serves run 7"):
        resident.ask(str(path), {**header, "run_id": 8}, content, timeout=30)
    other = resident.request("train", 7, {**run_config, "lr": 0.5}, node_config, time.time())
    with pytest.raises(resident.OwnerFailed, match=r"config hash \w+ differs .*: lr = 0.5 \(here 0.001\)"):
        resident.ask(str(path), other, content, timeout=30)
    other = resident.request("train", 7, run_config, {**node_config, "partition-id": 0}, time.time())
    with pytest.raises(resident.OwnerFailed, match="node config is .*'partition-id': '0'"):
        resident.ask(str(path), other, content, timeout=30)
    other = resident.request("train", 7, {**run_config, "model": "smollm2"}, node_config, time.time())
    with pytest.raises(resident.OwnerFailed, match="base model is 'smollm2', this owner process has 'embedded'"):
        resident.ask(str(path), other, content, timeout=30)

    status = resident.ask(str(path), {"kind": "status"}, None, timeout=30)
    assert status["model_loads"] == loads + 1 and status["train"] == 1 and status["refused"] == 4
    with pytest.raises(resident.Unreachable, match="no owner process answers"):
        resident.ask(str(tmp_path / "nobody.sock"), header, content, timeout=5)


def test_a_second_resident_on_a_live_socket_is_refused_and_a_stale_one_replaced(tmp_path):
    path = tmp_path / "owner.sock"
    with resident.listening_socket(path):
        with pytest.raises(OSError, match="another owner process is serving there"):
            resident.listening_socket(path)
    with resident.listening_socket(path):  # the file of a closed listener is replaced
        assert stat.S_ISSOCK(path.stat().st_mode)
    (tmp_path / "plain").write_text("x")
    with pytest.raises(OSError, match="exists and is not a socket"):
        resident.listening_socket(tmp_path / "plain")


def deployment(tmp_path, rounds: int, overrides: str, nodes: list[str]) -> subprocess.Popen:
    """scripts/local-deployment.sh with 2 SuperNodes and their resident owner processes."""
    env = {**os.environ, "FGRPO_DEPLOY_DIR": str(tmp_path / "deploy"), "FGRPO_RESIDENT": "1"}
    return subprocess.Popen([str(ROOT / "scripts" / "local-deployment.sh"), "2", str(rounds), overrides, *nodes],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL)


def client_rows(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "client"]


MOVING_RUN = (f"local-steps=1 prompts-per-step={MOVING['prompts_per_step']} group-size={MOVING['group_size']} "
              f"max-new-tokens={MOVING['max_new_tokens']} warm-start-steps={MOVING['warm_start_steps']} "
              f"train-size=16 eval-size=4 cache-dir='{MOVING['cache_dir']}'")


@pytest.mark.slow
def test_resident_owners_load_the_model_once_and_train_as_in_process(tmp_path):
    out, work = tmp_path / "run", tmp_path / "deploy"
    nodes = [f'partition-id={k} completions-dir="{tmp_path / f"owner-{k}"}"' for k in (0, 1)]
    proc = deployment(tmp_path, 3, f"{MOVING_RUN} out='{out}'", nodes)
    output, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, output[-3000:]
    for k in (0, 1):
        status = json.loads((work / f"owner-{k}.sock.status.json").read_text())
        assert status["model_loads"] == 1 and status["train"] == 3 and status["refused"] == status["failed"] == 0
        assert "loads the owner's model and data itself" not in (work / f"supernode-{k}.log").read_text()
    rows = client_rows(out)
    assert sorted((r["round"], r["client_id"]) for r in rows) == [(rnd, f"client-{k}") for rnd in (1, 2, 3)
                                                                  for k in (0, 1)]
    # the in-process run of the same config and seed, on one torch thread as each owner process had
    flags = [x for kv in MOVING_RUN.split() for x in ("--" + kv.split("=")[0], kv.split("=")[1].strip("'"))]
    subprocess.run(["fgrpo", "run", *flags, "--num-clients", "2", "--rounds", "3", "--out", str(tmp_path / "local")],
                   check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, timeout=300)
    deployed = load_file(out / "adapter" / "adapter_model.safetensors")
    local = load_file(tmp_path / "local" / "adapter" / "adapter_model.safetensors")
    assert deployed.keys() == local.keys() and all(torch.equal(deployed[k], local[k]) for k in local)


@pytest.mark.slow
def test_a_resident_killed_mid_round_costs_its_owner_that_round_only(tmp_path):
    out, work = tmp_path / "run", tmp_path / "deploy"
    owner_dir = tmp_path / "owner-1"
    nodes = ['partition-id=0', f'partition-id=1 completions-dir="{owner_dir}"']
    overrides = f"{MOVING_RUN.replace('local-steps=1', 'local-steps=4')} client-timeout=150.0 out='{out}'"
    proc = deployment(tmp_path, 3, overrides, nodes)
    log = work / "owner-1.log"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and "round 2" in log.read_text():
            break
        time.sleep(0.05)
    os.kill(int((work / "owner-pids").read_text().split()[1]), signal.SIGKILL)  # mid-way through round 2
    output, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, output[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    per_round = {rnd: sorted(r["client_id"] for r in rows if r["kind"] == "client" and r["round"] == rnd)
                 for rnd in (1, 2, 3)}
    assert per_round == {1: ["client-0", "client-1"], 2: ["client-0"], 3: ["client-0", "client-1"]}
    failed = [r for r in rows if r["kind"] == "warning" and r["round"] == 2]
    assert [r["client_id"] for r in failed] == ["client-1"] and "did not answer" in failed[0]["reason"]
    assert "loads the owner's model and data itself" in (work / "supernode-1.log").read_text()  # round 3
    logged = [json.loads(x) for x in (owner_dir / "client-1.log.jsonl").read_text().splitlines()]
    assert [r["round"] for r in logged] == [1, 3]  # its log intact: round 1 (resident), round 3 (the ClientApp)
    kept = [json.loads(x) for x in (owner_dir / "client-1.jsonl").read_text().splitlines()]
    assert sorted({r["round"] for r in kept}) == [1, 3]
