"""Every strategy in one place: how its clients train and how the server combines them.

A *strategy* (``--strategy``) is one idea of the server:

    weighting  the name of a pure weight function of ``fgrpo.aggregation`` (statistics -> weights w_k),
               or None when the server weighs nothing (``median``, ``local-only``)
    combine    how the server merges the deltas (``fgrpo.server.COMBINE``, or its own server class)
    mode       who trains from what, and whether there are weights (``Mode``): decided here, once
    adaptive   whether the weights depend on the round's statistics (``fgrpo compare`` plots them)

A *modifier* composes with any weighting through config settings: ``fedprox`` (a client-side
proximal term), ``fedadam`` / ``fedyogi`` (a server optimizer on the weighted pseudo-gradient).
``recipe`` turns a comparison's strategy name (``fgrpo+fedadam[tau=0.3]``) into config settings.
This module imports no torch (the command line lists the strategies at once); formulas:
docs/algorithm.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any


class Mode(Enum):
    """Who trains in a strategy's round (how the server merges them is ``Strategy.combine``)."""

    FEDERATED = False  # the sampled clients train from the global adapter
    POOLED = True  # one client holding every client's prompts trains the global adapter (centralized)
    LOCAL_ONLY = None  # each client trains its own adapter (``combine = "own"``)

    @property
    def pooled(self) -> bool:
        """True: every client's prompts in one client (the server sees no owner apart)."""
        return self.value is True


@dataclass(frozen=True)
class Strategy:
    name: str
    summary: str  # one line for the CLI help and the docs
    weighting: str | None  # a weight function of fgrpo.aggregation, by name; None: no aggregation
    mode: Mode = Mode.FEDERATED
    adaptive: bool = False
    combine: str = "weighted"  # how the server merges the deltas: "weighted" sum_k w_k delta_k, "median" (the
    # coordinate-wise median), or "own" (local-only: each delta to its own client's adapter; ``LocalOnlyServer``)

    @property
    def weigh(self):
        """The weight function (``fgrpo.aggregation.<weighting>``; imported here, with torch, when used), or
        None for a strategy that combines nothing."""
        if self.weighting is None:
            return None
        from fgrpo import aggregation

        return getattr(aggregation, self.weighting)


STRATEGIES: dict[str, Strategy] = {s.name: s for s in [
    Strategy("fgrpo", "w_k ∝ p_k^alpha exp(g_k / tau), g_k the relative gain over the client's own baseline",
             "fgrpo", adaptive=True),
    Strategy("fedavg", "w_k = n_k / sum n", "fedavg"),
    Strategy("uniform", "w_k = 1 / |S|", "uniform"),
    Strategy("reward-weighted", "w_k ∝ max(r_end_k, 0): raw rewards, the scale-sensitive strawman",
             "reward_weighted", adaptive=True),
    Strategy("gain-no-baseline", "w_k = softmax((r_end_k - r_start_k) / tau): gain without a personal baseline",
             "gain_no_baseline", adaptive=True),
    Strategy("median", "reference: the coordinate-wise median of the deltas (robust to a minority of bad "
             "updates; no weights)", None, combine="median"),
    Strategy("centralized", "reference: every client's prompts pooled in one model, same steps per round",
             "fedavg", mode=Mode.POOLED),
    Strategy("local-only", "reference: each client trains alone and is evaluated on its own tasks",
             None, mode=Mode.LOCAL_ONLY, combine="own"),
]}

FEDPROX_MU = 0.01  # FedProx weight of the `fedprox` recipes, tuned over {0.01, 0.1, 1} on scale-skew and
# difficulty-skew of the main preset, 3 seeds (RESULTS.md): 0.01 was best on both (1 cost 2-5 points)
SERVER_ADAPTIVE_LR = 0.003  # server step of the `fedadam` / `fedyogi` recipes: about the RMS of one
# client delta coordinate on the embedded default (||delta|| ~ 1.0 over 164k LoRA values), so the first
# adaptive step is as large as an sgd step


@dataclass(frozen=True)
class Modifier:
    name: str
    summary: str
    settings: dict[str, Any]


MODIFIERS: dict[str, Modifier] = {m.name: m for m in [
    Modifier("fedprox", f"clients add proximal_mu / 2 ||theta - theta_t||^2 (proximal_mu = {FEDPROX_MU})",
             {"proximal_mu": FEDPROX_MU}),
    Modifier("fedadam", "the server applies the weighted pseudo-gradient with Adam (FedAdam)",
             {"server_optimizer": "adam", "server_lr": SERVER_ADAPTIVE_LR}),
    Modifier("fedyogi", "the server applies the weighted pseudo-gradient with Yogi (FedYogi)",
             {"server_optimizer": "yogi", "server_lr": SERVER_ADAPTIVE_LR}),
]}
MODIFIED_WEIGHTING = "fedavg"  # a modifier alone (``fedprox``) modifies FedAvg


def recipe(name: str) -> dict[str, Any]:
    """Config settings of a named strategy: ``fgrpo``, ``fedprox`` (= fedavg + proximal term),
    ``fedadam``, ``fgrpo+fedadam``, ``fgrpo+fedprox+fedyogi``, ..., optionally followed by
    ``[key=value,...]`` config settings (``fgrpo[tau=0.3,gain_form=ratio]``).
    Raises ValueError for an unknown name (the caller words it for the user)."""
    settings: dict[str, Any] = {}
    if name.endswith("]") and "[" in name:
        name, inner = name[:-1].split("[", 1)
        for item in filter(None, (i.strip() for i in inner.split(","))):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"{item!r} in {name}[...] is not key=value")
            settings[key.strip()] = value.strip()
    parts = name.split("+")
    weighting, mods = (parts[0], parts[1:]) if parts[0] in STRATEGIES else (MODIFIED_WEIGHTING, parts)
    out: dict[str, Any] = {"strategy": weighting}
    for mod in mods:
        if mod not in MODIFIERS:
            raise ValueError(f"{name!r} is not known; use one of {', '.join([*STRATEGIES, *MODIFIERS])}, or "
                             "weighting+modifier such as fgrpo+fedadam")
        out.update(MODIFIERS[mod].settings)
    return {**out, **settings}
