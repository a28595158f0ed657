"""Command-line options for end-to-end runs that take seconds: the smallest sensible federation."""

TINY = ["--local-steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--train-size", "8",
        "--eval-size", "4", "--warm-start-steps", "2", "--max-new-tokens", "4"]
