"""The sampler's matmul kernels, chosen by measurement on the machine that runs (``fgrpo.sampler``).

A decode step multiplies a few rows by every weight of the model. How fast a given CPU does that for
skinny shapes depends on the library more than on the bytes: on an AMD EPYC with avx512_bf16, one
thread, torch's default float32 product (MKL) reads SmolLM2's LM head (49152 x 576) for one row in about
10 ms, the same weight reordered for oneDNN in 7 ms, and in bfloat16 6 ms (default) against 3.4 ms
(oneDNN). On another CPU the balance may differ, so the forms are timed, not assumed:

- ``kernel``: how the adapted (LoRA) linear layers multiply: ``dense`` (``F.linear``, today's path),
  ``onednn`` (the weight reordered once into oneDNN's blocked layout, ``mkldnn._linear_pointwise``) or,
  in float32 where it could be built, ``skinny`` (``fgrpo.skinny``: a loop that streams each weight row
  once, for up to ``SkinnyLinear.MAX_ROWS`` rows of x);
- ``head``: the same for the frozen linear layers (the LM head), whose copies are made once;
- ``fused``: q/k/v in one product and gate/up in one (fewer, larger matmuls: less per-call overhead).

``choose`` times each candidate on random weights of the model's own shapes (enough copies of each shape
to overflow the caches, as a decode step does) at 1 row and at the rollout batch, and keeps the fastest
sum; the choice is cached in ``kernels.json`` of the fgrpo cache folder, keyed by CPU model, torch version,
threads, precision, shapes and the kernels offered. Off the CPU, or where torch has no oneDNN, the choice
is ``DEFAULT``.

The loss forward's frozen layers (the base weight under each LoRA layer, the LM head) get their own choice
(``choose_frozen``): ``dense`` or ``FrozenOnednnLinear`` (W and W^T packed once; the forward and the input
gradient by oneDNN, exact up to float rounding), timed forward and backward at ``TRAIN_ROWS`` token positions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from fgrpo import skinny
from fgrpo.machine import cpu_name
from fgrpo.model import cache_root
from fgrpo.skinny import SkinnyLinear

log = logging.getLogger(__name__)

KERNELS = ("dense", "onednn", "skinny")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PACK_ROWS = 64  # oneDNN's layout hint: measured as good as the exact row count at 1, 16 and 64 rows
MAX_ROWS = 64  # the batch row count timed: the rollout batch rounded up to a power of two, at most this
WORKING_SET = 64 << 20  # bytes of weights per timed shape: past a 32 MiB L3, as the model's weights are
FUSE_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # siblings that read the same input


@dataclass(frozen=True)
class Choice:
    """How the sampler's linear layers multiply (module docstring)."""

    kernel: str = "dense"
    head: str = "dense"
    fused: bool = False


DEFAULT = Choice()
FORCED: Choice | None = None  # tests and benchmarks: use this instead of the measured choice
_CHOSEN: dict[str, Choice] = {}  # cache key -> choice, this process


class DenseLinear(torch.nn.Module):
    """y = x W^T + b by ``F.linear`` with W (and b) held in ``dtype``; x and y keep their dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.weight = weight.detach().to(dtype)
        self.bias = None if bias is None else bias.detach().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


class OnednnLinear(torch.nn.Module):
    """y = x W^T + b with W in ``dtype`` reordered once into oneDNN's layout (inference only: no autograd)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype), PACK_ROWS)
        self.bias = None if bias is None else bias.detach().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.packed, self.bias, "none", [], "").to(x.dtype)


LINEAR = {"dense": DenseLinear, "onednn": OnednnLinear, "skinny": SkinnyLinear}


_ONEDNN_RUNS: dict[torch.dtype, bool] = {}  # dtype -> whether oneDNN multiplies it here, this process


def onednn_runs(dtype: torch.dtype) -> bool:
    """Whether oneDNN multiplies ``dtype`` here (its bfloat16 path needs avx512 or avx_ne_convert): one try."""
    if dtype not in _ONEDNN_RUNS:
        try:
            OnednnLinear(torch.ones(8, 8), None, dtype)(torch.ones(1, 8))
            _ONEDNN_RUNS[dtype] = True
        except RuntimeError as exc:
            log.info("oneDNN does not run %s here: %s", dtype, str(exc).splitlines()[0])
            _ONEDNN_RUNS[dtype] = False
    return _ONEDNN_RUNS[dtype]


def candidates(dtype: torch.dtype) -> tuple[str, ...]:
    """The kernels that run ``dtype`` on this machine: ``dense`` always, ``onednn`` where torch's oneDNN runs it,
    ``skinny`` in float32 where it could be built."""
    runs = {"dense": True, "onednn": torch.backends.mkldnn.is_available() and onednn_runs(dtype),
            "skinny": skinny.available(dtype)}
    return tuple(k for k in KERNELS if runs[k])


class FusedOutputs:
    """One product y = x [W_1; W_2; ...]^T shared by sibling layers that read the same x (``FusedPart``)."""

    def __init__(self, linear: torch.nn.Module, sizes: list[int]):
        self.linear, self.sizes = linear, sizes
        self.input: torch.Tensor | None = None
        self.parts: tuple[torch.Tensor, ...] = ()
        self.given: set[int] = set()

    def part(self, x: torch.Tensor, i: int) -> torch.Tensor:
        # A part is served from the last product only if it was computed from this very tensor and not
        # handed out yet; anything else (another input, a second call) computes afresh: always x W_i^T.
        if x is not self.input or i in self.given:
            self.input, self.parts, self.given = x, self.linear(x).split(self.sizes, dim=-1), set()
        self.given.add(i)
        out = self.parts[i]
        if len(self.given) == len(self.sizes):  # every sibling served: drop the references
            self.input, self.parts = None, ()
        return out


class FusedPart(torch.nn.Module):
    """Sibling ``i`` of a fused group: its slice of the shared product."""

    def __init__(self, shared: FusedOutputs, i: int):
        super().__init__()
        self.shared, self.i = shared, i

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.part(x, self.i)


def fused_parts(weight: torch.Tensor, biases: list[torch.Tensor | None], sizes: list[int], kernel: str,
                dtype: torch.dtype) -> list[FusedPart]:
    """The ``FusedPart`` modules of one group of sibling layers: ``weight`` [sum out_i, in] their weights
    stacked, ``sizes`` the out_i."""
    bias = None if biases[0] is None else torch.cat(biases)
    shared = FusedOutputs(LINEAR[kernel](weight, bias, dtype), sizes)
    return [FusedPart(shared, i) for i in range(len(sizes))]


def fuse_groups(parent: torch.nn.Module, is_layer: Callable[[torch.nn.Module], bool]) -> list[tuple[str, ...]]:
    """The ``FUSE_GROUPS`` present among ``parent``'s children (each one a layer by ``is_layer``, all with
    the same input width and all with or all without bias; a wrapper's bias is its ``get_base_layer()``'s)."""
    children = dict(parent.named_children())
    groups = []
    for names in FUSE_GROUPS:
        layers = [children.get(n) for n in names]
        if all(m is not None and is_layer(m) for m in layers) and len(
                {(m.in_features, getattr(m, "get_base_layer", lambda m=m: m)().bias is None) for m in layers}) == 1:
            groups.append(names)
    return groups


@dataclass(frozen=True)
class Shapes:
    """The linear shapes (out, in) a decode step multiplies, with how many layers have each."""

    adapted: tuple[tuple[int, int, int], ...]  # (out, in, count), unfused
    fused: tuple[tuple[int, int, int], ...]  # (out, in, count), with FUSE_GROUPS fused
    frozen: tuple[tuple[int, int, int], ...]  # the frozen layers (the LM head)


def counted(shapes: list[tuple[int, int]]) -> tuple[tuple[int, int, int], ...]:
    return tuple(sorted((o, i, shapes.count((o, i))) for o, i in set(shapes)))


def batch_rows(rows: int) -> tuple[int, ...]:
    """The row counts timed: 1 and the batch rounded up to a power of two (at most ``MAX_ROWS``)."""
    return tuple(sorted({1, min(MAX_ROWS, 1 << max(0, rows - 1).bit_length())}))


def call_ms(kernel: str, dtype: torch.dtype, out: int, inp: int, rows: int, count: int, reps: int = 3) -> float:
    """Milliseconds of one product [rows, inp] x [out, inp]^T by ``kernel``: median of ``reps`` passes over
    copies of random weights (enough to overflow the caches, at most ``count``), per copy."""
    size = torch.finfo(dtype).bits // 8
    copies = max(1, min(count, math.ceil(WORKING_SET / (out * inp * size))))
    gen = torch.Generator().manual_seed(0)
    layers = [LINEAR[kernel](torch.randn(out, inp, generator=gen) * 0.02, None, dtype) for _ in range(copies)]
    x = torch.randn(rows, inp, generator=gen)
    times = []
    with torch.inference_mode():
        for _ in range(reps + 1):  # the first pass warms up
            start = time.perf_counter()
            for layer in layers:
                layer(x)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[1:]) / copies


def measure(shapes: Shapes, precision: str, rows: tuple[int, ...]) -> tuple[Choice, dict[str, float]]:
    """The fastest ``Choice`` for ``shapes`` and the milliseconds per step of each candidate (summed over
    ``rows``): adapted layers by kernel and fusion (``<kernel>`` / ``<kernel>+fused``), frozen by kernel
    (``head:<kernel>``)."""
    dtype, cache = DTYPES[precision], {}

    def total(kernel: str, layers: tuple[tuple[int, int, int], ...]) -> float:
        for o, i, c in layers:
            for r in rows:
                if (kernel, o, i, r) not in cache:
                    cache[kernel, o, i, r] = call_ms(kernel, dtype, o, i, r, c)
        return sum(c * cache[kernel, o, i, r] for o, i, c in layers for r in rows)

    times, offered = {}, candidates(dtype)
    for kernel in offered:
        times[kernel] = total(kernel, shapes.adapted)
        if shapes.fused != shapes.adapted:
            times[f"{kernel}+fused"] = total(kernel, shapes.fused)
        if shapes.frozen:
            times[f"head:{kernel}"] = total(kernel, shapes.frozen)
    body = min((k for k in times if not k.startswith("head:")), key=times.get)
    head = min(offered, key=lambda k: times.get(f"head:{k}", 0.0))
    return Choice(body.removesuffix("+fused"), head, body.endswith("+fused")), times


def measurable(device: torch.device) -> bool:
    """Whether there is anything to choose: a CPU with torch's oneDNN (elsewhere ``DEFAULT``: today's path)."""
    return device.type == "cpu" and torch.backends.mkldnn.is_available()


def remembered(spec: dict, measure_choice: Callable[[], tuple[dict, dict[str, float]]], what: str,
               cache_dir: str = "") -> dict:
    """The choice recorded for ``spec`` in ``kernels.json`` of the fgrpo cache folder, or the one
    ``measure_choice()`` returns ((choice, ms per candidate), then recorded); logged either way."""
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    if key in _CHOSEN:
        return _CHOSEN[key]
    path = cache_root(cache_dir) / "kernels.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        choice = known[key]["choice"]
        log.info("%s: %s (measured before, %s)", what, choice, path)
    else:
        choice, times = measure_choice()
        log.info("%s: %s (ms by candidate: %s)", what, choice, {k: round(v, 2) for k, v in times.items()})
        known[key] = {"choice": choice, "times_ms": times, **spec}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{id(known)}")
        tmp.write_text(json.dumps(known, indent=1))
        tmp.replace(path)  # atomic: a concurrent writer's entry may be lost, never a file half-written
    _CHOSEN[key] = choice
    return choice


def choose(shapes: Shapes, precision: str, rows: int, device: torch.device, cache_dir: str = "") -> Choice:
    """``FORCED`` if set; else the measured choice for these shapes on this machine (``measure``, once per
    machine, torch version, threads, precision and shapes: remembered in ``kernels.json``)."""
    if FORCED is not None:
        return FORCED
    if not measurable(device) or precision not in DTYPES:
        return DEFAULT
    timed = batch_rows(rows)
    spec = dict(cpu=cpu_name(), torch=torch.__version__, threads=torch.get_num_threads(), precision=precision,
                rows=timed, shapes=asdict(shapes), kernels=candidates(DTYPES[precision]),
                skinny=f"{skinny.build_id()}/{SkinnyLinear.MAX_ROWS}" if skinny.available(DTYPES[precision]) else None)

    def measured() -> tuple[dict, dict[str, float]]:
        choice, times = measure(shapes, precision, timed)
        return asdict(choice), times

    return Choice(**remembered(spec, measured, f"rollout kernels for {precision} at rows {timed}", cache_dir))


# The loss forward's frozen layers (the base weights under each LoRA layer, the LM head): the same product
# x W^T at training shapes (a step's few hundred token positions), with its input gradient g W.

TRAIN_ROWS = 256  # token positions timed: about a SmolLM2 step's (4 prompts, 16 completions of ~35 tokens)
FORCED_FROZEN: str | None = None  # tests, benchmarks: this kernel for the frozen layers in training, not the measured


class FrozenProduct(torch.autograd.Function):
    """y = x W^T by oneDNN on W packed once, and dL/dx = g W by oneDNN on W^T packed once (W gets no gradient)."""

    @staticmethod
    def forward(ctx, x, packed, packed_t, bias):
        ctx.packed_t = packed_t
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad):
        grad_x = torch.ops.mkldnn._linear_pointwise(grad.contiguous(), ctx.packed_t, None, "none", [], "")
        return grad_x, None, None, None


class FrozenOnednnLinear(torch.nn.Module):
    """A frozen float32 linear layer for the loss forward: ``FrozenProduct`` (exact gradients for its input)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        weight = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, TRAIN_ROWS)
        self.packed_t = torch.ops.mkldnn._reorder_linear_weight(weight.t().contiguous(), TRAIN_ROWS)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return FrozenProduct.apply(x, self.packed, self.packed_t, self.bias)


def train_ms(kernel: str, out: int, inp: int, count: int, reps: int = 3) -> float:
    """Milliseconds of y = x W^T and g W at ``TRAIN_ROWS`` rows by ``kernel`` (median of ``reps``, per copy)."""
    copies = max(1, min(count, 4, math.ceil(WORKING_SET / (out * inp * 4))))
    gen = torch.Generator().manual_seed(0)
    layers = [torch.nn.Linear(inp, out, bias=False) for _ in range(copies)]
    for layer in layers:
        layer.weight.requires_grad_(False)
    layers = [FrozenOnednnLinear(m) for m in layers] if kernel == "onednn" else layers
    x = torch.randn(TRAIN_ROWS, inp, generator=gen, requires_grad=True)
    times = []
    for _ in range(reps + 1):  # the first pass warms up
        start = time.perf_counter()
        for layer in layers:
            layer(x).sum().backward()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[1:]) / copies


def choose_frozen(shapes: tuple[tuple[int, int, int], ...], device: torch.device, cache_dir: str = "") -> str:
    """``dense`` or ``onednn`` for the loss forward's frozen layers of these (out, in, count) shapes, whichever
    ``train_ms`` finds faster summed over the layers (remembered; ``FORCED_FROZEN`` overrides it where used)."""
    if not measurable(device):
        return "dense"
    spec = dict(cpu=cpu_name(), torch=torch.__version__, threads=torch.get_num_threads(), purpose="train",
                rows=TRAIN_ROWS, shapes=shapes)

    def measured() -> tuple[dict, dict[str, float]]:
        times = {k: sum(c * train_ms(k, o, i, c) for o, i, c in shapes) for k in ("dense", "onednn")}
        return {"kernel": min(times, key=times.get)}, times

    return remembered(spec, measured, "frozen-layer kernel of the loss forward", cache_dir)["kernel"]
