"""A float32 matrix product for decode-step shapes (a few rows of x against a large W), built on the machine.

With one row, a decode step reads every weight once, so its products are bound by memory bandwidth. On a
2-core AMD EPYC (Zen 3, AVX2, no avx512) summing 1 GiB reads 27.9 GB/s, yet for SmolLM2-135M's one-row
shapes torch's float32 paths read far less: MKL (``F.linear``) 11-15 GB/s, oneDNN's packed layout 12-25
GB/s (all 211 products: 43.8 and 27.7 ms). ``skinny.cpp`` is the plain loop that streams each weight row once
with AVX2 FMA over torch's threads: 18.5 ms there (about 29 GB/s). Each weight block stays in cache while
every row multiplies it, so up to 16 rows still cost one pass over W: a whole SmolLM2 decode step there took
78 ms at 16 rows against 98 with oneDNN, and 149-170 against 118 at 32 (``SkinnyLinear.MAX_ROWS``). It is
one candidate of ``fgrpo.kernels``, used only where the measurement there picks it.

The loop is compiled once per machine by the C++ compiler (``$CXX`` or ``c++``; about 2 s: it includes no
torch header) into a Python module in the fgrpo cache folder, named by ``build_id()`` since it is built for
the CPU it runs on; it is called with the tensors' addresses. Where it cannot be built (not x86-64 with AVX2
and FMA, no compiler) ``available()`` is False, the reason is logged once, and the other kernels are all there
is.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch

from fgrpo.machine import cpu_flags, cpu_name
from fgrpo.model import cache_root

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("skinny.cpp")
NEEDS = ("avx2", "fma")  # CPU flags the kernel is compiled for (-march=native)
# -fopenmp: the loop's threads are OpenMP's; the runtime it links is the one torch has loaded (libgomp.so.1)
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_BUILT: dict[str, object] = {}  # "ext": the function, or "error": why it is not there


def extension():
    """The compiled ``skinny_linear(x, w, b, y, rows, n, out, threads)``, or None where it cannot be built (the
    reason logged once)."""
    if not _BUILT:
        compiler = os.environ.get("CXX", "c++")
        if platform.machine() not in ("x86_64", "AMD64") or not set(NEEDS) <= cpu_flags():
            _BUILT["error"] = f"needs x86-64 with {', '.join(NEEDS)}"
        elif shutil.which(compiler) is None:
            _BUILT["error"] = f"no C++ compiler ({compiler})"
        else:
            try:
                _BUILT["ext"] = _load(compiler)
            except (OSError, ImportError, subprocess.CalledProcessError) as exc:  # a failed build: other kernels remain
                detail = exc.stderr.strip().splitlines()[-1] if getattr(exc, "stderr", None) else str(exc)
                _BUILT["error"] = f"the build failed: {detail}"
        if "error" in _BUILT:
            log.info("the skinny float32 kernel is not offered: %s", _BUILT["error"])
    return _BUILT.get("ext")


def _load(compiler: str):
    """The module from the cache folder, compiled there first if missing (written under a temporary name and
    renamed: a build stopped halfway never leaves a module to load)."""
    path = cache_root() / "kernels" / f"fgrpo_skinny_{build_id()}{sysconfig.get_config_var('EXT_SUFFIX')}"
    if not path.exists():
        log.info("compiling the skinny float32 kernel -> %s", path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            built = Path(tmp) / path.name
            subprocess.run([compiler, *FLAGS, f"-I{sysconfig.get_paths()['include']}", str(SOURCE), "-o", str(built)],
                           check=True, capture_output=True, text=True)
            os.replace(built, path)
    spec = importlib.util.spec_from_file_location("fgrpo_skinny", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.skinny_linear


def build_id() -> str:
    """What the build depends on (the CPU, its flags, the source, the compiler flags), hashed: part of the
    module file's name, so that a cache folder shared by two machines never loads a build made for the other,
    and of the kernel choice's key in ``kernels.json``, so that a changed kernel is measured again."""
    parts = [cpu_name(), " ".join(sorted(cpu_flags())), SOURCE.read_text(), " ".join(FLAGS), sys.version]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:10]


def problem() -> str | None:
    """Why the kernel is not there (None: it is, or it was not asked for yet)."""
    return _BUILT.get("error")


def available(dtype: torch.dtype) -> bool:
    """Whether ``SkinnyLinear`` runs ``dtype`` here (float32 on a CPU it could be built for)."""
    return dtype == torch.float32 and extension() is not None


class SkinnyLinear(torch.nn.Module):
    """y = x W^T + b with W in float32: ``skinny_linear`` up to ``MAX_ROWS`` rows of x, ``F.linear`` beyond
    (inference only: no autograd)."""

    MAX_ROWS = 16  # past this, the loop is slower than oneDNN or MKL (SmolLM2's decode step, Zen 3: module docstring)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        if not available(dtype):
            raise ValueError(f"the skinny kernel does not run {dtype} here ({problem() or 'float32 only'})")
        self.weight = weight.detach().to(dtype).contiguous()
        self.bias = None if bias is None else bias.detach().to(dtype).contiguous()
        self.product = extension()
        # a few microseconds of Python per call, 211 calls a token on SmolLM2: what can be known once is (the
        # buffers never move: inference only)
        self.out_features, self.in_features = self.weight.shape
        self.pointers = (self.weight.data_ptr(), 0 if self.bias is None else self.bias.data_ptr())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > self.MAX_ROWS or x.dtype != torch.float32 or x.shape[-1] != self.in_features:
            return torch.nn.functional.linear(x, self.weight, self.bias)  # (a wrong dtype or width raises there)
        x = x.contiguous()
        y = torch.empty((*x.shape[:-1], self.out_features), dtype=torch.float32)
        self.product(x.data_ptr(), *self.pointers, y.data_ptr(), rows, self.in_features, self.out_features,
                     torch.get_num_threads())
        return y
