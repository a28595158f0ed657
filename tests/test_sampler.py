"""Rollouts from a lower-precision sampler (rollout_precision) and the loss's correction for it."""

import re

import pytest
import torch
import torch.nn.functional as F

from fgrpo import kernels, skinny
from fgrpo.grpo import grpo_loss, local_grpo, prompt_batches, sampler_correction
from fgrpo.kernels import DTYPES, Choice, FrozenOnednnLinear, FusedPart, OnednnLinear
from fgrpo.model import add_lora, build_tiny_model, char_tokenizer
from fgrpo.rollouts import generate, per_token_logps
from fgrpo.sampler import loss_kernels, resolve_rollout_precision, sampler_shapes, sampler_weights
from fgrpo.tasks import train_split
from test_grpo import grpo_settings

T, V, N = 4, 6, 20_000  # tokens per sequence, vocabulary, samples


def sequence_terms(theta: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log pi(o_t) of a policy whose T positions are independent categoricals with logits ``theta`` [T, V]."""
    return torch.log_softmax(theta, -1)[torch.arange(T), tokens]  # [n, T]


def test_correction_gives_the_on_policy_gradient_and_no_correction_does_not():
    """Sampling from a perturbed sampler q: the corrected GRPO loss (grpo_loss with sampler_correction's weights)
    has the expected gradient of sampling from pi itself (exact, by enumerating all V^T sequences), within
    sampling error; the uncorrected loss is off by far more than its sampling error."""
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(T, V, generator=gen).requires_grad_()
    sampler = theta.detach() + 0.5 * torch.randn(T, V, generator=gen)  # a sampler that rounds differently
    advantage = lambda o: (o == 0).sum(-1).float() - 1.0  # a fixed advantage per sequence

    everything = torch.cartesian_prod(*[torch.arange(V)] * T)  # [V^T, T]
    logp_all = sequence_terms(theta, everything)
    p = logp_all.sum(-1).exp().detach()
    exact = torch.autograd.grad(-(p * advantage(everything) * logp_all.mean(-1)).sum(), theta)[0]  # [T, V]

    tokens = torch.multinomial(torch.softmax(sampler, -1), N, replacement=True, generator=gen).T  # [N, T]
    logps = sequence_terms(theta, tokens)
    sampler_logps = torch.log_softmax(sampler, -1)[torch.arange(T), tokens]
    mask = torch.ones(N, T)
    adv = advantage(tokens)
    for mode, cap in (("sequence_truncate", 1e9), ("off", None)):
        weights = None
        if mode != "off":
            weights, stats = sampler_correction(logps.detach(), sampler_logps, mask, mode, cap)
            assert stats["sampler_logp_diff_mean"] > 0.1 and stats["sampler_cut_fraction"] == 0.0
        loss, _ = grpo_loss(logps, None, None, adv, mask, sampler_weights=weights)
        grad = torch.autograd.grad(loss, theta, retain_graph=True)[0]
        # per-sample gradients, closed form: -w A / T * (onehot(o_t) - softmax(theta_t)), for the standard error
        w = torch.ones(N, 1) if weights is None else weights
        onehot = torch.nn.functional.one_hot(tokens, V).float()
        per_sample = -(w * adv[:, None] / T)[..., None] * (onehot - torch.softmax(theta.detach(), -1))
        assert torch.allclose(per_sample.mean(0), grad, atol=1e-5)  # the loss's gradient is that mean
        z = ((grad - exact) / (per_sample.std(0) / N ** 0.5 + 1e-9)).abs().max().item()
        if mode == "off":
            assert z > 8  # biased: the sampler's distribution, not the policy's
        else:
            assert z < 4.5  # unbiased: within sampling error (24 entries)


def test_correction_modes_truncate_and_mask_at_the_cap():
    train = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    sampler = torch.zeros(3, 3)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]])
    w, stats = sampler_correction(train, sampler, mask, "sequence_mask", 3.0)
    assert w.shape == (3, 1) and w[1, 0] == 0 and w[0, 0] == 1 and torch.isclose(w[2, 0], torch.exp(torch.tensor(-1.)))
    assert stats["sampler_cut_fraction"] == pytest.approx(1 / 3) and stats["sampler_logp_diff_max"] == 2.0
    w, stats = sampler_correction(train, sampler, mask, "token_truncate", 3.0)
    assert w.shape == (3, 3) and w[1, 0] == 3.0 and w[1, 1] == 1.0
    assert stats["sampler_cut_fraction"] == pytest.approx(1 / 8)  # 1 of the 8 completion tokens
    w, _ = sampler_correction(train, sampler, mask, "token_mask", 3.0)
    assert w[1, 0] == 0 and w[2, 1] == pytest.approx(torch.exp(torch.tensor(-1.0)).item())


def test_auto_precision_follows_the_hardware():
    cpu, big = torch.device("cpu"), 135_000_000
    assert resolve_rollout_precision("auto", cpu, big, frozenset({"avx2", "avx512f"})) == "float32"  # not native
    assert resolve_rollout_precision("auto", cpu, big, frozenset({"avx512_bf16"})) == "bfloat16"
    assert resolve_rollout_precision("auto", cpu, big, frozenset({"amx_bf16"})) == "bfloat16"
    assert resolve_rollout_precision("auto", cpu, 870_000, frozenset({"amx_bf16"})) == "float32"  # small model
    assert resolve_rollout_precision("bfloat16", cpu, 870_000, frozenset()) == "bfloat16"  # asked for: as asked


def test_bfloat16_rollouts_record_sampler_logps_and_train_corrected():
    precision = "bfloat16"
    tokenizer = char_tokenizer()
    model = add_lora(build_tiny_model(tokenizer, seed=0), r=4, alpha=8, dropout=0.0, seed=0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(3))
    weights = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    modules = dict(model.named_modules())
    torch.manual_seed(0)
    r = generate(model, tokenizer, ["rev:abcdef=", "12+3="], 4, 8, temperature=0.7, precision=precision)
    assert dict(model.named_modules()) == modules  # every layer put back
    assert all(dict(model.named_parameters())[n] is p and torch.equal(p, saved) for n, (p, saved) in weights.items())
    policy = per_token_logps(model, r, 0.7)
    diff = ((policy - r.sampler_logps).abs() * r.completion_mask).sum() / r.completion_mask.sum()
    assert r.precision == precision and 0 < diff < 0.1  # a different, nearby distribution
    torch.manual_seed(0)
    exact = generate(model, tokenizer, ["rev:abcdef=", "12+3="], 4, 8, temperature=0.7)
    same = ((per_token_logps(model, exact, 0.7) - exact.sampler_logps).abs() * exact.completion_mask).max()
    assert exact.precision == "float32" and same < 1e-4  # float32: the sampler is the policy

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    settings = grpo_settings(local_steps=2, prompts_per_step=2, group_size=4, max_new_tokens=5,
                             sampler_correction="token_truncate")
    reward = lambda ex, text: float(len(text))
    train = train_split("spell_backward", 16, seed=0)
    low = local_grpo(model, tokenizer, opt, prompt_batches(train, 2, 0), reward,
                     type(settings)(**{**settings.__dict__, "rollout_precision": precision}))
    assert 0 < low.metrics["sampler_logp_diff_mean"] < 0.1 and "sampler_cut_fraction" in low.metrics
    full = local_grpo(model, tokenizer, opt, prompt_batches(train, 2, 0), reward, settings)
    assert not any(k.startswith("sampler_") for k in full.metrics)  # float32: nothing to correct


def lora_model():
    tokenizer = char_tokenizer()
    model = add_lora(build_tiny_model(tokenizer, seed=0), r=4, alpha=8, dropout=0.0, seed=0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(3))
    return model, tokenizer


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch without oneDNN")
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_every_kernel_choice_samples_what_the_default_kernels_sample(monkeypatch, precision):
    """oneDNN-packed and fused (q/k/v, gate/up) sampler layers: the same tokens for a seed as the default
    kernels and the same sampler log-probs within float rounding; the float32 weights untouched."""
    model, tokenizer = lora_model()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    runs = {}
    offered = kernels.candidates(DTYPES[precision])
    choices = [c for c in (kernels.DEFAULT, Choice("onednn", "onednn", True), Choice("dense", "onednn", True),
                           Choice("skinny", "skinny", True), Choice("skinny", "onednn", False),
                           Choice("onednn", "dense", False)) if {c.kernel, c.head} <= set(offered)]
    for choice in choices:
        monkeypatch.setattr(kernels, "FORCED", choice)
        torch.manual_seed(0)
        runs[choice] = generate(model, tokenizer, ["rev:abcdef=", "12+3="], 4, 8, temperature=0.7,
                                precision=precision)
    default = runs.pop(kernels.DEFAULT)
    for choice, r in runs.items():
        assert torch.equal(r.completion_ids, default.completion_ids), choice
        assert torch.allclose(r.sampler_logps, default.sampler_logps, atol=1e-4), choice
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    if "onednn" not in offered:
        pytest.skip(f"oneDNN does not run {precision} here: only the default kernels were compared")
    with sampler_weights(model, precision):  # FORCED: the last choice, unfused
        assert not any(isinstance(m, FusedPart) for m in model.modules())
        assert sum(isinstance(m, OnednnLinear) for m in model.modules()) == 4 * 7  # 4 layers x 7 adapted
    monkeypatch.setattr(kernels, "FORCED", Choice("onednn", "onednn", True))
    with sampler_weights(model, precision):
        assert sum(isinstance(m, FusedPart) for m in model.modules()) == 4 * 5  # q, k, v, gate, up
        shared = {id(m.shared): m.shared.linear for m in model.modules() if isinstance(m, FusedPart)}
        assert len(shared) == 4 * 2 and all(isinstance(m, OnednnLinear) for m in shared.values())  # qkv, gate/up
        assert sum(isinstance(m, OnednnLinear) for m in model.modules()) == 4 * 2 + 1  # o, down; the head


def test_the_skinny_kernel_is_the_plain_product_and_absent_where_it_cannot_be_built(monkeypatch, tmp_path):
    """``SkinnyLinear`` (fgrpo.skinny): x W^T + b for 1 to 20 rows (its loop up to
    ``MAX_ROWS``, ``F.linear`` past it), a
    strided x, an odd width; where the extension is not there, no kernel choice offers it."""
    if not skinny.available(torch.float32):
        pytest.skip(f"the skinny kernel cannot be built here: {skinny.problem()}")
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(100, 37, generator=gen), torch.randn(100, generator=gen)
    layer = skinny.SkinnyLinear(weight, bias, torch.float32)
    for rows in (1, 2, 3, 4, 5, 8, 9, 12, 15, 16, 17, 20):
        x = torch.randn(rows, 1, 37, generator=gen)
        assert torch.allclose(layer(x), F.linear(x, weight, bias), atol=1e-5), rows
    x = torch.randn(3, 74, generator=gen)[:, ::2]
    assert torch.allclose(skinny.SkinnyLinear(weight, None, torch.float32)(x), x @ weight.T, atol=1e-5)
    assert "skinny" not in kernels.candidates(torch.bfloat16)
    with pytest.raises(RuntimeError, match="dtype"):
        layer(x.double())  # not float32: F.linear's error, nothing read as float32
    monkeypatch.setenv("FGRPO_CACHE", str(tmp_path))  # nothing built there yet
    for compiler, problem in (("no-such-c++", "no C++ compiler (no-such-c++)"), ("false", "the build failed")):
        monkeypatch.setattr(skinny, "_BUILT", {})
        monkeypatch.setenv("CXX", compiler)
        assert "skinny" not in kernels.candidates(torch.float32) and skinny.problem().startswith(problem)
        with pytest.raises(ValueError, match=re.escape(problem)):
            skinny.SkinnyLinear(weight, bias, torch.float32)
    assert not list(tmp_path.rglob("*.so"))  # a failed build leaves nothing to load


def test_a_fused_part_is_its_own_product_whatever_the_call_order():
    gen = torch.Generator().manual_seed(0)
    w = [torch.randn(o, 8, generator=gen) for o in (4, 2, 2)]
    parts = kernels.fused_parts(torch.cat(w), [None] * 3, [4, 2, 2], "dense", torch.float32)
    x, y = torch.randn(3, 8, generator=gen), torch.randn(3, 8, generator=gen)
    for inp, i in [(x, 0), (x, 1), (y, 2), (x, 2), (x, 0), (x, 0), (y, 1)]:  # shared, another input, repeated
        assert torch.allclose(parts[i](inp), inp @ w[i].T, atol=1e-6)


def test_kernels_are_measured_once_per_machine_and_model_and_not_off_the_cpu(monkeypatch, tmp_path):
    model, _ = lora_model()
    shapes = sampler_shapes(model)
    assert shapes.adapted == ((128, 128, 16), (128, 384, 4), (384, 128, 8))  # q k v o; down; gate up
    assert shapes.fused == ((128, 128, 4), (128, 384, 4), (384, 128, 4), (768, 128, 4)) and len(shapes.frozen) == 1
    calls = []

    def fake_ms(kernel, dtype, out, inp, rows, count):  # oneDNN at half the default's time; fewer calls pay
        calls.append((kernel, out, inp, rows))
        return (0.5 if kernel == "onednn" else 1.0) * (1 + out * inp / 1e4)

    monkeypatch.setattr(kernels, "call_ms", fake_ms)
    monkeypatch.setattr(kernels, "_CHOSEN", {})
    cpu = torch.device("cpu")
    assert kernels.choose(shapes, "float32", 16, cpu, str(tmp_path)) == Choice("onednn", "onednn", True)
    assert {r for *_, r in calls} == {1, 16} and (tmp_path / "kernels.json").exists()
    measured = len(calls)
    monkeypatch.setattr(kernels, "_CHOSEN", {})  # a new process: read back from kernels.json
    assert kernels.choose(shapes, "float32", 9, cpu, str(tmp_path)) == Choice("onednn", "onednn", True)
    assert len(calls) == measured  # 9 rows time as 16: nothing measured again
    kernels.choose(shapes, "bfloat16", 16, cpu, str(tmp_path))
    assert len(calls) > measured  # another precision: measured
    assert kernels.choose(shapes, "float32", 16, torch.device("cuda"), str(tmp_path)) == kernels.DEFAULT


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch without oneDNN")
def test_the_loss_forward_on_packed_frozen_layers_keeps_values_and_gradients(monkeypatch):
    """The frozen layers packed for oneDNN in training (``loss_kernels``): the log-probs and LoRA gradients of
    the plain layers, gradients reaching the first layer through every packed one; the model put back after."""
    model, tokenizer = lora_model()
    torch.manual_seed(0)
    r = generate(model, tokenizer, ["rev:abcdef=", "12+3="], 4, 8, temperature=0.7)
    params = [p for p in model.parameters() if p.requires_grad]
    runs = {}
    for kernel in ("dense", "onednn"):
        monkeypatch.setattr(kernels, "FORCED_FROZEN", kernel)
        model.train()
        with loss_kernels(model):
            packed = sum(isinstance(m, FrozenOnednnLinear) for m in model.modules())
            logps = per_token_logps(model, r, 0.7)
            (logps * r.completion_mask).sum().backward()
        runs[kernel] = packed, logps.detach(), [p.grad.clone() for p in params]
        model.zero_grad(set_to_none=True)
    assert runs["dense"][0] == 0 and runs["onednn"][0] == 4 * 7 + 1  # 4 layers x 7 adapted; the LM head
    assert not any(isinstance(m, FrozenOnednnLinear) for m in model.modules())
    assert torch.allclose(runs["dense"][1], runs["onednn"][1], atol=1e-5)
    for a, b in zip(runs["dense"][2], runs["onednn"][2]):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    first_layer = [g for (n, _), g in zip(((n, p) for n, p in model.named_parameters() if p.requires_grad),
                                         runs["onednn"][2]) if "layers.0." in n and "lora_A" in n]
    assert first_layer and all(g.abs().sum() > 0 for g in first_layer)


def test_the_frozen_layers_kernel_is_measured_once_and_not_off_the_cpu(monkeypatch, tmp_path):
    calls = []

    def fake_ms(kernel, out, inp, count):  # oneDNN a third faster
        calls.append(kernel)
        return (2.0 if kernel == "onednn" else 3.0) * out * inp / 1e4

    monkeypatch.setattr(kernels, "train_ms", fake_ms)
    monkeypatch.setattr(kernels, "_CHOSEN", {})
    shapes, cpu = ((128, 128, 16), (384, 128, 8)), torch.device("cpu")
    assert kernels.choose_frozen(shapes, cpu, str(tmp_path)) == "onednn" and len(calls) == 4
    monkeypatch.setattr(kernels, "_CHOSEN", {})  # a new process: read back from kernels.json
    assert kernels.choose_frozen(shapes, cpu, str(tmp_path)) == "onednn" and len(calls) == 4
    assert kernels.choose_frozen(shapes, torch.device("cuda"), str(tmp_path)) == "dense"
