"""User data: JSONL / Parquet / Hugging Face folders, named rewards, and errors that name the row."""

import json

import pytest

from fgrpo import rewards, tasks, userdata
from fgrpo.cli import main
from fgrpo.config import ConfigError
from fgrpo.rewards import GuardedReward
from fgrpo.tasks import Example, correctness
from tiny import TINY

ROWS = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(5) for b in range(5)]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("bad, message", [
    ('{"prompt": "1+1=" "answer": "2"}', "invalid JSON"),
    ('{"answer": "2"}', "missing field 'prompt'"),
    ('{"prompt": "1+1="}', "missing field 'answer'"),
    ('{"prompt": "  ", "answer": "2"}', "field 'prompt' is empty"),
    ('{"prompt": 12, "answer": "2"}', "field 'prompt' has type int"),
    ('{"prompt": "1+1=", "answer": [2]}', "field 'answer' has type list"),
    ('[1, 2]', "expected a JSON object"),
])
def test_malformed_jsonl_row_names_file_line_and_field(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "owner.jsonl", [ROWS[0], ROWS[1], bad, ROWS[2]])
    with pytest.raises(userdata.DataError) as err:
        userdata.load_rows(path)
    assert f"{path}:3:" in str(err.value) and message in str(err.value)
    loaded = userdata.load_rows(path, skip_bad_rows=True)
    assert len(loaded.rows) == 3 and loaded.skipped == 1 and message in loaded.first_errors[0]


def test_parquet_and_hf_folders_with_custom_columns(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"q": r["prompt"], "a": int(r["answer"])} for r in ROWS]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "owner.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "saved")
    (tmp_path / "plain").mkdir()
    write_jsonl(tmp_path / "plain" / "train.jsonl", rows)
    for source in (tmp_path / "owner.parquet", tmp_path / "saved", tmp_path / "plain"):
        loaded = userdata.load_rows(str(source), "q", "a")
        assert loaded.rows[:2] == [{"prompt": "0+0=", "answer": "0"}, {"prompt": "0+1=", "answer": "1"}]
    with pytest.raises(userdata.DataError, match="has no column 'prompt'; its columns are: q, a"):
        userdata.load_rows(str(tmp_path / "owner.parquet"))
    bad = rows[:3] + [{"q": "", "a": 1}]
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "bad.parquet")
    with pytest.raises(userdata.DataError, match=r"bad.parquet: row 4: field 'q' is empty"):
        userdata.load_rows(str(tmp_path / "bad.parquet"), "q", "a")


def test_named_rewards():
    assert rewards.resolve_reward("exact")("p", "  Hello   World ", "hello world") == 1.0
    assert rewards.resolve_reward("exact")("p", "hello", "hello world") == 0.0
    math = rewards.resolve_reward("math")
    assert math("p", "the answer is $\\frac{1}{2}$", "0.5") == 1.0
    assert math("p", "0.4", "0.5") == 0.0
    rg = rewards.resolve_reward("rg:spell_backward")
    assert rg("p", "olleh", "olleh") == 1.0 and rg("p", "hello", "olleh") < 1.0
    assert rewards.resolve_reward("userdata_helpers:length_match")("p", "abc", "xyz") == 1.0
    with pytest.raises(ConfigError, match="cannot be imported"):
        rewards.resolve_reward("no_such_module:f")
    with pytest.raises(ConfigError, match="not known"):
        rewards.resolve_reward("fuzzy")


def test_failing_reward_scores_zero_and_is_counted():
    def flaky(prompt, completion, answer):
        return 1 / 0 if completion == "boom" else (float("nan") if completion == "nan" else 1.0)

    reward = GuardedReward(rewards.OwnerReward("flaky", flaky))
    example = Example("owner", "p", "a", {})
    assert [reward(example, c) for c in ("ok", "boom", "nan", "ok")] == [1.0, 0.0, 0.0, 1.0]
    assert reward.take_failures() == (2, 4) and reward.take_failures() == (0, 0)


def test_two_owners_run_end_to_end_with_their_own_verifiers(tmp_path, capsys):
    arith = write_jsonl(tmp_path / "arith.jsonl", ROWS)
    words = write_jsonl(tmp_path / "words.jsonl", [{"prompt": f"rev:{w}=", "answer": w[::-1]}
                                                    for w in ["cat", "dog", "sun", "map", "pen", "cup"] * 4])
    out = tmp_path / "run"
    args = ["run", *TINY, "--rounds", "1", "--data", f"{arith},{words}",
            "--rewards", "math,userdata_helpers:always_fails",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    clients = {r["client_id"]: r for r in rows if r["kind"] == "client"}
    assert set(clients) == {"arith", "words"}
    assert clients["arith"]["reward_failures"] == 0.0 and clients["words"]["reward_failures"] == 1.0
    assert "failed on every sample" in " ".join(capsys.readouterr().err.split())
    evals = [r for r in rows if r["kind"] == "eval"]
    assert set(k for k in evals[-1] if k.startswith("accuracy/")) == {"accuracy/arith", "accuracy/words"}
    # held-out rows: a fixed 20% of each file, never trained on
    # each owner's held-out rows carry its verifier (no global registry): correctness scores them with it
    held_out = userdata.load_owner(str(arith), "math", "prompt", "answer", False, 4).test[0]
    assert correctness(held_out, held_out.answer) == 1.0 and correctness(held_out, "no answer") == 0.0


def test_data_option_errors(tmp_path):
    assert main(["run", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "r")]) == 2
    assert main(["run", "--data", "x.jsonl", "--scenario", "task-skew", "--out", str(tmp_path / "r")]) == 2


def test_weighted_reward_functions_combine_and_are_logged_each():
    def broken_format(example, completion):
        raise ValueError("format checker down")

    example = Example("t", "q", "abc", {}, rewards.exact_match)
    reward = GuardedReward(rewards.OwnerReward("exact", rewards.exact_match),
                           (("format", rewards.format_reward, 0.5), ("broken", broken_format, 2.0)))
    assert reward(example, "abc") == 1.0 + 0.5 * 1.0 + 0.0  # verifier + 0.5 x format; a failing part scores 0
    assert reward(example, "abc.") == 0.0 + 0.5 * 0.0
    assert reward(example, "xyz") == 0.0 + 0.5 * 1.0
    assert reward.take_components() == {"reward/verifier": 1 / 3, "reward/format": 2 / 3, "reward/broken": 0.0}
    assert reward.take_components() == {} and reward.failures == 0  # reset; only the verifier's failures count


def test_conversational_rows_keep_their_messages(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "Reply in digits."},
                          {"role": "user", "content": f"What is {a} + {b}?"}], "answer": str(a + b)}
            for a in range(5) for b in range(5)]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    owner = userdata.load_owner(path, "exact", "prompt", "answer", False, 5)
    example = owner.train[0]
    assert example.prompt.startswith("What is") and example.messages[0] == ("system", "Reply in digits.")
    assert tasks.as_chat(example, "Default.").messages == example.messages  # its own system message stays
    assert owner.reward(example, f"Adding.\nAnswer: {example.answer}") == 1.0  # exact reads the marked answer
    assert owner.reward(example, f"{example.answer}.") == 0.0  # an unmarked answer must be exact


@pytest.mark.parametrize("bad, message", [
    ('{"messages": [], "answer": "2"}', "field 'messages' must be a non-empty list"),
    ('{"messages": [{"role": "robot", "content": "hi"}], "answer": "2"}', "'messages'[0] needs a role"),
    ('{"messages": [{"role": "user", "content": ""}], "answer": "2"}', "'messages'[0] needs a non-empty string"),
    ('{"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}], "answer": "2"}',
     "must end with a user message"),
])
def test_malformed_messages_name_the_line_and_the_problem(tmp_path, bad, message):
    good = {"messages": [{"role": "user", "content": "1+1"}], "answer": "2"}
    path = write_jsonl(tmp_path / "chat.jsonl", [good, bad])
    with pytest.raises(userdata.DataError) as err:
        userdata.load_rows(path)
    assert f"{path}:2: " in str(err.value) and message in str(err.value)


def test_rows_keep_their_other_columns_for_trl_reward_functions(tmp_path):
    rows = [{"prompt": f"{a}+1=", "answer": a + 1, "level": a % 2, "source": "gen"} for a in range(10)]
    path = write_jsonl(tmp_path / "columns.jsonl", rows)
    assert userdata.load_rows(path).rows[0] == {"prompt": "0+1=", "answer": "1",
                                                "columns": {"level": 0, "source": "gen"}}
    owner = userdata.load_owner(path, "exact", "prompt", "answer", False, 2)
    example = owner.train[0]
    level = int(example.answer) - 1
    assert example.columns == {"prompt": example.prompt, "answer": example.answer, "level": level % 2,
                               "source": "gen"}  # the row as TRL's reward functions see it, never sent anywhere
    assert isinstance(owner.reward, rewards.OwnerReward)
    assert owner.reward.judge(example, example.answer) == (1.0, 1.0, None)  # reward and correctness, one call
    assert correctness(owner.test[0], owner.test[0].answer) == 1.0  # a held-out row, judged by the owner's verifier


def test_conversational_rows_run_on_the_compact_embedded_model(tmp_path):
    """The embedded model has no chat template: an owner's conversations are read as their last user message
    (they crashed in evaluation before)."""
    path = tmp_path / "chats.jsonl"
    words = ("soap", "neon", "lamp", "desk", "rock", "tree", "milk", "bird", "wolf", "cake")
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"rev:{w}="}],
             "answer": w[::-1]} for w in words]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert main(["run", *TINY, "--rounds", "1", "--data", str(path), "--cache-dir", str(tmp_path / "cache"),
                 "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["rounds"] == 1
