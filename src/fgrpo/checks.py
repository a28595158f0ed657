"""Checks of a run's configuration that need more than the config itself: the strategy registry, the
task catalogue (reasoning-gym) and the machine. ``config_sources.build_config`` runs them after
``RunConfig.validate``; each raises a one-line ``ConfigError`` that names the key and what is valid.
"""

from __future__ import annotations

from fgrpo.config import ConfigError, RunConfig
from fgrpo.strategies import STRATEGIES, Mode


def check_run(cfg: RunConfig) -> RunConfig:
    """``cfg`` if its strategy, tasks and device are valid here, else a ConfigError."""
    check_strategy(cfg)
    check_tasks(cfg)
    check_data_files(cfg)
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("device = 'cuda' but no CUDA device is available; valid here: auto, cpu")
    return cfg


def check_strategy(cfg: RunConfig) -> None:
    if cfg.strategy not in STRATEGIES:
        raise ConfigError(f"strategy = {cfg.strategy!r} is not valid; choose one of: {', '.join(STRATEGIES)}")
    strategy = STRATEGIES[cfg.strategy]
    if (cfg.dp != "off" or cfg.secure_aggregation) and strategy.mode is not Mode.FEDERATED:
        raise ConfigError(f"dp and secure_aggregation apply to federated strategies; strategy = "
                          f"{cfg.strategy!r} has no aggregation to protect")
    if cfg.probes and cfg.secure_aggregation:
        raise ConfigError(f"probes = {cfg.probes} judge each client's update, which secure aggregation hides from "
                          "the server; use one or the other")
    if (cfg.dp != "off" or cfg.secure_aggregation) and strategy.combine != "weighted":
        raise ConfigError(f"dp and secure_aggregation protect a weighted sum of the updates; strategy = "
                          f"{cfg.strategy!r} takes their median instead; use a weighted strategy (fedavg, fgrpo, ...)")


def check_data_files(cfg: RunConfig) -> None:
    """A data source named as a file (.jsonl, .parquet) must exist: said before any model is loaded."""
    from pathlib import Path

    for source in cfg.data_sources if cfg.scenario == "user-data" else []:
        if Path(source).suffix in (".jsonl", ".parquet") and not Path(source).is_file():
            raise ConfigError(f"data: {source!r} does not exist")


def check_tasks(cfg: RunConfig) -> None:
    from fgrpo.tasks import TaskError, family

    for task in cfg.task_list:
        try:
            family(task)
        except TaskError as err:
            raise ConfigError(str(err)) from None


def check_flower_runtime(cfg: RunConfig, owners_bring_data: bool) -> None:
    """What the Flower runtime cannot run as the in-process runtime does: the references that need
    the clients' data in one place (``centralized``) or the server to know which client holds which
    tasks (``local-only``) when each SuperNode brings its own data."""
    mode = STRATEGIES[cfg.strategy].mode
    if owners_bring_data and mode is not Mode.FEDERATED:
        raise ConfigError(f"strategy = {cfg.strategy!r} cannot run on the Flower runtime with owners' own data "
                          f"(each SuperNode's --node-config data): it needs every owner's prompts or tasks known "
                          f"in one place; run it in-process (fgrpo run --data ...)")
