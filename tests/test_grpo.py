"""Local GRPO pieces on hand-computed tensors, plus one real local step on a tiny model."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fgrpo import kernels, sampler, tasks
from fgrpo.config import RunConfig
from fgrpo.decode_step import supported
from fgrpo.grpo import GRPOSettings, group_advantages, grpo_loss, local_grpo, prompt_batches
from fgrpo.kernels import Choice
from fgrpo.model import add_lora, build_tiny_model, char_tokenizer
from fgrpo.rollouts import Rollouts, decode, generate, kl_to_reference, length_chunks, per_token_logps
from fgrpo.sampler import sampler_weights


def grpo_settings(local_steps: int, **overrides) -> GRPOSettings:
    return GRPOSettings.from_config(RunConfig(**overrides), local_steps=local_steps)


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 5.0, 5.0, 5.0, 5.0])
    adv = group_advantages(rewards, group_size=4)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()  # unbiased, as TRL
    assert torch.allclose(adv[:4], (torch.tensor([1.0, 0.0, 0.0, 1.0]) - 0.5) / (std + 1e-4))
    assert torch.equal(adv[4:], torch.zeros(4))  # equal rewards carry no signal
    assert torch.allclose(group_advantages(rewards, 4, scale=False)[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_advantages_are_scale_free_only_with_std_division():
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.0])
    assert torch.allclose(group_advantages(rewards, 4), group_advantages(rewards * 10, 4), atol=1e-3)
    assert not torch.allclose(group_advantages(rewards, 4, False), group_advantages(rewards * 10, 4, False))


def test_loss_types_by_hand():
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([2.0, -1.0])
    # mu = 1: ratio = 1, per-token loss = -A
    grpo, _ = grpo_loss(logps, None, None, adv, mask, "grpo")
    assert grpo.item() == pytest.approx(((-2 * 2) / 2 + (1 * 3) / 3) / 2)
    dapo, _ = grpo_loss(logps, None, None, adv, mask, "dapo")
    assert dapo.item() == pytest.approx((-2 * 2 + 1 * 3) / 5)
    dr, _ = grpo_loss(logps, None, None, adv, mask, "dr_grpo", max_completion_length=4)
    assert dr.item() == pytest.approx((-2 * 2 + 1 * 3) / (2 * 4))
    with pytest.raises(ValueError):
        grpo_loss(logps, None, None, adv, mask, "nope")


def test_clip_and_kl_by_hand():
    logps = torch.tensor([[0.0]])
    old = torch.tensor([[-1.0]])  # ratio = e > 1 + eps
    ref = torch.tensor([[-0.5]])
    loss, metrics = grpo_loss(logps, old, ref, torch.tensor([1.0]), torch.ones(1, 1), "grpo", beta=0.1)
    kl = torch.exp(torch.tensor(-0.5)) + 0.5 - 1
    assert loss.item() == pytest.approx(-1.2 + 0.1 * kl.item())
    assert metrics["clip_ratio"] == 1.0
    assert metrics["kl"] == pytest.approx(kl.item())


@pytest.fixture(scope="module")
def tiny_lora():
    tokenizer = char_tokenizer()
    model = add_lora(build_tiny_model(tokenizer, seed=0), r=4, alpha=8, dropout=0.0, seed=0)
    return model, tokenizer


def test_rollouts_mask_stops_at_eos_and_logps_match_generate(tiny_lora):
    model, tokenizer = tiny_lora
    torch.manual_seed(0)
    r = generate(model, tokenizer, ["rev:abc=", "12+3="], num_per_prompt=3, max_new_tokens=6)
    assert r.prompt_ids.shape[0] == 6 and r.completion_mask.shape == r.completion_ids.shape
    for ids, mask, text in zip(r.completion_ids, r.completion_mask, r.texts):
        n = int(mask.sum())
        eos = (ids == tokenizer.eos_token_id).nonzero()
        if len(eos):
            assert n == int(eos[0]) + 1  # up to and including the first EOS
        else:
            assert n == ids.shape[0]
        assert "</s>" not in text
    # a left-padded batch gives the same log-probs as each prompt alone
    batch = per_token_logps(model, r)
    single = generate(model, tokenizer, ["12+3="], 1, 6)
    single.completion_ids, single.completion_mask = r.completion_ids[3:4], r.completion_mask[3:4]
    alone = per_token_logps(model, single)
    m = r.completion_mask[3].bool()
    assert torch.allclose(batch[3][m], alone[0][m], atol=1e-5)


def full_sequence_logps(model, r):
    """The textbook computation: one forward over the N full prompt+completion sequences."""
    ids = torch.cat([r.prompt_ids, r.completion_ids], 1)
    mask = torch.cat([r.prompt_mask, r.completion_mask], 1)
    c = r.completion_ids.shape[1]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                   logits_to_keep=c + 1).logits[:, :-1].float()
    return torch.gather(torch.log_softmax(logits, -1), 2, r.completion_ids[..., None])[..., 0]


def test_shared_prompt_forward_equals_full_forward_values_and_gradients(tiny_lora):
    """Prompts run once per group (KV cache repeated G times): same log-probs, loss and LoRA
    gradients as one forward over every full sequence, on a ragged, left-padded batch."""
    model, tokenizer = tiny_lora
    for name, p in model.named_parameters():  # a non-zero B so that the adapter matters
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    r = generate(model, tokenizer, ["rev:abcdef=", "12+3=", "x"], num_per_prompt=4, max_new_tokens=6)
    assert r.group_size == 4 and r.prompt_mask[4:].sum() < r.prompt_mask[:4].sum()  # padded rows
    params = [p for p in model.parameters() if p.requires_grad]
    advantages = torch.randn(12, generator=torch.Generator().manual_seed(2))
    results = []
    for logps_fn in (per_token_logps, full_sequence_logps):
        model.train()
        logps = logps_fn(model, r)
        loss, _ = grpo_loss(logps, None, None, advantages, r.completion_mask)
        loss.backward()
        results.append((logps.detach(), loss.item(), [p.grad.clone() for p in params]))
        model.zero_grad(set_to_none=True)
    (shared, shared_loss, shared_grads), (full, full_loss, full_grads) = results
    m = r.completion_mask.bool()
    assert torch.allclose(shared[m], full[m], atol=1e-5)
    assert abs(shared_loss - full_loss) < 1e-6
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(shared_grads, full_grads))
    assert any(g.abs().sum() > 0 for g in shared_grads)


def test_length_chunks_by_hand():
    lengths = torch.tensor([256, 19, 43, 5, 108, 32, 33, 64, 65])
    chunks = [(rows.tolist(), width) for rows, width in length_chunks(lengths)]
    # classes: <= 16 | 17..32 | 33..64 | 65..128 | 129..256; widths: each class's longest
    assert chunks == [([0], 256), ([4, 8], 108), ([2, 6, 7], 64), ([1, 5], 32), ([3], 5)]
    assert [(r.tolist(), w) for r, w in length_chunks(torch.tensor([10, 3, 7]))] == [([0, 1, 2], 10)]


def test_chunked_forward_equals_full_forward_values_and_gradients(tiny_lora):
    """Completions of very different lengths run in length chunks (each cut at its longest row, on its
    rows' prompt caches): the log-probs, loss and LoRA gradients of one forward over every full sequence."""
    model, tokenizer = tiny_lora
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(4))
    enc = tokenizer(["rev:abcdef=", "x"], return_tensors="pt", padding=True)
    lengths = [40, 3, 20, 10, 36, 1]  # two prompts x G = 3; chunks {40, 36}, {20} and {3, 10, 1}
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(4, len(tokenizer), (6, 40), generator=gen)
    mask = (torch.arange(40)[None, :] < torch.tensor(lengths)[:, None]).long()
    for row, n in enumerate(lengths):
        ids[row, n - 1] = tokenizer.eos_token_id
        ids[row, n:] = tokenizer.pad_token_id
    r = Rollouts(enc["input_ids"].repeat_interleave(3, 0), enc["attention_mask"].repeat_interleave(3, 0),
                 ids, mask, [""] * 6, group_size=3)
    assert len(length_chunks(mask.sum(1))) == 3
    params = [p for p in model.parameters() if p.requires_grad]
    advantages = torch.randn(6, generator=gen)
    results = []
    for logps_fn in (per_token_logps, full_sequence_logps):
        model.train()
        logps = logps_fn(model, r)
        loss, _ = grpo_loss(logps, None, None, advantages, mask)
        loss.backward()
        results.append((logps.detach(), loss.item(), [p.grad.clone() for p in params]))
        model.zero_grad(set_to_none=True)
    (chunked, chunked_loss, chunked_grads), (full, full_loss, full_grads) = results
    assert chunked.shape == full.shape == (6, 40)
    assert torch.allclose(chunked[mask.bool()], full[mask.bool()], atol=1e-5)
    assert abs(chunked_loss - full_loss) < 1e-6
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(chunked_grads, full_grads))
    assert any(g.abs().sum() > 0 for g in chunked_grads)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_decode_draws_what_generate_draws_with_fewer_rows(temperature, top_p):
    """Rows leave the batch at their EOS, yet a seed gives the tokens of transformers' ``generate`` and
    leaves the random generator where ``generate`` leaves it."""
    tokenizer = char_tokenizer()
    model = build_tiny_model(tokenizer, seed=2)  # random weights: EOS about 1 in 100 tokens
    prompts = ["rev:abcdef=", "12+3=", "x"]
    rows_run = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: rows_run.append(kwargs["input_ids"].shape[0]),
                                           with_kwargs=True)
    torch.manual_seed(0)
    ours = generate(model, tokenizer, prompts, num_per_prompt=4, max_new_tokens=30, temperature=temperature,
                    top_p=top_p)
    after_ours = torch.rand(3)
    hook.remove()
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    with torch.no_grad():
        full = model.generate(input_ids=enc["input_ids"].repeat_interleave(4, 0),
                              attention_mask=enc["attention_mask"].repeat_interleave(4, 0), do_sample=True,
                              top_k=0, temperature=temperature, top_p=top_p, max_new_tokens=30,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    after_theirs = torch.rand(3)
    n = ours.completion_ids.shape[1]
    assert torch.equal(ours.completion_ids, full[:, enc["input_ids"].shape[1]:])
    assert full.shape[1] == enc["input_ids"].shape[1] + n
    assert torch.equal(after_ours, after_theirs)
    lengths = ours.completion_mask.sum(1)
    assert lengths.min() < lengths.max()  # rows finished at different steps ...
    assert sum(rows_run[1:]) < 12 * (n - 1)  # ... and left the batch: fewer rows ran than generate runs


@pytest.mark.parametrize("forced", [None, Choice("onednn", "onednn", True), Choice("skinny", "skinny", True),
                                    Choice("skinny", "dense", False)])
def test_the_lean_decode_step_draws_what_transformers_forward_draws(monkeypatch, forced):
    """``DecodeStep`` (a KV cache allocated once, left padding, rows leaving at EOS, fused or separate sampler
    layers) gives the tokens and sampler log-probs of transformers' forward; above ``SMALL_MODEL`` it is the
    default, and transformers' forward runs only the prefill and the first step."""
    offered = kernels.candidates(torch.float32) if torch.backends.mkldnn.is_available() else ("dense",)
    if forced is not None and not {forced.kernel, forced.head} <= set(offered):
        pytest.skip(f"not offered here: {forced} (offered: {offered})")
    tokenizer = char_tokenizer()
    model = add_lora(build_tiny_model(tokenizer, seed=2), r=4, alpha=8, dropout=0.0, seed=0)  # EOS ~1 in 100
    monkeypatch.setattr(kernels, "FORCED", forced)
    assert supported(model)
    enc = tokenizer(["rev:abcdef=", "12+3=", "x"], return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"].repeat_interleave(4, 0), enc["attention_mask"].repeat_interleave(4, 0)
    runs = {}
    with torch.inference_mode(), sampler_weights(model, "float32", len(ids)):
        for lean in (False, True):
            torch.manual_seed(0)
            runs[lean] = decode(model, ids, mask, 40, tokenizer.eos_token_id, tokenizer.pad_token_id, 0.7, 0.9,
                                group_size=4, lean=lean)
    (plain, plain_logps), (lean, lean_logps) = runs[False], runs[True]
    assert torch.equal(plain, lean)
    assert torch.allclose(plain_logps, lean_logps, atol=1e-4)
    finished = (lean == tokenizer.eos_token_id).any(1)
    assert 0 < finished.sum() < len(lean)  # some rows left the batch before the end
    calls = []
    hook = model.get_base_model().register_forward_pre_hook(lambda *_: calls.append(1))
    # at exactly SMALL_MODEL parameters the model is not small, even when the sampler's kernel modules (whose
    # weights are not parameters) stand in for its layers
    monkeypatch.setattr(sampler, "SMALL_MODEL", sum(p.numel() for p in model.parameters()))
    torch.manual_seed(0)
    r = generate(model, tokenizer, ["rev:abcdef=", "12+3=", "x"], 4, 40, 0.7, 0.9)
    hook.remove()
    assert torch.equal(r.completion_ids, lean) and len(calls) == 2  # the prefill and the first step


def test_the_lean_decode_step_groups_query_heads_as_transformers_does():
    """GQA (4 query heads on 2 key/value heads, as SmolLM2's 9 on 3): the lean step's sampled tokens and
    log-probs are transformers' forward's."""
    tokenizer = char_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(1)
    model = LlamaForCausalLM(config).eval()
    enc = tokenizer(["rev:abcdef=", "x"], return_tensors="pt", padding=True)
    runs = []
    with torch.inference_mode():
        for lean in (False, True):
            torch.manual_seed(0)
            runs.append(decode(model, enc["input_ids"], enc["attention_mask"], 12, -1, tokenizer.pad_token_id,
                               lean=lean))
    assert runs[0][0].shape == (2, 12) and torch.equal(runs[0][0], runs[1][0])
    assert torch.allclose(runs[0][1], runs[1][1], atol=1e-4)


def test_shared_prefill_generates_the_same_tokens(tiny_lora):
    model, tokenizer = tiny_lora
    prompts = ["rev:abcdef=", "12+3=", "x"]
    shared = generate(model, tokenizer, prompts, num_per_prompt=3, max_new_tokens=6, greedy=True)
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        full = model.generate(input_ids=enc["input_ids"].repeat_interleave(3, 0),
                              attention_mask=enc["attention_mask"].repeat_interleave(3, 0), do_sample=False,
                              max_new_tokens=6, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    n = shared.completion_ids.shape[1]
    assert torch.equal(shared.completion_ids, full[:, -n:]) and full.shape[1] == enc["input_ids"].shape[1] + n


def test_rollouts_on_merged_lora_weights_match_the_adapter_and_leave_the_base_untouched(tiny_lora):
    model, tokenizer = tiny_lora
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(3))
    weights = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    prompts = ["rev:abcdef=", "12+3=", "x"]
    merged = generate(model, tokenizer, prompts, 2, 6, greedy=True, merge=True)
    plain = generate(model, tokenizer, prompts, 2, 6, greedy=True, merge=False)
    assert torch.equal(merged.completion_ids, plain.completion_ids)
    now = dict(model.named_parameters())
    assert now.keys() == weights.keys()
    assert all(now[n] is p and torch.equal(p, saved) for n, (p, saved) in weights.items())  # same tensors, same bits


def test_sampling_uses_the_whole_vocabulary():
    """top_k = 0: rollouts sample from the policy, not from transformers' default top 50."""
    tokenizer = char_tokenizer()
    model = add_lora(build_tiny_model(tokenizer, seed=0), r=4, alpha=8, dropout=0.0, seed=0)  # ~uniform logits
    torch.manual_seed(0)
    r = generate(model, tokenizer, ["a"] * 8, 64, max_new_tokens=1, temperature=3.0)
    assert len(set(r.completion_ids[:, 0].tolist())) > 60 and len(tokenizer) > 90


def test_local_grpo_changes_only_the_adapter(tiny_lora):
    model, tokenizer = tiny_lora
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train = tasks.train_split("spell_backward", 16, seed=0)
    reward = lambda ex, text: float(len(text))  # a dense reward so that groups differ
    result = local_grpo(model, tokenizer, opt, prompt_batches(train, 2, 0), reward,
                        grpo_settings(local_steps=2, prompts_per_step=2, group_size=4, max_new_tokens=5))
    assert result.num_prompts == 4
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert {"loss", "reward_std", "reward_pooled_std", "frac_zero_std", "clip_ratio"} <= set(result.metrics)
    # the std over all rewards includes the spread between prompts: never below the mean within-group std
    # (sample stds over 8 rewards vs groups of 4, hence the small slack)
    assert result.reward_pooled_std >= 0.9 * result.reward_std > 0
    assert kl_to_reference(model, result.last_rollouts) > 0  # beta = 0, yet the drift from the base is measured


def test_kl_to_reference_is_zero_for_the_base_model_and_matches_the_k3_formula():
    tokenizer = char_tokenizer()
    model = add_lora(build_tiny_model(tokenizer, seed=1), r=4, alpha=8, dropout=0.0, seed=0)
    rollouts = generate(model, tokenizer, ["rev:abc=", "cnt a:aa="], 3, 6)
    assert kl_to_reference(model, rollouts) == 0.0  # a fresh adapter (B = 0) is the base model
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    logps = per_token_logps(model, rollouts)
    with model.disable_adapter():
        ref = per_token_logps(model, rollouts)
    mask = rollouts.completion_mask.bool()
    expected = (torch.exp(ref - logps) - (ref - logps) - 1)[mask].mean()
    assert kl_to_reference(model, rollouts) == pytest.approx(float(expected), rel=1e-5) and expected > 0


def test_local_grpo_with_kl_and_mu(tiny_lora):
    """beta > 0 runs the reference forward with the adapter disabled; mu > 1 reuses rollouts."""
    model, tokenizer = tiny_lora
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train = tasks.train_split("spell_backward", 16, seed=0)
    reward = lambda ex, text: float(len(text))
    cfg = grpo_settings(local_steps=3, prompts_per_step=2, group_size=4, max_new_tokens=5, beta=0.1, mu=2)
    result = local_grpo(model, tokenizer, opt, prompt_batches(train, 2, 0), reward, cfg)
    assert result.metrics["kl"] > 0  # the adapter has moved away from the base model
    with model.disable_adapter():  # the reference really is the base: no LoRA contribution
        ids = tokenizer(["rev:abc="], return_tensors="pt")["input_ids"]
        base_logits = model(input_ids=ids).logits
    assert not torch.allclose(base_logits, model(input_ids=ids).logits)


def test_fedprox_term_adds_mu_times_the_drift_to_the_gradient():
    """With SGD and no clipping, step 1 is the same with or without the proximal term (theta equals
    the anchor), so step 2 sees the same rollouts and differs by exactly lr * mu * (theta_1 - theta_0)."""
    tokenizer = char_tokenizer()
    train = tasks.train_split("spell_backward", 16, seed=0)
    reward = lambda ex, text: float(len(text))

    starts = []

    def trained(steps: int, mu: float) -> list[torch.Tensor]:
        model = add_lora(build_tiny_model(tokenizer, seed=0), r=4, alpha=8, dropout=0.0, seed=0)
        params = [p for p in model.parameters() if p.requires_grad]
        starts.append([p.detach().clone() for p in params])
        torch.manual_seed(0)
        cfg = grpo_settings(local_steps=steps, prompts_per_step=2, group_size=4, max_new_tokens=5,
                           proximal_mu=mu, max_grad_norm=0.0)
        result = local_grpo(model, tokenizer, torch.optim.SGD(params, lr=0.5), prompt_batches(train, 2, 0),
                            reward, cfg)
        assert ("proximal_term" in result.metrics) == (mu > 0)
        return [p.detach().clone() for p in params]

    one, plain, prox = trained(1, 0.0), trained(2, 0.0), trained(2, 2.0)
    assert all(torch.equal(a, b) for a, b in zip(starts[0], starts[2]))  # the same seeded init
    drift = [a - b for a, b in zip(one, starts[0])]
    assert any(d.abs().max() > 0 for d in drift)
    for p0, p2, d in zip(plain, prox, drift):
        assert torch.allclose(p2, p0 - 0.5 * 2.0 * d, atol=1e-6)


def test_concatenated_rollouts_keep_every_log_prob(tiny_lora):
    """Two generate calls of different widths as one batch (dynamic sampling merges them): the same
    per-token log-probs, thanks to position ids from the attention mask."""
    from fgrpo.rollouts import concat_rollouts, select_groups

    model, tokenizer = tiny_lora
    torch.manual_seed(0)
    short = generate(model, tokenizer, ["rev:ab=", "cnt a:a="], 2, 3)
    long = generate(model, tokenizer, ["rev:abcdef=", "desc:1,22,3="], 2, 6)
    merged = concat_rollouts([select_groups(short, [1]), long], tokenizer.pad_token_id)
    assert merged.prompt_ids.shape[0] == 6 and merged.texts == short.texts[2:] + long.texts
    with torch.no_grad():
        parts = [per_token_logps(model, select_groups(short, [1])), per_token_logps(model, long)]
        together = per_token_logps(model, merged)
    for rows, part in zip((slice(0, 2), slice(2, 6)), parts):
        mask = merged.completion_mask[rows, :part.shape[1]].bool()
        assert torch.allclose(together[rows, :part.shape[1]][mask], part[mask], atol=1e-5)


def test_dynamic_sampling_trains_only_on_groups_with_signal(tiny_lora):
    from fgrpo.grpo import sample_step

    model, tokenizer = tiny_lora
    examples = tasks.train_split("letter_counting", 64, seed=0)
    cfg = grpo_settings(1, prompts_per_step=4, group_size=4, max_new_tokens=3, dynamic_sampling=3)
    reward = lambda e, t: float(len(t) % 2)  # noisy: some groups tie, some do not
    torch.manual_seed(0)
    step = sample_step(model, tokenizer, prompt_batches(examples, 4, seed=0), reward, cfg)
    stds = step.rewards.view(-1, 4).std(dim=1)
    assert 1 <= step.generations <= 4 and step.first_rewards.shape == (16,)
    assert len(step.rollouts.texts) == step.rewards.shape[0] <= 16 and bool((stds > 0).all())
    torch.manual_seed(0)
    plain = sample_step(model, tokenizer, prompt_batches(examples, 4, seed=0), reward,
                        grpo_settings(1, prompts_per_step=4, group_size=4, max_new_tokens=3))
    assert plain.generations == 1 and torch.equal(plain.first_rewards, step.first_rewards)  # same first batch


@pytest.mark.parametrize("form, workers", [("verifier", 0), ("verifier", 2), ("trl", 0), ("trl", 2)])
def test_an_owners_verifier_is_called_once_per_sample_and_step(tiny_lora, form, workers):
    """Score once: each local step calls the owner's verifier once per sample (one call of the batch in TRL's
    form), and that one value is both the reward and the correctness train_accuracy counts."""
    from fgrpo.rewards import GuardedReward, OwnerReward
    from fgrpo.tasks import Example
    from fgrpo.trl_rewards import BatchReward, RewardTerm

    model, tokenizer = tiny_lora
    seen: list[str] = []  # every completion the owner's function was asked about, in order

    def verifier(prompt, completion, answer):
        seen.append(completion)
        return float(len(completion) % 2)

    def batch_verifier(completions, **kwargs):
        return [verifier(None, c, None) for c in completions]

    owner = (OwnerReward("count", verifier) if form == "verifier"
             else BatchReward("count", [RewardTerm("count", batch_verifier, batch=True)]))
    rows = [Example("owner", e.prompt, e.answer, {"answer": e.answer}, columns={"prompt": e.prompt})
            for e in tasks.train_split("spell_backward", 8, seed=0)]
    reward = GuardedReward(owner)
    reward.begin_round(1, workers=workers)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(0)
    result = local_grpo(model, tokenizer, opt, prompt_batches(rows, 2, 0), reward,
                        grpo_settings(local_steps=2, prompts_per_step=2, group_size=4, max_new_tokens=5))
    assert len(seen) == 2 * 2 * 4  # local steps x prompts x completions: no second call for the accuracy
    shares = [sum(len(c) % 2 >= 1 for c in seen[k:k + 8]) / 8 for k in (0, 8)]  # per step, from the same calls
    assert result.metrics["train_accuracy"] == sum(shares) / 2
    assert reward.take_failures() == (0, 16)
