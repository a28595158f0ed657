"""Rollouts: sampling completions from the policy and computing their log-probs, for local GRPO and evaluation.

    prompt_texts -> generate (decode) -> Rollouts -> per_token_logps(_and_entropy)

``decode`` is our own KV-cached sampling loop: token for token what transformers' ``generate`` draws
(multinomial or greedy, same random numbers for a seed), but the G completions of a prompt share one
prefill of it, and each row leaves the batch and the KV cache at its EOS, so a step runs only the rows
still writing. ``generate`` tokenizes the prompts (left-padded), decodes on merged LoRA weights and
masks each completion up to and including its first EOS.

``per_token_logps_and_entropy`` is the log-prob forward of the loss: the B distinct prompts run once,
the completions in ``length_chunks`` (power-of-two length classes, each cut at its longest row), on
logits / temperature, the sampling distribution. Position ids come from the attention mask
(cumsum - 1), as ``generate`` computes them for left-padded prompts, so a padded row reads the same
positions as the unpadded prompt would.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import DynamicCache, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from fgrpo.decode_step import DecodeStep, lean_by_default
from fgrpo.model import lora_layers_replaced
from fgrpo.sampler import sampler_weights
from fgrpo.tasks import Example


@dataclass
class Rollouts:
    """B*G sampled completions; row i belongs to prompt i // G."""

    prompt_ids: torch.Tensor  # [N, P] left-padded
    prompt_mask: torch.Tensor  # [N, P]
    completion_ids: torch.Tensor  # [N, C]
    completion_mask: torch.Tensor  # [N, C] 1 up to and including the first EOS
    texts: list[str]  # N decoded completions (without EOS)
    group_size: int = 1  # G: rows i*G .. i*G+G-1 share one prompt
    sampler_logps: torch.Tensor | None = None  # [N, C] log pi_sampler(o_t | ...) at temperature (not greedy)
    precision: str = "float32"  # the sampler's weights (fgrpo.sampler): float32 means the sampler is the policy


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


def shared_prefill(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int):
    """(KV cache, the first step's input ids, their positions): with groups, one prefill of the prompts' first
    P-1 tokens shared by each group's rows, so that only the last prompt token runs in the first step."""
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)  # from the mask, as generate does for left padding
    if group_size > 1 and prompt_ids.shape[1] > 1:
        prompt = prompt_forward(model, prompt_ids[:, :-1], prompt_mask[:, :-1], positions[:, :-1], group_size,
                                logits_to_keep=1)
        return rows_cache(model, prompt.cache, None, group_size), prompt_ids[:, -1:], positions[:, -1:]
    return None, prompt_ids, positions


def draw(scores: torch.Tensor, greedy: bool, n: int, rows: torch.Tensor) -> torch.Tensor:
    """Next tokens of the running ``rows`` from their warped scores [rows, V]: argmax, or what
    torch.multinomial(probs [N, V], 1) draws: q ~ Exp(1) for every entry of all N rows, then argmax(p / q)."""
    if greedy:
        return scores.argmax(-1)
    q = torch.empty((n, scores.shape[1]), device=scores.device).exponential_(1)
    return (F.softmax(scores, dim=-1) / q[rows]).argmax(-1)


def decode(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int, eos_token_id: int,
           pad_token_id: int, temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
           group_size: int = 1, lean: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token sampling with the KV cache, [N, P] left-padded prompts -> [N, C] completions
    (right-padded with ``pad_token_id`` after each row's EOS; C <= ``max_new_tokens``) and, unless
    ``greedy``, each drawn token's log-prob under the sampler at ``temperature`` (before top-p: the
    distribution the loss computes), [N, C] (0 after EOS).
    What ``model.generate`` does for multinomial sampling (or greedy), with two savings: rows of a group
    share one prefill of the prompt's first P-1 tokens (``prompt_forward``), and a row that has written EOS
    leaves the batch and the KV cache, so each step runs only the unfinished rows. Each step draws the
    random numbers ``torch.multinomial`` draws for the full [N, vocabulary] probabilities (q ~ Exp(1),
    token = argmax p / q; rows that have left use none of theirs), so a seed gives the same tokens as
    ``generate`` would, up to float rounding of the smaller batch.
    With ``lean`` (default: ``decode_step.lean_by_default``), the steps after the first run
    ``decode_step.DecodeStep``: the same layers over a KV cache allocated once."""
    n = prompt_ids.shape[0]
    lean = lean_by_default(model) if lean is None else lean
    cache, step_ids, step_positions = shared_prefill(model, prompt_ids, prompt_mask, group_size)
    warpers = LogitsProcessorList(([] if greedy or temperature == 1.0 else [TemperatureLogitsWarper(temperature)])
                                  + ([] if greedy or top_p >= 1.0 else [TopPLogitsWarper(top_p)]))
    out = torch.full((n, max_new_tokens), pad_token_id, dtype=torch.long, device=prompt_ids.device)
    logps = None if greedy else torch.zeros((n, max_new_tokens), device=prompt_ids.device)
    rows = torch.arange(n, device=prompt_ids.device)  # the unfinished rows, in cache order
    mask, length, lean_step = prompt_mask, 0, None
    for t in range(max_new_tokens):
        if lean_step is None:
            step = model(input_ids=step_ids, attention_mask=mask, position_ids=step_positions, cache=cache,
                         use_cache=True, logits_to_keep=1)
            cache, scores = step.cache, step.logits[:, -1].float()
            if lean:  # from here on, the lean step over its own copy of this cache
                lean_step, cache = DecodeStep(model, cache, mask, max_new_tokens - t - 1), None
        else:
            scores = lean_step(step_ids[:, 0], step_positions[:, 0]).float()
        tokens = draw(warpers(None, scores), greedy, n, rows)  # [rows still running]
        out[rows, t] = tokens
        if logps is not None:  # log softmax(z / T)[token]: one gather, no second pass over the vocabulary
            logits = scores / temperature
            logps[rows, t] = logits.gather(1, tokens[:, None])[:, 0] - logits.logsumexp(-1)
        length = t + 1
        running = tokens != eos_token_id
        if not running.any():
            break
        if not running.all():
            keep = running.nonzero().flatten()
            lean_step.select(keep) if lean_step is not None else cache.batch_select_indices(keep)
            rows, tokens, mask, step_positions = rows[keep], tokens[keep], mask[keep], step_positions[keep]
        step_ids = tokens[:, None]
        step_positions = step_positions[:, -1:] + 1
        mask = mask if lean_step is not None else torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return out[:, :length], None if logps is None else logps[:, :length]


def generate(model, tokenizer, prompts: list[str], num_per_prompt: int, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False, merge: bool = True,
             precision: str = "float32") -> Rollouts:
    """Sample ``num_per_prompt`` completions per prompt with ``decode`` (inference mode; with ``merge``,
    on the sampler's weights: merged LoRA weights in ``precision``, fgrpo.sampler)."""
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    prompt_ids = enc["input_ids"].repeat_interleave(num_per_prompt, dim=0).to(device)  # [N, P]
    prompt_mask = enc["attention_mask"].repeat_interleave(num_per_prompt, dim=0).to(device)
    sampler = merge and isinstance(model, PeftModel)
    weights = sampler_weights(model, precision, len(prompt_ids)) if sampler else nullcontext()
    with torch.inference_mode(), weights:
        completion_ids, sampler_logps = decode(model, prompt_ids, prompt_mask, max_new_tokens, tokenizer.eos_token_id,
                                tokenizer.pad_token_id, temperature, top_p, greedy, num_per_prompt)
    completion_ids = completion_ids.clone()  # [N, C]; clone: a normal tensor for autograd
    sampler_logps = None if sampler_logps is None else sampler_logps.clone()
    is_eos = completion_ids == tokenizer.eos_token_id
    # index of the first EOS (or C when there is none); keep tokens up to and including it
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), completion_ids.shape[1])
    positions = torch.arange(completion_ids.shape[1], device=device)
    completion_mask = (positions[None, :] <= first_eos[:, None]).long()  # [N, C]
    keep = (completion_mask.bool() & ~is_eos)
    texts = [tokenizer.decode(ids[m], skip_special_tokens=True) for ids, m in zip(completion_ids, keep)]
    return Rollouts(prompt_ids, prompt_mask, completion_ids, completion_mask, texts, num_per_prompt,
                    sampler_logps, precision if sampler else "float32")


def length_chunks(lengths: torch.Tensor, min_width: int = 16) -> list[tuple[torch.Tensor, int]]:
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


def token_terms(logits: torch.Tensor, tokens: torch.Tensor, temperature: float, entropy: bool,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(z / T)[o_t] at each position, [n, w], from logits z [n, w, V] and tokens o [n, w]; with
    ``entropy``, H_t = -sum_v pi(v) log pi(v) there (no gradient). T = 1 divides nothing (the same values)."""
    z = logits.float()
    logp_all = F.log_softmax(z if temperature == 1.0 else z / temperature, dim=-1)  # [n, w, V]
    logp = torch.gather(logp_all, 2, tokens[..., None])[..., 0]
    if not entropy:
        return logp, None
    with torch.no_grad():
        return logp, -(logp_all.exp() * logp_all).sum(-1)


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
        tokens = rollouts.completion_ids[rows, :width]
        first = prompt_rows(prompt.logits[:, -1:], spread, g)  # [n, 1, V]: predicts o_1
        terms = [token_terms(first, tokens[:, :1], temperature, entropy)]
        if width > 1:  # o_1 .. o_{w-1} predict o_2 .. o_w
            rest = model(input_ids=rollouts.completion_ids[rows, :width - 1],
                         attention_mask=attention_mask[rows, :p + width - 1],
                         position_ids=position_ids[rows, p:p + width - 1], cache=cache).logits  # [n, w-1, V]
            terms.append(token_terms(rest, tokens[:, 1:], temperature, entropy))
        logps.append(F.pad(torch.cat([logp for logp, _ in terms], dim=1), (0, c - width)))
        if entropy:
            entropies.append(F.pad(torch.cat([h for _, h in terms], dim=1), (0, c - width)))  # [n, C]
    order = torch.cat([rows for rows, _ in chunks]).argsort()  # back to row order
    token_entropy = torch.cat(entropies)[order] if entropy else None
    return torch.cat(logps)[order], token_entropy


def per_token_logps(model, rollouts: Rollouts, temperature: float = 1.0) -> torch.Tensor:
    """log pi(o_t | q, o_<t) for every completion token, [N, C] (old and reference log-probs: no entropy)."""
    return per_token_logps_and_entropy(model, rollouts, temperature, entropy=False)[0]


@torch.no_grad()
def kl_to_reference(model, rollouts: Rollouts, temperature: float = 1.0, logps: torch.Tensor | None = None,
                    ref_logps: torch.Tensor | None = None, max_rows: int = 32) -> float:
    """Mean k3 estimate of KL(pi_theta || pi_ref) over the completion tokens of ``rollouts``, with pi_ref the
    base model (no adapter): how far the client's policy has moved, whatever ``beta`` is (a diagnostic, once
    per round). ``logps`` / ``ref_logps``: the log-probs already computed (local GRPO passes those of its
    last step: pi_old, the policy that sampled it, before that step's update, and pi_ref when beta != 0). What
    is missing is computed by a forward without gradient (eval mode: no random numbers drawn) on the first
    groups only, at most ``max_rows`` completions (at least one group), so the diagnostic costs a fraction of
    a step."""
    groups = min(len(rollouts.texts), max(max_rows, rollouts.group_size)) // rollouts.group_size
    if (logps is None or ref_logps is None) and groups * rollouts.group_size < len(rollouts.texts):
        n = groups * rollouts.group_size
        rollouts = select_groups(rollouts, list(range(groups)))
        logps = None if logps is None else logps[:n]
        ref_logps = None if ref_logps is None else ref_logps[:n]
    if logps is None:
        logps = per_token_logps(model, rollouts, temperature)
    ref = ref_logps
    if ref is None:
        with lora_layers_replaced(model):
            ref = per_token_logps(model, rollouts, temperature)
    log_ratio = (ref - logps)[:, :rollouts.completion_mask.shape[1]]
    mask = rollouts.completion_mask
    return float(((torch.exp(log_ratio) - log_ratio - 1) * mask).sum() / mask.sum().clamp(min=1))


def select_groups(r: Rollouts, groups: list[int]) -> Rollouts:
    """The rows of the given groups (each of ``group_size`` consecutive rows), in that order."""
    rows = [g * r.group_size + j for g in groups for j in range(r.group_size)]
    return Rollouts(r.prompt_ids[rows], r.prompt_mask[rows], r.completion_ids[rows], r.completion_mask[rows],
                    [r.texts[i] for i in rows], r.group_size,
                    None if r.sampler_logps is None else r.sampler_logps[rows], r.precision)


def concat_rollouts(parts: list[Rollouts], pad_token_id: int) -> Rollouts:
    """Rollouts of several generate calls as one batch: prompts left-padded and completions right-padded
    to the widest (masks 0 on the padding)."""
    p = max(r.prompt_ids.shape[1] for r in parts)
    c = max(r.completion_ids.shape[1] for r in parts)

    def cat(name: str, left: bool, width: int, value: int) -> torch.Tensor:
        tensors = [getattr(r, name) for r in parts]
        return torch.cat([F.pad(t, (width - t.shape[1], 0) if left else (0, width - t.shape[1]), value=value)
                          for t in tensors])

    logps = (None if any(r.sampler_logps is None for r in parts) else
             torch.cat([F.pad(r.sampler_logps, (0, c - r.sampler_logps.shape[1])) for r in parts]))
    return Rollouts(cat("prompt_ids", True, p, pad_token_id), cat("prompt_mask", True, p, 0),
                    cat("completion_ids", False, c, pad_token_id), cat("completion_mask", False, c, 0),
                    [t for r in parts for t in r.texts], parts[0].group_size, logps, parts[0].precision)
