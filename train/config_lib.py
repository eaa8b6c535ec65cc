"""Experiment configs: load a config script, apply `--config.a.b=value` overrides, fail on typos.

A config script is a Python file with `get_config(arg=None) -> ml_collections.ConfigDict`;
`path.py:arg` passes `arg` (e.g. `experiments/shakespeare_char.py:runlocal`). The returned
config is locked: an override may change a value, never invent a key.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any

import ml_collections


class ConfigError(ValueError):
    """A config script, key or value that cannot be used."""


def load_config_script(spec: str) -> ml_collections.ConfigDict:
    """Runs `get_config(arg)` of the script named by `path[:arg]` and returns the locked config."""
    path_str, _, arg = spec.partition(":")
    path = pathlib.Path(path_str)
    if not path.is_file():
        raise ConfigError(f"config script {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config script {path} defines no get_config(arg=None)")
    config = module.get_config(arg or None)
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config returned {type(config).__name__}, not a ConfigDict")
    config.lock()
    return config


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """All dotted leaf keys of a config, e.g. ["model.num_layers", "train.num_steps", ...]."""
    keys = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(flat_keys(value, name + "."))
        else:
            keys.append(name)
    return keys


def _unknown_key_error(config: ml_collections.ConfigDict, key: str) -> ConfigError:
    keys = flat_keys(config)
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.0)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def _parse_value(key: str, text: str, current: Any) -> Any:
    """Parses `text` into the type of the value it replaces, naming the key on failure."""
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"{key} expects a bool (true/false), got {text!r}")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text
        raise ConfigError(
            f"{key} expects {type(current).__name__}, got {text!r} which is not a literal"
        ) from None
    if current is None:
        return value
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if isinstance(current, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(current)(value)
    if type(value) is not type(current):
        raise ConfigError(
            f"{key} expects {type(current).__name__}, got {text!r} ({type(value).__name__})"
        )
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> None:
    """Applies `a.b=value` strings in place. Unknown keys and wrong types raise ConfigError."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        node = config
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
            if not isinstance(child, ml_collections.ConfigDict):
                raise _unknown_key_error(config, key)
            node = child
        leaf = parts[-1]
        if leaf not in node:
            raise _unknown_key_error(config, key)
        if isinstance(node[leaf], ml_collections.ConfigDict):
            raise ConfigError(f"{key} is a group of settings, not a value; set one of its fields")
        new_value = _parse_value(key, text, node[leaf])
        try:
            node[leaf] = new_value
        except TypeError as e:  # ConfigDict's own type check
            raise ConfigError(f"{key}: {e}") from None


def split_cli_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separates `--config.a.b=v` / `--config.a.b v` arguments from the rest of argv."""
    overrides, rest = [], []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--config.") and arg != "--config":
            body = arg[len("--config.") :]
            if "=" not in body:
                if i + 1 >= len(args):
                    raise ConfigError(f"{arg} needs a value")
                body = f"{body}={args[i + 1]}"
                i += 1
            overrides.append(body)
        else:
            rest.append(arg)
        i += 1
    return overrides, rest
