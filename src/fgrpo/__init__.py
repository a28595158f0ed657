"""fgrpo: federated GRPO with adaptive aggregation by relative performance gain."""

__version__ = "0.1.0"
