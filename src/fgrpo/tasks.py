"""Tasks, verifiable rewards and the named non-IID scenarios.

Prompts and answers come from reasoning-gym's procedural generators, and correctness is
reasoning-gym's own scorer (``score_answer``). Its prompts are long English instructions, far too
long for the tiny character-level default model, so each family renders a *compact* prompt from
the entry's metadata (``rev:neon=`` for "Spell this word backward: neon"); the gold answer and the
scorer stay reasoning-gym's.

Splits: each task's held-out test split is fixed (its own seed, independent of the run seed) so
that accuracies are comparable across runs; training prompts and the warm-start examples are drawn
with other seeds and never contain a test prompt.
"""

from __future__ import annotations

import difflib
import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cache
from typing import Any

import reasoning_gym

from fgrpo.seeds import derived_seed


@dataclass(frozen=True)
class TaskFamily:
    """A reasoning-gym family with a compact prompt format."""

    name: str
    rg_config: dict[str, Any]
    render_prompt: Callable[[dict], str]  # reasoning-gym entry -> compact prompt
    render_answer: Callable[[dict], str]  # reasoning-gym entry -> compact gold answer
    to_rg_answer: Callable[[str], str] = str.strip  # compact completion -> reasoning-gym answer


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str  # compact prompt the model sees
    answer: str  # compact gold answer (used for warm start and partial credit)
    entry: dict  # the reasoning-gym entry, for its scorer
    # a data owner's verifier f(prompt, completion, answer) -> float (user data); None: reasoning-gym's scorer
    verifier: Callable[[str, str, str], float] | None = field(default=None, compare=False, repr=False)


TASKS: dict[str, TaskFamily] = {
    t.name: t
    for t in [
        TaskFamily(
            "spell_backward",
            {"min_word_len": 3, "max_word_len": 6},
            lambda e: f"rev:{e['metadata']['word']}=",
            lambda e: e["answer"],
        ),
        TaskFamily(
            "letter_counting",
            {"min_words": 2, "max_words": 4},
            lambda e: f"cnt {e['metadata']['target_letter']}:{' '.join(e['metadata']['span'])}=",
            lambda e: e["answer"],
        ),
        TaskFamily(
            "number_sorting",
            {"min_numbers": 3, "max_numbers": 3, "min_decimals": 0, "max_decimals": 0,
             "min_value": 0, "max_value": 49},
            lambda e: ("asc:" if e["metadata"]["direction"] == "ascending" else "desc:")
            + ",".join(str(int(float(x))) for x in e["metadata"]["original_numbers"]) + "=",
            lambda e: ",".join(str(int(float(x))) for x in e["metadata"]["sorted_numbers"]),
            lambda text: str([x.strip() for x in text.split(",")]),
        ),
        TaskFamily(
            "word_sorting",
            {"min_words": 2, "max_words": 2, "min_word_length": 3, "max_word_length": 5},
            lambda e: ("asc:" if e["metadata"]["direction"] == "ascending" else "desc:")
            + ",".join(e["metadata"]["transformed_words"]) + "=",
            lambda e: ",".join(e["metadata"]["sorted_words"]),
            lambda text: ", ".join(x.strip() for x in text.split(",")),
        ),
    ]
}
DEFAULT_TASKS = ("spell_backward", "number_sorting", "letter_counting")

# Difficulty levels for ``difficulty-skew``: the same family with a harder reasoning-gym config.
# A level is a task of its own, named ``family@level`` (``spell_backward@3``), with its own test split.
DIFFICULTY_LEVELS: dict[str, list[dict[str, Any]]] = {
    "spell_backward": [{"min_word_len": 3, "max_word_len": 4}, {"min_word_len": 5, "max_word_len": 6},
                       {"min_word_len": 7, "max_word_len": 8}],
    "number_sorting": [{"min_numbers": 2, "max_numbers": 2}, {"min_numbers": 3, "max_numbers": 3},
                       {"min_numbers": 4, "max_numbers": 4}],
    "letter_counting": [{"min_words": 1, "max_words": 1}, {"min_words": 2, "max_words": 3},
                        {"min_words": 4, "max_words": 4}],
}
for _family, _levels in DIFFICULTY_LEVELS.items():
    for _level, _overrides in enumerate(_levels, start=1):
        _base = TASKS[_family]
        TASKS[f"{_family}@{_level}"] = replace(_base, name=f"{_family}@{_level}",
                                               rg_config={**_base.rg_config, **_overrides})


def family_of(task: str) -> str:
    """The reasoning-gym family of a task name (``spell_backward@3`` -> ``spell_backward``)."""
    return task.split("@")[0]


@cache
def _scorer(task: str):
    """A reasoning-gym dataset instance whose ``score_answer`` scores this task."""
    return reasoning_gym.create_dataset(family_of(task), seed=0, size=1, **TASKS[task].rg_config)


def correctness(example: Example, completion: str) -> float:
    """Score in [0, 1] for a completion (1.0 = correct): reasoning-gym's scorer, or the data owner's
    verifier of a user example (a verifier that fails scores 0)."""
    if example.verifier is not None:
        return guarded_call(example.verifier, example.prompt, completion, example.answer)[0]
    answer = TASKS[example.task].to_rg_answer(completion)
    return float(_scorer(example.task).score_answer(answer, example.entry))


def generate_examples(task: str, n: int, seed: int, exclude: frozenset[str] = frozenset(),
                      distinct: bool = True) -> list[Example]:
    """``n`` examples of ``task`` whose prompts are not in ``exclude`` (and, if ``distinct``,
    not repeated)."""
    family = TASKS[task]
    out: list[Example] = []
    seen = set(exclude)
    attempt = 0
    while len(out) < n:
        size = max(64, 2 * (n - len(out)))
        dataset = reasoning_gym.create_dataset(family_of(task), seed=derived_seed(seed, attempt), size=size,
                                               **family.rg_config)
        for entry in dataset:
            prompt = family.render_prompt(entry)
            if prompt in seen:
                continue
            if distinct:
                seen.add(prompt)
            # keep what the scorer reads; reasoning-gym's long English question is never used
            scored = {k: v for k, v in entry.items() if k != "question"}
            out.append(Example(task, prompt, family.render_answer(entry), scored))
            if len(out) == n:
                break
        attempt += 1
        if attempt > 50:
            raise ValueError(f"task {task!r} cannot produce {n} prompts outside the test split")
    return out


TEST_SPLIT_SIZE = 200  # held-out prompts per task; evaluation uses the first eval_size of them


@cache
def test_split(task: str, size: int = TEST_SPLIT_SIZE) -> tuple[Example, ...]:
    """The first ``size`` prompts of a task's fixed held-out split (same for every run seed)."""
    if not 1 <= size <= TEST_SPLIT_SIZE:
        raise ValueError(f"test split size must be in [1, {TEST_SPLIT_SIZE}], got {size}")
    return tuple(generate_examples(task, TEST_SPLIT_SIZE, seed=derived_seed("test", task))[:size])


def train_split(task: str, size: int, seed: int, salt: str = "train") -> list[Example]:
    """Training prompts of a task (repeats allowed), disjoint from its whole test split."""
    exclude = frozenset(e.prompt for e in test_split(task))
    return generate_examples(task, size, seed=derived_seed(salt, task, seed), exclude=exclude,
                             distinct=False)


# --- rewards: each client's verifier on its own scale ------------------------------------------

RewardFn = Callable[[Example, str], float]


@dataclass(frozen=True)
class RewardScale:
    """How a client turns correctness into its reward; ``range`` = max reward - min reward it can give
    (declared: only differential privacy on the statistics uses it, as a bound that depends on no data)."""

    name: str
    range: float

    def __call__(self, example: Example, completion: str) -> float:
        score = correctness(example, completion)
        if self.name == "x1":
            return score
        if self.name == "x10":
            return 10.0 * score
        if self.name == "partial":  # character-level partial credit in [0, 1]
            return difflib.SequenceMatcher(None, completion.strip(), example.answer).ratio()
        if self.name == "signed":
            return 1.0 if score >= 1.0 else -1.0
        raise ValueError(f"unknown reward scale {self.name!r}")


def content_answer(completion: str) -> str:
    """The answer with its format forgiven: surrounding white space and one trailing period removed
    (``" paos. "`` -> ``"paos"``). The one rule behind every ``content_*`` accuracy and the format reward."""
    return completion.strip().removesuffix(".").strip()


def format_reward(example: Example, completion: str) -> float:
    """1 when the completion is its answer and nothing else (``content_answer`` leaves it as it is), else 0."""
    return float(bool(completion) and content_answer(completion) == completion)


def guarded_call(verifier: Callable[..., float], *args) -> tuple[float, str | None]:
    """(score, None), or (0.0, what went wrong) when the verifier raises or returns a non-finite value:
    a verifier's bug or outage costs one sample, never the client."""
    try:
        value = float(verifier(*args))
    except Exception as err:
        return 0.0, f"{type(err).__name__}: {err}"
    if not math.isfinite(value):
        return 0.0, f"non-finite value {value}"
    return value, None


class GuardedReward:
    """Every client's reward as training sees it: a sample whose reward raises or is not finite
    scores 0 and is counted (``take_failures``); one bad sample never stops a client. It also keeps the
    lowest and highest reward given since ``take_observed_range`` was last called: the range a client
    reports is what its verifier actually produced, so no verifier needs to declare a scale.

    ``extra``: further reward functions with weights, (name, function, weight): the reward is
    r = r_verifier + sum_j weight_j * r_j, and each component's mean is logged (``take_components``)."""

    def __init__(self, reward: RewardFn, extra: tuple[tuple[str, RewardFn, float], ...] = ()):
        self.reward, self.extra = reward, extra
        self.name = getattr(reward, "name", "custom")
        # for DP on the statistics only
        self.declared_range = getattr(reward, "range", 1.0) + sum(abs(w) for _, _, w in extra)
        self.failures = self.calls = 0
        self.last_error = ""
        self.low, self.high = math.inf, -math.inf
        self.component_sums: dict[str, float] = {}
        self.component_calls = 0

    def __call__(self, example: Example, completion: str) -> float:
        self.calls += 1
        value, error = guarded_call(self.reward, example, completion)
        if error is not None:
            self.failures += 1
            self.last_error = error
        if self.extra:
            self.component_calls += 1
            self.component_sums["reward/verifier"] = self.component_sums.get("reward/verifier", 0.0) + value
            for name, fn, weight in self.extra:
                part = guarded_call(fn, example, completion)[0]
                self.component_sums[f"reward/{name}"] = self.component_sums.get(f"reward/{name}", 0.0) + part
                value += weight * part
        self.low, self.high = min(self.low, value), max(self.high, value)
        return value

    def take_components(self) -> dict[str, float]:
        """Mean of each reward component (unweighted) since the last call; empty without ``extra``."""
        out = {k: v / self.component_calls for k, v in self.component_sums.items()} if self.component_calls else {}
        self.component_sums, self.component_calls = {}, 0
        return out

    def take_observed_range(self) -> float:
        """max - min of the rewards given since the last call (0 when none or all equal)."""
        out = self.high - self.low if self.high >= self.low else 0.0
        self.low, self.high = math.inf, -math.inf
        return out

    def take_failures(self) -> tuple[int, int]:
        """(failed samples, all samples) since the last call."""
        out = (self.failures, self.calls)
        self.failures = self.calls = 0
        return out


REWARD_SCALES = {s.name: s for s in [RewardScale("x1", 1.0), RewardScale("x10", 10.0),
                                     RewardScale("partial", 1.0), RewardScale("signed", 2.0)]}


@dataclass(frozen=True)
class NoisyReward:
    """A flaky verifier: on a pseudo-random ``noise`` share of (prompt, completion) pairs it pays a coin
    flip (0 or 1) instead of correctness. Which pairs, and the flip, are a hash of the pair and
    ``salt``: the same answer always gets the same reward, so runs stay reproducible and resumable."""

    noise: float
    salt: str
    name: str = "noisy"
    range: float = 1.0

    def __call__(self, example: Example, completion: str) -> float:
        if derived_seed(self.salt, example.prompt, completion) / 2**31 < self.noise:
            return float(derived_seed(self.salt, "flip", example.prompt, completion) % 2)
        return correctness(example, completion)


@dataclass(frozen=True)
class InvertedReward:
    """A verifier that is wrong in a systematic way: it pays 1 for a wrong answer and 0 for a right one."""

    name: str = "inverted"
    range: float = 1.0

    def __call__(self, example: Example, completion: str) -> float:
        return 1.0 - correctness(example, completion)


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
    """
    if name not in ("scale-skew", "task-skew", "difficulty-skew", "dirichlet", "quantity-skew", "noisy-verifiers",
                    "stalled", "stragglers"):
        raise ValueError(f"unknown scenario {name!r}")
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
        levels = DIFFICULTY_LEVELS.get(family_of(tasks[0]))
        if levels is None:
            raise ValueError(f"difficulty-skew: task {tasks[0]!r} has no difficulty levels; "
                             f"choose one of {', '.join(DIFFICULTY_LEVELS)}")
        task = f"{family_of(tasks[0])}@{k % len(levels) + 1}"
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


class RoutedReward:
    """Each example scored by the verifier of the client it came from (for pooled training)."""

    def __init__(self, clients: list[ClientSpec]):
        self._owner = {id(e): c.reward for c in clients for e in c.train}
        self.name = "per-owner"
        self.range = max(c.reward.range for c in clients)

    def __call__(self, example: Example, completion: str) -> float:
        return self._owner[id(example)](example, completion)


def pooled_client(clients: list[ClientSpec], local_steps: int) -> ClientSpec:
    """The ``centralized`` reference: every client's prompts in one place, each scored by its owner's
    verifier, trained for ``local_steps`` steps per round (the federated round's total)."""
    train = [e for c in clients for e in c.train]
    return ClientSpec("pooled", describe_mixture(train), RoutedReward(clients), train, local_steps)


def scenario_tasks(clients: list[ClientSpec], order: tuple[str, ...] = ()) -> list[str]:
    """The tasks in the clients' data: those named in ``order`` first, in that order, then the rest
    in order of appearance."""
    present = dict.fromkeys(e.task for c in clients for e in c.train)
    return [t for t in order if t in present] + [t for t in present if t not in order]
