"""The sampler's one-token forward for Llama-family models, over a KV cache allocated once.

A decode step with one row reads every weight once; what transformers' forward adds around the matrix
products (a causal mask and the rotary table rebuilt every step, the cache grown by ``torch.cat`` in
every layer, keyword plumbing through five module levels) cost SmolLM2-135M about a third of its float32
step on a 2-core CPU. ``DecodeStep`` runs the same layers with none of that:

    x = embed(token)                                      # [R, 1, H], float32 residual stream
    for each layer:
        q, k, v = q_proj(n1(x)), k_proj(n1(x)), v_proj(n1(x))     # n1: the layer's input RMSNorm
        q, k = q cos_p + rot(q) sin_p, k cos_p + rot(k) sin_p     # RoPE at each row's position p
        K[:, :, t], V[:, :, t] = k, v                     # the cache: [R, kv heads, P + max_new, D]
        x = x + o_proj(softmax(q K^T / sqrt(D) + mask) V)  # sdpa, GQA; mask: the prompt's padding
        x = x + down_proj(silu(gate_proj(n2(x))) * up_proj(n2(x)))
    logits = lm_head(norm(x))

The layers are the model's own modules (the sampler's fused, packed or merged copies inside
``fgrpo.sampler.sampler_weights``, or LoRA layers as they are), the cos/sin table is the model's own
rotary embedding evaluated once for every position, so the values are transformers' up to float rounding
(tests/test_grpo.py). The prefill stays transformers' forward; its cache is copied in once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft import PeftModel

from fgrpo import sampler
from fgrpo.kernels import FusedPart

FORCED: bool | None = None  # benchmarks: use (True) or skip (False) the lean step whatever the model
LAYERS = frozenset({"LlamaDecoderLayer", "Qwen2DecoderLayer"})  # q/k/v/o + gate/up/down SiLU, RMSNorm, RoPE


def causal_lm(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def supported(model) -> bool:
    """Whether ``DecodeStep`` computes this model's forward: a Llama or Qwen2 decoder (no sliding window)."""
    lm = causal_lm(model)
    body, config = getattr(lm, "model", None), getattr(lm, "config", None)
    if body is None or config is None or not hasattr(body, "layers") or not hasattr(body, "rotary_emb"):
        return False
    if getattr(config, "use_sliding_window", False) or getattr(config, "hidden_act", "silu") != "silu":
        return False
    if getattr(body.rotary_emb, "rope_type", "default") in ("dynamic", "longrope"):  # these rescale by length
        return False
    return all(type(layer).__name__ in LAYERS and type(layer.input_layernorm).__name__.endswith("RMSNorm")
               for layer in body.layers)


def lean_by_default(model) -> bool:
    """Whether ``rollouts.decode`` steps by ``DecodeStep`` unless told: for a ``supported`` model of at least
    ``SMALL_MODEL`` parameters (smaller ones, the embedded default among them, keep their runs to the bit),
    unless ``FORCED`` says otherwise."""
    if FORCED is not None:
        return FORCED
    return supported(model) and not sampler.small_model(model)


def product(parent: torch.nn.Module, names: tuple[str, ...]):
    """One callable x -> x [W_1; W_2; ...]^T (the outputs side by side) for sibling layers: the shared product
    of a fused group (``kernels.FusedPart``) as it is, or each layer's own product, concatenated."""
    layers = [getattr(parent, n) for n in names]
    shared = getattr(layers[0], "shared", None)
    if isinstance(layers[0], FusedPart) and all(getattr(m, "shared", None) is shared for m in layers):
        return shared.linear.forward
    return lambda x: torch.cat([m(x) for m in layers], dim=-1)


def rms_norm(norm: torch.nn.Module):
    """x -> w * x / sqrt(mean(x^2) + eps) of a Llama/Qwen2 RMSNorm module, as one ``F.rms_norm``."""
    weight, eps = norm.weight, norm.variance_epsilon
    return lambda x: F.rms_norm(x, weight.shape, weight, eps)


class DecodeStep:
    """One-token steps of ``model`` for rows that continue a prefilled prompt batch (module docstring).

    ``cache``: the prefill's transformers cache ([R, kv heads, P, D] per layer); ``key_mask``: [R, P], 1 on
    the prompt tokens (0 on the left padding); ``max_new_tokens``: how many steps may follow."""

    def __init__(self, model, cache, key_mask: torch.Tensor, max_new_tokens: int):
        lm = causal_lm(model)
        self.body, self.head = lm.model, lm.get_output_embeddings()
        self.layers = [(rms_norm(layer.input_layernorm), product(layer.self_attn, ("q_proj", "k_proj", "v_proj")),
                        layer.self_attn.o_proj.forward, rms_norm(layer.post_attention_layernorm),
                        product(layer.mlp, ("gate_proj", "up_proj")), layer.mlp.down_proj.forward)
                       for layer in self.body.layers]
        attn = self.body.layers[0].self_attn
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.q_heads = lm.config.num_attention_heads
        self.rotated = (self.q_heads + lm.config.num_key_value_heads) * self.head_dim  # q, k: what RoPE turns
        self.norm = rms_norm(self.body.norm)
        rows, width = key_mask.shape
        self.length = width  # positions in the cache so far (the same for every row: prompts are left-padded)
        size = width + max_new_tokens
        self.keys, self.values = [], []
        for layer in cache.layers:
            k = layer.keys.new_empty(layer.keys.shape[:2] + (size, layer.keys.shape[3]))
            v = layer.values.new_empty(k.shape)
            k[:, :, :width], v[:, :, :width] = layer.keys, layer.values
            self.keys.append(k)
            self.values.append(v)
        self.key_mask = torch.ones((rows, size), dtype=torch.bool, device=key_mask.device)
        self.key_mask[:, :width] = key_mask.bool()
        self.padded = not bool(self.key_mask.all())  # no padding: sdpa without a mask
        # cos/sin of every position a step can reach, from the model's own rotary embedding (its scaling);
        # rot(x) sin = roll(x, D/2) * [-sin_1, sin_2]: the halves swapped (one flip) instead of two slices, a
        # negation and a cat
        positions = torch.arange(size, device=key_mask.device)[None]  # a row's position is below P + max_new
        probe = torch.zeros(1, device=key_mask.device)  # rotary_emb reads only its device and dtype (float32)
        cos, sin = (t[0] for t in self.body.rotary_emb(probe, positions))  # [positions, D]
        half = sin.shape[-1] // 2
        self.cos, self.signed_sin = cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these rows (indices into the current rows), in this order: the rows that wrote EOS leave."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.key_mask = self.key_mask.index_select(0, rows)
        self.padded = not bool(self.key_mask[:, :self.length].all())

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [R, V] of the next token after ``tokens`` [R] at ``positions`` [R], appended to the cache."""
        t, d = self.length, self.head_dim
        x = self.body.embed_tokens(tokens[:, None])  # [R, 1, H]
        rows = x.shape[0]
        cos, sin = self.cos[positions][:, None, None], self.signed_sin[positions][:, None, None]  # [R, 1, 1, D]
        mask = self.key_mask[:, None, None, :t + 1] if self.padded else None
        for (norm1, qkv, o_proj, norm2, gate_up, down), keys, values in zip(self.layers, self.keys, self.values):
            y = qkv(norm1(x))  # [R, 1, (Hq + 2 Hk) D]: q, k, v side by side
            qk = y[..., :self.rotated].view(rows, -1, 1, d)  # q's and k's heads, rotated together
            qk = qk * cos + qk.view(rows, -1, 1, 2, d // 2).flip(-2).view(qk.shape) * sin  # flip: roll by D/2
            q, k = qk[:, :self.q_heads], qk[:, self.q_heads:]
            keys[:, :, t:t + 1] = k
            values[:, :, t:t + 1] = y[..., self.rotated:].view(rows, -1, 1, d)
            o = F.scaled_dot_product_attention(q, keys[:, :, :t + 1], values[:, :, :t + 1], attn_mask=mask,
                                               scale=self.scaling, enable_gqa=self.q_heads != k.shape[1])
            x = x + o_proj(o.view(rows, 1, -1))
            gate, up = gate_up(norm2(x)).chunk(2, dim=-1)
            x = x + down(F.silu(gate) * up)
        self.length = t + 1
        return self.head(self.norm(x))[:, -1]
