"""Round checkpoints of the server state, written atomically.

``RUN_DIR/checkpoints/round-0003/`` holds ``tensors.safetensors`` (the global adapter, the server
optimizer's moments, local-only clients' adapters: names prefixed by what they are) and
``state.json`` (the round, every client's baseline, the server optimizer's step, and how many lines
of metrics.jsonl belong to the rounds up to this one). It is written under a temporary name, fsynced, and renamed, so a
crash leaves the previous checkpoint valid. Client sampling and rollouts are seeded per round and
per client, and clients keep no state between rounds, so this is everything a resume needs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, rnd: int, tensors: dict[str, torch.Tensor], state: dict,
                    metrics_lines: int, keep: int) -> Path:
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round-{rnd:04d}"
    tmp = root / f".tmp-round-{rnd:04d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / "tensors.safetensors")
    state = {"round": rnd, "metrics_lines": metrics_lines, **state}
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    for f in tmp.iterdir():
        _fsync(f)
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    _fsync(root)
    for old in sorted(root.glob("round-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / "checkpoints").glob("round-*"))
    return found[-1] if found else None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, state) of a checkpoint folder; state has ``round`` and ``metrics_lines``."""
    return load_file(path / "tensors.safetensors"), json.loads((path / "state.json").read_text())
