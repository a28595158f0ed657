"""Tasks: splits disjoint and seeded, compact prompts scored by reasoning-gym, reward scales."""

import pytest

from fgrpo import rewards, scenarios, tasks
from fgrpo.tasks import Example


@pytest.mark.parametrize("task", sorted(tasks.TASKS))
def test_splits_disjoint_and_seeded(task):
    test = tasks.test_split(task)
    assert len({e.prompt for e in test}) == len(test) == tasks.TEST_SPLIT_SIZE
    train = tasks.train_split(task, 300, seed=0)
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    assert [e.prompt for e in tasks.train_split(task, 300, seed=0)] == [e.prompt for e in train]
    assert [e.prompt for e in tasks.train_split(task, 300, seed=1)] != [e.prompt for e in train]
    assert tasks.test_split(task, 10) == test[:10]


@pytest.mark.parametrize("task", sorted(tasks.TASKS))
def test_gold_answer_scores_one_and_garbage_scores_below(task):
    for ex in tasks.test_split(task, 20):
        assert tasks.correctness(ex, ex.answer) == 1.0
        assert tasks.correctness(ex, "zz") < 1.0


@pytest.mark.parametrize("task", tasks.DEFAULT_TASKS)
def test_common_mistakes_are_wrong_answers_in_the_gold_answers_form(task):
    """The embedded model's public corpus mixes in each family's common wrong procedure: its answers
    look like gold answers (their characters) and reasoning-gym's scorer counts them wrong where they differ."""
    examples = tasks.test_split(task, 100)
    mistakes = [tasks.TASKS[task].mistake(ex.entry) for ex in examples]
    differ = [(ex, m) for ex, m in zip(examples, mistakes) if m != ex.answer]
    assert len(differ) >= 30
    assert all(tasks.correctness(ex, m) < 1.0 for ex, m in differ)
    assert all(m and set(m) <= set(ex.answer + "0123456789,") for ex, m in zip(examples, mistakes))


def test_reward_scales():
    ex = tasks.test_split("spell_backward", 1)[0]
    wrong = ex.answer[:-1] + ("a" if ex.answer[-1] != "a" else "b")
    s = rewards.REWARD_SCALES
    assert s["x1"](ex, ex.answer) == 1.0 and s["x10"](ex, ex.answer) == 10.0
    assert s["signed"](ex, ex.answer) == 1.0 and s["signed"](ex, wrong) == -1.0
    assert 0.0 < s["partial"](ex, wrong) < 1.0 and s["partial"](ex, ex.answer) == 1.0


def test_scenarios():
    clients = scenarios.build_scenario("scale-skew", 4, 20, seed=0)
    n = len(tasks.DEFAULT_TASKS)
    assert [c.task for c in clients] == [tasks.DEFAULT_TASKS[k % n] for k in range(4)]
    assert scenarios.scenario_tasks(clients) == list(tasks.DEFAULT_TASKS)
    assert [c.reward.name for c in clients] == ["x1", "x10", "partial", "signed"]
    assert {c.reward.name for c in scenarios.build_scenario("task-skew", 4, 20, seed=0)} == {"x1"}
    with pytest.raises(ValueError):
        scenarios.build_scenario("nope", 4, 20, seed=0)


def test_config_default_tasks_are_the_default_families():
    from fgrpo.config import RunConfig

    assert RunConfig().task_list == tasks.DEFAULT_TASKS


def test_difficulty_skew_gives_each_client_one_level_of_one_family():
    clients = scenarios.build_scenario("difficulty-skew", 4, 30, seed=0)
    assert [c.task for c in clients] == ["spell_backward@1", "spell_backward@2", "spell_backward@3",
                                         "spell_backward@1"]
    lengths = {c.task: {len(e.answer) for e in c.train} for c in clients}
    assert max(lengths["spell_backward@1"]) <= 4 < min(lengths["spell_backward@2"])
    assert max(lengths["spell_backward@2"]) <= 6 < min(lengths["spell_backward@3"])
    with pytest.raises(ValueError, match="no difficulty levels"):
        scenarios.build_scenario("difficulty-skew", 2, 10, seed=0, tasks=("gsm_symbolic",))


def test_difficulty_skew_on_a_reasoning_gym_curriculum_keeps_the_overrides():
    spec = "basic_arithmetic:operators=('+', '*')"
    assert tasks.split_tasks(f"{spec},chain_sum") == [spec, "chain_sum"]
    clients = scenarios.build_scenario("difficulty-skew", 3, 20, seed=0, tasks=(spec,))
    assert [c.task for c in clients] == [f"basic_arithmetic@{k}:operators=('+', '*')" for k in (1, 2, 3)]
    terms = [max(e.prompt.count(" ") for e in c.train) for c in clients]  # more terms: more spaces
    assert terms[0] < terms[2]
    assert not any("/" in e.prompt for c in clients for e in c.train)  # the override holds at every level


def dominant_share(clients):
    shares = []
    for c in clients:
        counts = [sum(e.task == t for e in c.train) for t in tasks.DEFAULT_TASKS]
        shares.append(max(counts) / len(c.train))
    return sum(shares) / len(shares)


def test_dirichlet_partitions_one_pool_and_alpha_controls_skew():
    skewed = scenarios.build_scenario("dirichlet", 4, 150, seed=0, dirichlet_alpha=0.1)
    even = scenarios.build_scenario("dirichlet", 4, 150, seed=0, dirichlet_alpha=100.0)
    for clients in (skewed, even):
        ids = [id(e) for c in clients for e in c.train]
        assert len(ids) == len(set(ids)) == 4 * 150  # a partition of the pool: nothing shared or lost
    assert dominant_share(skewed) > 0.7 > 0.45 > dominant_share(even)
    assert [c.task for c in scenarios.build_scenario("dirichlet", 4, 150, seed=0, dirichlet_alpha=0.1)] == \
        [c.task for c in skewed]  # seeded


def test_quantity_skew_sizes_and_local_steps_differ_tenfold():
    clients = scenarios.build_scenario("quantity-skew", 4, 200, seed=0, local_steps=10)
    sizes = [len(c.train) for c in clients]
    assert sizes[0] == 200 and sizes[0] / sizes[-1] >= 10
    assert [c.local_steps for c in clients] == [10, 5, 2, 1]
    assert set(scenarios.scenario_tasks(clients)) == set(tasks.DEFAULT_TASKS)  # IID mixtures


def test_pooled_client_scores_each_prompt_with_its_owners_verifier():
    clients = scenarios.build_scenario("scale-skew", 4, 10, seed=0)
    pooled = scenarios.pooled_client(clients, local_steps=40)
    assert len(pooled.train) == 40 and pooled.local_steps == 40 and pooled.reward.range == 10.0
    x10 = clients[1].train[0]  # client-1 rewards on a x10 scale
    assert pooled.reward(x10, x10.answer) == 10.0
    signed = clients[3].train[0]
    assert pooled.reward(signed, "zz") == -1.0


def test_every_built_in_reward_reports_true_correctness_with_its_reward():
    """Score once: a reward's verdict carries the correctness train_accuracy counts (``tasks.correctness``), not
    its scaled, noisy or inverted reward; a client's GuardedReward gives both for a batch from one call each."""
    example = tasks.train_split("spell_backward", 1, seed=0)[0]
    honest = [rewards.REWARD_SCALES[s] for s in ("x1", "x10", "partial", "signed")]
    for reward in [*honest, rewards.NoisyReward(1.0, "salt"), rewards.InvertedReward()]:
        for answer in (example.answer, "zz"):
            verdict = reward.judge(example, answer)
            assert verdict.correct == tasks.correctness(example, answer) and verdict.reward == reward(example, answer)
    assert rewards.InvertedReward().judge(example, example.answer) == (0.0, 1.0, None)
    pooled = scenarios.pooled_client(scenarios.build_scenario("scale-skew", 4, 4, seed=0), local_steps=1)
    guarded = rewards.guarded(pooled.reward, 0.5)
    right = [e.answer for e in pooled.train]
    scored = guarded.score_batch(pooled.train, right, [[]] * len(right), 0)
    assert scored.correct == [1.0] * len(right) and scored.rewards == [pooled.reward(e, a) + 0.5 * 1.0
                                                                       for e, a in zip(pooled.train, right)]


def test_noisy_verifiers_scenario_has_honest_flaky_and_inverted_verifiers():
    clients = scenarios.build_scenario("noisy-verifiers", 4, 20, seed=0, reward_noise=0.4)
    honest, flaky, _, inverted = (c.reward for c in clients)
    example = clients[1].train[0]
    answers = [example.answer] + [f"wrong{i}" for i in range(1999)]
    agree = [flaky(example, a) == tasks.correctness(example, a) for a in answers]
    assert abs(agree.count(False) / len(agree) - 0.4 / 2) < 0.03  # a coin flip on 40% disagrees half the time
    assert [flaky(example, a) for a in answers[:50]] == [flaky(example, a) for a in answers[:50]]  # deterministic
    assert honest(example, example.answer) == 1.0 and honest(example, "wrong") == 0.0
    assert inverted(clients[3].train[0], clients[3].train[0].answer) == 0.0 and inverted(example, "wrong") == 1.0


def test_stalled_and_straggler_scenarios():
    stalled = scenarios.build_scenario("stalled", 4, 10, seed=0)
    assert [c.task for c in stalled] == ["spell_backward", "spell_backward@3", "number_sorting", "number_sorting@3"]
    stragglers = scenarios.build_scenario("stragglers", 4, 10, seed=0, local_steps=8)
    assert [c.local_steps for c in stragglers] == [8, 4, 2, 8]


def test_task_lists_and_specs_with_overrides():
    assert tasks.split_tasks("basic_arithmetic:max_terms=2,min_digits=1, chain_sum,spell_backward@2") == [
        "basic_arithmetic:max_terms=2,min_digits=1", "chain_sum", "spell_backward@2"]
    assert tasks.parse_task("basic_arithmetic@2:max_terms=3,operators=('+', '-'),format_style=simple") == (
        "basic_arithmetic", 2, {"max_terms": 3, "operators": ("+", "-"), "format_style": "simple"})
    fam = tasks.family("chain_sum:max_terms=2,max_digits=1")
    assert not fam.compact and fam.rg_config == {"max_terms": 2, "max_digits": 1}
    assert tasks.family("spell_backward:max_word_len=4").compact  # a compact family keeps its compact form
    example = tasks.test_split("chain_sum:max_terms=2,max_digits=1", 1)[0]
    assert example.prompt.startswith("State the final answer") and example.prompt.count("+") + \
        example.prompt.count("-") == 1
    assert tasks.correctness(example, f"Thinking.\nAnswer: {example.answer}") == 1.0


@pytest.mark.parametrize("spec, needle", [
    ("basic_arithmetc", "not a reasoning-gym dataset (did you mean basic_arithmetic"),
    ("basic_arithmetic:max_term=2", "basic_arithmetic has no setting 'max_term'; valid: min_terms, max_terms"),
    ("basic_arithmetic:min_terms=5,max_terms=2", "reasoning-gym rejects the config"),
    ("simple_equations:operators=('+', '-')", "reasoning-gym rejects the config"),  # fails when drawing
    ("basic_arithmetic:max_terms", "override 'max_terms' is not key=value"),
    ("gsm_symbolic@2", "gsm_symbolic has no difficulty levels"),
    ("chain_sum@x", "difficulty level 'x' is not a number"),
])
def test_bad_task_specs_say_what_is_valid(spec, needle):
    with pytest.raises(tasks.TaskError, match=None) as err:
        tasks.family(spec)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_task_with_few_distinct_prompts_holds_out_half_of_them():
    spec = "chain_sum:min_terms=2,max_terms=2,min_digits=1,max_digits=1"  # 10 x 10 x 2 = 200 prompts
    held = tasks.test_split(spec)
    assert 80 <= len(held) <= 100 and len({e.prompt for e in held}) == len(held)
    train = tasks.train_split(spec, 200, seed=0)
    assert not {e.prompt for e in train} & {e.prompt for e in held}
    assert len(tasks.test_split("spell_backward")) == 200  # the built-in splits are unchanged


@pytest.mark.parametrize("completion, answer", [
    ("Let me think.\n<answer> 42 </answer>", "42"),
    ("So x = \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("Natalia sold 48 clips.\n#### 72", "72"),
    ("The answer is **7**.", "7"),
    ("The final answer to the problem is -3.", "-3"),
    ("Answer: ['1', '2', '3']", "['1', '2', '3']"),
    ("First 3 + 4 = 7.\nThen 7 * 2 = 14", "14"),
    ("It costs 1,250 dollars", "1250"),
    ("paos", "paos"),
    ("The word reversed:\nsoap.", "soap"),
    ("", ""),
])
def test_extract_answer_rules(completion, answer):
    assert tasks.extract_answer(completion) == answer


def test_chat_examples_read_the_extracted_answer_and_forgive_the_format():
    compact = tasks.test_split("number_sorting", 1)[0]
    chat = tasks.as_chat(compact, "Be brief.")
    assert chat.messages == (("system", "Be brief."), ("user", chat.prompt)) and chat.prompt != compact.prompt
    assert chat.answer.startswith("[")  # reasoning-gym's answer form, not the compact one
    assert tasks.correctness(chat, f"Sorted.\nAnswer: {chat.answer}") == 1.0
    assert tasks.correctness(chat, chat.answer) < 1.0  # an unmarked list: its last number is read
    assert tasks.content_correctness(chat, chat.answer) == 1.0  # the whole completion, format forgiven
    assert rewards.format_reward(chat, "Answer: 3") == 1.0 and rewards.format_reward(chat, "3") == 0.0
    assert rewards.format_reward(compact, compact.answer) == 1.0  # compact: the bare answer is the format
    owner = Example("mine", "1+1=", "2", {"answer": "2"}, messages=(("system", "Mine."), ("user", "1+1=")))
    assert tasks.as_chat(owner, "Default.").messages == owner.messages  # the owner's system message is kept
