"""Units: the unit of work is a relation under one variant of the settings that belong to a prompt encoder.

A sweep (the config's `sweep` section, or `--sweep key=v1,v2` on the command line) lists variants; each is a set
of overrides of the per-encoder settings (config.schema.PER_UNIT). The frozen LM and the data are shared by every unit, so a
(relation, variant) pair is just another prompt encoder in the packed batch: its own encoder, optimizer, epochs,
dev selection, early stopping, checkpoint and record. Without a sweep there is one variant, the run's own settings,
named "" (and its units are the relations, in today's folders: a sweep of one variant is the run it always was).

    "sweep": {"variants": [{"prompt.encoder": "mlp"}, {"prompt.encoder": "lstm"}],     every variant ...
              "grid": {"train.seed": [34, 35, 36]}}                                    ... with every combination

A unit's id is its place in the output folder under relations/: "P36" (no sweep) or "P36/seed=35".
"""
from __future__ import annotations

import copy
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from ptuning.config.checks import build
from ptuning.config.schema import PER_UNIT, ConfigError, ExperimentConfig

SEED = "train.seed"
BASE = "base"  # a sweep's variant with no overrides: a folder of its own beside the relation's record


@dataclass(frozen=True, eq=False)
class Variant:
    name: str  # "" for the run's own settings; else its overrides, e.g. "lr=0.003,seed=35"
    overrides: dict[str, Any]
    cfg: ExperimentConfig = field(repr=False)  # the run's config with the overrides applied

    @property
    def setting(self) -> str:
        """The variant without its seed: the seeds of one setting are pooled in the statistics ("" for the run's
        own settings)."""
        return name_of({k: v for k, v in self.overrides.items() if k != SEED})


@dataclass(frozen=True, eq=False)
class Unit:
    task: Any  # ptuning.tasks.RelationTask
    variant: Variant

    @property
    def relation(self) -> str:
        return self.task.id

    @property
    def id(self) -> str:
        return unit_id(self.relation, self.variant.name)


def unit_id(relation: str, variant: str) -> str:
    """A unit's id, its folder under relations/: the relation alone for the run's own settings (variant "")."""
    return relation if not variant else f"{relation}/{variant}"


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "-".join(_value(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def name_of(overrides: dict[str, Any]) -> str:
    """A variant's name from its overrides: 'lr=0.003,seed=35' (keys without their section, in key order)."""
    return ",".join(f"{key.split('.', 1)[1]}={_value(value)}" for key, value in sorted(overrides.items()))


def parse_axis(text: str) -> tuple[str, list[Any]]:
    """'train.seed=34,35,36' -> ('train.seed', [34, 35, 36]); 'prompt.template=[3,3,0],[2,2,0]' takes JSON values,
    'prompt.encoder=lstm,mlp' plain words."""
    if "=" not in text:
        raise ConfigError(f"--sweep {text!r}: expected section.key=value1,value2,...")
    key, raw = text.split("=", 1)
    try:
        values = json.loads(f"[{raw}]")
    except json.JSONDecodeError:
        values = [v.strip() for v in raw.split(",") if v.strip()]
    return key.strip(), values


def variants(cfg: ExperimentConfig, source: str = "config") -> list[Variant]:
    """Every variant of the config's sweep, each with its settings checked; [the run's own] without a sweep."""
    sweep = cfg.sweep
    if sweep is None:
        return [Variant("", {}, cfg)]
    where = f"{source}: sweep"
    if not isinstance(sweep, dict) or set(sweep) - {"variants", "grid"}:
        raise ConfigError(f"{where}: expected an object with 'variants' (a list of overrides) and/or 'grid' "
                          "(lists of values by key)")
    listed = sweep.get("variants") or [{}]
    grid = sweep.get("grid") or {}
    if not isinstance(listed, list) or not all(isinstance(v, dict) for v in listed):
        raise ConfigError(f"{where}.variants: expected a list of objects of overrides")
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"{where}.grid: expected an object of non-empty lists of values")
    known = {f"{section}.{key}" for section, values in cfg.to_dict().items() if isinstance(values, dict)
             for key in values}
    for key in [k for v in listed for k in v] + list(grid):
        if key not in known:
            raise ConfigError(f"{where}: '{key}': unknown key (sweepable: {', '.join(PER_UNIT)})")
        if key not in PER_UNIT:
            raise ConfigError(f"{where}: '{key}' cannot vary within a sweep: it changes what every unit shares (the "
                              f"model, the data, the batches); run it separately (sweepable: {', '.join(PER_UNIT)})")
    out, names = [], set()
    base = {k: v for k, v in cfg.to_dict().items() if k != "sweep"}
    for listed_overrides, combination in itertools.product(listed, itertools.product(*grid.values())):
        overrides = {**listed_overrides, **dict(zip(grid, combination))}
        name = name_of(overrides) or BASE
        if "/" in name:
            raise ConfigError(f"{where}: variant {name!r}: a value may not contain '/' (it names a folder)")
        if name in names:
            raise ConfigError(f"{where}: variant {name!r} appears twice")
        names.add(name)
        raw = copy.deepcopy(base)
        for key, value in overrides.items():
            section, option = key.split(".", 1)
            raw[section][option] = value
        try:
            variant_cfg = build(raw, f"{where} variant {name!r}")
        except ConfigError as error:
            raise ConfigError(str(error)) from None
        out.append(Variant(name, overrides, variant_cfg))
    _refuse_repeats(out, where)
    return out


def _refuse_repeats(found: list[Variant], where: str) -> None:
    """Two variants that resolve to the same settings (a seed the base already has, an lr equal to the base's)
    would train one unit twice and pool the copies as two seeds: a spread near zero, an interval too narrow."""
    seen: dict[tuple, str] = {}
    for variant in found:
        full = variant.cfg.to_dict()
        settings = tuple(full[key.split(".")[0]][key.split(".")[1]] for key in PER_UNIT)
        settings = tuple(tuple(v) if isinstance(v, list) else v for v in settings)
        if settings in seen:
            raise ConfigError(f"{where}: variants {seen[settings]!r} and {variant.name!r} resolve to the same "
                              f"settings (seed {variant.cfg.train.seed}): the same unit would train twice and count "
                              "as two seeds; drop one")
        seen[settings] = variant.name


def units(tasks: list, variant_list: list[Variant]) -> list[Unit]:
    """Relation-major: a relation's variants side by side, so a pack of as many units holds one relation's."""
    return [Unit(task, variant) for task in tasks for variant in variant_list]
