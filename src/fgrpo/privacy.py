"""Differential privacy for client updates and for the statistics FGRPO's weights are made of.

Placement follows Flower's DP strategies and mods (``dp`` in the config):

    server : the server clips each update,   adds Gaussian noise to the weighted sum   (central DP)
    client : each client clips its update,   the server adds the noise to the weighted sum (central DP)
    local  : each client clips its update and adds the noise itself; the server adds nothing

    clip      Delta_k <- Delta_k * min(1, C / ||Delta_k||_2)
    central   Delta   =  sum_k w_k Delta_k + N(0, (sigma * C * w_max)^2 I)
              w_max: the weight bound in force, max_weight_ratio / |S| (adaptive weights), or the largest
              of the round's weights when they depend only on the run config (fedavg, uniform)
    local     Delta_k <- Delta_k + N(0, (sigma * C)^2 I)           (on the client, before sending)

The sensitivity of the weighted sum to one client is w_k * C <= w_max * C. Adaptive weights are computed
from the statistics below, so the noise is calibrated to their bound, which depends on no data; the
weights themselves are private only when the statistics are (``dp_stats_noise > 0``).

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
from dataclasses import replace

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


def central_noise_std(noise_multiplier: float, clip: float, max_weight: float) -> float:
    """sigma * C * w_max: the std that makes the weighted sum a Gaussian mechanism with multiplier sigma, where
    w_max bounds every client's weight without looking at data (the sensitivity to one client is w_k * C;
    ``Server.noise`` says which bound)."""
    return noise_multiplier * clip * max_weight


def privatize_stats(stats: ClientStats, noise_multiplier: float, seed: int, bound: float | None = None,
                    gain_spread: str = "group") -> ClientStats:
    """Clip r_start, r_end and the spread ``gain_spread`` selects to [-R, R] (R = ``bound``, the verifier's
    declared reward range) and add N(0, (sigma_s 2 sqrt(3) R)^2); the range sent is R itself (the observed one
    would depend on data). Without ``bound``, R is the range in ``stats``."""
    gen = torch.Generator().manual_seed(seed)
    scale = stats.reward_range if bound is None else bound
    paired = stats.validation_size > 0  # d_k in [-1, 1] and se_k in [0, 1] (units of the range) join the vector
    diameter = 2 * math.sqrt(5 if paired else 3)  # of the clipped vector, in units of R
    values = [(v, scale) for v in (stats.reward_start, stats.reward_end, reward_spread(stats, gain_spread))]
    values += [(stats.paired_gain, 1.0), (stats.paired_se, 1.0)] if paired else []
    noisy = [min(max(v, -r), r) + noise_multiplier * diameter * r * float(torch.randn((), generator=gen,
                                                                                        dtype=torch.float64))
             for v, r in values]
    spread = max(noisy[2], 0.0)
    measured = dict(paired_gain=noisy[3], paired_se=max(noisy[4], 0.0)) if paired else {}
    return replace(stats, reward_start=noisy[0], reward_end=noisy[1], reward_std=spread, reward_range=scale,
                   reward_pooled_std=spread, **measured)


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
