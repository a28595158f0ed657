"""A TRL user's reward functions run unchanged: called per batch as TRL's GRPOTrainer calls them, with
weights, None for "not applicable", log_extra / log_metric / trainer_state, and reward workers."""

import json
import shutil
import sys
import threading
import time

import pytest

from fgrpo import rewards, userdata
from fgrpo.cli import main
from fgrpo.config import ConfigError
from fgrpo.model import embedded_model_path
from fgrpo.rewards import GuardedReward, owner_reward
from fgrpo.tasks import Example, correctness
from fgrpo.trl_rewards import BatchReward, RewardState, RewardTerm, is_batch_function
from tiny import TINY

trl_rewards = pytest.importorskip("trl.rewards")

USER_MODULE = '''
def length_reward(completions, lengths, trainer_state, log_extra=None, log_metric=None, **kwargs):
    """A user's TRL reward function on conversational data: None where the row's "lengths" is 0."""
    contents = [c[0]["content"] for c in completions]
    if log_extra is not None:
        log_extra("round", [trainer_state.round] * len(contents))
        log_extra("step", [trainer_state.global_step] * len(contents))
        log_extra("chars", [len(c) for c in contents])
    if log_metric is not None:
        log_metric("mean_chars", sum(len(c) for c in contents) / len(contents))
    return [None if n == 0 else (len(c) % 3) / 2 for c, n in zip(contents, lengths)]


def first(completions, **kwargs):
    return [{"a": 1.0, "b": None, "c": 0.5}.get(c, 0.0) for c in completions]


def second(completions, **kwargs):
    return [{"a": None, "b": None, "c": 1.0}.get(c, 2.0) for c in completions]


def seen(prompts, completions, completion_ids, **kwargs):
    SEEN.append({"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **kwargs})
    return [1.0] * len(completions)


SEEN = []
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_trl_rewards.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_trl_rewards", None)
    yield __import__("my_trl_rewards")
    sys.modules.pop("my_trl_rewards", None)


def chat_model(tmp_path) -> str:
    """The tiny test model (TINY's 2 warm-start steps) with a chat template, so that conversations reach it."""
    folder = tmp_path / "chat-model"
    shutil.copytree(embedded_model_path(2, str(tmp_path / "cache")), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return str(folder)


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_trl_functions_run_end_to_end_as_trl_calls_them(tmp_path, user_module, capsys):
    # an owner with TRL's accuracy_reward (its data: prompts and a LaTeX "solution"; "x" is unparseable: None)
    maths = write_jsonl(tmp_path / "maths.jsonl", [
        {"messages": [{"role": "user", "content": f"{a}+{b}="}], "solution": f"${a + b}$" if a else "x"}
        for a in range(5) for b in range(5)])
    # and one with a TRL function of its own, on conversations with a column of their own
    chat = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": f"rev:{w}="}], "solution": w[::-1], "lengths": k % 3}
        for k, w in enumerate(["cat", "dog", "sun", "map", "pen", "cup"] * 4)])
    out = tmp_path / "run"
    args = ["run", *TINY, "--rounds", "1", "--model", chat_model(tmp_path), "--system-prompt", "",
            "--data", f"{maths},{chat}", "--answer-column", "solution", "--completion-samples", "2",
            "--rewards", "trl:accuracy_reward+0.5*trl:think_format_reward,my_trl_rewards:length_reward",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    assert main(args) == 0
    rows = {json.loads(line)["messages"][0]["content"]: json.loads(line)
            for path in (maths, chat) for line in open(path)}
    for owner in ("maths", "chat"):
        for record in map(json.loads, (out / "completions" / f"{owner}.jsonl").read_text().splitlines()):
            row = rows[record["prompt"]]
            texts = [c["text"] for c in record["completions"]]
            completions = [[{"role": "assistant", "content": t}] for t in texts]  # conversational, as TRL passes them
            columns = {k: [v] * len(texts) for k, v in row.items() if k != "messages"}
            kwargs = {"prompts": [row["messages"]] * len(texts), "completions": completions, **columns}
            if owner == "maths":
                parts = [trl_rewards.accuracy_reward(**kwargs), trl_rewards.think_format_reward(**kwargs)]
                expected = [sum(w * v for w, v in zip((1.0, 0.5), values) if v is not None) for values in zip(*parts)]
                for c, accuracy in zip(record["completions"], parts[0]):
                    got = c["extra"]["reward/accuracy_reward"]
                    assert got == accuracy  # None: the gold solution is not parseable
                    assert c["extra"]["solution"] == row["solution"] and "answer_parsed" in c["extra"]  # log_extra
            else:
                state = RewardState(round=1, global_step=0)
                values = user_module.length_reward(**kwargs, trainer_state=state)
                expected = [0.0 if v is None else v for v in values]  # one function: None alone sums to 0
                assert [c["extra"]["round"] for c in record["completions"]] == [1] * len(texts)
                assert [c["extra"]["step"] for c in record["completions"]] == [0] * len(texts)
                assert record["reward_metrics"]["mean_chars"] >= 0  # log_metric: kept with the samples
            assert [c["reward"] for c in record["completions"]] == pytest.approx(expected, abs=1e-6)
    clients = {r["client_id"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
               if r["kind"] == "client"}
    kept = {row["client_id"]: row for path in (out / "completions").glob("*.log.jsonl")
            for row in map(json.loads, path.read_text().splitlines())}  # the owners' own logs
    assert {"reward/accuracy_reward", "reward/think_format_reward"} <= set(kept["maths"])
    assert not any("mean_chars" in k for k in clients["chat"])  # logged metrics are not sent to the server
    assert clients["maths"]["reward_failures"] == 0.0 and clients["chat"]["reward_failures"] == 0.0
    capsys.readouterr()
    assert main(["completions", str(out), "--client", "chat"]) == 0
    shown = capsys.readouterr().out
    assert "extra" in shown and "mean_chars" in shown


def test_signature_detection(user_module):
    def verifier(prompt, completion, answer):
        return 1.0

    def verifier_with_options(prompt, completion, answer, **options):
        return 1.0

    def only_kwargs(**kwargs):
        return []

    assert is_batch_function(trl_rewards.accuracy_reward) and is_batch_function(trl_rewards.think_format_reward)
    assert is_batch_function(trl_rewards.get_soft_overlong_punishment(8, 2))  # (completion_ids, **kwargs)
    assert is_batch_function(user_module.seen) and is_batch_function(only_kwargs)
    assert not is_batch_function(verifier) and not is_batch_function(verifier_with_options)
    assert not is_batch_function(rewards.exact_match) and not is_batch_function(len)
    assert isinstance(owner_reward("exact"), rewards.OwnerReward)  # the (prompt, completion, answer) form stays
    assert isinstance(owner_reward("my_trl_rewards:first"), BatchReward)
    assert isinstance(owner_reward("0.5*exact"), BatchReward)


def test_none_and_weights_as_trl(user_module):
    """r = nansum_j w_j r_j (None: NaN); each function's logged mean is over the samples it applied to."""
    reward = GuardedReward(owner_reward("my_trl_rewards:first+0.5*my_trl_rewards:second"))
    examples = [Example("owner", "p", "a", {}, columns={"prompt": "p"})] * 4
    scores = reward.score_batch(examples, ["a", "b", "c", "d"], [[1], [2], [3], [4]], 0)
    assert scores.rewards == [1.0, 0.0, 0.5 + 0.5 * 1.0, 0.0 + 0.5 * 2.0]
    assert scores.correct == [1.0, 0.0, 0.5, 0.0]  # the first function's reward (None, not applicable: 0)
    assert reward.take_components() == {"reward/first": (1.0 + 0.5 + 0.0) / 3, "reward/second": (1.0 + 2.0) / 2}
    assert reward.take_failures() == (0, 4)
    with pytest.raises(ConfigError, match="is not NAME or WEIGHT"):
        owner_reward("exact+")
    with pytest.raises(ConfigError, match="is not NAME or WEIGHT"):
        owner_reward("0.5 exact")


def test_kwargs_are_trls(user_module):
    """prompts, completions (text, or messages for conversations), completion_ids, every column, trainer_state."""
    reward = GuardedReward(owner_reward("my_trl_rewards:seen+trl:think_format_reward"))
    reward.begin_round(3)
    plain = Example("o", "2+2=", "4", {}, columns={"prompt": "2+2=", "answer": "4", "level": 1})
    chat = Example("o", "hi", "4", {}, messages=(("user", "hi"),),
                   columns={"prompt": [{"role": "user", "content": "hi"}], "answer": "4", "level": 2})
    user_module.SEEN.clear()
    reward.score_batch([plain, chat], ["4", "<think>x</think>4"], [[5, 2], [6, 7, 2]], 2)
    (seen,) = user_module.SEEN
    assert seen["prompts"] == ["2+2=", [{"role": "user", "content": "hi"}]]
    assert seen["completions"] == ["4", [{"role": "assistant", "content": "<think>x</think>4"}]]
    assert seen["completion_ids"] == [[5, 2], [6, 7, 2]]
    assert seen["answer"] == ["4", "4"] and seen["level"] == [1, 2]
    assert (seen["trainer_state"].round, seen["trainer_state"].global_step) == (3, 2)
    assert callable(seen["log_extra"]) and callable(seen["log_metric"])


def test_raising_and_hanging_verifiers_under_workers_score_zero_and_are_counted():
    release = threading.Event()

    def verifier(prompt, completion, answer):
        if completion == "boom":
            raise RuntimeError("verifier service unreachable")
        if completion == "hang":
            release.wait(30)
        return 1.0

    for owner in (rewards.OwnerReward("slow", verifier),  # one (prompt, completion, answer) verifier
                  BatchReward("slow", [RewardTerm("slow", verifier)])):
        example = Example("owner", "p", "a", {}, columns={"prompt": "p"})
        reward = GuardedReward(owner)
        reward.begin_round(1, workers=2, timeout=0.5)
        start = time.monotonic()
        scores = reward.score_batch([example] * 5, ["ok", "boom", "hang", "ok", "hang"], [[]] * 5, 0)
        assert scores.rewards == [1.0, 0.0, 0.0, 1.0, 0.0] and time.monotonic() - start < 5
        assert reward.take_failures() == (3, 5) and "timed out" in reward.last_error
        # training's accuracy comes with the rewards, from the same calls: a failed or hanging sample is not correct
        assert scores.correct == [1.0, 0.0, 0.0, 1.0, 0.0]
    release.set()


def test_a_raising_batch_costs_only_its_bad_samples(user_module):
    calls = []

    def picky(completions, **kwargs):
        calls.append(len(completions))
        if "boom" in completions:
            raise ValueError("cannot score boom")
        return [1.0] * len(completions)

    reward = GuardedReward(BatchReward("picky", [RewardTerm("picky", picky, batch=True)]))
    example = Example("owner", "p", "a", {}, columns={"prompt": "p"})
    assert reward.score_batch([example] * 3, ["a", "boom", "c"], [[1]] * 3, 0).rewards == [1.0, 0.0, 1.0]
    assert calls == [3, 1, 1, 1] and reward.take_failures() == (1, 3)  # the batch, then sample by sample


def test_trl_missing_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)
    monkeypatch.setitem(sys.modules, "trl.rewards", None)
    with pytest.raises(ConfigError) as err:
        owner_reward("trl:accuracy_reward+0.5*trl:think_format_reward")
    assert "\n" not in str(err.value) and "needs TRL" in str(err.value) and "pip install trl" in str(err.value)


def test_trl_names(tmp_path):
    with pytest.raises(ConfigError, match="TRL has no reward function 'no_such_reward'"):
        owner_reward("trl:no_such_reward")
    with pytest.raises(ConfigError, match="module of your own"):
        owner_reward("trl:get_soft_overlong_punishment")
    rows = [{"messages": [{"role": "user", "content": f"{a}+1="}], "solution": f"${a + 1}$", "topic": "sums"}
            for a in range(10)]
    owner = userdata.load_owner(write_jsonl(tmp_path / "sums.jsonl", rows),
                                "trl:accuracy_reward+0.5*trl:think_format_reward", "prompt", "solution", False, 4)
    example = owner.test[0]
    messages = [{"role": "user", "content": example.prompt}]
    assert example.columns == {"prompt": messages, "solution": example.answer, "topic": "sums"}
    # held-out accuracy: the first function, on the row as TRL passes it (a conversation: messages), the judge the
    # held-out row carries; a training row carries none (its correctness comes with its reward)
    assert owner.reward.terms[0].function is trl_rewards.accuracy_reward
    right = f"\\boxed{{{example.answer.strip('$')}}}"
    assert correctness(example, right) == 1.0 and correctness(example, "no") == 0.0
    assert all(e.verifier is None for e in owner.train) and all(e.verifier is not None for e in owner.test)
    assert owner.reward.judge(owner.train[0], "no") == (0.0, 0.0, None)
