"""Where a run's configuration comes from, and where it goes: defaults < preset < TOML file < flags
(``build_config``, the one layering of ``fgrpo run``, ``compare``, ``eval`` and the Flower apps), the
packaged presets, and the resolved config written back as TOML (RUN_DIR/config.toml, docs/config.md)."""

from __future__ import annotations

import difflib
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from fgrpo.config import ConfigError, RunConfig, config_fields


def build_config(file: str | Path | None = None, overrides: dict[str, Any] | None = None,
                 preset: str | None = None, checked: bool = True) -> RunConfig:
    """The one layering of every command: defaults < ``preset`` (its [run] table, and its first
    [compare] scenario) < the TOML ``file`` < ``overrides`` (the command line); validated.
    ``data`` without a ``scenario`` in any layer makes the scenario 'user-data'. ``checked``: also against the
    strategy registry, the task catalogue and the machine (``checks.check_run``; it imports reasoning-gym)."""
    values: dict[str, Any] = {}
    if preset is not None:
        data, source = preset_data(preset)
        scenarios = data.get("compare", {}).get("scenarios", [])
        values.update(_known({**({"scenario": scenarios[0]} if scenarios else {}), **data.get("run", {})},
                             source=source))
    if file is not None:
        values.update(_known(load_toml(file), source=str(file)))
    values.update(_known(overrides or {}, source="command line"))
    if values.get("data") and "scenario" not in values:
        values["scenario"] = "user-data"
    cfg = RunConfig(**{k: coerce(k, v) for k, v in values.items()}).validate()
    if not checked:
        return cfg
    from fgrpo.checks import check_run  # the strategy registry, the task catalogue, the machine

    return check_run(cfg)


def preset_data(name_or_path: str) -> tuple[dict, str]:
    """(the parsed TOML, where it came from) of a preset: a packaged name such as ``main`` or a file."""
    path = Path(name_or_path)
    if path.suffix == ".toml" and path.exists():
        text, source = path.read_text(), str(path)
    else:
        packaged = resources.files("fgrpo") / "presets" / f"{name_or_path}.toml"
        if not packaged.is_file():
            known = sorted(p.name[:-5] for p in (resources.files("fgrpo") / "presets").iterdir()
                           if p.name.endswith(".toml"))
            raise ConfigError(f"preset {name_or_path!r}: no such file or packaged preset; packaged: {', '.join(known)}")
        text, source = packaged.read_text(), f"preset {name_or_path}"
    try:
        return tomllib.loads(text), source
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source} is not valid TOML: {err}") from None


def load_toml(file: str | Path) -> dict[str, Any]:
    """A TOML file's content; a missing or invalid file is a ConfigError naming it."""
    path = Path(file)
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {err}") from None


# keys that no longer exist: (the value that did nothing, what replaces the key); an old config.toml with the
# value that did nothing still loads (fgrpo report, eval, --resume of an earlier run)
RETIRED = {"max_weight": (1.0, "max_weight_ratio, the one weight bound as a multiple of 1 / |S| (max_weight = w "
                               "with n clients per round is max_weight_ratio = w * n)")}


def _known(values: dict[str, Any], source: str) -> dict[str, Any]:
    names = [f.name for f in config_fields()]
    out = {}
    for raw_key, value in values.items():
        key = raw_key.replace("-", "_")
        if key in RETIRED:
            inert, instead = RETIRED[key]
            if value == inert:
                continue
            raise ConfigError(f"{raw_key} = {value!r} in {source}: {raw_key!r} was replaced by {instead}")
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {raw_key!r} in {source}{hint}")
        out[key] = value
    return out


def to_toml(config: RunConfig) -> str:
    """The resolved config as TOML (flat, one key per line)."""
    return "".join(f"{f.name} = {toml_value(getattr(config, f.name))}\n" for f in config_fields())


def toml_value(value: bool | int | float | str) -> str:
    """One TOML value: booleans lower-case, strings quoted with backslashes and quotes escaped."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def reference_markdown() -> str:
    """docs/config.md, generated from the RunConfig fields (``python -m fgrpo.config_sources``)."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `RunConfig` in `src/fgrpo/config.py` by `python -m fgrpo.config_sources > docs/config.md`;",
        "a test regenerates it and fails when it differs. Every key is a TOML key of `--config FILE.toml`",
        "and a command-line option of `fgrpo run` (`--local-steps 5` for `local_steps`); the command line",
        "wins over the file.",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]
    defaults = RunConfig()
    for f in config_fields():
        value = getattr(defaults, f.name)
        lines.append(f"| `{f.name}` | {type(value).__name__} | `{value!r}` | {f.metadata['doc']} |")
    return "\n".join(lines) + "\n"




def coerce(key: str, value: Any) -> Any:
    """Convert ``value`` to the declared type of ``key`` (exact for TOML, parsed for CLI text)."""
    kind = type(getattr(RunConfig(), key))
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes"):
            return True
        if str(value).lower() in ("false", "0", "no"):
            return False
    elif kind in (int, float):  # an int key takes an int (never a float); a float key takes either
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if number and (kind is float or isinstance(value, int)):
            return kind(value)
        if isinstance(value, str):
            try:
                return kind(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key} = {value!r} has the wrong type; expected {kind.__name__}")


if __name__ == "__main__":
    print(reference_markdown(), end="")
