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
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import reasoning_gym


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


def derived_seed(*parts: object) -> int:
    """A stable 31-bit seed from any parts (same on every machine and Python run)."""
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


@cache
def _scorer(task: str):
    """A reasoning-gym dataset instance whose ``score_answer`` scores this task."""
    return reasoning_gym.create_dataset(task, seed=0, size=1, **TASKS[task].rg_config)


def correctness(example: Example, completion: str) -> float:
    """reasoning-gym's score in [0, 1] for a completion (1.0 = correct)."""
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
        dataset = reasoning_gym.create_dataset(task, seed=derived_seed(seed, attempt), size=size,
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

@dataclass(frozen=True)
class RewardScale:
    """How a client turns correctness into its reward; ``range`` = max reward - min reward."""

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


REWARD_SCALES = {s.name: s for s in [RewardScale("x1", 1.0), RewardScale("x10", 10.0),
                                     RewardScale("partial", 1.0), RewardScale("signed", 2.0)]}


@dataclass
class ClientSpec:
    client_id: str
    task: str
    reward: RewardScale
    train: list[Example]


def build_scenario(name: str, num_clients: int, train_size: int, seed: int,
                   tasks: tuple[str, ...] = DEFAULT_TASKS) -> list[ClientSpec]:
    """Clients of a named scenario.

    - ``task-skew``: client k holds task ``tasks[k % len(tasks)]``, reward = correctness.
    - ``scale-skew``: task-skew, and client k's verifier emits rewards on its own scale,
      cycling through x1, x10, partial credit in [0, 1], and -1/+1.
    """
    scales = list(REWARD_SCALES.values())
    clients = []
    for k in range(num_clients):
        task = tasks[k % len(tasks)]
        if name == "task-skew":
            reward = REWARD_SCALES["x1"]
        elif name == "scale-skew":
            reward = scales[k % len(scales)]
        else:
            raise ValueError(f"unknown scenario {name!r}")
        train = train_split(task, train_size, seed=seed, salt=f"client{k}")
        clients.append(ClientSpec(f"client-{k}", task, reward, train))
    return clients


def scenario_tasks(clients: list[ClientSpec]) -> list[str]:
    """The tasks a federation is evaluated on (each distinct client task, in order)."""
    return list(dict.fromkeys(c.task for c in clients))
