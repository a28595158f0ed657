"""Rewards: what a client's GRPO trains on, ``reward(example, completion) -> float`` (``RewardFn``).

Built-in tasks pay correctness (``tasks.correctness``, 1.0 = correct) on each client's own scale
(``RewardScale``; ``REWARD_SCALES`` by name):
    x1        correctness (range 1)
    x10       10 x correctness (range 10)
    partial   character-level partial credit in [0, 1] (range 1)
    signed    +1 for a correct answer, -1 otherwise (range 2)
A ``range`` (max - min reward) is declared only for differential privacy on the statistics, as a bound
that depends on no data; the range a client reports is the one its rewards actually spanned.
Verifiers that are wrong on purpose (``noisy-verifiers`` scenario): ``NoisyReward``, ``InvertedReward``.
The ``centralized`` reference scores each pooled prompt with its owner's reward (``RoutedReward``).

A data owner's reward is chosen by name (``rewards`` option: one per data source, or one for all), 1.0 =
correct (``resolve_reward``):
    module:func    your function: in TRL's form, func(completions, **kwargs) -> list[float | None], called
                   per batch as TRL calls it (``fgrpo.trl_rewards``), or func(prompt, completion, answer) -> float
    trl:<name>     one of TRL's ready reward functions (``trl.rewards``): trl:accuracy_reward, trl:think_format_reward
    exact          normalized string match (case, surrounding space, inner runs of space) of the
                   completion, or of the answer it marks (``tasks.marked_answer``: "Answer: 42")
    math           math-verify: the completion's final expression equals the answer's
    rg:<dataset>   reasoning-gym's scorer of that dataset on {"answer": answer} (the marked answer
                   if the completion marks one)
Several, weighted as TRL's ``reward_weights``: ``[w*]name+[w*]name...`` (``owner_reward``), r = sum_j w_j r_j; the
first one is the verifier: its score is a sample's correctness (``train_accuracy``) and held-out accuracy's
judge (``verifier_of``: the ``Example.verifier`` of the owner's held-out rows). One (prompt, completion, answer)
verifier becomes an ``OwnerReward``; TRL-form or weighted functions a ``trl_rewards.BatchReward``, which scores a
batch at a time.

Score once: every reward here judges a sample in one call, ``judge(example, completion) -> Verdict``: the reward
and the correctness (1.0 = correct, on no client's scale: a scaled, noisy or inverted reward still reports the
true correctness), so training's accuracy never calls a verifier a second time.

Failure policy: every client's reward, built-in or the owner's, is wrapped in a ``GuardedReward``: a
sample whose reward raises or is not finite scores 0 and is counted (``reward_failures``); one bad
sample never stops a client. The rule itself is ``tasks.guarded_call`` (``judged`` for a whole verdict), which
``tasks.correctness`` applies to an owner's verifier too, so evaluation survives it as well. ``GuardedReward`` also
adds weighted extra rewards (``format_reward``: the answer in its documented form), each one logged; it scores
a batch (``score_batch``: rewards and correctness, a ``ScoredBatch``), on reward workers when asked
(``begin_round``), keeping what TRL-form functions log.
"""

from __future__ import annotations

import difflib
import importlib
import math
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from fgrpo.config import ConfigError
from fgrpo.seeds import derived_seed
from fgrpo.tasks import Example, content_answer, correctness, guarded_call, marked_answer, reads_extracted
from fgrpo.trl_rewards import (
    BatchLog,
    BatchReward,
    BatchScores,
    RewardState,
    RewardTerm,
    ScoredBatch,
    Verdict,
    is_batch_function,
    on_workers,
    trl_function,
)

RewardFn = Callable[[Example, str], float]


class Judge:
    """A reward that judges a sample once, ``judge(example, completion) -> Verdict`` (reward and correctness);
    called as a ``RewardFn``, its reward alone."""

    def __call__(self, example: Example, completion: str) -> float:
        return self.judge(example, completion).reward


def judged(reward: RewardFn, example: Example, completion: str) -> Verdict:
    """The reward's ``Verdict`` (a bare reward function: its value, and ``tasks.correctness``) under the failure
    policy (``tasks.guarded_call``'s rule): a reward that raises or is not finite scores 0, is not correct, and says
    what went wrong."""
    judge = getattr(reward, "judge", None)
    try:
        verdict = judge(example, completion) if judge else Verdict(reward(example, completion),
                                                                   correctness(example, completion))
        value = float(verdict.reward)
    except Exception as err:
        return Verdict(0.0, 0.0, f"{type(err).__name__}: {err}")
    if not math.isfinite(value):
        return Verdict(0.0, 0.0, f"non-finite value {value}")
    return verdict._replace(reward=value)


@dataclass(frozen=True)
class RewardScale(Judge):
    """How a client turns correctness into its reward; ``range`` = max reward - min reward it can give
    (declared: only differential privacy on the statistics uses it, as a bound that depends on no data)."""

    name: str
    range: float

    def judge(self, example: Example, completion: str) -> Verdict:
        score = correctness(example, completion)
        if self.name == "x1":
            return Verdict(score, score)
        if self.name == "x10":
            return Verdict(10.0 * score, score)
        if self.name == "partial":  # character-level partial credit in [0, 1]
            return Verdict(difflib.SequenceMatcher(None, completion.strip(), example.answer).ratio(), score)
        if self.name == "signed":
            return Verdict(1.0 if score >= 1.0 else -1.0, score)
        raise ValueError(f"unknown reward scale {self.name!r}")


REWARD_SCALES = {s.name: s for s in [RewardScale("x1", 1.0), RewardScale("x10", 10.0),
                                     RewardScale("partial", 1.0), RewardScale("signed", 2.0)]}


def format_reward(example: Example, completion: str) -> float:
    """1 when the answer has the documented form, else 0: compact, the completion is its answer and nothing
    else (``content_answer`` leaves it as it is); chat and English prompts, it marks its answer
    (``marked_answer``, the system prompt asks for "Answer: <answer>")."""
    if reads_extracted(example):
        return float(marked_answer(completion) is not None)
    return float(bool(completion) and content_answer(completion) == completion)


class GuardedReward(Judge):
    """Every client's reward as training sees it: a sample whose reward raises or is not finite
    scores 0 and is counted (``take_failures``); one bad sample never stops a client. It also keeps the
    lowest and highest reward given since ``take_observed_range`` was last called: the range a client
    reports is what its verifier actually produced, so no verifier needs to declare a scale.

    ``extra``: further reward functions with weights, (name, function, weight): the reward is
    r = r_verifier + sum_j weight_j * r_j, and each component's mean is logged (``take_components``), as is
    each of an owner's weighted functions (``BatchReward``), over the samples it applied to.

    A batch at a time (``score_batch``: each sample's reward and correctness from one call of the reward): an
    owner's ``BatchReward`` as TRL calls its functions, on ``workers`` threads when ``begin_round`` asks for them
    (any reward then: one call per sample, with ``timeout``); what TRL-form functions log stays on the owner's
    side (``take_round_log``)."""

    def __init__(self, reward: RewardFn, extra: tuple[tuple[str, RewardFn, float], ...] = ()):
        self.reward, self.extra = reward, extra
        self.name = getattr(reward, "name", "custom")
        # for DP on the statistics only
        self.declared_range = getattr(reward, "range", 1.0) + sum(abs(w) for _, _, w in extra)
        self.failures = self.calls = 0
        self.last_error = ""
        self.low, self.high = math.inf, -math.inf
        self.component_sums: dict[str, list[float]] = {}  # reward/<name> -> [sum, samples it applied to]
        self.begin_round(0)

    def begin_round(self, rnd: int, workers: int = 0, timeout: float = 0.0) -> None:
        """A new round: TRL's ``trainer_state`` at (round, step 0), ``workers`` threads for the reward calls
        (0: none) with ``timeout`` seconds per call (0: no limit), nothing logged yet."""
        self.state, self.workers, self.timeout = RewardState(round=rnd), workers, timeout
        self.round_columns: dict[str, list] | None = None  # of the round's first batch: its sample completions'
        self.round_metrics: dict[str, list[float]] = {}

    def judge(self, example: Example, completion: str) -> Verdict:
        """One sample: its reward (the extra rewards added, counted and logged) and its verifier's correctness."""
        verdict = judged(self.reward, example, completion)
        return Verdict(self._record(example, completion, verdict.reward, verdict.error), verdict.correct)

    def score_batch(self, examples: list[Example], completions: list[str], completion_ids: list[list[int]],
                    step: int) -> ScoredBatch:
        """Each sample's reward and correctness from one call of the reward (per sample, or per batch in TRL's
        form); ``step``: local steps done in the round (TRL's ``global_step``). A reward scored per sample, without
        workers, is judged once per sample (``judge``), its extra rewards right after it, as it always was."""
        self.state.global_step = step
        batch = getattr(self.reward, "score_batch", None)
        if batch is None and not self.workers:
            verdicts = [self.judge(e, c) for e, c in zip(examples, completions)]
            return ScoredBatch([v.reward for v in verdicts], [v.correct for v in verdicts])
        if batch is not None:
            scores = batch(examples, completions, completion_ids, self.state, self.workers, self.timeout)
        else:
            verdicts = on_workers(lambda i: judged(self.reward, examples[i], completions[i]), len(examples),
                                  self.workers, self.timeout, lambda error: Verdict(0.0, 0.0, error))
            scores = BatchScores([v.reward for v in verdicts], [v.error for v in verdicts], {},
                                 BatchLog(len(examples)), [v.correct for v in verdicts])
        self._keep_log(scores)
        rewards = [self._record(e, c, scores.totals[i], scores.errors[i], {k: v[i] for k, v in scores.parts.items()})
                   for i, (e, c) in enumerate(zip(examples, completions))]
        return ScoredBatch(rewards, scores.correct)

    def _keep_log(self, scores: BatchScores) -> None:
        """The round's first batch: each function's rewards (None: not applicable) and what the functions logged;
        every batch: the numbers they logged."""
        if self.round_columns is None:
            parts = {f"reward/{k}": [None if math.isnan(x) else x for x in v] for k, v in scores.parts.items()}
            self.round_columns = {**parts, **scores.log.columns}
        for name, values in scores.log.metrics.items():
            self.round_metrics.setdefault(name, []).extend(values)

    def _record(self, example: Example, completion: str, value: float, error: str | None,
                parts: dict[str, float] | None = None) -> float:
        """The reward of a sample whose verifier gave (``value``, ``error``), with the extra rewards added;
        counted, and its components (``parts``: an owner's weighted functions) logged."""
        self.calls += 1
        if error is not None:
            self.failures += 1
            self.last_error = error
        components = dict(parts) if parts else ({"verifier": value} if self.extra else {})
        for name, fn, weight in self.extra:
            part = guarded_call(fn, example, completion)[0]
            components[name] = part
            value += weight * part
        for name, part in components.items():
            if not math.isnan(part):  # None from a TRL-form function: not applicable here
                total = self.component_sums.setdefault(f"reward/{name}", [0.0, 0])
                total[0], total[1] = total[0] + part, total[1] + 1
        self.low, self.high = min(self.low, value), max(self.high, value)
        return value

    def take_components(self) -> dict[str, float]:
        """Mean of each reward component (unweighted) since the last call; empty without ``extra`` or
        several owner's functions."""
        out = {k: total / n for k, (total, n) in self.component_sums.items() if n}
        self.component_sums = {}
        return out

    def take_round_log(self) -> tuple[dict[str, list], dict[str, float]]:
        """What this round's reward functions logged, for the owner's sample completions: columns of the round's
        first batch (TRL's ``log_extra``; each weighted function's reward as reward/<name>), one value per
        sample, and the mean of each ``log_metric`` number."""
        columns = self.round_columns or {}
        metrics = {k: sum(v) / len(v) for k, v in self.round_metrics.items() if v}
        self.round_columns, self.round_metrics = None, {}
        return columns, metrics

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


@dataclass(frozen=True)
class NoisyReward(Judge):
    """A flaky verifier: on a pseudo-random ``noise`` share of (prompt, completion) pairs it pays a coin
    flip (0 or 1) instead of correctness. Which pairs, and the flip, are a hash of the pair and
    ``salt``: the same answer always gets the same reward, so runs stay reproducible and resumable."""

    noise: float
    salt: str
    name: str = "noisy"
    range: float = 1.0

    def judge(self, example: Example, completion: str) -> Verdict:
        score = correctness(example, completion)
        if derived_seed(self.salt, example.prompt, completion) / 2**31 < self.noise:
            return Verdict(float(derived_seed(self.salt, "flip", example.prompt, completion) % 2), score)
        return Verdict(score, score)


@dataclass(frozen=True)
class InvertedReward(Judge):
    """A verifier that is wrong in a systematic way: it pays 1 for a wrong answer and 0 for a right one."""

    name: str = "inverted"
    range: float = 1.0

    def judge(self, example: Example, completion: str) -> Verdict:
        score = correctness(example, completion)
        return Verdict(1.0 - score, score)


class RoutedReward(Judge):
    """Each example judged by the reward of the owner it came from (for pooled training): ``owners`` are
    (reward, its examples) pairs, one per client."""

    def __init__(self, owners: Iterable[tuple[RewardFn, list[Example]]]):
        owners = list(owners)
        self._owner = {id(e): reward for reward, train in owners for e in train}
        self.name = "per-owner"
        # the clients' rewards are GuardedReward (declared_range) or bare verifiers (range)
        self.range = max(getattr(r, "declared_range", getattr(r, "range", 1.0)) for r, _ in owners)

    def judge(self, example: Example, completion: str) -> Verdict:
        return judged(self._owner[id(example)], example, completion)


# --- a data owner's verifiers ----------------------------------------------------------------

def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def owner_answer(completion: str) -> str:
    """The answer a completion marks (``tasks.marked_answer``), else the whole completion."""
    marked = marked_answer(completion)
    return completion.strip() if marked is None else marked


def exact_match(prompt: str, completion: str, answer: str) -> float:
    return float(normalize(answer) in (normalize(completion), normalize(owner_answer(completion))))


def math_match(prompt: str, completion: str, answer: str) -> float:
    from math_verify import parse, verify

    if threading.current_thread() is threading.main_thread():
        return float(verify(parse(answer), parse(completion)))
    # on a reward worker: math-verify's own timeouts need signal.alarm, which only the main thread has
    # (reward_timeout applies instead), as TRL's accuracy_reward does
    return float(verify(parse(answer, parsing_timeout=None), parse(completion, parsing_timeout=None),
                        timeout_seconds=None))


def resolve_reward(name: str):
    """A verifier ``f(prompt, completion, answer) -> float`` from its name (see module docstring)."""
    if name == "exact":
        return exact_match
    if name == "math":
        return math_match
    if name.startswith("rg:"):
        import reasoning_gym

        try:
            scorer = reasoning_gym.create_dataset(name[3:], seed=0, size=1)
        except Exception as err:
            raise ConfigError(f"rewards: {name!r}: reasoning-gym has no dataset {name[3:]!r} ({err})") from None
        return lambda prompt, completion, answer: float(
            scorer.score_answer(owner_answer(completion), {"answer": answer, "metadata": {}}))
    if name.startswith("trl:"):
        return trl_function(name[4:])
    if ":" in name:
        module_name, func_name = name.split(":", 1)
        try:
            func = getattr(importlib.import_module(module_name), func_name)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"rewards: {name!r} cannot be imported ({err}); give module:function on the "
                              "Python path") from None
        if not callable(func):
            raise ConfigError(f"rewards: {name!r} is not callable")
        return func
    raise ConfigError(f"rewards: {name!r} is not known; use module:function, trl:<name>, exact, math or rg:<dataset>")


_TERM = re.compile(r"\s*(?:([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*\*\s*)?([^\s*+]+)\s*")


def owner_reward(spec: str) -> OwnerReward | BatchReward:
    """A data owner's reward from its ``rewards`` entry: functions joined by ``+``, each ``name`` or
    ``weight*name`` (TRL's ``reward_weights``; 1 when not given). One (prompt, completion, answer) verifier at
    weight 1 is an ``OwnerReward``, as always; anything else a ``BatchReward``, logged as reward/<name> each."""
    terms: list[RewardTerm] = []
    for part in spec.split("+"):
        match = _TERM.fullmatch(part)
        if match is None:
            raise ConfigError(f"rewards: {spec!r}: {part.strip()!r} is not NAME or WEIGHT*NAME (functions joined "
                              "by +, e.g. trl:accuracy_reward+0.5*trl:think_format_reward)")
        function = resolve_reward(match[2])
        label = match[2].rsplit(":", 1)[-1]
        label = f"{label}_{len(terms) + 1}" if label in [t.name for t in terms] else label
        terms.append(RewardTerm(label, function, float(match[1] or 1.0), is_batch_function(function)))
    if len(terms) == 1 and not terms[0].batch and terms[0].weight == 1.0:
        return OwnerReward(spec, terms[0].function)
    return BatchReward(spec, terms)


class OwnerReward(Judge):
    """A data owner's reward: its verifier on (prompt, completion, answer), on any scale (declared range 1:
    the bound DP on the statistics clips to); its value is both the reward and the correctness. Failures are
    handled where every client's reward is (``GuardedReward``)."""

    range = 1.0

    def __init__(self, name: str, verifier: Callable[[str, str, str], float]):
        self.name = name
        self.verifier = verifier

    def judge(self, example: Example, completion: str) -> Verdict:
        value = float(self.verifier(example.prompt, completion, example.answer))
        return Verdict(value, value)

    def verifier_of(self, columns: dict) -> Callable[[str, str, str], float]:
        """The verifier evaluation scores a held-out row with (``Example.verifier``): the same for every row."""
        return self.verifier


def guarded(reward: RewardFn, format_weight: float = 0.0) -> GuardedReward:
    """``reward`` under the failure policy (``GuardedReward``), with the format reward added at
    ``format_weight`` when it is > 0 (``format_reward`` in the config)."""
    extra = (("format", format_reward, format_weight),) if format_weight > 0 else ()
    return GuardedReward(reward, extra)
