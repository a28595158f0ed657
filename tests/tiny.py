"""Command-line options for end-to-end runs that take seconds: the smallest sensible federation."""

import tempfile
from pathlib import Path

TINY = ["--local-steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--train-size", "8",
        "--eval-size", "4", "--warm-start-steps", "2", "--max-new-tokens", "4"]

# For tests that need non-zero updates: TINY's 2-step model answers almost nothing, so most groups tie
# at reward 0 and a client's update is often exactly zero. This one (300 warm-start steps, ~40 s to
# build) answers some prompts of two of the three default tasks; it is built once and shared.
# Its rounds use 4 prompts x 4 completions of up to 8 tokens: with TINY's 2 x 2 of 4 tokens, every group of
# two of three clients can tie, depending on the library versions' numerics.
MOVING = {"warm_start_steps": 300, "cache_dir": str(Path(tempfile.gettempdir()) / "fgrpo-tests-cache"),
          "prompts_per_step": 4, "group_size": 4, "max_new_tokens": 8}
MOVING_ARGS = ["--warm-start-steps", "300", "--cache-dir", MOVING["cache_dir"]]
