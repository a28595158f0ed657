"""The non-IID scenarios: which client holds which prompts, scored by which reward, with how much local work.

``build_scenario`` makes the clients (``ClientSpec``) of a named scenario (README, "Scenarios"):
task-skew, scale-skew, difficulty-skew, dirichlet, quantity-skew, noisy-verifiers, stalled, stragglers.
``load_clients`` gives a run its clients and held-out test sets: a named scenario's, or with
``scenario = 'user-data'`` one client per data owner (``fgrpo.userdata``). ``pooled_client`` is the
``centralized`` reference: every client's prompts in one place, each scored by its owner's reward.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, replace

from reasoning_gym.factory import DATASETS, has_curriculum

from fgrpo import userdata
from fgrpo.config import ConfigError, RunConfig
from fgrpo.rewards import REWARD_SCALES, InvertedReward, NoisyReward, RewardFn, RoutedReward, guarded
from fgrpo.seeds import derived_seed
from fgrpo.tasks import (
    DEFAULT_TASKS,
    DIFFICULTY_LEVELS,
    Example,
    as_chat,
    curriculum_levels,
    parse_task,
    test_split,
    train_split,
)

# Tasks the embedded model cannot solve (pass@8 = 0 measured, docs/embedded-default.md): the stalled
# clients of the ``stalled`` scenario hold them.
STALLED_TASKS = ("spell_backward@3", "number_sorting@3", "word_sorting")


@dataclass
class ClientSpec:
    client_id: str
    task: str  # the client's task, or a short description of its mixture of tasks
    reward: RewardFn
    train: list[Example]
    local_steps: int | None = None  # None: the run's local_steps (quantity-skew scales it)
    lies: bool = False  # reports fabricated statistics with its ordinary update (the lying-owner scenario's liar)


def build_scenario(name: str, num_clients: int, train_size: int, seed: int,
                   tasks: tuple[str, ...] = DEFAULT_TASKS, dirichlet_alpha: float = 0.5,
                   local_steps: int = 10, reward_noise: float = 0.5) -> list[ClientSpec]:
    """Clients of a named scenario (README, "Scenarios").

    - ``task-skew``: client k holds task ``tasks[k % len(tasks)]``, reward = correctness.
    - ``scale-skew``: task-skew, and client k's verifier emits rewards on its own scale,
      cycling through x1, x10, partial credit in [0, 1], and -1/+1.
    - ``difficulty-skew``: one family (``tasks[0]``); client k holds difficulty level
      ``k % 3 + 1`` of it (``spell_backward@1`` .. ``@3``), reward = correctness.
    - ``dirichlet``: a pool of ``num_clients * train_size`` prompts, equal parts of every task,
      split by flwr-datasets' DirichletPartitioner: client mixtures of tasks ~ Dir(alpha).
    - ``quantity-skew``: an IID pool split by flwr-datasets' SizePartitioner into sizes falling
      geometrically from ``train_size`` to ``train_size / 10``; a client's local steps per round
      scale with its size (as epochs over its data would), so n_k differs 10x too.
    - ``noisy-verifiers``: task-skew; cycling over four kinds of verifier: honest, flaky on a
      ``reward_noise`` share of answers (two clients of four, ``NoisyReward``), and wrong in a
      systematic way (pays for wrong answers, ``InvertedReward``).
    - ``stalled``: even clients hold the tasks, odd clients a task the model cannot solve yet
      (``STALLED_TASKS``: no learning signal).
    - ``stragglers``: task-skew, local work per round cycling over full, half and a quarter of
      ``local_steps`` (run it with ``fraction`` < 1 for partial participation).
    - ``lying-owner``: scale-skew, and the last client reports fabricated statistics
      (``trust.fabricated``: the largest gain its range allows, a collapsed spread, 10^6 prompts) with its
      ordinary update; the same clients and data as scale-skew otherwise.
    """
    if name not in ("scale-skew", "task-skew", "difficulty-skew", "dirichlet", "quantity-skew", "noisy-verifiers",
                    "stalled", "stragglers", "lying-owner"):
        raise ValueError(f"unknown scenario {name!r}")
    if name == "lying-owner":
        clients = build_scenario("scale-skew", num_clients, train_size, seed, tasks, dirichlet_alpha, local_steps,
                                 reward_noise)
        clients[-1].lies = True
        return clients
    if name in ("dirichlet", "quantity-skew"):
        return _pooled_scenario(name, num_clients, train_size, seed, tasks, dirichlet_alpha, local_steps)
    clients = []
    for k in range(num_clients):
        task, reward, steps = _client_of(name, k, tasks, local_steps, reward_noise)
        train = train_split(task, train_size, seed=seed, salt=f"client{k}")
        clients.append(ClientSpec(f"client-{k}", task, reward, train, steps))
    return clients


def _client_of(name: str, k: int, tasks: tuple[str, ...], local_steps: int, reward_noise: float,
               ) -> tuple[str, RewardFn, int | None]:
    """(task, reward, local steps or None) of client k of a named scenario that is not split from a pool."""
    if name == "difficulty-skew":
        levels = level_count(tasks[0])
        if not levels:
            raise ValueError(f"difficulty-skew: task {tasks[0]!r} has no difficulty levels; choose a compact "
                             f"family ({', '.join(DIFFICULTY_LEVELS)}) or a reasoning-gym dataset with a curriculum")
        task = with_level(tasks[0], k % levels + 1)
    elif name == "stalled":
        task = STALLED_TASKS[k // 2 % len(STALLED_TASKS)] if k % 2 else tasks[k // 2 % len(tasks)]
    else:
        task = tasks[k % len(tasks)]
    reward, steps = REWARD_SCALES["x1"], None
    if name == "scale-skew":
        reward = list(REWARD_SCALES.values())[k % len(REWARD_SCALES)]
    elif name == "noisy-verifiers" and k % 4 in (1, 2):
        reward = NoisyReward(reward_noise, f"client-{k}")
    elif name == "noisy-verifiers" and k % 4 == 3:
        reward = InvertedReward()
    elif name == "stragglers":
        steps = max(1, local_steps // 2 ** (k % 3))
    return task, reward, steps


def with_level(task: str, level: int) -> str:
    """The task at a difficulty level: ``basic_arithmetic:max_terms=2`` -> ``basic_arithmetic@2:max_terms=2``."""
    head, colon, tail = task.partition(":")
    return f"{head.partition('@')[0]}@{level}{colon}{tail}"


def level_count(task: str) -> int:
    """How many difficulty levels ``difficulty-skew`` can give a task's dataset (0: none)."""
    name = parse_task(task)[0]
    if name in DIFFICULTY_LEVELS:
        return len(DIFFICULTY_LEVELS[name])
    return min(3, curriculum_levels(name)) if name in DATASETS and has_curriculum(name) else 0


def _pooled_scenario(name: str, num_clients: int, train_size: int, seed: int, tasks: tuple[str, ...],
                     alpha: float, local_steps: int) -> list[ClientSpec]:
    """Split one pool of prompts (every task in equal parts) with a flwr-datasets partitioner."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, SizePartitioner

    if name == "dirichlet":
        sizes = None
        pool_size = num_clients * train_size
    else:
        ratio = 10.0 ** (-1 / max(num_clients - 1, 1))  # largest / smallest = 10
        sizes = [max(1, round(train_size * ratio**k)) for k in range(num_clients)]
        pool_size = sum(sizes)
    per_task = -(-pool_size // len(tasks))
    pool = [e for t in tasks for e in train_split(t, per_task, seed=seed, salt="pool")]
    rng = random.Random(derived_seed("pool-order", seed))
    rng.shuffle(pool)
    pool = pool[:pool_size]
    table = Dataset.from_dict({"index": list(range(len(pool))), "task": [e.task for e in pool]})
    if sizes is None:
        partitioner = DirichletPartitioner(num_partitions=num_clients, partition_by="task", alpha=alpha,
                                           min_partition_size=max(1, train_size // 20), seed=seed)
    else:
        partitioner = SizePartitioner(partition_sizes=sizes)
    partitioner.dataset = table
    clients = []
    for k in range(num_clients):
        train = [pool[i] for i in partitioner.load_partition(k)["index"]]
        steps = None if sizes is None else max(1, round(local_steps * sizes[k] / sizes[0]))
        clients.append(ClientSpec(f"client-{k}", describe_mixture(train), REWARD_SCALES["x1"], train, steps))
    return clients


def describe_mixture(examples: list[Example]) -> str:
    """``spell_backward 70% + number_sorting 30%``, or the task name alone for one task."""
    counts = Counter(e.task for e in examples)
    if len(counts) == 1:
        return next(iter(counts))
    return " + ".join(f"{t} {100 * n / len(examples):.0f}%" for t, n in counts.most_common())


def pooled_client(clients: list[ClientSpec], local_steps: int) -> ClientSpec:
    """The ``centralized`` reference: every client's prompts in one place, each scored by its owner's
    verifier, trained for ``local_steps`` steps per round (the federated round's total)."""
    train = [e for c in clients for e in c.train]
    reward = RoutedReward((c.reward, c.train) for c in clients)
    return ClientSpec("pooled", describe_mixture(train), reward, train, local_steps)


def scenario_tasks(clients: list[ClientSpec], order: tuple[str, ...] = ()) -> list[str]:
    """The tasks in the clients' data: those named in ``order`` first, in that order, then the rest
    in order of appearance."""
    present = dict.fromkeys(e.task for c in clients for e in c.train)
    return [t for t in order if t in present] + [t for t in present if t not in order]


def load_clients(cfg: RunConfig, prompt_style: str = "compact",
                 ) -> tuple[list[ClientSpec], dict[str, list[Example]], list[str]]:
    """(clients, held-out test sets per task, notes for the user) of a named scenario or of user data; with
    ``prompt_style = 'chat'``, every example as chat messages (``as_chat``)."""
    clients, test_sets, notes = _client_data(cfg)
    if prompt_style == "chat":
        for client in clients:
            client.train = [as_chat(e, cfg.system_prompt) for e in client.train]
        test_sets = {t: [as_chat(e, cfg.system_prompt) for e in examples] for t, examples in test_sets.items()}
    else:  # compact prompts: an owner's conversation is read as its last user message (its prompt text)
        for client in clients:
            client.train = [replace(e, messages=None) if e.messages else e for e in client.train]
        test_sets = {t: [replace(e, messages=None) if e.messages else e for e in examples]
                     for t, examples in test_sets.items()}
    for client in clients:  # the failure policy for every verifier, built-in or the owner's
        client.reward = guarded(client.reward, cfg.format_reward)
    return clients, test_sets, notes


def centralized_client(clients: list[ClientSpec], cfg: RunConfig) -> ClientSpec:
    """The ``centralized`` reference's one client (``pooled_client``), trained for the federated round's
    total local steps: the clients per round times their mean local steps."""
    per_round = max(1, round(cfg.fraction * len(clients)))
    steps = sum(c.local_steps or cfg.local_steps for c in clients) * per_round / len(clients)
    pooled = pooled_client(clients, max(1, round(steps)))
    pooled.reward = guarded(pooled.reward, cfg.format_reward)
    return pooled


def client_tasks(clients: list[ClientSpec], test_sets: dict) -> dict[str, list[str]]:
    """Each client's tasks among the held-out ones (local-only clients are evaluated on their own)."""
    return {c.client_id: scenario_tasks([c], tuple(test_sets)) for c in clients}


def _client_data(cfg: RunConfig) -> tuple[list[ClientSpec], dict[str, list[Example]], list[str]]:
    if cfg.scenario != "user-data":
        clients = build_scenario(cfg.scenario, cfg.num_clients, cfg.train_size, cfg.seed, cfg.task_list,
                                 cfg.dirichlet_alpha, cfg.local_steps, cfg.reward_noise)
        test_sets = {t: test_split(t, cfg.eval_size) for t in scenario_tasks(clients, cfg.task_list)}
        return clients, test_sets, []
    if not cfg.data.strip():
        raise ConfigError("scenario = 'user-data' needs data = FILE[,FILE...] in this runtime (on Flower, "
                          "each SuperNode names its own with --node-config 'data=\"FILE\" reward=\"NAME\"')")
    owners, notes = userdata.load_owners(cfg.data_sources, cfg.reward_names, cfg.prompt_column, cfg.answer_column,
                                         cfg.skip_bad_rows, cfg.eval_size)
    clients = [ClientSpec(o.name, o.name, o.reward, o.train) for o in owners]  # one client per data owner
    return clients, {o.name: o.test for o in owners}, notes
