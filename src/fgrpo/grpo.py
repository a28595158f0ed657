"""Local GRPO: what one client does in one round, readable top to bottom.

    rollout -> rewards -> group_advantages -> grpo_loss -> AdamW step on the LoRA parameters

For a batch of B prompts, G completions each are sampled from the current policy (pi_old) by
``decode``: batched, KV-cached sampling, token for token what transformers' ``generate`` draws, but
each row leaves the batch at its EOS. Each completion gets the client's own reward r_i, and

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

import random
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import DynamicCache, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from fgrpo.tasks import Example, RewardFn

if TYPE_CHECKING:
    from fgrpo.config import RunConfig


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


@dataclass
class Rollouts:
    """B*G sampled completions; row i belongs to prompt i // G."""

    prompt_ids: torch.Tensor  # [N, P] left-padded
    prompt_mask: torch.Tensor  # [N, P]
    completion_ids: torch.Tensor  # [N, C]
    completion_mask: torch.Tensor  # [N, C] 1 up to and including the first EOS
    texts: list[str]  # N decoded completions (without EOS)
    group_size: int = 1  # G: rows i*G .. i*G+G-1 share one prompt


def prompt_forward(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, position_ids: torch.Tensor,
                   group_size: int, logits_to_keep: int = 0):
    """Run each distinct prompt once: ``prompt_ids`` etc. are [N, L] with groups of G identical rows; the
    forward runs on rows 0, G, 2G, ... ([B, L]), so prompt tokens cost B instead of B*G token positions.
    Returns the model output (B rows, with its KV cache); ``prompt_rows`` / ``rows_cache`` spread it."""
    return model(input_ids=prompt_ids[::group_size], attention_mask=prompt_mask[::group_size],
                 position_ids=position_ids[::group_size], use_cache=True, logits_to_keep=logits_to_keep)


def prompt_rows(t: torch.Tensor, rows: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """The rows of a per-prompt tensor [B, ...] that completion rows ``rows`` read (row i reads prompt
    i // G); differentiable, so gradients reach the prompt positions as in a full forward. ``None``:
    all N rows in order, by ``repeat_interleave`` (the op of a plain batched forward, same values
    to the bit)."""
    return t.repeat_interleave(group_size, dim=0) if rows is None else t.index_select(0, rows // group_size)


def rows_cache(model, prompt_cache, rows: torch.Tensor | None, group_size: int) -> DynamicCache:
    """A new KV cache of the prompts that completion rows ``rows`` read (``prompt_rows`` of each layer)."""
    return DynamicCache([(prompt_rows(layer.keys, rows, group_size), prompt_rows(layer.values, rows, group_size))
                         for layer in prompt_cache.layers], config=model.config)


@contextmanager
def merged_lora(model):
    """Run inside with each LoRA layer's weight replaced by W + s * B A and the adapter branch off:
    one matmul per linear layer instead of three, for rollouts and evaluation (no gradients).
    The original weight tensors are put back untouched afterwards (no in-place merge and unmerge,
    whose rounding would drift the frozen base). Costs a transient copy of the adapted weights."""
    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and m.active_adapters]
    originals = [m.get_base_layer().weight for m in layers]
    with torch.no_grad():
        for m in layers:
            base = m.get_base_layer()
            delta = sum(m.get_delta_weight(a) for a in m.active_adapters if a in m.lora_A)
            base.weight = torch.nn.Parameter(base.weight + delta, requires_grad=False)
    try:
        with model.disable_adapter():
            yield
    finally:
        for m, weight in zip(layers, originals):
            m.get_base_layer().weight = weight


def prompt_texts(tokenizer, examples: list[Example]) -> list[str]:
    """What the model reads for each example: its chat messages rendered with the tokenizer's chat template
    and the generation prompt, or its prompt text as it is. A template's leading BOS text is dropped when the
    tokenizer adds BOS itself (no doubled BOS)."""
    adds_bos = tokenizer.bos_token is not None and tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]
    out = []
    for e in examples:
        if e.messages is None:
            out.append(e.prompt)
            continue
        text = tokenizer.apply_chat_template([{"role": role, "content": content} for role, content in e.messages],
                                             tokenize=False, add_generation_prompt=True)
        out.append(text.removeprefix(tokenizer.bos_token) if adds_bos else text)
    return out


def decode(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int, eos_token_id: int,
           pad_token_id: int, temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
           group_size: int = 1) -> torch.Tensor:
    """Token-by-token sampling with the KV cache, [N, P] left-padded prompts -> [N, C] completions
    (right-padded with ``pad_token_id`` after each row's EOS; C <= ``max_new_tokens``).

    What ``model.generate`` does for multinomial sampling (or greedy), with two savings:
    - rows of a group share one prefill of the prompt's first P-1 tokens (``prompt_forward``);
    - a row that has written EOS leaves the batch and the KV cache (``batch_select_indices``), so
      each step runs only the unfinished rows instead of all N to the longest one.
    Each step draws the random numbers ``torch.multinomial`` draws for the full [N, vocabulary]
    probabilities (q ~ Exp(1), token = argmax p / q; rows that have left use none of theirs), so a
    seed gives the same tokens as ``generate`` would, up to float rounding of the smaller batch."""
    n, p = prompt_ids.shape
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    cache = None
    if group_size > 1 and p > 1:  # then only the last prompt token runs in the first step
        prompt = prompt_forward(model, prompt_ids[:, :-1], prompt_mask[:, :-1], positions[:, :-1], group_size,
                                logits_to_keep=1)
        cache = rows_cache(model, prompt.cache, None, group_size)
        step_ids, step_positions = prompt_ids[:, -1:], positions[:, -1:]
    else:
        step_ids, step_positions = prompt_ids, positions
    warpers = LogitsProcessorList(([] if greedy or temperature == 1.0 else [TemperatureLogitsWarper(temperature)])
                                  + ([] if greedy or top_p >= 1.0 else [TopPLogitsWarper(top_p)]))
    out = torch.full((n, max_new_tokens), pad_token_id, dtype=torch.long, device=prompt_ids.device)
    rows = torch.arange(n, device=prompt_ids.device)  # the unfinished rows, in cache order
    mask = prompt_mask
    length = 0
    for t in range(max_new_tokens):
        step = model(input_ids=step_ids, attention_mask=mask, position_ids=step_positions, cache=cache,
                     use_cache=True, logits_to_keep=1)
        cache = step.cache
        scores = warpers(None, step.logits[:, -1].float())  # [rows still running, V]
        if greedy:
            tokens = scores.argmax(-1)
        else:  # torch.multinomial(probs [N, V], 1): q ~ Exp(1) for every entry, then argmax(p / q)
            q = torch.empty((n, scores.shape[1]), device=scores.device).exponential_(1)
            tokens = (F.softmax(scores, dim=-1) / q[rows]).argmax(-1)
        out[rows, t] = tokens
        length = t + 1
        running = tokens != eos_token_id
        if not running.any():
            break
        if not running.all():
            keep = running.nonzero().flatten()
            cache.batch_select_indices(keep)
            rows, tokens, mask, step_positions = rows[keep], tokens[keep], mask[keep], step_positions[keep]
        step_ids = tokens[:, None]
        step_positions = step_positions[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return out[:, :length]


def generate(model, tokenizer, prompts: list[str], num_per_prompt: int, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False, merge: bool = True) -> Rollouts:
    """Sample ``num_per_prompt`` completions per prompt with ``decode`` (inference mode; with ``merge``,
    on merged LoRA weights)."""
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    prompt_ids = enc["input_ids"].repeat_interleave(num_per_prompt, dim=0).to(device)  # [N, P]
    prompt_mask = enc["attention_mask"].repeat_interleave(num_per_prompt, dim=0).to(device)
    with torch.inference_mode(), merged_lora(model) if merge and isinstance(model, PeftModel) else nullcontext():
        completion_ids = decode(model, prompt_ids, prompt_mask, max_new_tokens, tokenizer.eos_token_id,
                                tokenizer.pad_token_id, temperature, top_p, greedy, num_per_prompt)
    completion_ids = completion_ids.clone()  # [N, C]; clone: a normal tensor for autograd
    is_eos = completion_ids == tokenizer.eos_token_id
    # index of the first EOS (or C when there is none); keep tokens up to and including it
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), completion_ids.shape[1])
    positions = torch.arange(completion_ids.shape[1], device=device)
    completion_mask = (positions[None, :] <= first_eos[:, None]).long()  # [N, C]
    keep = (completion_mask.bool() & ~is_eos)
    texts = [tokenizer.decode(ids[m], skip_special_tokens=True) for ids, m in zip(completion_ids, keep)]
    return Rollouts(prompt_ids, prompt_mask, completion_ids, completion_mask, texts, num_per_prompt)


def per_token_logps(model, rollouts: Rollouts, temperature: float = 1.0) -> torch.Tensor:
    """log pi(o_t | q, o_<t) for every completion token, [N, C] (old and reference log-probs: no entropy)."""
    return per_token_logps_and_entropy(model, rollouts, temperature, entropy=False)[0]


@torch.no_grad()
def kl_to_reference(model, rollouts: Rollouts, temperature: float = 1.0) -> float:
    """Mean k3 estimate of KL(pi_theta || pi_ref) over the completion tokens of ``rollouts``, with pi_ref the
    base model (adapter disabled): how far the client's policy has moved, whatever ``beta`` is (a diagnostic:
    two forwards without gradient, once per round, in eval mode so no random numbers are drawn)."""
    logps = per_token_logps(model, rollouts, temperature)
    with model.disable_adapter():
        ref = per_token_logps(model, rollouts, temperature)
    log_ratio = ref - logps
    mask = rollouts.completion_mask
    return float(((torch.exp(log_ratio) - log_ratio - 1) * mask).sum() / mask.sum().clamp(min=1))


def length_chunks(lengths: torch.Tensor, min_width: int = 32) -> list[tuple[torch.Tensor, int]]:
    """Rows grouped by completion length (tokens up to and including EOS) into power-of-two classes
    (up to ``min_width``, up to 2 * ``min_width``, ...): (row indices, the class's longest length) per
    class, longest first. A row is padded to at most twice its length (or ``min_width``) instead of to
    the batch's longest; completions of at most ``min_width`` tokens stay one chunk."""
    classes = [max(min_width, 1 << (int(n) - 1).bit_length()) for n in lengths.tolist()]
    chunks = []
    for c in sorted(set(classes), reverse=True):
        rows = torch.tensor([i for i, k in enumerate(classes) if k == c], device=lengths.device)
        chunks.append((rows, int(lengths[rows].max())))
    return chunks


def per_token_logps_and_entropy(model, rollouts: Rollouts, temperature: float = 1.0, entropy: bool = True,
                                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(o_t | q, o_<t) for every completion token, [N, C], and (with ``entropy``) the policy's
    entropy at each of those positions, H_t = -sum_v pi(v) log pi(v), [N, C] (no gradient: a diagnostic;
    it costs one more pass over the [rows, tokens, vocabulary] probabilities, so only the loss forward asks).
    Positions after a row's EOS hold 0 or whatever the padded forward gives; the loss masks them.

    The B distinct prompts run once (their KV cache is then shared by their G completions); the
    completions run in ``length_chunks``, each on its rows' prompt caches and cut at its longest
    completion. Same values as one forward over the N full sequences (up to float rounding;
    tests/test_grpo.py), with B*P + about sum(lengths) token positions instead of N*(P+C)."""
    p, c = rollouts.prompt_ids.shape[1], rollouts.completion_ids.shape[1]
    g = rollouts.group_size
    attention_mask = torch.cat([rollouts.prompt_mask, rollouts.completion_mask], dim=1)  # [N, P+C]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as generate does for left padding
    prompt = prompt_forward(model, rollouts.prompt_ids, rollouts.prompt_mask, position_ids[:, :p], g,
                            logits_to_keep=1)  # B rows
    chunks = length_chunks(rollouts.completion_mask.sum(1))
    logps, entropies = [], []
    for rows, width in chunks:
        spread = None if len(chunks) == 1 else rows  # one chunk: all rows in order
        cache = rows_cache(model, prompt.cache, spread, g)
        logits = prompt_rows(prompt.logits[:, -1:], spread, g)  # [n, 1, V]: predicts o_1
        if width > 1:  # o_1 .. o_{w-1} predict o_2 .. o_w
            rest = model(input_ids=rollouts.completion_ids[rows, :width - 1],
                         attention_mask=attention_mask[rows, :p + width - 1],
                         position_ids=position_ids[rows, p:p + width - 1], cache=cache).logits  # [n, w-1, V]
            logits = torch.cat([logits, rest], dim=1)
        logp_all = F.log_softmax(logits.float() / temperature, dim=-1)  # [n, w, V]
        tokens = rollouts.completion_ids[rows, :width]
        logps.append(F.pad(torch.gather(logp_all, 2, tokens[..., None])[..., 0], (0, c - width)))
        if entropy:
            with torch.no_grad():
                entropies.append(F.pad(-(logp_all.exp() * logp_all).sum(-1), (0, c - width)))  # [n, C]
    order = torch.cat([rows for rows, _ in chunks]).argsort()  # back to row order
    token_entropy = torch.cat(entropies)[order] if entropy else None
    return torch.cat(logps)[order], token_entropy


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
    dynamic_sampling: int  # extra generate calls per step to replace groups without signal (0: off)

    @classmethod
    def from_config(cls, cfg: RunConfig, local_steps: int | None = None) -> GRPOSettings:
        """From the run config; ``local_steps`` overrides the run's (quantity-skew scales it per client)."""
        return cls(local_steps=local_steps or cfg.local_steps, prompts_per_step=cfg.prompts_per_step,
                   group_size=cfg.group_size, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                   top_p=cfg.top_p, max_grad_norm=cfg.max_grad_norm, loss_type=cfg.loss_type,
                   scale_rewards=cfg.scale_rewards, beta=cfg.beta, epsilon_low=cfg.epsilon_low,
                   epsilon_high=cfg.epsilon_high, mu=cfg.mu, kl_bias_correction=cfg.kl_bias_correction,
                   proximal_mu=cfg.proximal_mu, completion_samples=cfg.completion_samples,
                   dynamic_sampling=cfg.dynamic_sampling)


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


def completion_samples(examples: list[Example], texts: list[str], rewards: torch.Tensor, advantages: torch.Tensor,
                       group_size: int) -> list[dict]:
    """One record per prompt of ``examples`` (the first of a step's batch): its completions with reward
    and advantage. They stay with the data owner; nothing of them is sent to the server."""
    return [{"prompt": e.prompt, "answer": e.answer,
             "completions": [{"text": texts[i * group_size + j], "reward": float(rewards[i * group_size + j]),
                              "advantage": float(advantages[i * group_size + j])} for j in range(group_size)]}
            for i, e in enumerate(examples)]


def select_groups(r: Rollouts, groups: list[int]) -> Rollouts:
    """The rows of the given groups (each of ``group_size`` consecutive rows), in that order."""
    rows = [g * r.group_size + j for g in groups for j in range(r.group_size)]
    return Rollouts(r.prompt_ids[rows], r.prompt_mask[rows], r.completion_ids[rows], r.completion_mask[rows],
                    [r.texts[i] for i in rows], r.group_size)


def concat_rollouts(parts: list[Rollouts], pad_token_id: int) -> Rollouts:
    """Rollouts of several generate calls as one batch: prompts left-padded and completions right-padded
    to the widest (masks 0 on the padding)."""
    p = max(r.prompt_ids.shape[1] for r in parts)
    c = max(r.completion_ids.shape[1] for r in parts)

    def cat(name: str, left: bool, width: int, value: int) -> torch.Tensor:
        tensors = [getattr(r, name) for r in parts]
        return torch.cat([F.pad(t, (width - t.shape[1], 0) if left else (0, width - t.shape[1]), value=value)
                          for t in tensors])

    return Rollouts(cat("prompt_ids", True, p, pad_token_id), cat("prompt_mask", True, p, 0),
                    cat("completion_ids", False, c, pad_token_id), cat("completion_mask", False, c, 0),
                    [t for r in parts for t in r.texts], parts[0].group_size)


@dataclass
class StepRollouts:
    """What one local step trains on, and the plain sample of the policy its statistics come from."""

    examples: list[Example]  # the prompts of the first batch
    rollouts: Rollouts  # the groups trained on (with dynamic sampling: those whose rewards differ)
    rewards: torch.Tensor  # [N] of ``rollouts``
    first_rewards: torch.Tensor  # [B*G] of the first batch: r_start / r_end, the reward std, samples
    first_texts: list[str]
    generations: int  # generate calls this step


def sample_step(model, tokenizer, batches: Iterator[list[Example]], reward_fn: RewardFn, cfg: GRPOSettings,
                ) -> StepRollouts:
    """A step's rollouts and rewards. With ``dynamic_sampling = K`` (DAPO), groups whose rewards are all
    equal carry no signal and are replaced by groups of further prompts, with at most K extra generate
    calls; the step trains on at most B groups with signal (on the first batch when none has any)."""
    def draw() -> tuple[list[Example], Rollouts, torch.Tensor]:
        examples = next(batches)
        rollouts = generate(model, tokenizer, prompt_texts(tokenizer, examples), cfg.group_size,
                            cfg.max_new_tokens, cfg.temperature, cfg.top_p)
        rows = [e for e in examples for _ in range(cfg.group_size)]  # N = B*G
        return examples, rollouts, torch.tensor([reward_fn(e, t) for e, t in zip(rows, rollouts.texts)])

    examples, rollouts, rewards = draw()
    first = StepRollouts(examples, rollouts, rewards, rewards, rollouts.texts, 1)
    if not cfg.dynamic_sampling:
        return first
    kept: list[tuple[Rollouts, torch.Tensor]] = []
    while True:
        signal = (rewards.view(-1, cfg.group_size).std(dim=1) > 0).nonzero().flatten().tolist()
        kept.append((select_groups(rollouts, signal), rewards.view(-1, cfg.group_size)[signal].flatten()))
        groups = sum(len(r.texts) for r, _ in kept) // cfg.group_size
        if groups >= cfg.prompts_per_step or first.generations > cfg.dynamic_sampling:
            break
        _, rollouts, rewards = draw()
        first.generations += 1
    if groups == 0:
        return first
    n = cfg.prompts_per_step * cfg.group_size
    first.rollouts = select_groups(concat_rollouts([r for r, _ in kept if r.texts], tokenizer.pad_token_id),
                                   list(range(min(groups, cfg.prompts_per_step))))
    first.rewards = torch.cat([w for _, w in kept])[:n]
    return first


def local_grpo(model, tokenizer, optimizer: torch.optim.Optimizer, batches: Iterator[list[Example]],
               reward_fn: RewardFn, cfg: GRPOSettings, correctness_fn: RewardFn | None = None,
               ) -> LocalResult:
    """Run ``cfg.local_steps`` GRPO steps on the model's active adapter; returns the statistics."""
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if cfg.proximal_mu > 0 else None  # theta_global
    sums: dict[str, float] = {}
    step_rewards: list[float] = []
    samples: list[dict] = []
    for _ in range(cfg.local_steps):
        model.eval()  # sampling and old/ref log-probs without dropout
        step_rollouts = sample_step(model, tokenizer, batches, reward_fn, cfg)
        rollouts, rewards = step_rollouts.rollouts, step_rollouts.rewards  # what the step trains on
        advantages = group_advantages(rewards, cfg.group_size, cfg.scale_rewards == "group")
        advantages = advantages.to(rollouts.prompt_ids.device)
        first_rewards = step_rollouts.first_rewards  # [B*G]: the policy's plain sample, for the statistics
        if not step_rewards and cfg.completion_samples:  # the first step's first prompts
            examples = step_rollouts.examples[:cfg.completion_samples]
            plain = group_advantages(first_rewards, cfg.group_size, cfg.scale_rewards == "group")
            samples = completion_samples(examples, step_rollouts.first_texts, first_rewards, plain, cfg.group_size)
        with torch.no_grad():
            old_logps = per_token_logps(model, rollouts, cfg.temperature) if cfg.mu > 1 else None
            ref_logps = None
            if cfg.beta != 0.0:
                with model.disable_adapter():
                    ref_logps = per_token_logps(model, rollouts, cfg.temperature)
        model.train()
        for _ in range(cfg.mu):
            logps, entropy = per_token_logps_and_entropy(model, rollouts, cfg.temperature)
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
        step_rewards.append(first_rewards.mean().item())
        step = {"loss": loss.item(), "grad_norm": float(grad_norm), **loss_metrics,
                **rollout_metrics(rollouts, first_rewards, cfg.group_size, entropy, tokenizer.eos_token_id)}
        if cfg.dynamic_sampling:
            step["generations_per_step"] = float(step_rollouts.generations)
        if correctness_fn is not None:
            rows = [e for e in step_rollouts.examples for _ in range(cfg.group_size)]
            step["train_accuracy"] = sum(correctness_fn(e, t) >= 1.0 for e, t in
                                         zip(rows, step_rollouts.first_texts)) / len(rows)
        for key, value in step.items():
            sums[key] = sums.get(key, 0.0) + value
    model.eval()
    metrics = {key: value / cfg.local_steps for key, value in sums.items()}
    return LocalResult(num_prompts=cfg.local_steps * cfg.prompts_per_step,
                       reward_start=step_rewards[0], reward_end=step_rewards[-1],
                       reward_std=metrics["reward_std"],
                       reward_pooled_std=metrics["reward_pooled_std"], metrics=metrics, samples=samples,
                       last_rollouts=rollouts)
