"""Seeds derived from names: every random choice of a run (data, client sampling, rollouts, noise)
draws from a generator seeded by the run seed and what the choice is for."""

from __future__ import annotations

import zlib


def derived_seed(*parts: object) -> int:
    """A stable 31-bit seed from any parts (same on every machine and Python run)."""
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF
