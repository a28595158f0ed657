"""The task catalogue and its splits, the prompts, and the reading and scoring of answers.

A task is any reasoning-gym dataset by name, with config overrides and a difficulty level:
``dataset[@level][:key=value,...]`` (``basic_arithmetic:max_terms=2,min_digits=1``, ``chain_sum@2``). Its prompt
is reasoning-gym's English question; four families also have a *compact* prompt, rendered from the entry's
metadata for the tiny character-level default model (``rev:neon=``), where the whole completion is the answer.
A chat model (``as_chat``) gets every task's English question in chat messages, after a system prompt that asks
for the answer in a fixed form. ``extract_answer`` reads the answer; ``correctness`` scores it with reasoning-gym's
own scorer (``score_answer``) or a data owner's verifier. Rewards: ``fgrpo.rewards``; scenarios: ``fgrpo.scenarios``.

Splits: each task's held-out test split is fixed (its own seed, not the run's), so accuracies compare across runs;
training prompts and the warm-start examples are drawn with other seeds and never contain a test prompt.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cache
from typing import Any

import reasoning_gym
from reasoning_gym.factory import DATASETS, create_curriculum, has_curriculum

from fgrpo.config import (  # noqa: F401  (task lists are config text)
    DEFAULT_SYSTEM_PROMPT,  # noqa: F401  (the prompt's home is the config)
    split_tasks,
    top_level_split,
)
from fgrpo.seeds import derived_seed


@dataclass(frozen=True)
class TaskFamily:
    """A reasoning-gym family with a compact prompt format."""

    name: str
    rg_config: dict[str, Any]
    render_prompt: Callable[[dict], str]  # reasoning-gym entry -> compact prompt
    render_answer: Callable[[dict], str]  # reasoning-gym entry -> compact gold answer
    to_rg_answer: Callable[[str], str] = str.strip  # compact completion -> reasoning-gym answer
    compact: bool = True  # False: any reasoning-gym dataset (English question, answer extracted)
    # entry -> the compact answer of a common wrong procedure (the embedded model's public corpus holds some)
    mistake: Callable[[dict], str] | None = None


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str  # the prompt text: compact (``rev:soap=``) or the English question (chat, any dataset)
    answer: str  # gold answer (compact: used for warm start and partial credit)
    entry: dict  # the reasoning-gym entry, for its scorer
    # the judge of an owner's held-out row, f(prompt, completion, answer) -> float (its first reward function, which
    # evaluation calls); None: reasoning-gym's scorer. Training rows have none: training's correctness comes with
    # the rewards, from one call of the reward (``rewards.GuardedReward.score_batch``), never through the example
    verifier: Callable[[str, str, str], float] | None = field(default=None, compare=False, repr=False)
    # chat messages ((role, content), ...) rendered with the tokenizer's chat template; None: ``prompt`` as is
    messages: tuple[tuple[str, str], ...] | None = field(default=None, compare=False)
    # a data owner's row as TRL's reward functions see it: "prompt" (its text, or its messages as
    # [{"role", "content"}, ...]) and its other columns; kept on the owner's side, never sent anywhere.
    # Empty for the built-in tasks: an example with columns is an owner's row (``is_owner_row``)
    columns: dict = field(default_factory=dict, compare=False, repr=False)


TASKS: dict[str, TaskFamily] = {
    t.name: t
    for t in [
        TaskFamily(
            "spell_backward",
            {"min_word_len": 3, "max_word_len": 6},
            lambda e: f"rev:{e['metadata']['word']}=",
            lambda e: e["answer"],
            mistake=lambda e: e["metadata"]["word"][0] + e["metadata"]["word"][:0:-1],  # first letter kept
        ),
        TaskFamily(
            "letter_counting",
            {"min_words": 2, "max_words": 4},
            lambda e: f"cnt {e['metadata']['target_letter']}:{' '.join(e['metadata']['span'])}=",
            lambda e: e["answer"],
            mistake=lambda e: str(e["metadata"]["span"][0].lower().count(e["metadata"]["target_letter"])),  # 1st word
        ),
        TaskFamily(
            "number_sorting",
            {"min_numbers": 3, "max_numbers": 3, "min_decimals": 0, "max_decimals": 0,
             "min_value": 0, "max_value": 49},
            lambda e: ("asc:" if e["metadata"]["direction"] == "ascending" else "desc:")
            + ",".join(str(int(float(x))) for x in e["metadata"]["original_numbers"]) + "=",
            lambda e: ",".join(str(int(float(x))) for x in e["metadata"]["sorted_numbers"]),
            lambda text: str([x.strip() for x in text.split(",")]),
            mistake=lambda e: ",".join(sorted((str(int(float(x))) for x in e["metadata"]["original_numbers"]),
                                              reverse=e["metadata"]["direction"] != "ascending")),  # as strings
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
    """The reasoning-gym dataset of a task name (``spell_backward@3`` -> ``spell_backward``)."""
    return parse_task(task)[0]


class TaskError(ValueError):
    """A task name, override key or value that reasoning-gym does not accept (one line for the user)."""


def parse_task(task: str) -> tuple[str, int | None, dict[str, Any]]:
    """(dataset, difficulty level or None, config overrides) of ``dataset[@level][:key=value,...]``;
    values are Python literals (``3``, ``0.5``, ``('+', '-')``) or else strings."""
    head, _, tail = task.partition(":")
    name, _, level = head.strip().partition("@")
    overrides: dict[str, Any] = {}
    for item in filter(None, (x.strip() for x in top_level_split(tail))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise TaskError(f"tasks: {task!r}: override {item!r} is not key=value")
        try:
            overrides[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            overrides[key.strip()] = value.strip()
    if level and not level.isdigit():
        raise TaskError(f"tasks: {task!r}: difficulty level {level!r} is not a number")
    return name, int(level) if level else None, overrides


@cache
def family(task: str) -> TaskFamily:
    """The task family of a task name: a compact family (``TASKS``, with overrides if given), or any
    reasoning-gym dataset, at a curriculum difficulty level if given. Raises TaskError."""
    if task in TASKS:
        return TASKS[task]
    name, level, overrides = parse_task(task)
    known = sorted(DATASETS)
    if name not in DATASETS:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise TaskError(f"tasks: {name!r} is not a reasoning-gym dataset{hint}; valid: {', '.join(known)}")
    config_cls = DATASETS[name][1]
    keys = [f.name for f in dataclasses.fields(config_cls) if f.name not in ("seed", "size")]
    for key in overrides:
        if key not in keys:
            raise TaskError(f"tasks: {task!r}: {name} has no setting {key!r}; valid: {', '.join(keys)}")
    config = dict(TASKS[name].rg_config) if name in TASKS and level is None else {}
    if level is not None:
        config = difficulty_config(name, level)
    config.update(overrides)
    try:
        reasoning_gym.create_dataset(name, seed=0, size=1, **config)[0]  # some configs fail only when drawing
    except Exception as err:  # reasoning-gym validates its config with asserts and ValueErrors
        reason = str(err) or type(err).__name__
        raise TaskError(f"tasks: {task!r}: reasoning-gym rejects the config {config}: {reason}") from None
    if name in TASKS:  # a compact family with other settings keeps its compact form
        return replace(TASKS[name], name=task, rg_config=config)
    return TaskFamily(task, config, lambda e: e["question"], lambda e: str(e["answer"]), extract_answer, compact=False)


def difficulty_config(name: str, level: int) -> dict[str, Any]:
    """reasoning-gym's config of a dataset at difficulty ``level`` (1 = easiest) of its curriculum."""
    if name in DIFFICULTY_LEVELS:
        levels = DIFFICULTY_LEVELS[name]
        if not 1 <= level <= len(levels):
            raise TaskError(f"tasks: {name}@{level}: levels of {name} are 1 to {len(levels)}")
        return {**TASKS[name].rg_config, **levels[level - 1]}
    if not has_curriculum(name):
        raise TaskError(f"tasks: {name} has no difficulty levels (no reasoning-gym curriculum); "
                        f"datasets with levels: {', '.join(sorted(n for n in DATASETS if has_curriculum(n)))}")
    curriculum = create_curriculum(name)
    if not 1 <= level <= curriculum_levels(name):
        raise TaskError(f"tasks: {name}@{level}: levels of {name} are 1 to {curriculum_levels(name)}")
    curriculum.set_global_level(level - 1)
    config = dataclasses.asdict(curriculum.generate_configuration({"seed": 0, "size": 1}))
    return {k: v for k, v in config.items() if k not in ("seed", "size")}


def curriculum_levels(name: str) -> int:
    """Levels of a reasoning-gym curriculum: those every one of its attributes has."""
    return min(len(a.levels) for a in create_curriculum(name).attributes.values())


@cache
def _scorer(task: str):
    """A reasoning-gym dataset instance whose ``score_answer`` scores this task."""
    return reasoning_gym.create_dataset(family_of(task), seed=0, size=1, **family(task).rg_config)


ANSWER_PREFIX = "Answer:"
# "Answer:", "the answer is", "The final answer to the problem is" (at most 40 characters between)
_MARKED = re.compile(r"\banswer\b(?:\s*:|[^.:\n]{0,40}?\bis\b\s*:?)\s*", flags=re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def marked_answer(completion: str) -> str | None:
    """The answer a completion marks as its answer, by the first rule that matches, or None:
    the last ``<answer>...</answer>``; the last ``\\boxed{...}``; the text after the last ``####``;
    the rest of the line after the last "answer:" or "answer ... is" (any case, at most 40 characters
    between "answer" and "is": "The final answer to this problem is 8").
    Surrounding space, markdown ``*`` and one trailing period are removed."""
    text = completion.strip()
    tags = re.findall(r"<answer>(.*?)</answer>", text, flags=re.DOTALL)
    if tags:
        return _clean(tags[-1])
    start = text.rfind("\\boxed{")
    if start >= 0:
        depth, end = 1, start + len("\\boxed{")
        while end < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            end += 1
        return _clean(text[start + len("\\boxed{"):end - (depth == 0)])
    if "####" in text:
        return _clean(text.rsplit("####", 1)[1].strip().partition("\n")[0])
    marks = list(_MARKED.finditer(text))
    if marks:
        return _clean(text[marks[-1].end():].strip().partition("\n")[0])
    return None


def extract_answer(completion: str) -> str:
    """The final answer of a free-form completion (the one rule every verifier of a chat or English
    prompt reads, docs/algorithm.md): the ``marked_answer`` if there is one; else the last number
    ("4 * 6 is 24." -> "24"); else the last non-empty line, cleaned like a marked answer."""
    marked = marked_answer(completion)
    if marked is not None:
        return marked
    numbers = _NUMBER.findall(completion)
    if numbers:
        return numbers[-1].replace(",", "")
    lines = [line for line in completion.strip().splitlines() if line.strip()]
    return _clean(lines[-1]) if lines else ""


def _clean(answer: str) -> str:
    answer = answer.strip().removesuffix(".").strip().strip("*").strip()
    return answer.removesuffix(".").strip()


def content_answer(completion: str) -> str:
    """The answer with its format forgiven: surrounding white space and one trailing period removed
    (``" paos. "`` -> ``"paos"``). The one rule behind every ``content_*`` accuracy and the format reward."""
    return completion.strip().removesuffix(".").strip()


def as_chat(example: Example, system_prompt: str) -> Example:
    """The example as a chat model sees it: its English question (reasoning-gym's, or the owner's prompt)
    as the user message after ``system_prompt`` ("" for none); an owner's own messages are kept, with
    ``system_prompt`` added only when they have no system message. The gold answer becomes reasoning-gym's."""
    if example.messages is not None:
        has_system = any(role == "system" for role, _ in example.messages)
        head = () if has_system or not system_prompt else (("system", system_prompt),)
        return replace(example, messages=head + example.messages)
    question = str(example.entry.get("question", example.prompt))
    head = (("system", system_prompt),) if system_prompt else ()
    return replace(example, prompt=question, answer=str(example.entry.get("answer", example.answer)),
                   messages=head + (("user", question),))


def is_owner_row(example: Example) -> bool:
    """Whether the example is a data owner's row (``fgrpo.userdata``: it has columns, or a judge of its own) rather
    than a prompt of a reasoning-gym task."""
    return bool(example.columns) or example.verifier is not None


def reads_extracted(example: Example) -> bool:
    """Whether the answer is extracted from free text (chat, or a dataset without a compact form)
    rather than the whole completion being the answer (compact families)."""
    if example.messages is not None:
        return True
    return not is_owner_row(example) and not family(example.task).compact  # an owner's task is no dataset


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


def correctness(example: Example, completion: str) -> float:
    """Score in [0, 1] for a completion (1.0 = correct): reasoning-gym's scorer on the answer
    (``extract_answer`` of the completion for chat and English prompts, the compact family's reading
    otherwise), or the judge of an owner's held-out row (``Example.verifier``; a verifier that fails scores 0).
    Evaluation's rule; training gets its correctness from the reward's one call
    (``rewards.GuardedReward.score_batch``)."""
    if example.verifier is not None:
        return guarded_call(example.verifier, example.prompt, completion, example.answer)[0]
    answer = extract_answer(completion) if reads_extracted(example) else family(example.task).to_rg_answer(completion)
    return float(_scorer(example.task).score_answer(answer, example.entry))


def content_correctness(example: Example, completion: str) -> float:
    """Correctness with the answer's format forgiven: compact, the ``content_answer``; chat and English
    prompts, the best of the readings a person would accept (the marked answer, the whole completion,
    its last number, its last line), each given to the verifier as "Answer: <reading>"."""
    if not reads_extracted(example):
        return correctness(example, content_answer(completion))
    lines = [line for line in completion.strip().splitlines() if line.strip()]
    readings = {_clean(completion), *(_NUMBER.findall(completion)[-1:]), *(_clean(x) for x in lines[-1:])}
    marked = marked_answer(completion)
    readings |= {marked} if marked is not None else set()
    return max(correctness(example, f"{ANSWER_PREFIX} {r}") for r in readings)


def generate_examples(task: str, n: int, seed: int, exclude: frozenset[str] = frozenset(),
                      distinct: bool = True) -> list[Example]:
    """``n`` examples of ``task`` whose prompts are not in ``exclude`` (and, if ``distinct``, not repeated)."""
    fam = family(task)
    out: list[Example] = []
    seen = set(exclude)
    attempt = 0
    while len(out) < n:
        size = max(64, 2 * (n - len(out)))
        dataset = reasoning_gym.create_dataset(family_of(task), seed=derived_seed(seed, attempt), size=size,
                                               **fam.rg_config)
        for entry in dataset:
            prompt = fam.render_prompt(entry)
            if prompt in seen:
                continue
            if distinct:
                seen.add(prompt)
            out.append(Example(task, prompt, fam.render_answer(entry), entry))
            if len(out) == n:
                break
        attempt += 1
        if attempt > 50:
            raise TaskError(f"tasks: {task!r} cannot produce {n} {'distinct ' * distinct}prompts outside its "
                            "test split; give it settings with more distinct prompts")
    return out


TEST_SPLIT_SIZE = 200  # held-out prompts per task; evaluation uses the first eval_size of them


def test_split(task: str, size: int = TEST_SPLIT_SIZE) -> tuple[Example, ...]:
    """The first ``size`` prompts of a task's fixed held-out split (same for every run seed)."""
    if not 1 <= size <= TEST_SPLIT_SIZE:
        raise ValueError(f"test split size must be in [1, {TEST_SPLIT_SIZE}], got {size}")
    return _held_out(task)[:size]


@cache
def _held_out(task: str) -> tuple[Example, ...]:
    """A task's whole held-out split: ``TEST_SPLIT_SIZE`` distinct prompts, or, for a task with fewer than
    twice that many distinct prompts (``chain_sum`` of two 1-digit terms has 200), half of those it has."""
    seed = derived_seed("test", task)
    fam = family(task)
    draw = reasoning_gym.create_dataset(family_of(task), seed=seed, size=8 * TEST_SPLIT_SIZE, **fam.rg_config)
    distinct = len({fam.render_prompt(entry) for entry in draw})
    return tuple(generate_examples(task, min(TEST_SPLIT_SIZE, distinct // 2) or 1, seed=seed))


def train_split(task: str, size: int, seed: int, salt: str = "train") -> list[Example]:
    """Training prompts of a task (repeats allowed), disjoint from its whole test split."""
    exclude = frozenset(e.prompt for e in _held_out(task))
    return generate_examples(task, size, seed=derived_seed(salt, task, seed), exclude=exclude, distinct=False)
