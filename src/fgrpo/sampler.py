"""The sampler's weights: the precision rollouts decode in (``rollout_precision``).

Decoding one token reads every weight of the model once, so on a CPU (and for one row on a GPU) its
speed is the memory bandwidth divided by the weights' bytes. Rollouts can therefore run on a copy of
the policy in a lower precision, while the loss forward and backward stay float32:

- ``float32``: the merged-LoRA weights as they are (``merged_lora``); the sampler is the policy.
- ``bfloat16``: every linear layer's merged weight W + s B A rounded to bfloat16 (half the bytes); inputs
  and outputs stay float32 (embeddings, norms and the residual stream are untouched).

The sampler then draws from a slightly different distribution than the one the loss trains, which
biases the gradient unless corrected: ``grpo.sampler_correction`` reweights the loss by
pi_train / pi_sampler per token or sequence, as TRL does for vLLM rollouts.

``auto`` decides by the hardware, once per run:
- models under ``SMALL_MODEL`` parameters: float32 (decoding such a model costs operator calls, not
  bytes; a cast saves nothing);
- CUDA: bfloat16 where ``torch.cuda.is_bf16_supported()``, else float32;
- CPU: bfloat16 where the CPU has native bfloat16 instructions (flag ``avx512_bf16`` or ``amx_bf16``
  in /proc/cpuinfo), else float32: without them a bfloat16 matrix product is emulated and slower
  than float32 for more than a few rows.

int8 (PyTorch's dynamic quantization of the linear layers) was measured and is not offered: on
SmolLM2-135M it decodes twice as fast as float32 on a CPU without native bfloat16, but its per-batch
activation quantization moves the sampler far from the policy (a mean |log pi_old - log pi_sampler| of
0.61 per token against 0.029 for bfloat16), so the correction would discard most of each batch
(BENCHMARKS.md).
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer

from fgrpo.model import lora_layers_replaced

PRECISIONS = ("auto", "float32", "bfloat16")
SMALL_MODEL = 50_000_000  # parameters: below this ``auto`` keeps float32
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def resolve_rollout_precision(setting: str, device: torch.device, parameters: int,
                              flags: frozenset[str] | None = None) -> str:
    """The precision rollouts run in: ``setting`` itself unless it is 'auto' (rules in the module docstring).
    ``flags``: the CPU flags to decide by (default: this machine's)."""
    if setting != "auto":
        return setting
    if parameters < SMALL_MODEL:
        return "float32"
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if NATIVE_BF16_FLAGS & (cpu_flags() if flags is None else flags) else "float32"


class Bfloat16Linear(torch.nn.Module):
    """y = x W^T + b with W (and b) held in bfloat16: the product runs in bfloat16; x and y are float32."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = weight.detach().to(torch.bfloat16)
        self.bias = None if bias is None else bias.detach().to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), self.weight, self.bias).to(x.dtype)


# precision -> the module a linear layer's (merged) weight becomes on the sampler: Module(weight, bias).
# benchmarks/rollouts.py adds an int8 one (PyTorch's dynamic quantization) to measure it.
LOW_PRECISION: dict[str, type[torch.nn.Module]] = {"bfloat16": Bfloat16Linear}


def merged_weight(layer: LoraLayer) -> torch.Tensor:
    """W + s * B A of a LoRA layer, its active adapters merged (float32, a new tensor)."""
    delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A)
    return layer.get_base_layer().weight + delta


@contextmanager
def merged_lora(model):
    """Run inside with each LoRA layer's weight replaced by W + s * B A and the adapter branch gone
    (``lora_layers_replaced``): one matmul per linear layer instead of three, for rollouts and evaluation
    (no gradients). The original weight tensors are put back untouched afterwards (no in-place merge and
    unmerge, whose rounding would drift the frozen base). Costs a transient copy of the adapted weights."""
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    originals = [m.get_base_layer().weight for m in layers]
    with torch.no_grad():
        merged = [merged_weight(m) for m in layers]
    for m, weight in zip(layers, merged):
        m.get_base_layer().weight = torch.nn.Parameter(weight, requires_grad=False)
    try:
        with lora_layers_replaced(model):
            yield
    finally:
        for m, weight in zip(layers, originals):
            m.get_base_layer().weight = weight


_FROZEN_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # plain Linear -> {precision: copy}


def _frozen_copy(linear: torch.nn.Linear, precision: str) -> torch.nn.Module:
    """The low-precision copy of a layer without adapter (its weight is frozen): made once, then reused."""
    copies = _FROZEN_COPIES.setdefault(linear, {})
    if precision not in copies:
        copies[precision] = LOW_PRECISION[precision](linear.weight, linear.bias)
    return copies[precision]


@contextmanager
def sampler_weights(model, precision: str):
    """Run inside on the sampler: ``merged_lora`` for float32; otherwise with every linear layer replaced by
    a ``LOW_PRECISION[precision]`` module of its merged weight W + s B A (LoRA layers, made afresh: the adapter changes
    every step) or of its frozen weight (other linear layers such as the LM head, made once). The original
    modules are put back afterwards; the float32 weights are never modified."""
    if precision == "float32":
        with merged_lora(model):
            yield
        return
    with torch.no_grad():
        low = {id(m): LOW_PRECISION[precision](merged_weight(m), m.get_base_layer().bias)
               for m in model.modules() if isinstance(m, LoraLayer)}
    plain = [(parent, name, child) for parent in model.modules() if not isinstance(parent, LoraLayer)
             for name, child in parent.named_children() if type(child) is torch.nn.Linear]  # the LM head
    for parent, name, child in plain:
        setattr(parent, name, _frozen_copy(child, precision))
    try:
        with lora_layers_replaced(model, lambda m: low[id(m)]):
            yield
    finally:
        for parent, name, child in plain:
            setattr(parent, name, child)
