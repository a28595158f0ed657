"""Tasks: splits disjoint and seeded, compact prompts scored by reasoning-gym, reward scales."""

import pytest

from fgrpo import tasks


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


def test_reward_scales():
    ex = tasks.test_split("spell_backward", 1)[0]
    wrong = ex.answer[:-1] + ("a" if ex.answer[-1] != "a" else "b")
    s = tasks.REWARD_SCALES
    assert s["x1"](ex, ex.answer) == 1.0 and s["x10"](ex, ex.answer) == 10.0
    assert s["signed"](ex, ex.answer) == 1.0 and s["signed"](ex, wrong) == -1.0
    assert 0.0 < s["partial"](ex, wrong) < 1.0 and s["partial"](ex, ex.answer) == 1.0


def test_scenarios():
    clients = tasks.build_scenario("scale-skew", 4, 20, seed=0)
    n = len(tasks.DEFAULT_TASKS)
    assert [c.task for c in clients] == [tasks.DEFAULT_TASKS[k % n] for k in range(4)]
    assert tasks.scenario_tasks(clients) == list(tasks.DEFAULT_TASKS)
    assert [c.reward.name for c in clients] == ["x1", "x10", "partial", "signed"]
    assert {c.reward.name for c in tasks.build_scenario("task-skew", 4, 20, seed=0)} == {"x1"}
    with pytest.raises(ValueError):
        tasks.build_scenario("nope", 4, 20, seed=0)


def test_config_default_tasks_are_the_default_families():
    from fgrpo.config import RunConfig

    assert RunConfig().task_list == tasks.DEFAULT_TASKS


def test_difficulty_skew_gives_each_client_one_level_of_one_family():
    clients = tasks.build_scenario("difficulty-skew", 4, 30, seed=0)
    assert [c.task for c in clients] == ["spell_backward@1", "spell_backward@2", "spell_backward@3",
                                         "spell_backward@1"]
    lengths = {c.task: {len(e.answer) for e in c.train} for c in clients}
    assert max(lengths["spell_backward@1"]) <= 4 < min(lengths["spell_backward@2"])
    assert max(lengths["spell_backward@2"]) <= 6 < min(lengths["spell_backward@3"])
    with pytest.raises(ValueError, match="no difficulty levels"):
        tasks.build_scenario("difficulty-skew", 2, 10, seed=0, tasks=("word_sorting",))


def dominant_share(clients):
    shares = []
    for c in clients:
        counts = [sum(e.task == t for e in c.train) for t in tasks.DEFAULT_TASKS]
        shares.append(max(counts) / len(c.train))
    return sum(shares) / len(shares)


def test_dirichlet_partitions_one_pool_and_alpha_controls_skew():
    skewed = tasks.build_scenario("dirichlet", 4, 150, seed=0, dirichlet_alpha=0.1)
    even = tasks.build_scenario("dirichlet", 4, 150, seed=0, dirichlet_alpha=100.0)
    for clients in (skewed, even):
        ids = [id(e) for c in clients for e in c.train]
        assert len(ids) == len(set(ids)) == 4 * 150  # a partition of the pool: nothing shared or lost
    assert dominant_share(skewed) > 0.7 > 0.45 > dominant_share(even)
    assert [c.task for c in tasks.build_scenario("dirichlet", 4, 150, seed=0, dirichlet_alpha=0.1)] == \
        [c.task for c in skewed]  # seeded


def test_quantity_skew_sizes_and_local_steps_differ_tenfold():
    clients = tasks.build_scenario("quantity-skew", 4, 200, seed=0, local_steps=10)
    sizes = [len(c.train) for c in clients]
    assert sizes[0] == 200 and sizes[0] / sizes[-1] >= 10
    assert [c.local_steps for c in clients] == [10, 5, 2, 1]
    assert set(tasks.scenario_tasks(clients)) == set(tasks.DEFAULT_TASKS)  # IID mixtures


def test_pooled_client_scores_each_prompt_with_its_owners_verifier():
    clients = tasks.build_scenario("scale-skew", 4, 10, seed=0)
    pooled = tasks.pooled_client(clients, local_steps=40)
    assert len(pooled.train) == 40 and pooled.local_steps == 40 and pooled.reward.range == 10.0
    x10 = clients[1].train[0]  # client-1 rewards on a x10 scale
    assert pooled.reward(x10, x10.answer) == 10.0
    signed = clients[3].train[0]
    assert pooled.reward(signed, "zz") == -1.0


def test_noisy_verifiers_scenario_has_honest_flaky_and_inverted_verifiers():
    clients = tasks.build_scenario("noisy-verifiers", 4, 20, seed=0, reward_noise=0.4)
    honest, flaky, _, inverted = (c.reward for c in clients)
    example = clients[1].train[0]
    answers = [example.answer] + [f"wrong{i}" for i in range(1999)]
    agree = [flaky(example, a) == tasks.correctness(example, a) for a in answers]
    assert abs(agree.count(False) / len(agree) - 0.4 / 2) < 0.03  # a coin flip on 40% disagrees half the time
    assert [flaky(example, a) for a in answers[:50]] == [flaky(example, a) for a in answers[:50]]  # deterministic
    assert honest(example, example.answer) == 1.0 and honest(example, "wrong") == 0.0
    assert inverted(clients[3].train[0], clients[3].train[0].answer) == 0.0 and inverted(example, "wrong") == 1.0


def test_stalled_and_straggler_scenarios():
    stalled = tasks.build_scenario("stalled", 4, 10, seed=0)
    assert [c.task for c in stalled] == ["spell_backward", "spell_backward@3", "number_sorting", "number_sorting@3"]
    stragglers = tasks.build_scenario("stragglers", 4, 10, seed=0, local_steps=8)
    assert [c.local_steps for c in stragglers] == [8, 4, 2, 8]
