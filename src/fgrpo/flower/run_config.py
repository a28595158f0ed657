"""The Flower run config: one key per ``fgrpo run`` option (kebab-case), and the RunConfig a node trains under.

Light on purpose (no torch): the ClientApp reads it before it knows whether it loads a model itself or asks
the owner's resident process (``fgrpo.flower.resident``) to train.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

from fgrpo.config import RunConfig, config_fields
from fgrpo.config_sources import build_config, toml_value


def run_config_keys() -> dict[str, object]:
    """The Flower run config keys (kebab-case) and defaults, one per ``fgrpo run`` option."""
    defaults = RunConfig()
    return {f.name.replace("_", "-"): getattr(defaults, f.name) for f in config_fields()}


def config_from_run_config(run_config: dict, checked: bool = True) -> RunConfig:
    """A validated RunConfig from Flower's run config (unknown keys are a ConfigError); ``checked``: also against
    the task catalogue and the machine (``config_sources.build_config``)."""
    return build_config(overrides={k.replace("-", "_"): v for k, v in run_config.items()}, checked=checked)


def node_run_config(run_config: dict, node_config: dict, checked: bool = True) -> RunConfig:
    """The RunConfig a SuperNode trains under: the run's, with the owner's own data and verifier when its node
    config names them (``data="/path/owner.jsonl" reward="math"``)."""
    cfg = config_from_run_config(run_config, checked)
    if "data" in node_config:
        cfg = replace(cfg, scenario="user-data", data=str(node_config["data"]),
                      rewards=str(node_config.get("reward", cfg.rewards)))
    return cfg


def config_hash(cfg: RunConfig) -> str:
    """A short digest of every config key: two processes train alike only if theirs are equal."""
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_config_toml() -> str:
    """The ``[tool.flwr.app.config]`` section of pyproject.toml (``python -m fgrpo.flower.run_config``)."""
    return "[tool.flwr.app.config]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in run_config_keys().items())


if __name__ == "__main__":
    print(run_config_toml(), end="")
