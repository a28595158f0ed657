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
