"""fgrpo as a Flower App: run config mirrors `fgrpo run`, the wire format is checked, the simulation
runtime gives the in-process result, and the deployment runtime (SuperLink + 2 SuperNodes as
separate processes) finishes and leaves no process behind."""

import json
import os
import signal
import socket
import subprocess
import time
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fgrpo.aggregation import ClientStats
from fgrpo.cli import main
from fgrpo.flower import wire
from fgrpo.flower.run_config import run_config_keys
from fgrpo.report import REWARDS, SENT_METRICS, ClientReport
from tiny import MOVING, MOVING_ARGS, TINY

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN_CONFIG = " ".join(f"{TINY[i][2:]}={TINY[i + 1]}" for i in range(0, len(TINY), 2))
MOVING_RUN_CONFIG = " ".join(f"{k.replace('_', '-')}={v!r}" for k, v in MOVING.items())


def test_flower_run_config_mirrors_every_fgrpo_option():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == run_config_keys(), (
        "pyproject.toml's [tool.flwr.app.config] is stale: replace it with `python -m fgrpo.flower.run_config`")


def test_reply_round_trip_keeps_the_update():
    update = ClientReport(ClientStats("c", 4, 0.1, 0.5, 0.2, 1.0, 0.3), {"a": torch.ones(2, 3), "b": torch.ones(3)},
                          {"loss": 0.5}, 1.0, "spell_backward", "x1")
    back = wire.content_report(wire.report_content(update))
    assert back.stats == update.stats and back.metrics == {"loss": 0.5} and back.task == "spell_backward"
    assert back.delta.keys() == update.delta.keys() and torch.equal(back.delta["a"], torch.ones(2, 3))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, seconds: float = 30) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {seconds} s")


def group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


def adapters_equal(a: Path, b: Path) -> bool:
    ta = load_file(a / "adapter" / "adapter_model.safetensors")
    tb = load_file(b / "adapter" / "adapter_model.safetensors")
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def flower_simulation(tmp_path, run_config: str, supernodes: int) -> subprocess.CompletedProcess:
    """``flwr run . --stream`` on a fresh simulation SuperLink (own process group, stopped after)."""
    port = free_port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\n'
                                      f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home)}  # Flower's state under tmp_path, not ~/.flwr
    link = subprocess.Popen(["flower-superlink", "--insecure", "--simulation", "--port", str(port),
                             "--disable-runtime-dependency-installation",  # the installed env, no CUDA torch
                             "--database", str(tmp_path / "link.db")],
                            stdout=open(tmp_path / "superlink.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True, env=env)  # own process group: stopped with its children
    try:
        wait_for_port(port)
        done = subprocess.run(["flwr", "run", ".", "sim", "--stream", "--run-config", run_config,
                               "--federation-config", f"num-supernodes={supernodes}"], cwd=ROOT, env=env,
                              timeout=240, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert "Installing application dependencies" not in done.stdout  # ran in the installed environment
    finally:
        os.killpg(link.pid, signal.SIGTERM)
        link.wait(timeout=30)
        time.sleep(1)
        if group_alive(link.pid):
            os.killpg(link.pid, signal.SIGKILL)
    assert not group_alive(link.pid)
    return done


def test_flower_simulation_equals_in_process_run(tmp_path):
    """Same seed and config: the global adapter after 2 rounds is bitwise the in-process one."""
    cache = tmp_path / "cache"
    assert main(["run", *TINY, "--rounds", "2", "--num-clients", "3", "--cache-dir", str(cache),
                 "--out", str(tmp_path / "in-process")]) == 0
    flower_simulation(tmp_path, f"{TINY_RUN_CONFIG} rounds=2 num-clients=3 cache-dir='{cache}' "
                                f"out='{tmp_path / 'flower'}'", supernodes=3)
    assert (tmp_path / "flower" / "summary.json").exists()
    assert adapters_equal(tmp_path / "flower", tmp_path / "in-process")
    flower_rows = [json.loads(x) for x in (tmp_path / "flower" / "metrics.jsonl").read_text().splitlines()]
    local_rows = [json.loads(x) for x in (tmp_path / "in-process" / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in rows]
    assert strip(flower_rows) == strip(local_rows)
    exact = owner_logs(tmp_path / "in-process")  # no DP: the server receives the owners' exact statistics
    clients = [r for r in flower_rows if r["kind"] == "client"]
    assert len(clients) == 6 and all(r[k] == exact[(r["round"], r["client_id"])][k] for r in clients
                                     for k in ("reward_start", "reward_end", "reward_std", "train_accuracy"))


def owner_logs(run_dir: Path) -> dict[tuple[int, str], dict]:
    """The owners' own logs of an in-process run, by (round, client id)."""
    logs = (run_dir / "completions").glob("*.log.jsonl")
    rows = [json.loads(line) for p in logs for line in p.read_text().splitlines()]
    return {(r["round"], r["client_id"]): r for r in rows}


def test_flower_under_dp_receives_no_exact_reward_statistic(tmp_path):
    """dp_stats_noise > 0 on the Flower simulation: what the ServerApp received and logged equals the in-process
    run's (same noise, same seed), and none of it is an exact reward statistic of the owner (those stay in the
    owner's log); without the statistics' noise the exact numbers arrive (test_flower_simulation_equals_...)."""
    moving = [a for k, v in MOVING.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    dp = ["--dp", "client", "--dp-noise", "0.01", "--dp-stats-noise", "0.5"]
    assert main(["run", *TINY, *moving, "--rounds", "1", "--num-clients", "2", *dp,
                 "--out", str(tmp_path / "in-process")]) == 0
    merged = dict(pair.split("=", 1) for pair in f"{TINY_RUN_CONFIG} {MOVING_RUN_CONFIG}".split())  # later wins
    flower_simulation(tmp_path, " ".join(f"{k}={v}" for k, v in merged.items()) + " rounds=1 num-clients=2 dp='client' "
                                f"dp-noise=0.01 dp-stats-noise=0.5 out='{tmp_path / 'flower'}'", supernodes=2)
    rows = {name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
                   if json.loads(x)["kind"] == "client"] for name in ("flower", "in-process")}
    strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in rows]
    assert strip(rows["flower"]) == strip(rows["in-process"]) and len(rows["flower"]) == 2
    exact = owner_logs(tmp_path / "in-process")
    for row in rows["flower"]:
        log = exact[(row["round"], row["client_id"])]
        secret = {log[k] for k in ("reward_start", "reward_end", "reward_std", "reward_pooled_std", "train_accuracy",
                                   "frac_zero_std", "loss", "grad_norm")} - {0.0, 1.0}
        secret -= {log[k] for k in row if k in log and SENT_METRICS.get(k, REWARDS) != REWARDS}  # policy values
        received = {v for k, v in row.items() if isinstance(v, float) and k not in ("weight", "gain", "baseline")}
        assert not received & secret and "train_accuracy" not in row and "loss" not in row


def test_secure_aggregation_equals_plain_aggregation(tmp_path):
    """FGRPO weights + SecAgg+ on the Flower simulation: the server sees no single delta, and the global
    adapter after round 1 equals the plain one (the in-process run, bitwise the plain Flower
    simulation by the test above) within SecAgg+'s quantization: each client's value is stochastically
    rounded to a grid of step 2c / 2^22 (4.8e-7 for c = secagg_clip_range = 1), so the sum of K clients'
    is off by less than K * 2c / 2^22, plus float32 rounding (1e-7)."""
    moving = TINY_RUN_CONFIG.replace("warm-start-steps=2", f"warm-start-steps={MOVING['warm_start_steps']}")
    common = ["--rounds", "2", "--num-clients", "3", "--checkpoint-keep", "5", *MOVING_ARGS]
    assert main(["run", *TINY, *common, "--out", str(tmp_path / "plain")]) == 0
    flower_simulation(tmp_path, f"{moving} rounds=2 num-clients=3 checkpoint-keep=5 cache-dir='{MOVING['cache_dir']}' "
                                f"secure-aggregation=true out='{tmp_path / 'secure'}'", supernodes=3)
    rows = [json.loads(x) for x in (tmp_path / "secure" / "metrics.jsonl").read_text().splitlines()]
    clients = [r for r in rows if r["kind"] == "client"]
    assert len(clients) == 6 and all(r["update_norm"] is None for r in clients)  # no delta reached the server
    assert all(r["max_abs_delta"] < 1.0 for r in clients)  # nothing was clipped by SecAgg+
    assert abs(sum(r["weight"] for r in clients if r["round"] == 1) - 1) < 1e-9
    round_1 = "checkpoints/round-0001/tensors.safetensors"
    secure, plain = load_file(tmp_path / "secure" / round_1), load_file(tmp_path / "plain" / round_1)
    start = load_file(tmp_path / "plain" / "checkpoints/round-0000/tensors.safetensors")
    keys = [k for k in plain if k.startswith("global/")]
    moved = max(float((plain[k] - start[k]).abs().max()) for k in keys)
    error = max(float((secure[k] - plain[k]).abs().max()) for k in keys)
    assert moved > 1e-4  # the round really changed the adapter ...
    k = sum(1 for r in clients if r["round"] == 1)
    assert 0 < error < k * 2 * 1.0 / 2**22 + 1e-7, error  # ... and SecAgg+ reproduced it up to its quantization
    assert json.loads((tmp_path / "secure" / "summary.json").read_text())["rounds"] == 2


@pytest.mark.slow
def test_local_deployment_with_tls_and_supernode_auth(tmp_path):
    """SuperLink + 2 SuperNodes, 2 rounds, TLS and SuperNode authentication on (the insecure
    deployment runs in the next test and in tests/test_tutorial.py)."""
    secure = True
    work, out = tmp_path / "deploy", tmp_path / "run"
    moving = TINY_RUN_CONFIG.replace("warm-start-steps=2", f"warm-start-steps={MOVING['warm_start_steps']}")
    overrides = f"{moving} cache-dir='{MOVING['cache_dir']}' out='{out}'"
    started = time.perf_counter()
    env = {**os.environ, "FGRPO_DEPLOY_DIR": str(work), "FGRPO_SECURE": "1" if secure else "0"}
    done = subprocess.run([str(ROOT / "scripts" / "local-deployment.sh"), "2", "2", overrides], env=env,
                          timeout=280, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert time.perf_counter() - started < 300
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for rnd in (1, 2):
        assert sorted(r["client_id"] for r in rows if r["kind"] == "client" and r["round"] == rnd) == \
            ["client-0", "client-1"]  # every client took part in every round
    final = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any(final[k].abs().sum() > 0 for k in final if "lora_B" in k)  # LoRA B starts at zero: it moved
    if secure:  # the SuperLink served HTTPS and both SuperNodes were registered before joining
        assert "running on https://" in (work / "superlink.log").read_text()
        assert all("registered successfully" in (work / f"register-{k}.log").read_text() for k in (0, 1))
    pids = [int(p) for p in (work / "pids").read_text().split()]
    assert len(pids) == 3 and not any(group_alive(p) for p in pids)  # SuperLink + 2 SuperNodes, all gone


@pytest.mark.slow
def test_run_survives_a_supernode_stopped_mid_run(tmp_path):
    """Stop one of two SuperNodes after round 1: the run finishes with the other. The nodes name
    themselves (client-id), and the server's rows use those names."""
    work, out = tmp_path / "deploy", tmp_path / "run"
    overrides = f"{TINY_RUN_CONFIG} client-timeout=45.0 cache-dir='{tmp_path / 'cache'}' out='{out}'"
    nodes = ['partition-id=0 client-id="owner-a"', 'partition-id=1 client-id="owner-b"']  # ids of their choosing
    proc = subprocess.Popen([str(ROOT / "scripts" / "local-deployment.sh"), "2", "3", overrides, *nodes],
                            env={**os.environ, "FGRPO_DEPLOY_DIR": str(work)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    deadline = time.time() + 200
    while time.time() < deadline and proc.poll() is None:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and any(json.loads(x)["kind"] == "eval" and json.loads(x)["round"] == 1
                                    for x in metrics.read_text().splitlines()):
            break
        time.sleep(0.5)
    pids = [int(p) for p in (work / "pids").read_text().split()]
    os.killpg(pids[2], signal.SIGKILL)  # SuperNode 1 (pids: SuperLink, SuperNode 0, SuperNode 1)
    output, _ = proc.communicate(timeout=420)
    assert proc.returncode == 0, output[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows if r["kind"] == "eval"] == [0, 1, 2, 3]
    per_round = {rnd: sorted(r["client_id"] for r in rows if r["kind"] == "client" and r["round"] == rnd)
                 for rnd in (1, 2, 3)}
    assert per_round[1] == ["owner-a", "owner-b"] and per_round[3] == ["owner-a"]  # both, then the survivor
    assert not any(group_alive(p) for p in pids)


class NodesOnly:
    """The part of a Flower Grid that sampling reads: the connected SuperNodes."""

    def __init__(self, node_ids: list[int]):
        self.ids = node_ids

    def get_node_ids(self) -> list[int]:
        return self.ids


def test_dp_accounting_counts_the_supernodes_when_owners_bring_their_own_data(tmp_path):
    """A ServerApp whose SuperNodes bring their own data holds no client list; its sampling rate for
    privacy accounting is clients per round over the nodes taking part (it divided by zero before)."""
    from opacus.accountants import RDPAccountant

    from fgrpo.aggregation import update_norm
    from fgrpo.config_sources import build_config
    from fgrpo.flower.server_app import FGRPOStrategy
    from fgrpo.host import ModelHost
    from fgrpo.rundir import RunRecorder
    from fgrpo.server import Server

    options = {TINY[i][2:].replace("-", "_"): TINY[i + 1] for i in range(0, len(TINY), 2)}
    cfg = build_config(overrides={**options, "scenario": "user-data", "dp": "server", "dp_noise": 0.9,
                                  "fraction": 0.5, "cache_dir": str(tmp_path / "cache")})
    host = ModelHost(cfg)
    fed = Server(cfg, host.adapter())  # the server side alone: no client list when the owners bring their data
    strategy = FGRPOStrategy(cfg, fed, host, RunRecorder(tmp_path / "run", cfg, fed, host), [], {}, None, None)
    nodes = strategy.participants(1, NodesOnly([11, 12, 13, 14]))
    assert len(nodes) == 2
    updates = [ClientReport(ClientStats(f"owner-{node}", 2, 0.2, 0.5, 0.3, 1.0, 0.4),
                            {k: torch.full_like(v, 1e-3) for k, v in fed.global_adapter.items()}, {}, 1.0)
               for node in nodes]
    rows = fed.finish_round(1, updates)
    server = next(r for r in rows if r["kind"] == "server")
    accountant = RDPAccountant()
    accountant.step(noise_multiplier=0.9, sample_rate=0.5)
    assert server["epsilon"] == pytest.approx(accountant.get_epsilon(cfg.dp_delta), rel=1e-9)
    assert update_norm(fed.global_adapter) > 0


def test_sample_completions_stay_on_the_client_and_never_reach_a_message(tmp_path):
    """What a ClientApp replies (wire.report_content) holds no completion text, while the client's
    completions-dir holds the round's samples."""
    from fgrpo.config_sources import build_config
    from fgrpo.runner import InProcessRun

    options = {TINY[i][2:].replace("-", "_"): TINY[i + 1] for i in range(0, len(TINY), 2)}
    fed = InProcessRun(build_config(overrides={**options, **MOVING, "num_clients": 2, "completion_samples": 3}))
    update = fed.trainer.train(fed.clients[0], 1, fed.server.global_adapter, owner_dir=tmp_path / "node")
    records = [json.loads(line) for line in (tmp_path / "node" / "client-0.jsonl").read_text().splitlines()]
    texts = {c["text"] for r in records for c in r["completions"]}
    prompts = {r["prompt"] for r in records}
    assert len(records) == 3 and len(prompts) == 3
    content = wire.report_content(update)
    sent = [v for record in content.values() if not hasattr(record, "to_torch_state_dict")
            for v in [*record.keys(), *record.values()]]  # every key and value besides the delta's arrays
    assert len(sent) > 10
    assert not any(isinstance(v, str) and v in texts for v in sent)  # no completion as a value
    assert not any(p in str(v) for p in prompts for v in sent)  # no prompt anywhere


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["centralized", "local-only"])
def test_reference_strategies_on_the_flower_simulation_equal_in_process(tmp_path, strategy):
    """The references run on Flower as in-process: centralized trains one pooled client on one SuperNode
    (weight 1), local-only sends each client its own adapter and evaluates each on its own tasks. Before,
    centralized silently ran FedAvg (each of 3 clients weight 1/3) and local-only saved no adapter."""
    cache = tmp_path / "cache"
    common = f"rounds=2 num-clients=3 strategy='{strategy}' cache-dir='{cache}'"
    assert main(["run", *TINY, "--rounds", "2", "--num-clients", "3", "--strategy", strategy,
                 "--cache-dir", str(cache), "--out", str(tmp_path / "in-process")]) == 0
    flower_simulation(tmp_path, f"{TINY_RUN_CONFIG} {common} out='{tmp_path / 'flower'}'", supernodes=3)
    rows = {name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("flower", "in-process")}
    strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in rows]
    assert strip(rows["flower"]) == strip(rows["in-process"])
    clients = [r for r in rows["flower"] if r["kind"] == "client" and r["round"] == 1]
    if strategy == "centralized":
        assert [(r["client_id"], r["weight"]) for r in clients] == [("pooled", 1.0)]
        assert adapters_equal(tmp_path / "flower", tmp_path / "in-process")
    else:
        assert len(clients) == 3 and all(r["weight"] is None for r in clients)
        for k in range(3):  # each client's own adapter, bitwise the in-process one
            assert _same_adapter(tmp_path / "flower" / "adapter" / f"client-{k}",
                                 tmp_path / "in-process" / "adapter" / f"client-{k}")


def _same_adapter(a: Path, b: Path) -> bool:
    ta, tb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_reference_strategies_are_refused_when_owners_bring_their_own_data():
    """centralized and local-only need every owner's prompts or tasks in one place: with the owners' own data
    on Flower (scenario user-data, no data in the run config) the ServerApp refuses before any work, in one line."""
    from fgrpo.checks import check_flower_runtime
    from fgrpo.config import ConfigError
    from fgrpo.config_sources import build_config

    for strategy in ("centralized", "local-only"):
        cfg = build_config(overrides={"strategy": strategy, "scenario": "user-data"})
        with pytest.raises(ConfigError, match=f"strategy = '{strategy}' cannot run on the Flower runtime") as err:
            check_flower_runtime(cfg, owners_bring_data=True)
        assert "\n" not in str(err.value)
        check_flower_runtime(build_config(overrides={"strategy": strategy}), owners_bring_data=False)  # simulation
    check_flower_runtime(build_config(overrides={"scenario": "user-data"}), owners_bring_data=True)  # fgrpo: fine


@pytest.mark.slow
def test_a_lying_supernode_is_screened_on_the_flower_simulation(tmp_path):
    """lying-owner on Flower: the last SuperNode's client sends an ordinary update with a fabricated report
    (10^6 prompts, the largest gain its range allows, spread 0); the server leaves it out of every round."""
    flower_simulation(tmp_path, f"{TINY_RUN_CONFIG} rounds=2 num-clients=2 scenario='lying-owner' "
                                f"cache-dir='{tmp_path / 'cache'}' out='{tmp_path / 'flower'}'", supernodes=2)
    rows = [json.loads(x) for x in (tmp_path / "flower" / "metrics.jsonl").read_text().splitlines()]
    warnings = [r for r in rows if r["kind"] == "warning"]
    assert [(r["round"], r["client_id"]) for r in warnings] == [(1, "client-1"), (2, "client-1")]
    assert all("num_prompts = 1000000" in r["reason"] for r in warnings)
    assert [r["client_id"] for r in rows if r["kind"] == "client"] == ["client-0", "client-0"]
