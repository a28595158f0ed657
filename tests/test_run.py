"""`fgrpo run` end to end on tiny settings, the run directory, the model cache, and bad input."""

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fgrpo.cli import main
from fgrpo.config import config_fields
from fgrpo.config_sources import build_config
from fgrpo.model import build_tiny_model, char_tokenizer, embedded_model_path
from fgrpo.tasks import DEFAULT_TASKS
from tiny import MOVING_ARGS
from tiny import TINY as TINY_ARGS

TINY = ["--rounds", "2", *TINY_ARGS]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    out = root / "run"
    assert main(["run", *TINY, "--cache-dir", str(root / "cache"), "--out", str(out)]) == 0
    return out


def test_run_directory_contents(run_dir):
    for name in ("config.toml", "metrics.jsonl", "summary.json", "adapter/adapter_config.json",
                 "plots/accuracy.png"):
        assert (run_dir / name).exists(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("strategy", "scenario", "seed", "rounds", "model", "initial_macro_accuracy",
                "final_macro_accuracy", "final_worst_task_accuracy", "per_task_accuracy",
                "wall_seconds", "adapter_path"):
        assert key in summary, key
    assert summary["strategy"] == "fgrpo" and summary["scenario"] == "scale-skew"
    assert list(summary["per_task_accuracy"]) == list(DEFAULT_TASKS)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("round" in r for r in rows)
    assert [r["round"] for r in rows if r["kind"] == "eval"] == [0, 1, 2]
    clients = [r for r in rows if r["kind"] == "client"]
    assert len(clients) == 8 and abs(sum(r["weight"] for r in clients if r["round"] == 1) - 1) < 1e-9
    resolved = build_config(run_dir / "config.toml")  # the resolved config reads back as it was
    assert resolved.rounds == 2 and resolved.warm_start_steps == 2 and resolved.out == str(run_dir)


def test_saved_adapter_loads_with_peft(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base, summary["adapter_path"])
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    loaded = get_peft_model_state_dict(model)
    assert saved.keys() == loaded.keys()
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # training moved B
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_embedded_model_is_cached_and_deterministic(tmp_path):
    a = embedded_model_path(3, str(tmp_path / "a"))
    mtime = (a / "config.json").stat().st_mtime_ns
    assert embedded_model_path(3, str(tmp_path / "a")) == a
    assert (a / "config.json").stat().st_mtime_ns == mtime  # reused, not rebuilt
    b = embedded_model_path(3, str(tmp_path / "b"))
    wa = load_file(a / "model.safetensors")
    wb = load_file(b / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_run_with_local_model_folder(tmp_path):
    folder = tmp_path / "my-model"
    tokenizer = char_tokenizer()
    build_tiny_model(tokenizer, seed=3).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "out"
    assert main(["run", *TINY, "--rounds", "1", "--model", str(folder), "--out", str(out),
                 "--strategy", "fedavg", "--scenario", "task-skew"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == str(folder) and summary["strategy"] == "fedavg"


def test_help_lists_every_option_and_default(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in config_fields():
        assert "--" + f.name.replace("_", "-") in text
    assert "(default: 'fgrpo')" in text


@pytest.mark.parametrize("args, needle", [
    (["--strategy", "fedmagic"], "strategy = 'fedmagic' is not valid; choose one of: fgrpo, fedavg, uniform"),
    (["--scenario", "iid"], "scenario = 'iid' is not valid"),
    (["--model", "/no/such/folder"], "model = '/no/such/folder': no such folder"),
    (["--tasks", "spell_backward,letter_countin"], "tasks: 'letter_countin' is not a reasoning-gym dataset (did "
                                                   "you mean letter_counting"),
    (["--tasks", "basic_arithmetic:max_term=2"], "basic_arithmetic has no setting 'max_term'; valid: min_terms"),
    (["--model", "/no/such/model.gguf"], "model = '/no/such/model.gguf': no such GGUF file"),
    (["--prompt-style", "chat"], "prompt_style = 'chat' but model = 'embedded' has no chat template"),
    (["--fraction", "1.5"], "fraction = 1.5 is out of range; valid: 0 < fraction <= 1"),
    (["--uniform-mix", "-0.1"], "uniform_mix = -0.1 is out of range"),
    (["--tau", "0"], "tau = 0.0 is out of range; valid: > 0"),
    (["--rounds", "two"], "rounds = 'two' has the wrong type; expected int"),
])
def test_bad_values_exit_2_with_one_line(capsys, args, needle):
    assert main(["run", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_unknown_config_key_names_closest(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("rounds = 3\nlocal_step = 2\n")
    assert main(["run", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'local_step'" in err and "did you mean 'local_steps'" in err
    assert str(cfg) in err


def test_cli_subprocess_error_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "fgrpo.cli", "run", "--strategy", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "strategy = 'nope'" in proc.stderr


def test_folder_without_a_model_fails_before_any_output(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    assert main(["run", "--model", str(empty), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"model = '{empty}' could not be loaded" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_fraction_samples_clients(tmp_path):
    out = tmp_path / "out"
    assert main(["run", *TINY, "--rounds", "2", "--fraction", "0.5", "--cache-dir", str(tmp_path / "c"),
                 "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    per_round = [[r["client_id"] for r in rows if r["kind"] == "client" and r["round"] == k] for k in (1, 2)]
    assert [len(ids) for ids in per_round] == [2, 2]


@pytest.mark.parametrize("strategy", ["centralized", "local-only"])
def test_reference_strategies_run_on_every_clients_data(tmp_path, strategy):
    """centralized: one pooled client trains on all clients' prompts (each scored by its owner's verifier);
    local-only: each client keeps its own adapter."""
    out = tmp_path / "out"
    assert main(["run", *TINY, "--rounds", "1", "--strategy", strategy, "--cache-dir", str(tmp_path / "c"),
                 "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    clients = [r["client_id"] for r in rows if r["kind"] == "client"]
    assert clients == (["pooled"] if strategy == "centralized" else [f"client-{k}" for k in range(4)])
    assert json.loads((out / "summary.json").read_text())["strategy"] == strategy


def test_eval_reproduces_the_runs_final_accuracy(run_dir, capsys):
    summary = json.loads((run_dir / "summary.json").read_text())
    from fgrpo.commands import evaluate_saved

    accuracy = evaluate_saved(str(run_dir / "adapter"), {})["accuracy"]
    assert accuracy == summary["per_task_accuracy"]
    assert main(["eval", "--adapter", str(run_dir / "adapter")]) == 0
    out = capsys.readouterr().out
    assert "macro" in out and all(task in out for task in summary["per_task_accuracy"])


def test_eval_of_a_folder_without_adapter_exits_2(tmp_path, capsys):
    assert main(["eval", "--adapter", str(tmp_path)]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err


def test_a_finished_run_directory_is_not_overwritten(run_dir, capsys):
    before = (run_dir / "metrics.jsonl").read_text()
    assert main(["run", *TINY, "--out", str(run_dir)]) == 2
    assert "already holds a run; continue it with --resume" in capsys.readouterr().err
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_ffa_keeps_lora_a_frozen_and_aggregation_exact(tmp_path):
    out = tmp_path / "run"
    assert main(["run", *TINY, *MOVING_ARGS, "--rounds", "2", "--lora-aggregation", "ffa", "--checkpoint-keep", "5",
                 "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    server = [r for r in rows if r["kind"] == "server"]
    assert len(server) == 2 and all(r["lora_product_error"] < 1e-9 for r in server)
    assert all(r["pseudo_gradient_norm"] > 0 for r in server)
    start = load_file(out / "checkpoints" / "round-0000" / "tensors.safetensors")
    final = load_file(out / "checkpoints" / "round-0002" / "tensors.safetensors")
    assert all(torch.equal(final[k], start[k]) == ("lora_A" in k) for k in start)  # only B moved


def test_report_rebuilds_summary_and_plot_from_metrics_alone(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *TINY, "--rounds", "2", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]) == 0
    original = json.loads((out / "summary.json").read_text())
    (out / "summary.json").unlink()
    (out / "plots" / "accuracy.png").unlink()
    # a finished run's metrics with a changed final row: the report must follow metrics.jsonl
    lines = (out / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    last["macro_accuracy"], last[f"accuracy/{DEFAULT_TASKS[0]}"] = 0.625, 0.875
    (out / "metrics.jsonl").write_text("\n".join([*lines[:-1], json.dumps(last)]) + "\n")
    assert main(["report", str(out)]) == 0
    rebuilt = json.loads((out / "summary.json").read_text())
    assert (out / "plots" / "accuracy.png").stat().st_size > 0
    assert rebuilt["final_macro_accuracy"] == 0.625 and rebuilt["per_task_accuracy"][DEFAULT_TASKS[0]] == 0.875
    same = {k for k in original if k not in ("final_macro_accuracy", "per_task_accuracy", "wall_seconds")}
    assert {k: rebuilt[k] for k in same} == {k: original[k] for k in same}
    assert main(["report", str(tmp_path)]) == 2


def test_sgd_local_optimizer_trains_the_adapter():
    from fgrpo.runner import InProcessRun
    from tiny import MOVING

    options = {TINY_ARGS[i][2:].replace("-", "_"): TINY_ARGS[i + 1] for i in range(0, len(TINY_ARGS), 2)}
    fed = InProcessRun(build_config(overrides={**options, **MOVING, "num_clients": 2,
                                                      "local_optimizer": "sgd", "lr": 0.5}))
    assert isinstance(fed.trainer.optimizer, torch.optim.SGD) and fed.trainer.optimizer.defaults["momentum"] == 0.9
    before = {k: v.clone() for k, v in fed.global_adapter.items()}
    rows = fed.run_round(1)
    assert any(r["kind"] == "client" and r["update_norm"] > 0 for r in rows)
    assert any(not torch.equal(before[k], v) for k, v in fed.global_adapter.items())


def test_truncated_completions_are_counted_and_warned_about(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *TINY, "--max-new-tokens", "1", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    clients = [r for r in rows if r["kind"] == "client"]
    assert all(r["truncated_fraction"] > 0.5 and r["entropy"] >= 0 for r in clients)
    assert "completions were cut at max_new_tokens = 1" in " ".join(capsys.readouterr().err.split())


def test_tensorboard_events_hold_the_macro_accuracy_series(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(["run", *TINY, "--tensorboard", "true", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    series = [(e.step, e.value) for e in events.Scalars("eval/macro_accuracy")]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    expected = [(r["round"], r["macro_accuracy"]) for r in rows if r["kind"] == "eval"]
    assert [s for s, _ in series] == [s for s, _ in expected] == [0, 1, 2]
    assert [v for _, v in series] == pytest.approx([v for _, v in expected], abs=1e-6)
    assert "client/client-0/reward_end" in events.Tags()["scalars"]


def test_clients_keep_sample_completions_and_fgrpo_completions_shows_them(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *TINY, "--completion-samples", "2", "--cache-dir", str(tmp_path / "cache"),
                 "--out", str(out)]) == 0
    for client in ("client-0", "client-1", "client-2", "client-3"):
        records = [json.loads(line) for line in (out / "completions" / f"{client}.jsonl").read_text().splitlines()]
        assert [r["round"] for r in records] == [1, 1, 2, 2]  # 2 prompts per round, 2 rounds
        assert all(len(r["completions"]) == 2 and {"text", "reward", "advantage"} <= set(r["completions"][0])
                   for r in records)
    capsys.readouterr()
    assert main(["completions", str(out), "--round", "2", "--client", "client-1"]) == 0
    shown = capsys.readouterr().out
    assert "client-1" in shown and "client-0" not in shown
    kept = out / "completions" / "client-0.jsonl"
    with open(kept, "a") as fh:  # as if a crash hit round 3 after the client wrote its samples
        fh.write(json.dumps({"round": 3, "client_id": "client-0", "prompt": "p", "answer": "a", "completions": []})
                 + "\n")
    assert main(["run", "--resume", str(out), "--rounds", "3"]) == 0
    assert [json.loads(line)["round"] for line in kept.read_text().splitlines()] == [1, 1, 2, 2, 3, 3]


def test_run_preset_supplies_the_run_table_and_options_win(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "--preset", "tiny", "--rounds", "1", "--cache-dir", str(tmp_path / "cache"),
                 "--out", str(out)]) == 0
    resolved = build_config(out / "config.toml")
    assert resolved.rounds == 1 and resolved.local_steps == 1 and resolved.group_size == 2  # option, preset
    assert resolved.scenario == "scale-skew"  # the preset's first scenario


def test_pass_at_k_near_zero_temperature_is_greedy_accuracy():
    from fgrpo.evaluation import evaluate, pass_at_k
    from fgrpo.model import load_base
    from fgrpo.tasks import test_split
    from tiny import MOVING

    base, tokenizer = load_base("embedded", torch.device("cpu"), MOVING["warm_start_steps"], MOVING["cache_dir"])
    test_sets = {t: test_split(t, 24) for t in DEFAULT_TASKS}
    greedy = evaluate(base, tokenizer, test_sets, 8).exact
    assert pass_at_k(base, tokenizer, test_sets, 2, 8, temperature=1e-4) == greedy
    assert sum(pass_at_k(base, tokenizer, test_sets, 4, 8, temperature=1.0).values()) > 0


def test_a_file_that_is_not_gguf_is_one_line_and_leaves_no_cache(tmp_path, capsys):
    junk = tmp_path / "model.gguf"
    junk.write_bytes(b"not a model at all")
    assert main(["run", "--model", str(junk), "--cache-dir", str(tmp_path / "cache"), "--out",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"model = '{junk}': not a GGUF file transformers can load" in err and len(err.splitlines()) == 1
    assert not any((tmp_path / "cache").glob("gguf-*")) and not (tmp_path / "out").exists()
