"""Local GRPO: what one client does in one round, readable top to bottom (``local_grpo``), each local step

    sample_step (rollouts; rewards and correctness from one call of the reward) -> group_advantages
    -> policy_update (mu x: grpo_loss [+ FedProx] -> AdamW step on the LoRA parameters) -> step_metrics

For a batch of B prompts, G completions each are sampled from the current policy (pi_old) by
``fgrpo.rollouts.generate``: batched, KV-cached sampling, token for token what transformers'
``generate`` draws, but each row leaves the batch at its EOS. Each completion gets the client's own
reward r_i, and

    A_i = (r_i - mean_g r) / (std_g r + 1e-4)        (scale_rewards = "group"; "none": no division)

with the unbiased std over the group, as TRL does. Groups whose rewards are all equal carry no
signal (A = 0); they are counted in ``frac_zero_std``. The per-token loss is the clipped surrogate

    rho_t = exp(logp_t - old_logp_t)
    L_t   = -min(rho_t * A, clip(rho_t, 1 - epsilon_low, 1 + epsilon_high) * A) + beta * KL_t
    KL_t  = exp(ref_t - logp_t) - (ref_t - logp_t) - 1     (k3 estimator; ref = adapter disabled)

aggregated over completion tokens by ``loss_type``:
    grpo    : mean over each sequence's tokens, then over sequences
    dapo    : sum over all tokens / number of tokens           (one process, one batch)
    dr_grpo : sum over all tokens / (B * G * max_new_tokens)

How this differs from textbook GRPO: mu = 1 by default, so pi_old is the detached current policy and no
separate old-log-prob forward is run (the ratio is 1 and only its gradient matters); beta = 0 by default, so
no reference forward is run. Log-probs (``fgrpo.rollouts.per_token_logps``) are taken on logits / temperature
(the sampling distribution), with position ids computed from the attention mask, as ``generate`` does for
left-padded prompts. All of this matches TRL's GRPOTrainer loss (tests/test_trl_parity.py).

Rollouts in a lower precision (``rollout_precision = bfloat16``, ``fgrpo.sampler``) are drawn from pi_sampler, not
pi_old: ``rollout_weights`` reweights the surrogate as TRL corrects vLLM rollouts; in float32 nothing is reweighted.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields

import torch

from fgrpo.config import RunConfig
from fgrpo.model import lora_layers_replaced
from fgrpo.rewards import RewardFn
from fgrpo.rollouts import (
    Rollouts,
    concat_rollouts,
    generate,
    per_token_logps,
    per_token_logps_and_entropy,
    prompt_texts,
    select_groups,
)
from fgrpo.sampler import loss_kernels
from fgrpo.tasks import Example


def prompt_batches(examples: list[Example], batch_size: int, seed: int) -> Iterator[list[Example]]:
    """Endless batches of prompts, reshuffled each pass, deterministic for a seed."""
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            extra = list(range(len(examples)))
            rng.shuffle(extra)
            order += extra
        batch, order = order[:batch_size], order[batch_size:]
        yield [examples[i] for i in batch]


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """A_i = (r_i - mean_g r) / (std_g r + 1e-4), groups of ``group_size`` consecutive rows; [N]."""
    grouped = rewards.view(-1, group_size)  # [B, G]
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        centered = centered / (grouped.std(dim=1, keepdim=True) + 1e-4)
    return centered.reshape(-1)


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, loss_type: str = "grpo",
              beta: float = 0.0, epsilon_low: float = 0.2, epsilon_high: float = 0.2,
              max_completion_length: int | None = None, kl_bias_correction: bool = False,
              sampler_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped GRPO surrogate (+ beta * k3 KL), aggregated by ``loss_type``. All tensors [N, C]
    except ``advantages`` [N]; ``old_logps`` None means pi_old = detached current policy.
    ``kl_bias_correction`` multiplies KL_t by rho_t (TRL's ``use_bias_correction_kl``).
    ``sampler_weights`` ([N, C] or [N, 1], from ``sampler_correction``) multiply the surrogate, not the KL."""
    mask = mask.to(logps.dtype)
    old_logps = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old_logps)  # [N, C]
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    adv = advantages[:, None]  # [N, 1]
    per_token_loss = -torch.min(ratio * adv, clipped * adv)  # [N, C]
    if sampler_weights is not None:  # rollouts from a lower-precision sampler: w ~ pi_train / pi_sampler
        per_token_loss = per_token_loss * sampler_weights
    metrics: dict[str, float] = {}
    if beta != 0.0:
        log_ref_ratio = ref_logps - logps
        per_token_kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1  # [N, C]
        if kl_bias_correction:
            per_token_kl = per_token_kl * ratio
        per_token_loss = per_token_loss + beta * per_token_kl
        metrics["kl"] = ((per_token_kl * mask).sum() / mask.sum().clamp(min=1)).item()
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    elif loss_type == "dapo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1)
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (logps.shape[0] * max_completion_length)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    is_clipped = ((ratio < 1 - epsilon_low) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
    metrics["clip_ratio"] = ((is_clipped * mask).sum() / mask.sum().clamp(min=1)).item()
    return loss, metrics


def sampler_correction(train_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor,
                       mode: str = "sequence_mask", cap: float = 3.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Importance weights for rollouts drawn from a sampler that is not the trained policy (lower-precision
    weights), as TRL's ``vllm_importance_sampling_correction``: with d_t = log pi_train(o_t) - log pi_sampler(o_t)
    (pi_train the policy the rollouts are trained from, pi_old),

        token_*:    rho_t = exp(d_t)                    -> [N, C]
        sequence_*: rho   = exp(sum_t d_t) per row      -> [N, 1]
        *_truncate: w = min(rho, cap)        *_mask: w = rho if rho <= cap else 0

    E_{o ~ sampler}[rho * f(o)] = E_{o ~ pi_train}[f(o)], so the weighted loss has the gradient of on-policy
    sampling; the cap bounds the variance (truncation) or drops the rows the sampler got most wrong (mask).
    Metrics: the mismatch |d_t| (mean and max over completion tokens), the mean weight, and the share of
    tokens (token_*) or sequences (sequence_*) whose ratio the cap truncated or masked."""
    mask = mask.to(train_logps.dtype)
    diff = (train_logps - sampler_logps) * mask  # [N, C]
    per_sequence = mode.startswith("sequence")
    rho = torch.exp(diff.sum(-1, keepdim=True) if per_sequence else diff)
    over = rho > cap
    weights = rho.clamp(max=cap) if mode.endswith("truncate") else rho.masked_fill(over, 0.0)
    tokens = mask.bool()
    counted = torch.ones_like(over) if per_sequence else tokens  # which entries of ``over`` count
    return weights, {
        "sampler_logp_diff_mean": (diff.abs().sum() / mask.sum().clamp(min=1)).item(),
        "sampler_logp_diff_max": diff.abs().max().item() if tokens.any() else 0.0,
        "sampler_weight_mean": weights[counted].mean().item() if counted.any() else 1.0,
        "sampler_cut_fraction": over[counted].float().mean().item() if counted.any() else 0.0,
    }


def rollout_metrics(rollouts: Rollouts, rewards: torch.Tensor, group_size: int, entropy: torch.Tensor,
                    eos_token_id: int) -> dict[str, float]:
    """What a step's rollouts say (docs/algorithm.md, section 5): reward spread within groups and over
    all rollouts, groups without signal, length, completions cut at max_new_tokens (no EOS; a cut
    answer usually scores 0), policy entropy. ``rewards``: [B*G], the policy's plain sample."""
    mask = rollouts.completion_mask.to(entropy.dtype)  # [N, C]
    group_std = rewards.view(-1, group_size).std(dim=1)  # [B]
    return {
        "reward_std": group_std.mean().item(),
        "reward_pooled_std": rewards.std().item(),
        "frac_zero_std": (group_std == 0).float().mean().item(),
        "completion_length": rollouts.completion_mask.sum(1).float().mean().item(),
        "truncated_fraction": 1.0 - (rollouts.completion_ids == eos_token_id).any(1).float().mean().item(),
        "entropy": ((entropy * mask).sum() / mask.sum().clamp(min=1)).item(),
    }


@dataclass(frozen=True)
class GRPOSettings:
    """The subset of the run config that local GRPO needs (defaults and meanings: RunConfig)."""

    local_steps: int
    prompts_per_step: int
    group_size: int
    max_new_tokens: int
    temperature: float
    top_p: float
    max_grad_norm: float
    loss_type: str
    scale_rewards: str
    beta: float
    epsilon_low: float
    epsilon_high: float
    mu: int
    kl_bias_correction: bool
    proximal_mu: float
    completion_samples: int  # prompts whose completions the client keeps each round
    sampler_correction: str  # how rollouts of a lower-precision sampler are reweighted (off: not at all)
    sampler_correction_cap: float
    dynamic_sampling: int  # extra generate calls per step to replace groups without signal (0: off)
    rollout_precision: str = "float32"  # the sampler's weights, resolved (fgrpo.sampler; never 'auto' here)

    @classmethod
    def from_config(cls, cfg: RunConfig, local_steps: int | None = None,
                    rollout_precision: str = "float32") -> GRPOSettings:
        """From the run config: each field from the config field of the same name, except ``local_steps``,
        which the argument overrides when given (quantity-skew scales it per client), and ``rollout_precision``,
        the config's setting resolved for the model and device (``sampler.resolve_rollout_precision``)."""
        config_names = {f.name for f in fields(cfg)}
        same = {f.name: getattr(cfg, f.name) for f in fields(cls) if f.name in config_names}
        return cls(**{**same, "local_steps": local_steps or cfg.local_steps, "rollout_precision": rollout_precision})


@dataclass
class LocalResult:
    """What a client reports after local training (docs/algorithm.md, section 2), besides its delta."""

    num_prompts: int  # n_k
    reward_start: float  # mean reward of the first local step's rollouts (r_start)
    reward_end: float  # mean reward of the last local step's rollouts (r_end)
    reward_std: float  # mean within-group reward std over the local steps
    reward_pooled_std: float  # std of all of a step's rewards (prompts and completions), mean over the steps
    metrics: dict[str, float]
    samples: list[dict] = field(default_factory=list)  # a few prompts with their completions: the owner's data
    last_rollouts: Rollouts | None = field(default=None, repr=False)  # the last step's (for diagnostics)
    last_logps: torch.Tensor | None = field(default=None, repr=False)  # their log-probs under the policy then [N, C]
    last_ref_logps: torch.Tensor | None = field(default=None, repr=False)  # and under pi_ref when beta != 0


def completion_samples(step: StepRollouts, cfg: GRPOSettings) -> list[dict]:
    """One record per prompt of the first ``cfg.completion_samples`` of a step's first batch: its completions with
    reward and advantage (A_i in the plain sample). They stay with the data owner; none is sent to the server."""
    rewards, g = step.first_rewards, cfg.group_size
    advantages = group_advantages(rewards, g, cfg.scale_rewards == "group")
    return [{"prompt": e.prompt, "answer": e.answer,
             "completions": [{"text": step.first_texts[i * g + j], "reward": float(rewards[i * g + j]),
                              "advantage": float(advantages[i * g + j])} for j in range(g)]}
            for i, e in enumerate(step.examples[:cfg.completion_samples])]


@dataclass
class StepRollouts:
    """What one local step trains on, and the plain sample of the policy its statistics come from."""

    examples: list[Example]  # the prompts of the first batch
    rollouts: Rollouts  # the groups trained on (with dynamic sampling: those whose rewards differ)
    rewards: torch.Tensor  # [N] of ``rollouts``
    first_rewards: torch.Tensor  # [B*G] of the first batch: r_start / r_end, the reward std, samples
    first_texts: list[str]
    generations: int  # generate calls this step
    first_correct: list[float] | None = None  # [B*G] correctness of the first batch (None: the reward gives none)


def score(reward_fn: RewardFn, rows: list[Example], rollouts: Rollouts, step: int) -> tuple[torch.Tensor, list | None]:
    """([N] rewards, [N] correctness) of a batch's completions, from one call: the reward's ``score_batch`` when it
    has one (a client's ``GuardedReward``: TRL-form functions get the batch, the completion ids and ``step``; reward
    workers), else one call per sample and no correctness."""
    if not hasattr(reward_fn, "score_batch"):
        return torch.tensor([reward_fn(e, t) for e, t in zip(rows, rollouts.texts)]), None
    lengths = rollouts.completion_mask.sum(1).tolist()  # up to and including the EOS, as TRL's completion_ids
    ids = [row[:n] for row, n in zip(rollouts.completion_ids.tolist(), lengths)]
    scored = reward_fn.score_batch(rows, rollouts.texts, ids, step)
    return torch.tensor(scored.rewards), scored.correct


def sample_step(model, tokenizer, batches: Iterator[list[Example]], reward_fn: RewardFn, cfg: GRPOSettings,
                step: int = 0) -> StepRollouts:
    """A step's rollouts, rewards and correctness (``step``: local steps done before this one); with
    ``dynamic_sampling``, groups without signal replaced (``resample_groups``)."""
    def draw() -> tuple[list[Example], Rollouts, torch.Tensor, list[float] | None]:
        examples = next(batches)
        rollouts = generate(model, tokenizer, prompt_texts(tokenizer, examples), cfg.group_size,
                            cfg.max_new_tokens, cfg.temperature, cfg.top_p, precision=cfg.rollout_precision)
        rows = [e for e in examples for _ in range(cfg.group_size)]  # N = B*G
        return examples, rollouts, *score(reward_fn, rows, rollouts, step)

    examples, rollouts, rewards, correct = draw()
    first = StepRollouts(examples, rollouts, rewards, rewards, rollouts.texts, 1, correct)
    return resample_groups(first, lambda: draw()[1:3], tokenizer, cfg) if cfg.dynamic_sampling else first


def resample_groups(first: StepRollouts, draw: Callable[[], tuple[Rollouts, torch.Tensor]], tokenizer,
                    cfg: GRPOSettings) -> StepRollouts:
    """Dynamic sampling (DAPO), ``dynamic_sampling = K``: groups whose rewards are all equal (std_g r = 0) carry no
    signal and are replaced by groups of further prompts (``draw``), with at most K extra generate calls; the step
    trains on at most B groups with signal (on the first batch when none has any)."""
    rollouts, rewards = first.rollouts, first.rewards
    kept: list[tuple[Rollouts, torch.Tensor]] = []
    while True:
        signal = (rewards.view(-1, cfg.group_size).std(dim=1) > 0).nonzero().flatten().tolist()
        kept.append((select_groups(rollouts, signal), rewards.view(-1, cfg.group_size)[signal].flatten()))
        groups = sum(len(r.texts) for r, _ in kept) // cfg.group_size
        if groups >= cfg.prompts_per_step or first.generations > cfg.dynamic_sampling:
            break
        rollouts, rewards = draw()
        first.generations += 1
    if groups == 0:
        return first
    first.rollouts = select_groups(concat_rollouts([r for r, _ in kept if r.texts], tokenizer.pad_token_id),
                                   list(range(min(groups, cfg.prompts_per_step))))
    first.rewards = torch.cat([w for _, w in kept])[:cfg.prompts_per_step * cfg.group_size]
    return first


@torch.no_grad()
def old_and_ref_logps(model, rollouts: Rollouts, cfg: GRPOSettings) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Log-probs of pi_old (only for mu > 1; otherwise None: the detached current policy) and of the
    reference pi_ref, the adapter disabled (only for beta != 0), without gradient."""
    old_logps = per_token_logps(model, rollouts, cfg.temperature) if cfg.mu > 1 else None
    ref_logps = None
    if cfg.beta != 0.0:
        with lora_layers_replaced(model):
            ref_logps = per_token_logps(model, rollouts, cfg.temperature)
    return old_logps, ref_logps


def rollout_weights(pi_old: torch.Tensor, rollouts: Rollouts, cfg: GRPOSettings) -> tuple[torch.Tensor | None, dict]:
    """Rollouts of a lower-precision sampler: w = min(rho, cap) or rho * [rho <= cap], rho = pi_old / pi_sampler per
    token or per sequence (``sampler_correction``; default sequence_mask, cap 3; ``off``: no weights, the metrics
    only). float32: the sampler is pi_old, nothing is reweighted (None, {})."""
    if rollouts.precision == "float32" or rollouts.sampler_logps is None:
        return None, {}
    weights, stats = sampler_correction(pi_old, rollouts.sampler_logps, rollouts.completion_mask,
                                        cfg.sampler_correction, cfg.sampler_correction_cap)
    return (None if cfg.sampler_correction == "off" else weights), stats


def proximal(loss: torch.Tensor, params: list, anchor: list | None, mu: float, metrics: dict) -> torch.Tensor:
    """FedProx: L + mu/2 * ||theta - theta_global||^2, ``anchor`` = theta_global (None: L as it is)."""
    if anchor is None:
        return loss
    drift = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))  # ||theta - theta_global||^2
    metrics["proximal_term"] = drift.item()
    return loss + 0.5 * mu * drift


@dataclass
class StepUpdate:
    """What a step's updates leave: the last one's loss, grad norm, metrics, entropy; pi_old's, pi_ref's log-probs."""

    loss: float
    grad_norm: float
    metrics: dict[str, float]
    entropy: torch.Tensor  # [N, C]
    pi_old: torch.Tensor  # [N, C] log-probs of the policy the rollouts were trained from
    ref_logps: torch.Tensor | None  # [N, C] under pi_ref (None: beta = 0)


def policy_update(model, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], anchor: list | None,
                  rollouts: Rollouts, advantages: torch.Tensor, cfg: GRPOSettings) -> StepUpdate:
    """The mu inner iterations on one step's rollouts: theta <- AdamW(theta, grad L), L the clipped surrogate
    (``grpo_loss``, reweighted by ``rollout_weights``) plus the FedProx term, gradients clipped to max_grad_norm."""
    with loss_kernels(model):  # the frozen layers in the kernels fastest at training shapes (fgrpo.sampler)
        old_logps, ref_logps = old_and_ref_logps(model, rollouts, cfg)  # without dropout: the model is in eval mode
        model.train()
        weights, sampler_stats = None, {}
        for iteration in range(cfg.mu):
            logps, entropy = per_token_logps_and_entropy(model, rollouts, cfg.temperature)
            if iteration == 0:
                pi_old = logps.detach() if old_logps is None else old_logps  # the policy the rollouts train from
                weights, sampler_stats = rollout_weights(pi_old, rollouts, cfg)
            loss, metrics = grpo_loss(logps, old_logps, ref_logps, advantages, rollouts.completion_mask,
                                      cfg.loss_type, cfg.beta, cfg.epsilon_low, cfg.epsilon_high, cfg.max_new_tokens,
                                      cfg.kl_bias_correction, weights)
            metrics.update(sampler_stats)
            proximal(loss, params, anchor, cfg.proximal_mu, metrics).backward()
            grad_norm = (torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                         if cfg.max_grad_norm > 0 else torch.tensor(0.0))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return StepUpdate(loss.item(), float(grad_norm), metrics, entropy, pi_old, ref_logps)


def step_metrics(step: StepRollouts, update: StepUpdate, cfg: GRPOSettings, eos_token_id: int) -> dict[str, float]:
    """One local step's metrics: the update's, the plain sample's (``rollout_metrics``), generate calls (dynamic
    sampling), and train_accuracy = share of the first batch's completions with correctness >= 1 (when the reward
    gives correctness)."""
    out = {"loss": update.loss, "grad_norm": update.grad_norm, **update.metrics,
           **rollout_metrics(step.rollouts, step.first_rewards, cfg.group_size, update.entropy, eos_token_id)}
    if cfg.dynamic_sampling:
        out["generations_per_step"] = float(step.generations)
    if step.first_correct is not None:
        out["train_accuracy"] = sum(c >= 1.0 for c in step.first_correct) / len(step.first_correct)
    return out


def local_grpo(model, tokenizer, optimizer: torch.optim.Optimizer, batches: Iterator[list[Example]],
               reward_fn: RewardFn, cfg: GRPOSettings) -> LocalResult:
    """Run ``cfg.local_steps`` GRPO steps on the model's active adapter; returns the statistics (metrics: the
    mean over the steps)."""
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if cfg.proximal_mu > 0 else None  # theta_global (FedProx)
    sums: dict[str, float] = {}
    step_rewards: list[float] = []  # mean reward of each step's plain sample
    for step_index in range(cfg.local_steps):
        model.eval()  # sampling and old/ref log-probs without dropout
        step = sample_step(model, tokenizer, batches, reward_fn, cfg, step_index)  # o_i ~ pi_old, r_i
        advantages = group_advantages(step.rewards, cfg.group_size, cfg.scale_rewards == "group")  # A_i
        advantages = advantages.to(step.rollouts.prompt_ids.device)
        if step_index == 0:
            samples = completion_samples(step, cfg)
        update = policy_update(model, optimizer, params, anchor, step.rollouts, advantages, cfg)
        step_rewards.append(step.first_rewards.mean().item())
        for key, value in step_metrics(step, update, cfg, tokenizer.eos_token_id).items():
            sums[key] = sums.get(key, 0.0) + value
    model.eval()
    metrics = {key: value / cfg.local_steps for key, value in sums.items()}
    return LocalResult(num_prompts=cfg.local_steps * cfg.prompts_per_step,
                       reward_start=step_rewards[0], reward_end=step_rewards[-1],
                       reward_std=metrics["reward_std"], reward_pooled_std=metrics["reward_pooled_std"],
                       metrics=metrics, samples=samples, last_rollouts=step.rollouts, last_logps=update.pi_old,
                       last_ref_logps=update.ref_logps)
