"""Local GRPO: what one client does in one round, readable top to bottom.

    rollout -> rewards -> group_advantages -> grpo_loss -> AdamW step on the LoRA parameters

For a batch of B prompts, G completions each are sampled from the current policy (pi_old) in one
``generate`` call with the KV cache. Each completion gets the client's own reward r_i, and

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

How this differs from textbook GRPO: mu = 1 by default, so pi_old is the detached current policy
and no separate old-log-prob forward is run (the ratio is 1 and only its gradient matters); beta
= 0 by default, so no reference forward is run. Log-probs are taken on logits / temperature (the
sampling distribution), with position ids computed from the attention mask, as ``generate`` does
for left-padded prompts. All of this matches TRL's GRPOTrainer loss (tests/test_trl_parity.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import GenerationConfig

from fgrpo.tasks import Example

RewardFn = Callable[[Example, str], float]


@dataclass
class Rollouts:
    """B*G sampled completions; row i belongs to prompt i // G."""

    prompt_ids: torch.Tensor  # [N, P] left-padded
    prompt_mask: torch.Tensor  # [N, P]
    completion_ids: torch.Tensor  # [N, C]
    completion_mask: torch.Tensor  # [N, C] 1 up to and including the first EOS
    texts: list[str]  # N decoded completions (without EOS)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], num_per_prompt: int, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False) -> Rollouts:
    """Sample ``num_per_prompt`` completions per prompt in one batched, KV-cached generate call."""
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    prompt_ids = enc["input_ids"].repeat_interleave(num_per_prompt, dim=0).to(device)  # [N, P]
    prompt_mask = enc["attention_mask"].repeat_interleave(num_per_prompt, dim=0).to(device)
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=not greedy, temperature=None if greedy else temperature,
        top_p=None if greedy else top_p, top_k=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, use_cache=True)
    out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=gen_config)
    completion_ids = out[:, prompt_ids.shape[1]:]  # [N, C]
    is_eos = completion_ids == tokenizer.eos_token_id
    # index of the first EOS (or C when there is none); keep tokens up to and including it
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), completion_ids.shape[1])
    positions = torch.arange(completion_ids.shape[1], device=device)
    completion_mask = (positions[None, :] <= first_eos[:, None]).long()  # [N, C]
    keep = (completion_mask.bool() & ~is_eos)
    texts = [tokenizer.decode(ids[m], skip_special_tokens=True) for ids, m in zip(completion_ids, keep)]
    return Rollouts(prompt_ids, prompt_mask, completion_ids, completion_mask, texts)


def per_token_logps(model, rollouts: Rollouts, temperature: float = 1.0) -> torch.Tensor:
    """log pi(o_t | q, o_<t) for every completion token, [N, C]."""
    input_ids = torch.cat([rollouts.prompt_ids, rollouts.completion_ids], dim=1)  # [N, P+C]
    attention_mask = torch.cat([rollouts.prompt_mask, rollouts.completion_mask], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as generate does for left padding
    c = rollouts.completion_ids.shape[1]
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=c + 1).logits[:, :-1]  # [N, C, V]: logits predicting o_1..o_C
    logits = logits.float() / temperature
    return torch.gather(F.log_softmax(logits, dim=-1), 2, rollouts.completion_ids[..., None])[..., 0]


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
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped GRPO surrogate (+ beta * k3 KL), aggregated by ``loss_type``. All tensors [N, C]
    except ``advantages`` [N]; ``old_logps`` None means pi_old = detached current policy.
    ``kl_bias_correction`` multiplies KL_t by rho_t (TRL's ``use_bias_correction_kl``)."""
    mask = mask.to(logps.dtype)
    old_logps = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old_logps)  # [N, C]
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    adv = advantages[:, None]  # [N, 1]
    per_token_loss = -torch.min(ratio * adv, clipped * adv)  # [N, C]
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


@dataclass
class GRPOSettings:
    """The subset of the run config that local GRPO needs."""

    local_steps: int = 10
    prompts_per_step: int = 16
    group_size: int = 8
    max_new_tokens: int = 10
    temperature: float = 1.0
    top_p: float = 1.0
    max_grad_norm: float = 1.0
    loss_type: str = "grpo"
    scale_rewards: str = "group"
    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    mu: int = 1
    kl_bias_correction: bool = False
    proximal_mu: float = 0.0


@dataclass
class LocalResult:
    """What a client reports after local training (DESIGN section 3), besides its delta."""

    num_prompts: int  # n_k
    reward_start: float  # mean reward of the first local step's rollouts (r_start)
    reward_end: float  # mean reward of the last local step's rollouts (r_end)
    reward_std: float  # mean within-group reward std over the local steps
    metrics: dict[str, float]


def local_grpo(model, tokenizer, optimizer: torch.optim.Optimizer, batches: Iterator[list[Example]],
               reward_fn: RewardFn, cfg: GRPOSettings, correctness_fn: RewardFn | None = None,
               ) -> LocalResult:
    """Run ``cfg.local_steps`` GRPO steps on the model's active adapter; returns the statistics."""
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if cfg.proximal_mu > 0 else None  # theta_global
    sums: dict[str, float] = {}
    step_rewards: list[float] = []
    for _ in range(cfg.local_steps):
        examples = next(batches)
        model.eval()  # sampling and old/ref log-probs without dropout
        rollouts = generate(model, tokenizer, [e.prompt for e in examples], cfg.group_size,
                            cfg.max_new_tokens, cfg.temperature, cfg.top_p)
        rows = [e for e in examples for _ in range(cfg.group_size)]  # N = B*G
        rewards = torch.tensor([reward_fn(e, t) for e, t in zip(rows, rollouts.texts)])  # [N]
        advantages = group_advantages(rewards, cfg.group_size, cfg.scale_rewards == "group")
        advantages = advantages.to(rollouts.prompt_ids.device)
        group_std = rewards.view(-1, cfg.group_size).std(dim=1)  # [B]
        with torch.no_grad():
            old_logps = per_token_logps(model, rollouts, cfg.temperature) if cfg.mu > 1 else None
            ref_logps = None
            if cfg.beta != 0.0:
                with model.disable_adapter():
                    ref_logps = per_token_logps(model, rollouts, cfg.temperature)
        model.train()
        for _ in range(cfg.mu):
            logps = per_token_logps(model, rollouts, cfg.temperature)
            loss, loss_metrics = grpo_loss(logps, old_logps, ref_logps, advantages,
                                           rollouts.completion_mask, cfg.loss_type, cfg.beta,
                                           cfg.epsilon_low, cfg.epsilon_high, cfg.max_new_tokens,
                                           cfg.kl_bias_correction)
            total = loss
            if anchor is not None:  # FedProx: + mu/2 * ||theta - theta_global||^2
                proximal = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
                total = loss + 0.5 * cfg.proximal_mu * proximal
                loss_metrics["proximal_term"] = proximal.item()
            total.backward()
            grad_norm = (torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                         if cfg.max_grad_norm > 0 else torch.tensor(0.0))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        step_rewards.append(rewards.mean().item())
        step = {
            "loss": loss.item(), "grad_norm": float(grad_norm), "reward_std": group_std.mean().item(),
            "frac_zero_std": (group_std == 0).float().mean().item(),
            "completion_length": rollouts.completion_mask.sum(1).float().mean().item(),
            **loss_metrics,
        }
        if correctness_fn is not None:
            step["train_accuracy"] = sum(correctness_fn(e, t) >= 1.0 for e, t in
                                         zip(rows, rollouts.texts)) / len(rows)
        for key, value in step.items():
            sums[key] = sums.get(key, 0.0) + value
    model.eval()
    metrics = {key: value / cfg.local_steps for key, value in sums.items()}
    return LocalResult(num_prompts=cfg.local_steps * cfg.prompts_per_step,
                       reward_start=step_rewards[0], reward_end=step_rewards[-1],
                       reward_std=metrics["reward_std"], metrics=metrics)
