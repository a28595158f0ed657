"""The sampler's weights: the precision rollouts decode in (``rollout_precision``).

Decoding one token reads every weight of the model once, so on a CPU (and for one row on a GPU) its
speed is the memory bandwidth divided by the weights' bytes. Rollouts can therefore run on a copy of
the policy in a lower precision, while the loss forward and backward stay float32:

- ``float32``: the merged-LoRA weights as they are (``merged_lora``); the sampler is the policy.
- ``bfloat16``: every linear layer's merged weight W + s B A rounded to bfloat16 (half the bytes); inputs
  and outputs stay float32 (embeddings, norms and the residual stream are untouched).

Either way the sampler's linear layers multiply in the kernels ``fgrpo.kernels`` measures fastest on this
machine for the model's shapes (oneDNN-packed weights, q/k/v and gate/up fused, or plain ``F.linear``).
The loss forward's frozen layers likewise (``loss_kernels``: packed once, with exact input gradients).

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
from collections.abc import Callable
from contextlib import contextmanager

import torch
from peft.tuners.lora import LoraLayer

from fgrpo import kernels
from fgrpo.kernels import DEFAULT, DTYPES, Choice, DenseLinear, Shapes, counted, fuse_groups, fused_parts
from fgrpo.machine import cpu_flags
from fgrpo.model import lora_layers_replaced

PRECISIONS = ("auto", "float32", "bfloat16")
SMALL_MODEL = 50_000_000  # parameters: below this ``auto`` keeps float32
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


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


# precision -> the module a linear layer's (merged) weight becomes on the sampler with the ``dense`` kernel:
# make(weight, bias): ``DenseLinear`` in that dtype (bfloat16: the product runs in bfloat16, x and y stay
# float32). benchmarks/rollouts.py adds an int8 one (PyTorch's dynamic quantization) to measure it.
LOW_PRECISION: dict[str, Callable[[torch.Tensor, torch.Tensor | None], torch.nn.Module]] = {
    p: (lambda weight, bias, dtype=dtype: DenseLinear(weight, bias, dtype)) for p, dtype in DTYPES.items()}


def sampler_linear(kernel: str, precision: str, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Module:
    """The sampler's module of one linear layer: ``LOW_PRECISION[precision]`` or the ``kernel``'s (fgrpo.kernels)."""
    if kernel == "dense":
        return LOW_PRECISION[precision](weight, bias)
    return kernels.LINEAR[kernel](weight, bias, DTYPES[precision])


def merged_weight(layer: LoraLayer) -> torch.Tensor:
    """W + s * B A of a LoRA layer, its active adapters merged (float32, a new tensor)."""
    delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A)
    return layer.get_base_layer().weight + delta


def merged_into(out: torch.Tensor, layer: LoraLayer) -> torch.Tensor:
    """``out`` <- W + s * B A of a LoRA layer: one ``addmm`` (a single pass over W) for a plain adapter, else
    ``merged_weight`` copied in. Equal to ``merged_weight`` up to float rounding."""
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    plain = (len(active) == 1 and not layer.use_dora.get(active[0], False) and not layer.fan_in_fan_out
             and layer.lora_A[active[0]].weight.dtype == layer.get_base_layer().weight.dtype == torch.float32)
    if not plain:
        return out.copy_(merged_weight(layer))
    a = active[0]
    return torch.addmm(layer.get_base_layer().weight, layer.lora_B[a].weight, layer.lora_A[a].weight,
                       alpha=layer.scaling[a], out=out)


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


_FROZEN_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # plain Linear -> {(precision, kernel): copy}


def is_adapted(module: torch.nn.Module) -> bool:
    return isinstance(module, LoraLayer)


def plain_linears(model) -> list[tuple[torch.nn.Module, str, torch.nn.Linear]]:
    """(parent, name, layer) of each linear layer without adapter (the LM head); not those inside a LoRA layer."""
    inside = {id(m) for layer in model.modules() if is_adapted(layer) for m in layer.modules()}
    return [(parent, name, child) for parent in model.modules() if id(parent) not in inside
            for name, child in parent.named_children() if type(child) is torch.nn.Linear]


def sampler_shapes(model) -> Shapes:
    """The shapes of the model's adapted layers (unfused and fused) and frozen ones, for ``kernels.choose``."""
    adapted, fused = [], []
    for parent in model.modules():
        groups = fuse_groups(parent, is_adapted)
        fused += [(sum(getattr(parent, n).out_features for n in names), getattr(parent, names[0]).in_features)
                  for names in groups]
        grouped = {n for names in groups for n in names}
        for name, child in parent.named_children():
            if is_adapted(child):
                adapted.append((child.out_features, child.in_features))
                fused += [] if name in grouped else [(child.out_features, child.in_features)]
    frozen = [(child.out_features, child.in_features) for _, _, child in plain_linears(model)]
    return Shapes(counted(adapted), counted(fused), counted(frozen))


_CHOICES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(precision, rows timed): Choice}


_PARAMETERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its parameter count


def small_model(model) -> bool:
    """Whether ``model`` has under ``SMALL_MODEL`` parameters, counted the first time it is asked: before
    ``sampler_weights`` swaps its layers for kernel modules, whose weights are not parameters (counted inside,
    SmolLM2-135M has 28 M, and its decode would leave the lean step)."""
    if model not in _PARAMETERS:
        _PARAMETERS[model] = sum(p.numel() for p in model.parameters())
    return _PARAMETERS[model] < SMALL_MODEL


def sampler_choice(model, precision: str, rows: int = 1) -> Choice:
    """The kernels the sampler of ``model`` uses at ``precision`` for batches of ``rows`` (``kernels.choose``);
    models under ``SMALL_MODEL`` parameters keep ``DEFAULT`` (their decode costs operator calls, not bytes,
    and their runs stay as they were to the bit), unless ``kernels.FORCED`` says otherwise."""
    if kernels.FORCED is not None:
        return kernels.FORCED
    known = _CHOICES.setdefault(model, {})  # every generate call asks: scan the model once per setting
    key = (precision, kernels.batch_rows(rows))
    if key not in known:
        known[key] = DEFAULT if small_model(model) else kernels.choose(sampler_shapes(model), precision, rows,
                                                          next(model.parameters()).device)
    return known[key]


def _frozen_copy(linear: torch.nn.Linear, precision: str, kernel: str) -> torch.nn.Module:
    """The sampler's copy of a layer without adapter (its weight is frozen): made once, then reused."""
    copies = _FROZEN_COPIES.setdefault(linear, {})
    if (precision, kernel) not in copies:
        copies[precision, kernel] = sampler_linear(kernel, precision, linear.weight, linear.bias)
    return copies[precision, kernel]


# model -> {fused: [(parent, names), ...] (adapted_layout), "plain": plain_linears(model)}: scanned once
_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def adapted_layout(model, fused: bool) -> list[tuple[torch.nn.Module, tuple[str, ...]]]:
    """(parent, names) of the LoRA layers: a ``FUSE_GROUPS`` group (with ``fused``) or one layer per entry.
    Scanned once per model (every ``generate`` call asks; the layers never change)."""
    known = _LAYOUTS.setdefault(model, {})
    if fused not in known:
        layout = []
        for parent in model.modules():
            groups = fuse_groups(parent, is_adapted) if fused else []
            grouped = {n for names in groups for n in names}
            layout += [(parent, names) for names in groups]
            layout += [(parent, (name,)) for name, child in parent.named_children()
                       if is_adapted(child) and name not in grouped]
        known[fused] = layout
    return known[fused]


def adapted_modules(model, precision: str, choice: Choice) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """(parent, name, module) for every LoRA layer: its merged weight W + s B A as ``choice.kernel`` at
    ``precision``; with ``choice.fused``, the ``FUSE_GROUPS`` as ``FusedPart`` modules of one product."""
    swaps = []
    with torch.no_grad():
        for parent, names in adapted_layout(model, choice.fused):
            layers = [getattr(parent, n) for n in names]
            bases = [m.get_base_layer() for m in layers]
            if len(names) == 1:
                merged = merged_into(torch.empty_like(bases[0].weight), layers[0])
                swaps.append((parent, names[0], sampler_linear(choice.kernel, precision, merged, bases[0].bias)))
                continue
            sizes = [m.out_features for m in layers]
            stacked = torch.empty(sum(sizes), layers[0].in_features)  # [W_1 + s B_1 A_1; ...] written in place
            for m, rows in zip(layers, stacked.split(sizes)):
                merged_into(rows, m)
            parts = fused_parts(stacked, [m.bias for m in bases], sizes, choice.kernel, DTYPES[precision])
            swaps += [(parent, n, part) for n, part in zip(names, parts)]
    return swaps


@contextmanager
def sampler_weights(model, precision: str, rows: int = 1):
    """Run inside on the sampler: every linear layer replaced by its ``precision`` copy in the kernels
    ``sampler_choice`` picks for batches of ``rows``: the merged weight W + s B A of each LoRA layer (made
    afresh: the adapter changes every step; ``adapted_modules``) and the frozen weight of the others (the
    LM head: made once). float32 with the ``DEFAULT`` kernels is ``merged_lora``. The original modules are
    put back afterwards; the float32 weights are never modified."""
    small_model(model)  # its size counted before any layer is swapped (decode asks it inside)
    choice = sampler_choice(model, precision, rows) if precision in DTYPES else DEFAULT
    if precision == "float32" and choice == DEFAULT:
        with merged_lora(model):
            yield
        return
    swaps = adapted_modules(model, precision, choice)
    known = _LAYOUTS.setdefault(model, {})
    if "plain" not in known:
        known["plain"] = plain_linears(model)
    swaps += [(parent, name, _frozen_copy(child, precision, choice.head)) for parent, name, child in known["plain"]]
    originals = [(parent, name, getattr(parent, name)) for parent, name, _ in swaps]
    for parent, name, module in swaps:
        setattr(parent, name, module)
    try:
        yield
    finally:
        for parent, name, module in originals:
            setattr(parent, name, module)


_FROZEN_TRAIN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # frozen Linear -> its packed copy
_TRAIN_CHOICES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (kernel, frozen_layers)


def frozen_layers(model) -> list[tuple[torch.nn.Module, str, torch.nn.Linear]]:
    """(parent, name, layer) of every frozen linear layer: each LoRA layer's base layer and the plain ones."""
    return [(m, "base_layer", m.base_layer) for m in model.modules()
            if is_adapted(m) and type(m.base_layer) is torch.nn.Linear] + plain_linears(model)


@contextmanager
def loss_kernels(model):
    """Run the loss forward and backward inside: every frozen linear layer as the kernel
    ``kernels.choose_frozen`` measures faster at training shapes (oneDNN-packed W and W^T, made once, or
    as it is). Models under ``SMALL_MODEL`` parameters keep their layers, unless ``kernels.FORCED_FROZEN``."""
    if model not in _TRAIN_CHOICES:  # every local step asks: scan the model once
        layers = frozen_layers(model)
        small = small_model(model)
        shapes = counted([(m.out_features, m.in_features) for _, _, m in layers])
        kernel = "dense" if small else kernels.choose_frozen(shapes, next(model.parameters()).device)
        _TRAIN_CHOICES[model] = kernel, layers
    kernel, swaps = _TRAIN_CHOICES[model]
    if (kernels.FORCED_FROZEN or kernel) == "dense":
        yield
        return
    for parent, name, layer in swaps:
        if layer not in _FROZEN_TRAIN:
            _FROZEN_TRAIN[layer] = kernels.FrozenOnednnLinear(layer)
        setattr(parent, name, _FROZEN_TRAIN[layer])
    try:
        yield
    finally:
        for parent, name, layer in swaps:
            setattr(parent, name, layer)

