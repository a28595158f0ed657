"""A data owner's reward functions in TRL's form, unchanged, and the reward workers.

TRL's contract (``GRPOTrainer._calculate_rewards``), which ``BatchReward`` keeps: a reward function
``f(completions, **kwargs) -> list[float | None]`` is called once per batch with the keyword arguments
    prompts          each sample's prompt: its text, or its messages [{"role", "content"}, ...] when
                     the owner's row is a conversation (``messages``)
    completions      each sample's completion: its text, or [{"role": "assistant", "content": text}]
                     when the prompt is a conversation
    completion_ids   each completion's token ids, up to and including its EOS
    <column>         every other column of the owner's data (``Example.columns``), one value per sample
    trainer_state    a ``RewardState``: ``round`` and ``global_step`` (local steps done in the round)
    log_extra        log_extra(column, values): a column of the owner's sample completions
    log_metric       log_metric(name, value): a number kept with the owner's sample completions
``None`` means "not applicable to this sample": it counts as NaN, left out of the weighted sum
(TRL's ``nansum``) and of that function's logged mean. A function is taken in TRL's form when its
first parameter is named ``completions``, ``prompts`` or ``completion_ids``, or it takes only
``**kwargs``; otherwise it is a verifier ``f(prompt, completion, answer) -> float`` called per sample.

Several functions combine with weights, as TRL's ``reward_weights``: r = sum_j w_j r_j over the
functions that apply (``rewards = "trl:accuracy_reward+0.5*trl:think_format_reward"``).

Failures follow every client's policy (``rewards.GuardedReward``): a function that raises, returns a
non-finite value or the wrong number of rewards costs the samples concerned 0 for that function, and
they are counted (``reward_failures``). A batch call that raises is retried sample by sample, so one
bad sample costs only itself. With reward workers (``run_pool``), each sample is scored by its own call
on a pool of threads; a call still running ``reward_timeout`` seconds after it started scores 0, is
counted, and its thread is abandoned (a fresh one takes its place).
"""

from __future__ import annotations

import inspect
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple

from fgrpo.config import ConfigError
from fgrpo.tasks import Example, guarded_call

TRL_ARGUMENTS = ("completions", "prompts", "completion_ids")


@dataclass
class RewardState:
    """What a TRL reward function gets as ``trainer_state`` (TRL: its TrainerState): the federated round,
    and the local steps done so far in it (TRL's ``global_step``: 0 while the first step is scored)."""

    round: int = 0
    global_step: int = 0


def is_batch_function(function: Callable) -> bool:
    """TRL's form: the first parameter is named completions, prompts or completion_ids, or it takes only
    ``**kwargs``. Otherwise (prompt, completion, answer), one sample per call."""
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature
        return False
    if parameters and parameters[0].name in TRL_ARGUMENTS:
        return True
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in parameters)
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                  and p.default is p.empty]
    return takes_kwargs and not positional


def trl_function(name: str) -> Callable:
    """One of TRL's ready reward functions (``trl.rewards``) by name: ``accuracy_reward``, ..."""
    try:
        import trl.rewards as trl_rewards
    except ImportError:
        raise ConfigError(f"rewards: 'trl:{name}' needs TRL, which is not installed (pip install trl)") from None
    if name.startswith("get_"):
        raise ConfigError(f"rewards: 'trl:{name}' makes a reward function from arguments; make it in a module of "
                          f"your own (my_rewards.py: overlong = {name}(...)) and name that one (my_rewards:overlong)")
    try:
        return getattr(trl_rewards, name)
    except AttributeError:
        raise ConfigError(f"rewards: TRL has no reward function {name!r} (trl.rewards: accuracy_reward, "
                          "reasoning_accuracy_reward, think_format_reward, ...)") from None


@dataclass(frozen=True)
class RewardTerm:
    name: str  # logged as reward/<name>
    function: Callable
    weight: float = 1.0
    batch: bool = False  # TRL's form f(completions, **kwargs) -> list; else f(prompt, completion, answer) -> float


@dataclass
class BatchLog:
    """What reward functions log through TRL's ``log_extra`` (a value per sample of the batch) and
    ``log_metric`` (numbers); they stay with the owner's sample completions."""

    size: int
    columns: dict[str, list] = field(default_factory=dict)
    metrics: dict[str, list[float]] = field(default_factory=dict)

    def extra(self, rows: list[int]) -> Callable[[str, list], None]:
        """``log_extra`` for a call on the batch's samples ``rows``."""
        def log_extra(column: str, values: list) -> None:
            slot = self.columns.setdefault(column, [None] * self.size)
            for row, value in zip(rows, values):
                slot[row] = value
        return log_extra

    def log_metric(self, name: str, value: float) -> None:
        self.metrics.setdefault(name, []).append(float(value))


def trl_kwargs(examples: list[Example], completions: list[str], completion_ids: list[list[int]] | None) -> dict:
    """The keyword arguments TRL gives a reward function for these samples, but the logging ones."""
    prompts = [e.columns.get("prompt", e.prompt) for e in examples]
    keys = dict.fromkeys(k for e in examples for k in e.columns if k not in ("prompt", "completion", "completion_ids"))
    return {"prompts": prompts,
            "completions": [[{"role": "assistant", "content": c}] if isinstance(p, list) else c
                            for p, c in zip(prompts, completions)],
            "completion_ids": completion_ids, **{k: [e.columns.get(k) for e in examples] for k in keys}}


def checked(value: Any) -> tuple[float, str | None]:
    """(reward, None); None -> NaN (not applicable); (0.0, what went wrong) for a non-number or non-finite value."""
    if value is None:
        return math.nan, None
    try:
        value = float(value)
    except (TypeError, ValueError) as err:
        return 0.0, f"{type(err).__name__}: {err}"
    return (value, None) if math.isfinite(value) else (0.0, f"non-finite value {value}")


def call_term(term: RewardTerm, examples: list[Example], completions: list[str], completion_ids, state: RewardState,
              log: BatchLog, rows: list[int]) -> list[tuple[float, str | None]]:
    """One function's (reward, error) per sample; a TRL-form function once for all of them (raises as it does)."""
    if not term.batch:
        return [guarded_call(term.function, e.prompt, c, e.answer) for e, c in zip(examples, completions)]
    out = list(term.function(**trl_kwargs(examples, completions, completion_ids), trainer_state=state,
                             log_extra=log.extra(rows), log_metric=log.log_metric))
    if len(out) != len(examples):
        error = f"{term.name} returned {len(out)} rewards for {len(examples)} completions"
        return [(0.0, error)] * len(examples)
    return [checked(v) for v in out]


def run_pool(tasks: list[Callable[[], Any]], workers: int, timeout: float) -> list[tuple[Any, str | None]]:
    """(result, None) of each task run on ``workers`` daemon threads, or (None, what went wrong) when it raised
    or was still running ``timeout`` seconds after it started (0: no limit); a timed-out task's thread is
    abandoned and replaced, so the pool keeps its size."""
    results: dict[int, tuple[Any, str | None]] = {}
    started: dict[int, float] = {}
    todo = deque(range(len(tasks)))
    lock = threading.Condition()

    def work() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i = todo.popleft()
                started[i] = time.monotonic()
            try:
                out = (tasks[i](), None)
            except Exception as err:
                out = (None, f"{type(err).__name__}: {err}")
            with lock:
                if i in results:  # timed out meanwhile: this thread was replaced
                    return
                results[i] = out
                del started[i]
                lock.notify()

    def spawn() -> None:
        threading.Thread(target=work, daemon=True, name="fgrpo-reward").start()

    with lock:
        for _ in range(min(workers, len(tasks))):
            spawn()
        while len(results) < len(tasks):
            now = time.monotonic()
            for i, t0 in list(started.items()):
                if timeout > 0 and now - t0 >= timeout:
                    results[i] = (None, f"timed out after {timeout:g} s")
                    del started[i]
                    spawn()
            deadlines = [t0 + timeout - now for t0 in started.values()] if timeout > 0 else []
            lock.wait(max(min(deadlines), 0.001) if deadlines else (timeout or None))
    return [results[i] for i in range(len(tasks))]


class Verdict(NamedTuple):
    """One sample, judged once: the reward training uses, whether the completion is correct (the verifier's score,
    1.0 = correct: what ``train_accuracy`` counts, whatever the reward's scale), and what went wrong (None: nothing)."""

    reward: float
    correct: float
    error: str | None = None


@dataclass
class ScoredBatch:
    """What one scoring call gives a batch of samples: the reward each is trained on, and its correctness (the
    verifier's score, 1.0 = correct, before any scale or extra reward), which ``train_accuracy`` counts."""

    rewards: list[float]
    correct: list[float]


def on_workers(score: Callable[[int], Any], n: int, workers: int, timeout: float, failed: Callable[[str], Any]) -> list:
    """``score(i)`` of each sample i < n on the reward workers (``run_pool``), ``failed(error)`` for a call that
    raised or timed out: the one place where rewards of either form meet the pool."""
    tasks = [partial(score, i) for i in range(n)]
    return [out if error is None else failed(error) for out, error in run_pool(tasks, workers, timeout)]


@dataclass
class BatchScores:
    totals: list[float]  # the weighted sum per sample
    errors: list[str | None]  # what went wrong per sample (None: nothing)
    parts: dict[str, list[float]]  # each function's reward per sample (NaN: not applicable); with 2+ functions
    log: BatchLog
    correct: list[float]  # the first function's reward per sample (0 where it failed or did not apply)


class BatchReward:
    """A data owner's reward functions with weights (``terms``), scored a batch at a time as TRL does; the first
    function is the verifier (its reward is a sample's correctness). Declared range (for DP on the statistics
    only): sum_j |w_j|."""

    def __init__(self, name: str, terms: list[RewardTerm]):
        self.name, self.terms = name, terms
        self.range = sum(abs(t.weight) for t in terms)

    def score_batch(self, examples: list[Example], completions: list[str], completion_ids: list[list[int]] | None,
                    state: RewardState, workers: int = 0, timeout: float = 0.0) -> BatchScores:
        """Every sample's rewards: each function once on the batch, or with ``workers``, one call per sample on
        a pool of threads (``on_workers``)."""
        log, rows = BatchLog(len(examples)), list(range(len(examples)))
        if not workers:
            per_sample = self._score(examples, completions, completion_ids, state, log, rows)
        else:
            def one(i: int) -> list[tuple[float, str | None]]:
                ids = None if completion_ids is None else completion_ids[i:i + 1]
                return self._score(examples[i:i + 1], completions[i:i + 1], ids, state, log, [i])[0]

            per_sample = on_workers(one, len(examples), workers, timeout,
                                    lambda error: [(0.0, error)] * len(self.terms))
        return self._combine(per_sample, log)

    def _score(self, examples, completions, completion_ids, state, log, rows) -> list[list[tuple[float, str | None]]]:
        """(reward, error) of each function (inner) for each sample (outer)."""
        per_term = [self._term(t, examples, completions, completion_ids, state, log, rows) for t in self.terms]
        return [list(values) for values in zip(*per_term)]

    def _term(self, term, examples, completions, completion_ids, state, log, rows) -> list[tuple[float, str | None]]:
        try:
            return call_term(term, examples, completions, completion_ids, state, log, rows)
        except Exception as err:
            if len(examples) == 1:
                return [(0.0, f"{type(err).__name__}: {err}")]
        return [out for i in range(len(examples))  # the batch raised: sample by sample, so a bad one costs itself
                for out in self._term(term, examples[i:i + 1], completions[i:i + 1],
                                      None if completion_ids is None else completion_ids[i:i + 1], state, log,
                                      rows[i:i + 1])]

    def _combine(self, per_sample: list[list[tuple[float, str | None]]], log: BatchLog) -> BatchScores:
        totals = [sum((t.weight * v for t, (v, _) in zip(self.terms, values) if not math.isnan(v)), 0.0)
                  for values in per_sample]
        errors = [next((e for _, e in values if e is not None), None) for values in per_sample]
        parts = ({t.name: [values[j][0] for values in per_sample] for j, t in enumerate(self.terms)}
                 if len(self.terms) > 1 else {})
        correct = [0.0 if error is not None or math.isnan(value) else value for (value, error), *_ in per_sample]
        return BatchScores(totals, errors, parts, log, correct)

    def judge(self, example: Example, completion: str) -> Verdict:
        """One sample, without its token ids (the ``centralized`` reference scores its pooled prompts so): 0 when a
        function failed, with what went wrong."""
        scores = self.score_batch([example], [completion], None, RewardState())
        error = scores.errors[0]
        return Verdict(0.0 if error is not None else scores.totals[0], scores.correct[0], error)

    def __call__(self, example: Example, completion: str) -> float:
        verdict = self.judge(example, completion)
        if verdict.error is not None:
            raise RuntimeError(verdict.error)
        return verdict.reward

    def verifier_of(self, columns: dict) -> RowVerifier:
        """The verifier evaluation scores a held-out row with (``Example.verifier``): the first function on it."""
        return RowVerifier(self.terms[0], columns)


@dataclass(frozen=True)
class RowVerifier:
    """An owner's first reward function on one of its held-out rows (``columns``), as evaluation calls a verifier:
    f(prompt, completion, answer) -> float, 1.0 = correct (None, not applicable: 0). Training never calls it: its
    correctness comes with the rewards (``BatchScores.correct``)."""

    term: RewardTerm
    columns: dict

    def __call__(self, prompt: str, completion: str, answer: str) -> float:
        example = Example("", prompt, answer, {}, columns=self.columns)
        value, error = call_term(self.term, [example], [completion], None, RewardState(), BatchLog(1), [0])[0]
        if error is not None:
            raise ValueError(error)
        return 0.0 if math.isnan(value) else value
