"""Experiment configuration: typed sections read from JSON, overridden with `--set section.key=value`, swept with
`--sweep`. Every key is checked: an unknown key or a value of the wrong type or outside its choices is a ConfigError
that names the file and the key, never a traceback from deep inside the trainer.

    schema.py   the sections, and what each setting is (a unit's own, neutral to results, a protocol quirk)
    checks.py   JSON -> typed sections, cross-field checks, the protocol's quirks resolved
    sweep.py    variants of a unit's own settings; a unit = (relation, variant)
    load.py     config files, --set, --sweep
"""
from ptuning.config.load import config_from_dict, load_config, parse_override
from ptuning.config.schema import (PER_UNIT, QUIRKS, RESULT_NEUTRAL, ConfigError, DataConfig, ExperimentConfig,
                                   ModelConfig)

__all__ = ["PER_UNIT", "QUIRKS", "RESULT_NEUTRAL", "ConfigError", "DataConfig", "ExperimentConfig", "ModelConfig",
           "config_from_dict", "load_config", "parse_override"]
