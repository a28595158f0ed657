"""Server-side aggregation: pure functions over per-client statistics.

FGRPO weights each participant by its *relative performance gain* against its own history:

    first participation:  b_k <- r_start_k,   s_k <- max(std_k, floor * range_k)
    gain ("z"):           g_k = (r_end_k - b_k) / max(s_k, floor * range_k)
    gain ("ratio"):       g_k = (r_end_k - b_k) / max(|b_k|, floor * range_k)
    weights:              w_k ∝ p_k^alpha * exp(g_k / tau),   p_k = n_k / sum_j n_j
                          w <- (1 - lambda) * w + lambda / |S|
    global step:          theta <- theta + eta * sum_k w_k * delta_k
    baseline update:      b_k <- m * b_k + (1 - m) * r_end_k,   s_k <- m * s_k + (1 - m) * std_k

``std_k`` is the client's mean within-group reward std (``gain_spread = "group"``, the definition of
docs/algorithm.md) or, in the named variant ``gain_spread = "pooled"``, the std of all its rewards in a step's
rollouts, across prompts and completions. The within-group std measures how diverse the policy's
samples for one prompt are, and GRPO drives it towards 0 as the policy turns deterministic; r_end
still varies from round to round with the batch of prompts, so a client whose groups have collapsed
gets z gains of several units from batch noise alone. The pooled std includes the variation across
prompts and does not collapse that way (its z gain is an effect size).

``range_k`` is the client's reward range: the largest max - min of the rewards its verifier actually
gave in one round's rollouts, so far (no verifier declares a scale). The floor thus scales with the
client's rewards: multiplying them by c > 0 leaves both gain forms unchanged, and the z form is also
unchanged by adding a constant. A client whose rewards have never differed (range 0) has gain 0.
Clients absent from a round keep their state.

Baselines, all on the same interface (statistics in, weights out):
    fedavg            w_k = p_k
    uniform           w_k = 1 / |S|
    reward-weighted   w_k ∝ max(r_end_k, 0)   (the scale-sensitive strawman; uniform if all are 0)
    gain-no-baseline  w_k = softmax((r_end_k - r_start_k) / tau)   (ablation: no personal baseline)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fgrpo.config import RunConfig

Adapter = dict[str, torch.Tensor]  # LoRA tensor name -> tensor


@dataclass(frozen=True)
class ClientStats:
    """What the server learns about one client in one round (besides its delta)."""

    client_id: str
    num_prompts: int  # n_k
    reward_start: float  # r_start: mean reward of the first local step's rollouts
    reward_end: float  # r_end: mean reward of the last local step's rollouts
    reward_std: float  # mean within-group reward std
    reward_range: float  # max - min of the rewards its verifier gave in this round's rollouts
    reward_pooled_std: float  # std of all rewards of a step's rollouts (prompts and completions), mean over steps
    paired_gain: float = 0.0  # d_k: gain = paired, the mean paired score change on the owner's validation prompts
    paired_se: float = 0.0  # se_k: its standard error over those prompts (both in units of the reward range)
    validation_size: int = 0  # V_k: how many validation prompts (0: not measured)


@dataclass(frozen=True)
class ClientBaseline:
    """Server state per client id (b_k, s_k and the reward range it has reported)."""

    baseline: float
    spread: float
    reward_range: float
    rounds: int = 0


@dataclass(frozen=True)
class FGRPOSettings:
    """The server's weighting settings (defaults and meanings: RunConfig)."""

    gain_form: str
    tau: float
    baseline_momentum: float
    uniform_mix: float
    size_exponent: float
    gain_floor: float
    gain_spread: str = "group"
    gain: str = "reward"  # "reward": r_end against b_k; "paired" / "probe": a measured gain d_k with its se_k
    gain_lean: str = "both"  # a measured gain: "both" ways, or only "down" (t_k < 0)
    gain_shortfall: str = "history"  # what lowers an owner: a gain below its usual one, or only a "decline"

    @classmethod
    def from_config(cls, cfg: RunConfig) -> FGRPOSettings:
        return cls(gain_form=cfg.gain_form, tau=cfg.tau, baseline_momentum=cfg.baseline_momentum,
                   uniform_mix=cfg.uniform_mix, size_exponent=cfg.size_exponent, gain_floor=cfg.gain_floor,
                   gain_spread=cfg.gain_spread, gain=cfg.gain, gain_lean=cfg.gain_lean,
                   gain_shortfall=cfg.gain_shortfall)


@dataclass
class RoundWeights:
    weights: list[float]  # one per participant, summing to 1
    gains: list[float | None]  # g_k (None for strategies without gains)
    client_baselines: dict[str, ClientBaseline]  # server state after this round


def data_shares(stats: list[ClientStats]) -> list[float]:
    """p_k = n_k / sum_j n_j."""
    total = sum(s.num_prompts for s in stats)
    return [s.num_prompts / total for s in stats]


def reward_spread(s: ClientStats, gain_spread: str) -> float:
    """std_k: the within-group reward std ("group") or the std of all the round's rewards ("pooled")."""
    if gain_spread == "group":
        return s.reward_std
    if gain_spread == "pooled":
        return s.reward_pooled_std
    raise ValueError(f"unknown gain spread {gain_spread!r}")


def init_baselines(stats: list[ClientStats], client_baselines: dict[str, ClientBaseline],
                   floor: float, gain_spread: str = "group") -> dict[str, ClientBaseline]:
    """Add first-time participants: b_k = r_start_k, s_k = max(std_k, floor * range_k)."""
    out = dict(client_baselines)
    for s in stats:
        if s.client_id not in out:
            out[s.client_id] = ClientBaseline(s.reward_start, max(reward_spread(s, gain_spread),
                                                                  floor * s.reward_range), s.reward_range)
    return out


def relative_gain(s: ClientStats, state: ClientBaseline, form: str, floor: float) -> float:
    """g_k: the client's improvement over its own baseline, in units of its own reward scale."""
    reward_range = max(state.reward_range, s.reward_range)
    if form == "z":
        scale = max(state.spread, floor * reward_range)
    elif form == "ratio":
        scale = max(abs(state.baseline), floor * reward_range)
    else:
        raise ValueError(f"unknown gain form {form!r}")
    return (s.reward_end - state.baseline) / scale if scale > 0 else 0.0  # scale 0: rewards never differed


def gain_weights(gains: list[float], shares: list[float], tau: float, size_exponent: float,
                 uniform_mix: float) -> list[float]:
    """w_k ∝ p_k^alpha * exp(g_k / tau), then mixed with uniform: (1 - lambda) w + lambda / |S|."""
    logits = torch.tensor([size_exponent * math.log(p) + g / tau for g, p in zip(gains, shares)],
                          dtype=torch.float64)
    w = torch.softmax(logits, dim=0)
    w = (1 - uniform_mix) * w + uniform_mix / len(gains)
    return w.tolist()


def update_baselines(stats: list[ClientStats], client_baselines: dict[str, ClientBaseline],
                     momentum: float, gain_spread: str = "group") -> dict[str, ClientBaseline]:
    """EMA of each participant's baseline and spread; absent clients are unchanged."""
    out = dict(client_baselines)
    for s in stats:
        old = out[s.client_id]
        out[s.client_id] = replace(
            old,
            baseline=momentum * old.baseline + (1 - momentum) * s.reward_end,
            spread=momentum * old.spread + (1 - momentum) * reward_spread(s, gain_spread),
            reward_range=max(old.reward_range, s.reward_range),
            rounds=old.rounds + 1,
        )
    return out


def fgrpo(stats: list[ClientStats], client_baselines: dict[str, ClientBaseline],
          settings: FGRPOSettings) -> RoundWeights:
    """FGRPO adaptive aggregation weights for one round (a measured gain: ``resolved_gain_weights``)."""
    if settings.gain != "reward":
        return resolved_gain_weights(stats, client_baselines, settings)
    states = init_baselines(stats, client_baselines, settings.gain_floor, settings.gain_spread)
    gains = [relative_gain(s, states[s.client_id], settings.gain_form, settings.gain_floor)
             for s in stats]
    weights = gain_weights(gains, data_shares(stats), settings.tau, settings.size_exponent,
                           settings.uniform_mix)
    return RoundWeights(weights, gains, update_baselines(stats, states, settings.baseline_momentum,
                                                            settings.gain_spread))


T_CLIP = 3.0  # |t_k| beyond 3 standard errors counts as 3: one round's weight ratio is at most e^(2 T / tau)


def resolved_gain_weights(stats: list[ClientStats], client_baselines: dict[str, ClientBaseline],
                          settings: FGRPOSettings) -> RoundWeights:
    """FGRPO with a measured gain d_k (gain = paired: the owner's; probe: the server's) and its standard error:

        t_k = (d_k - b_k) / e_k,   e_k = max(se_k, 1 / V_k)    b_k: the owner's past gains (EMA, 0 at first)
        gain_shortfall = decline:  t_k <- max(t_k, min(d_k / e_k, 0))   (lowered only by a resolved decline)
        w_k ∝ n_k * exp(clip(t_k, -T, H) / tau)     T = T_CLIP; H = T (gain_lean = both) or 0 (down)
        b_k <- m * b_k + (1 - m) * d_k

    A gain that is not resolved (t_k near 0: within its standard error of the owner's usual gain) leaves
    FedAvg's weight w_k = n_k / sum n; only a resolved gain moves it. With ``down`` a resolved gain above the
    owner's usual one raises nobody: only a resolved shortfall lowers that owner's weight (the others share
    it in proportion to n_k). With ``decline`` an update that improved its owner (d_k >= 0) is never lowered,
    however far below its past gains (learning slows as a task is learnt), and one that made it worse is
    lowered by the smaller of its two shortfalls. The gains reported are the t_k."""
    states = {s.client_id: client_baselines.get(s.client_id, ClientBaseline(0.0, 0.0, 0.0)) for s in stats}
    t = []
    for s in stats:
        resolution = max(s.paired_se, 1 / max(s.validation_size, 1))
        t_k = (s.paired_gain - states[s.client_id].baseline) / resolution
        t.append(max(t_k, min(s.paired_gain / resolution, 0.0)) if settings.gain_shortfall == "decline" else t_k)
    high = T_CLIP if settings.gain_lean == "both" else 0.0
    logits = torch.tensor([math.log(p) + min(max(x, -T_CLIP), high) / settings.tau
                           for x, p in zip(t, data_shares(stats))], dtype=torch.float64)
    out = dict(client_baselines)
    for s in stats:
        old = states[s.client_id]
        m = settings.baseline_momentum if old.rounds else 0.0  # the first measured gain starts the history
        out[s.client_id] = replace(old, baseline=m * old.baseline + (1 - m) * s.paired_gain, rounds=old.rounds + 1)
    return RoundWeights(torch.softmax(logits, dim=0).tolist(), t, out)


def fedavg(stats: list[ClientStats], client_baselines: dict[str, ClientBaseline],
           settings: FGRPOSettings) -> RoundWeights:
    """FedAvg: w_k = p_k; server state is left as it is."""
    return RoundWeights(data_shares(stats), [None] * len(stats), dict(client_baselines))


def uniform(stats: list[ClientStats], client_baselines: dict[str, ClientBaseline],
            settings: FGRPOSettings) -> RoundWeights:
    """Uniform: w_k = 1 / |S|."""
    return RoundWeights([1 / len(stats)] * len(stats), [None] * len(stats), dict(client_baselines))


def reward_weighted(stats: list[ClientStats], client_baselines: dict[str, ClientBaseline],
                    settings: FGRPOSettings) -> RoundWeights:
    """w_k ∝ max(r_end_k, 0): raw rewards, so a client on a x10 scale gets ~10x the weight."""
    raw = [max(s.reward_end, 0.0) for s in stats]
    total = sum(raw)
    weights = [r / total for r in raw] if total > 0 else [1 / len(stats)] * len(stats)
    return RoundWeights(weights, [None] * len(stats), dict(client_baselines))


def gain_no_baseline(stats: list[ClientStats], client_baselines: dict[str, ClientBaseline],
                     settings: FGRPOSettings) -> RoundWeights:
    """Ablation: g_k = r_end_k - r_start_k (no personal baseline, no scale), w = softmax(g / tau)."""
    gains = [s.reward_end - s.reward_start for s in stats]
    weights = torch.softmax(torch.tensor(gains, dtype=torch.float64) / settings.tau, dim=0).tolist()
    return RoundWeights(weights, gains, dict(client_baselines))


def cap_weights(weights: list[float], bound: float) -> list[float]:
    """Weights with none above ``bound`` (raised to 1 / n when lower, the least feasible bound): each
    weight over it is cut to it and the excess is shared by the others in proportion to their weights,
    repeated until none exceeds it (water-filling). Sums to 1; the order of the weights is kept."""
    bound = max(bound, 1 / len(weights))
    out, capped = list(weights), set()
    while over := [i for i, w in enumerate(out) if i not in capped and w > bound]:
        capped.update(over)
        free = [i for i in range(len(out)) if i not in capped]
        left, free_total = 1.0 - bound * len(capped), sum(out[i] for i in free)
        for i in capped:
            out[i] = bound
        for i in free:  # in proportion; equally when the free weights are all zero
            out[i] = left * (out[i] / free_total if free_total > 0 else 1 / len(free))
    return out


WeightFn = Callable[[list[ClientStats], dict[str, ClientBaseline], FGRPOSettings], RoundWeights]
# the strategies that use them: fgrpo.strategies.STRATEGIES


def lora_product_error(global_params: dict[str, torch.Tensor], deltas: list[dict[str, torch.Tensor]],
                       weights: list[float]) -> float:
    """How far averaging LoRA factors separately is from averaging the updates they make.

    For each adapted layer, with B_k = B + dB_k and A_k = A + dA_k (and sum_k w_k = 1):
        exact  = sum_k w_k B_k A_k             (what averaging the full weight updates would give)
        fedit  = (sum_k w_k B_k)(sum_k w_k A_k) (what averaging A and B separately gives)
        exact - fedit = sum_k w_k (B_k - B_bar)(A_k - A_bar)
        exact - B A   = sum_k w_k dB_k A_k + B dA_bar
    returns ||exact - fedit||_F / ||exact - B A||_F over all layers (0 when A is shared and frozen).
    Each difference is one product U V of thin factors, and ||U V||_F^2 = tr((U^T U)(V V^T)) needs
    only (K r x K r) matrices: never a full d_out x d_in weight.
    """
    num = den = 0.0
    for a_name in (k for k in global_params if "lora_A" in k):
        b_name = a_name.replace("lora_A", "lora_B")
        a, b = global_params[a_name].double(), global_params[b_name].double()
        d_a = [d[a_name].double() for d in deltas]
        d_b = [d[b_name].double() for d in deltas]
        d_a_bar = sum(w * x for w, x in zip(weights, d_a))
        d_b_bar = sum(w * x for w, x in zip(weights, d_b))
        num += _product_norm_sq([w * (x - d_b_bar) for w, x in zip(weights, d_b)], [x - d_a_bar for x in d_a])
        den += _product_norm_sq([w * x for w, x in zip(weights, d_b)] + [b], [a + x for x in d_a] + [d_a_bar])
    # 6 significant digits: the float64 products may differ in the last bits between runs (thread splits)
    return float(f"{math.sqrt(num / den):.6g}") if den > 0 else 0.0


def _product_norm_sq(lefts: list[torch.Tensor], rights: list[torch.Tensor]) -> float:
    """||sum_i L_i R_i||_F^2 = tr((U^T U)(V V^T)) with U = [L_1 .. L_n], V = [R_1; ..; R_n]."""
    u, v = torch.cat(lefts, dim=1), torch.cat(rights, dim=0)
    return max(float(((u.T @ u) * (v @ v.T)).sum()), 0.0)


def update_norm(delta: dict[str, torch.Tensor]) -> float:
    """||delta||_2 over all adapter tensors."""
    return math.sqrt(sum(float((d.float() ** 2).sum()) for d in delta.values()))


def pseudo_gradient(deltas: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Delta = sum_k w_k * delta_k, in float32."""
    return {name: sum(w * d[name].to(torch.float32) for w, d in zip(weights, deltas)) for name in deltas[0]}


def coordinate_median(deltas: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Delta = the coordinate-wise median of the deltas (the ``median`` strategy, a robust reference: one
    client cannot move a coordinate beyond the others' range); for an even count, the lower middle value."""
    return {name: torch.stack([d[name].to(torch.float32) for d in deltas]).median(dim=0).values for name in deltas[0]}


@dataclass(frozen=True)
class ServerOptimizer:
    """How the server applies the weighted pseudo-gradient (Reddi et al. 2021, as in Flower)."""

    kind: str  # sgd | adam | yogi
    lr: float  # eta
    beta1: float
    beta2: float
    eps: float  # the adaptivity tau of FedAdam / FedYogi

    @classmethod
    def from_config(cls, cfg: RunConfig) -> ServerOptimizer:
        return cls(cfg.server_optimizer, cfg.server_lr, cfg.server_beta1, cfg.server_beta2, cfg.server_eps)


@dataclass
class ServerOptimizerState:
    step: int = 0
    m: dict[str, torch.Tensor] | None = None
    v: dict[str, torch.Tensor] | None = None


def server_step(global_params: dict[str, torch.Tensor], delta: dict[str, torch.Tensor],
                opt: ServerOptimizer, state: ServerOptimizerState,
                ) -> tuple[dict[str, torch.Tensor], ServerOptimizerState]:
    """One server update from the pseudo-gradient Delta (new tensors; inputs untouched).

        sgd:   theta <- theta + eta * Delta
        adam:  m <- b1 m + (1 - b1) Delta;  v <- b2 v + (1 - b2) Delta^2
               theta <- theta + eta * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)
        yogi:  m as adam;  v <- v - (1 - b2) Delta^2 sign(v - Delta^2)
               theta <- theta + eta * m / (sqrt(v) + eps)     (no bias correction, as in Flower)
    """
    if opt.kind == "sgd":
        new = {k: (theta.to(torch.float32) + opt.lr * delta[k]).to(theta.dtype) for k, theta in global_params.items()}
        return new, ServerOptimizerState(state.step + 1)
    if opt.kind not in ("adam", "yogi"):
        raise ValueError(f"unknown server optimizer {opt.kind!r}")
    t = state.step + 1
    m_old = state.m or {k: torch.zeros_like(d) for k, d in delta.items()}
    v_old = state.v or {k: torch.zeros_like(d) for k, d in delta.items()}
    m = {k: opt.beta1 * m_old[k] + (1 - opt.beta1) * d for k, d in delta.items()}
    if opt.kind == "adam":
        v = {k: opt.beta2 * v_old[k] + (1 - opt.beta2) * d * d for k, d in delta.items()}
        lr = opt.lr * math.sqrt(1 - opt.beta2**t) / (1 - opt.beta1**t)
    else:
        v = {k: v_old[k] - (1 - opt.beta2) * d * d * torch.sign(v_old[k] - d * d) for k, d in delta.items()}
        lr = opt.lr
    new = {k: (theta.to(torch.float32) + lr * m[k] / (v[k].sqrt() + opt.eps)).to(theta.dtype)
           for k, theta in global_params.items()}
    return new, ServerOptimizerState(t, m, v)
