"""A float32 matrix product for decode-step shapes (a few rows of x against a large W), built on the machine.

With one row, a decode step reads every weight once, so its products are bound by memory bandwidth. On a
2-core AMD EPYC (Zen 3, AVX2, no avx512) summing 1 GiB reads 27.9 GB/s, yet for SmolLM2-135M's one-row
shapes torch's float32 paths read far less: MKL (``F.linear``) 11-15 GB/s, oneDNN's packed layout 12-25
GB/s (all 211 products: 43.8 and 27.7 ms). ``skinny.cpp`` is the plain loop that streams each weight row once
with AVX2 FMA over torch's threads: 18.5 ms there (about 29 GB/s), and level with oneDNN at 8 rows
(``benchmarks/rollouts.py --decode-bound``). It is one candidate of ``fgrpo.kernels``, used only where the
measurement there picks it.

The extension is compiled once per machine by ``torch.utils.cpp_extension`` (about 40 s on 2 cores; cached
in torch's extension folder under a name that includes the CPU, since it is built for the CPU it runs on).
Where it cannot be built (not x86-64 with AVX2 and FMA, no compiler) ``available()`` is False, the reason is
logged once, and the other kernels are all there is.
"""

from __future__ import annotations

import hashlib
import logging
import platform
from pathlib import Path

import torch

from fgrpo.machine import cpu_flags, cpu_name

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("skinny.cpp")
NEEDS = ("avx2", "fma")  # CPU flags the kernel is compiled for (-march=native)
# -fopenmp: at::parallel_for is inline; without it the loop runs on one thread (measured: 1.6x slower). The
# OpenMP runtime it links is the one torch has loaded (the same libgomp.so.1).
FLAGS = ["-O3", "-march=native", "-fopenmp"]
_BUILT: dict[str, object] = {}  # "ext": the module, or "error": why it is not there


def extension():
    """The compiled module (``skinny_linear``), or None where it cannot be built (the reason logged once)."""
    if not _BUILT:
        flags = cpu_flags()
        if platform.machine() not in ("x86_64", "AMD64") or not set(NEEDS) <= flags:
            _BUILT["error"] = f"needs x86-64 with {', '.join(NEEDS)}"
        else:
            log.info("loading the skinny float32 kernel (built the first time on a machine: about 40 s)")
            try:
                from torch.utils.cpp_extension import load

                _BUILT["ext"] = load(f"fgrpo_skinny_{build_id()}", [str(SOURCE)], extra_cflags=FLAGS,
                                     extra_ldflags=["-fopenmp"])
            except Exception as exc:  # no compiler, no ninja, a failed build: the other kernels remain
                _BUILT["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc) else ''}"
        if "error" in _BUILT:
            log.info("the skinny float32 kernel is not offered: %s", _BUILT["error"])
    return _BUILT.get("ext")


def build_id() -> str:
    """What the build depends on (the CPU, its flags, the source, the compiler flags), hashed: part of the
    extension's name, so that a cache folder shared by two machines never loads a build made for the other,
    and of the kernel choice's key in ``kernels.json``, so that a changed kernel is measured again."""
    parts = [cpu_name(), " ".join(sorted(cpu_flags())), SOURCE.read_text(), " ".join(FLAGS)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:10]


def problem() -> str | None:
    """Why the extension is not there (None: it is, or it was not asked for yet)."""
    return _BUILT.get("error")


def available(dtype: torch.dtype) -> bool:
    """Whether ``SkinnyLinear`` runs ``dtype`` here (float32 on a CPU it could be built for)."""
    return dtype == torch.float32 and extension() is not None


class SkinnyLinear(torch.nn.Module):
    """y = x W^T + b with W in float32: ``skinny_linear`` up to ``MAX_ROWS`` rows of x, ``F.linear`` beyond
    (inference only: no autograd)."""

    MAX_ROWS = 8  # past this, the loop is slower than oneDNN or MKL (level at 8 rows on SmolLM2's shapes)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        if not available(dtype):
            raise ValueError(f"the skinny kernel does not run {dtype} here ({problem() or 'float32 only'})")
        self.weight = weight.detach().to(dtype).contiguous()
        self.bias = None if bias is None else bias.detach().to(dtype).contiguous()
        self.product = extension().skinny_linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // x.shape[-1] > self.MAX_ROWS:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        return self.product(x, self.weight, self.bias)
