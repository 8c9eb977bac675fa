"""JSON into the typed settings of ptuning/config/schema.py: every key checked (an unknown key, a value of the wrong
type or outside its choices is a ConfigError naming the file and the key), the cross-field checks a single key's
type cannot express, and the protocol's quirks resolved."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from ptuning.config.schema import QUIRKS, RENAMED, SECTIONS, ConfigError, ExperimentConfig


def _section_class(name: str) -> type:
    return typing.get_type_hints(ExperimentConfig)[name]


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check `value` against a field annotation; accept the obvious spellings (ints for floats, 'a,b' lists)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for option in inner[:-1]:  # the first type that takes the value
            try:
                return _coerce(value, option, where)
            except ConfigError:
                pass
        return _coerce(value, inner[-1], where)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {annotation!r}")  # pragma: no cover - a programming error


def _build_section(cls: type, values: dict[str, Any], where: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected an object of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            hint = RENAMED.get(f"{where.rsplit(' ', 1)[-1]}.{key}")
            raise ConfigError(f"{where}.{key}: " + (f"renamed {hint}" if hint else
                                                    f"unknown key (known: {', '.join(sorted(known))})"))
        value = _coerce(value, hints[key], f"{where}.{key}")
        choices = known[key].metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{where}.{key}: {value!r} is not one of {', '.join(choices)}")
        kwargs[key] = value
    return cls(**kwargs)


def build(raw: dict[str, Any], source: str = "config") -> ExperimentConfig:
    """The settings of one JSON object (its sweep section kept as it is: ptuning/config/load.py checks it)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be an object with sections {', '.join(SECTIONS)}")
    sections = {}
    for name, values in raw.items():
        if name not in SECTIONS:
            raise ConfigError(f"{source}: unknown section '{name}' (known: {', '.join(SECTIONS)})")
        if name == "protocol" and isinstance(values, str):  # "protocol": "reference" names the base alone
            values = {"name": values}
        if name == "deepspeed":  # passed through to DeepSpeed, which checks its own keys
            if values is not None and not isinstance(values, dict):
                raise ConfigError(f"{source}: deepspeed: expected an object (a DeepSpeed config)")
            sections[name] = values
            continue
        if name == "sweep":  # checked whole below, against the settings it varies (ptuning/config/sweep.py)
            sections[name] = values
            continue
        sections[name] = _build_section(_section_class(name), values, f"{source}: {name}")
    config = ExperimentConfig(**sections)
    _check(config, source)
    _resolve_protocol(config, source)
    return config



def _resolve_protocol(config: ExperimentConfig, source: str) -> None:
    """Every unset quirk follows the protocol's name; the reference's fp16 LM sets the weights' dtype."""
    protocol = config.protocol
    for quirk in QUIRKS:
        if getattr(protocol, quirk) is None:
            setattr(protocol, quirk, protocol.name == "reference")
    if protocol.lm_fp16:
        if config.model.dtype == "bfloat16" or config.model.bf16:
            raise ConfigError(f"{source}: protocol.lm_fp16 puts the LM in float16; it cannot be combined with "
                              "model.dtype bfloat16 or model.bf16 (set protocol.lm_fp16=false to keep bf16)")
        config.model.dtype = "float16"
    if protocol.lm_dropout and config.parallel.deterministic:
        raise ConfigError(f"{source}: protocol.lm_dropout draws the frozen LM's dropout masks from the process's "
                          "generator, so a unit's masks depend on its pack and on a resume: it cannot be combined "
                          "with parallel.deterministic (set one of them false)")
    if protocol.last_epoch_unevaluated and config.train.max_epochs < 2:
        raise ConfigError(f"{source}: protocol.last_epoch_unevaluated evaluates epochs 1..max_epochs-1: "
                          "train.max_epochs must be >= 2")


def _check(config: ExperimentConfig, source: str) -> None:
    """Cross-field checks that a single key's type cannot express."""
    template = config.prompt.template
    if template is not None:
        if len(template) != 3 or any(t < 0 for t in template):
            raise ConfigError(f"{source}: prompt.template: expected three counts >= 0, got {template}")
    for key in ("lr", "lm_lr", "lr_decay"):
        if getattr(config.train, key) <= 0:
            raise ConfigError(f"{source}: train.{key}: must be > 0")
    for key in ("batch_size", "eval_batch_size", "max_epochs", "patience"):
        if getattr(config.train, key) < 1:
            raise ConfigError(f"{source}: train.{key}: must be >= 1")
    if config.parallel.tensor_parallel not in (1, 2, 4, 8):
        raise ConfigError(f"{source}: parallel.tensor_parallel: must be 1, 2, 4 or 8")
    if config.train.bucket_rows < 0:
        raise ConfigError(f"{source}: train.bucket_rows: must be >= 0 (0 turns length buckets off)")
    if config.train.row_tokens < 0:
        raise ConfigError(f"{source}: train.row_tokens: must be >= 0 (0 puts one fact in each row)")
    pack = config.train.pack_units
    if (isinstance(pack, str) and pack != "auto") or (isinstance(pack, int) and pack < 0):
        raise ConfigError(f"{source}: train.pack_units: must be >= 0 (0: each replica's share in one "
                          "pack) or \"auto\"")
    zero = (config.deepspeed or {}).get("zero_optimization") or {}
    if isinstance(zero, dict) and zero.get("stage", 0) == 3:
        raise ConfigError(f"{source}: deepspeed.zero_optimization.stage 3 partitions the LM's parameters across the "
                          "ranks, but every rank fine-tunes its own relation's copy of the LM here; use stage 0, 1 or "
                          "2")
    if config.parallel.threads < 0:
        raise ConfigError(f"{source}: parallel.threads: must be >= 0 (0 leaves torch's default)")
    if config.parallel.deterministic and not (isinstance(pack, int) and pack > 0 and config.parallel.threads > 0):
        raise ConfigError(f"{source}: parallel.deterministic needs train.pack_units > 0 (packs that do not depend "
                          "on the world size) and parallel.threads > 0 (the same threads on every rank)")
    if config.output.checkpoint_minutes < 0:
        raise ConfigError(f"{source}: output.checkpoint_minutes: must be >= 0 (0 checkpoints every epoch)")
