"""fgrpo as a Flower App: the same local GRPO and the same aggregation, on Flower's runtimes."""
