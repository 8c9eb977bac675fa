import json

import pytest

from ptuning.config import ConfigError, load_config


def write(tmp_path, payload) -> str:
    path = tmp_path / "c.json"
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return str(path)


def test_defaults_are_the_papers():
    cfg = load_config(None)
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.lr_decay) == (1e-5, 5e-4, 0.98)
    assert (cfg.train.batch_size, cfg.train.max_epochs, cfg.train.patience, cfg.train.seed) == (8, 100, 20, 34)
    assert cfg.prompt.encoder == "lstm" and cfg.train.mode == "ptuning"


def test_file_and_overrides(tmp_path):
    path = write(tmp_path, {"model": {"name": "x"}, "train": {"lr": 1}})
    cfg = load_config(path, ["train.lr=3e-5", "data.relations=P19,P1001", "prompt.template=[2,2,0]",
                             "model.bf16=true", "output.dir=/tmp/o"])
    assert cfg.model.name == "x" and cfg.train.lr == 3e-5 and isinstance(cfg.train.lr, float)
    assert cfg.data.relations == ["P19", "P1001"] and cfg.prompt.template == [2, 2, 0]
    assert cfg.model.bf16 is True and cfg.output.dir == "/tmp/o"


@pytest.mark.parametrize("payload, overrides, message", [
    ({"train": {"lrr": 1}}, [], "train.lrr: unknown key"),
    ({"trian": {}}, [], "unknown section 'trian'"),
    ({}, ["train.batch_size=eight"], "train.batch_size: expected an integer"),
    ({}, ["prompt.encoder=gru"], "prompt.encoder: 'gru' is not one of lstm, mlp, none"),
    ({}, ["data.vocab=50k"], "data.vocab: '50k' is not one of"),
    ({}, ["prompt.template=[3,3]"], "prompt.template: expected three counts"),
    ({}, ["train.lr=0"], "train.lr: must be > 0"),
    ({}, ["lr=3"], "expected section.key=value"),
])
def test_bad_keys_and_values_are_named(tmp_path, payload, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(write(tmp_path, payload), overrides)


def test_broken_json_names_file_and_line(tmp_path):
    path = write(tmp_path, '{\n  "train": {"lr": 1e-5,}\n}')
    with pytest.raises(ConfigError, match=r"c\.json, line 2: not valid JSON"):
        load_config(path)


def test_shipped_configs_validate():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.json"))
    assert configs
    for path in configs:
        load_config(path)
