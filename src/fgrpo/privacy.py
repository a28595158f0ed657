"""Differential privacy for client updates and for the statistics FGRPO's weights are made of.

Placement follows Flower's DP strategies and mods (``dp`` in the config):

    server : the server clips each update,   adds Gaussian noise to the weighted sum   (central DP)
    client : each client clips its update,   the server adds the noise to the weighted sum (central DP)
    local  : each client clips its update and adds the noise itself; the server adds nothing

    clip      Delta_k <- Delta_k * min(1, C / ||Delta_k||_2)
    central   Delta   =  sum_k w_k Delta_k + N(0, (sigma * C * max_k w_k)^2 I)
              (with max_weight < 1 the weights are capped there and max_k w_k is replaced by that bound)
    local     Delta_k <- Delta_k + N(0, (sigma * C)^2 I)           (on the client, before sending)

The sensitivity of the weighted sum to one client is w_k * C, with the round's weights treated as
fixed (as Flower's DP FedAvg treats 1/m): they are computed from the statistics below, so they
are private only when those are (``dp_stats_noise > 0``), and are otherwise revealed to the server.

Statistics (r_start, r_end and the reward spread the server's ``gain_spread`` uses): with
``dp_stats_noise = sigma_s > 0`` each client clips them to [-R, R] (R = its verifier's declared
reward range, a bound that depends on no data, so a -1/+1 verifier's negative means survive) and
adds N(0, (sigma_s * 2 sqrt(3) R)^2) to each before sending (two clipped 3-vectors are at most 2
sqrt(3) R apart in L2); the reward range it reports is then R, not the range its rewards spanned.
FGRPO's weights, baselines and every other server decision are then post-processing of noised values
(the other spread is not sent: both spread fields carry the noised one).

Accounting: Opacus' RDP accountant, one Gaussian mechanism per round for the updates (noise
multiplier sigma) and one for the statistics (sigma_s), each with client sampling rate q =
clients per round / clients (central DP; treated as Poisson sampling, the usual approximation
for a fixed-size sample), composed by the accountant. Local DP gets no amplification from
sampling (the server sees who sent), so q = 1 there. epsilon is reported for ``dp_delta``.
"""

from __future__ import annotations

import math
import warnings

import torch
from opacus.accountants import RDPAccountant

from fgrpo.aggregation import Adapter, ClientStats, reward_spread, update_norm


def clip_update(delta: Adapter, clip: float) -> tuple[Adapter, bool]:
    """delta * min(1, C / ||delta||); and whether it was clipped."""
    norm = update_norm(delta)
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: v * factor for k, v in delta.items()}, factor < 1.0


def add_gaussian_noise(delta: Adapter, std: float, seed: int) -> Adapter:
    """delta + N(0, std^2 I), from a generator seeded by ``seed`` (reproducible and resumable)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: v + std * torch.randn(v.shape, generator=gen, dtype=torch.float32).to(v.dtype).to(v.device)
            for k, v in sorted(delta.items())}


def central_noise_std(noise_multiplier: float, clip: float, weights: list[float], max_weight: float = 1.0,
                      ) -> float:
    """sigma * C * max_k w_k: the std that makes the weighted sum a Gaussian mechanism with
    multiplier sigma (the sensitivity to one client is w_k * C). With a weight bound (``max_weight``
    < 1) the noise is calibrated to the bound, sigma * C * max(max_weight, 1 / n), which does not
    depend on the round's statistics."""
    if max_weight < 1:
        return noise_multiplier * clip * max(max_weight, 1 / len(weights))
    return noise_multiplier * clip * max(weights)


def privatize_stats(stats: ClientStats, noise_multiplier: float, seed: int, bound: float | None = None,
                    gain_spread: str = "group") -> ClientStats:
    """Clip r_start, r_end and the spread ``gain_spread`` selects to [-R, R] (R = ``bound``, the verifier's
    declared reward range) and add N(0, (sigma_s 2 sqrt(3) R)^2); the range sent is R itself (the observed one
    would depend on data). Without ``bound``, R is the range in ``stats``."""
    gen = torch.Generator().manual_seed(seed)
    scale = stats.reward_range if bound is None else bound
    std = noise_multiplier * 2 * math.sqrt(3) * scale
    noisy = [min(max(v, -scale), scale) + std * float(torch.randn((), generator=gen, dtype=torch.float64))
             for v in (stats.reward_start, stats.reward_end, reward_spread(stats, gain_spread))]
    spread = max(noisy[2], 0.0)
    return ClientStats(stats.client_id, stats.num_prompts, noisy[0], noisy[1], spread, scale, spread)


def epsilon(rounds: int, noise_multiplier: float, sample_rate: float, delta: float,
            stats_noise_multiplier: float = 0.0) -> float:
    """epsilon after ``rounds`` rounds of the update mechanism (and the statistics mechanism when
    its multiplier is > 0), from Opacus' RDP accountant."""
    accountant = RDPAccountant()  # its warning about the alpha grid's edge is about tightness only
    accountant.history = [(noise_multiplier, sample_rate, rounds)]
    if stats_noise_multiplier > 0:
        accountant.history.append((stats_noise_multiplier, sample_rate, rounds))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return accountant.get_epsilon(delta)
