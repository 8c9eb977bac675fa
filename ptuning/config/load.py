"""Where settings come from: a JSON config file, `--set section.key=value` overrides and `--sweep key=v1,v2` axes;
a config's sweep checked whole (every variant's settings) before anything runs."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ptuning.config.checks import build
from ptuning.config.schema import SECTIONS, ConfigError, ExperimentConfig
from ptuning.config.sweep import parse_axis, variants
from ptuning.files import DataError, read_json


def config_from_dict(raw: dict[str, Any], source: str = "config") -> ExperimentConfig:
    config = build(raw, source)
    if config.sweep is not None:
        variants(config, source)  # every variant's settings checked now, before anything runs
    return config


def parse_override(text: str) -> tuple[str, str, Any]:
    """'train.lr=3e-5' -> ('train', 'lr', 3e-05). Values are JSON where they parse as JSON, else strings.
    'protocol=reference' is short for 'protocol.name=reference'."""
    path, raw = text.split("=", 1) if "=" in text else (text, "")
    if path == "protocol":
        path = "protocol.name"
    if "=" not in text or "." not in path:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    section, key = path.split(".", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return section, key, value


def load_config(path: str | Path | None, overrides: list[str] = (), sweep: list[str] = ()) -> ExperimentConfig:
    """Read a JSON config (or start from defaults when path is None), apply `--set` overrides, and add each
    `--sweep key=v1,v2` as an axis of the sweep's grid."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            raw = read_json(path)
        except DataError as error:
            raise ConfigError(str(error)) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: the top level must be an object with sections {', '.join(SECTIONS)}")
    for text in overrides:
        section, key, value = parse_override(text)
        if section not in SECTIONS:
            raise ConfigError(f"--set {text!r}: unknown section '{section}' (known: {', '.join(SECTIONS)})")
        if section == "protocol" and isinstance(raw.get(section), str):
            raw[section] = {"name": raw[section]}
        if not isinstance(raw.setdefault(section, {}), dict):
            raise ConfigError(f"{source}: {section}: expected an object of keys, got {raw[section]!r}")
        raw[section][key] = value
    if sweep:
        if not isinstance(raw.setdefault("sweep", {}) or {}, dict):
            raise ConfigError(f"{source}: sweep: expected an object with 'variants' and/or 'grid'")
        raw["sweep"] = raw["sweep"] or {}
        grid = raw["sweep"].setdefault("grid", {})
        for text in sweep:
            key, values = parse_axis(text)
            grid[key] = values
    return config_from_dict(raw, source)
