"""Experiment configuration: typed dataclasses read from JSON, overridden with `--set section.key=value`.

Every key is checked: an unknown key or a value of the wrong type or outside its choices is a ConfigError that
names the file and the key, never a traceback from deep inside the trainer.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ptuning.files import DataError, read_json


class ConfigError(ValueError):
    """A bad config file, key or value. The message names where."""


def _choices(*options: str) -> dict:
    return {"choices": options}


@dataclass
class ModelConfig:
    # An alias (bert-base-cased, gpt2-xl, smollm2-135m, ...), a local folder, a .gguf file, or a hub id.
    name: str = "smollm2-135m"
    kind: str = field(default="auto", metadata=_choices("auto", "masked", "causal"))
    gguf_file: str | None = None  # a GGUF file inside `name` (a folder) to load with transformers' gguf_file=
    tokenizer: str | None = None  # for checkpoints without one (Megatron-11B: default roberta-large)
    device: str = "auto"  # auto picks cuda when available, else cpu
    # The frozen LM's weights (and so its compute). auto: bfloat16 where the device has bf16 matrix units (a GPU that
    # supports it, a CPU with AMX tiles), else float32; resolved when the run starts and recorded so.
    dtype: str = field(default="float32", metadata=_choices("float32", "bfloat16", "float16", "auto"))
    bf16: bool = False  # bf16 autocast around the language model
    add_bos: bool = False  # causal LMs: start every prompt with the BOS token (GPT-2 style LAMA runs use none)


@dataclass
class DataConfig:
    data_dir: str | None = None  # else --data-dir, else $LAMA_DATA, else ./data
    vocab: str = field(default="shared", metadata=_choices("original", "shared", "lama"))
    vocab_key: str | None = None  # which word list of the vocab file; default follows the model family
    relations: list[str] | None = None  # None: all 41 relations found
    max_train: int | None = None  # cap per relation (first N after filtering), for quick runs
    max_dev: int | None = None
    max_test: int | None = None


@dataclass
class PromptConfig:
    # Pseudo tokens (before subject, between subject and object, after object). Causal LMs need the last to be 0.
    template: list[int] | None = None  # default [3, 3, 3] for masked LMs, [3, 3, 0] for causal LMs
    encoder: str = field(default="lstm", metadata=_choices("lstm", "mlp", "none"))
    anchors: bool = False  # keep the manual template's words after each segment's pseudo tokens
    init: str = field(default="random", metadata=_choices("random", "manual"))
    lstm_dropout: float = 0.0


@dataclass
class TrainConfig:
    # ptuning: prompts only, LM frozen. finetune: LM fine-tuning with the manual template.
    # ptuning_finetune: prompts and LM together (LM at lm_lr).
    mode: str = field(default="ptuning", metadata=_choices("ptuning", "finetune", "ptuning_finetune"))
    lr: float = 1e-5
    lm_lr: float = 5e-6
    weight_decay: float = 5e-4
    lr_decay: float = 0.98  # ExponentialLR gamma, stepped once per relation epoch
    batch_size: int = 8
    eval_batch_size: int = 64
    max_epochs: int = 100
    patience: int = 20  # stop a relation after this many epochs without a better dev P@1
    seed: int = 34
    # How many units (a relation under one sweep variant) train together in one packed batch. N > 0: packs of N
    # in order, the same under any world size; 0: each data-parallel group's share as one pack; "auto": as many as
    # the device's memory holds (python -m model_parallel.memory shows the arithmetic).
    pack_units: int | str = 0
    # A step's packed rows go through the LM in length-sorted chunks of at most this many rows (0: one padded
    # batch). Less padding; the same gradients (one backward over the summed chunk losses).
    bucket_rows: int = 64
    # Facts share batch rows of up to this many tokens, back to back, attention kept inside each fact (when the
    # backbone supports it; 0: one padded fact per row). Training and evaluation; results change only by rounding.
    row_tokens: int = 64
    manual_baseline: bool = True  # also evaluate the manual prompt on test for each relation


@dataclass
class OutputConfig:
    dir: str = "runs/default"
    save_encoders: bool = True
    resume: bool = True  # skip relations with a final result, resume interrupted ones from their checkpoint
    # A relation's checkpoint (encoder, optimizer, best copy: ~2 GB at 11B) is written at the end of an epoch once
    # this many minutes have passed since its last one, and on SIGTERM/SIGUSR1; 0 = after every epoch.
    checkpoint_minutes: float = 15.0


@dataclass
class LoggingConfig:
    progress: str = field(default="auto", metadata=_choices("auto", "bars", "lines", "off"))
    # W&B: offline by default (files under <output.dir>/wandb), online when WANDB_MODE=online, none when false.
    wandb: bool = True
    wandb_project: str = "ptuning-lama"
    wandb_group: str | None = None  # default: model and vocabulary, so seeds of one setting line up
    wandb_job_type: str | None = None  # default: train.mode


@dataclass
class ParallelConfig:
    # World = data-parallel groups x tensor_parallel. Relations are spread over the data-parallel groups; the
    # ranks of one tensor-parallel group hold shards of one model and train the same relations.
    tensor_parallel: int = 1
    # Each relation's prompt encoder lives on ONE rank of its tensor-parallel group (its state divided by the
    # group's size); false keeps a copy on every rank.
    shard_prompts: bool = True
    threads: int = 0  # CPU threads each rank computes with (torch.set_num_threads); 0 leaves torch's default
    # The same floats for a relation under 1 or N ranks: packs of train.pack_units (> 0) that do not depend on
    # the world size, parallel.threads (> 0) threads on every rank, and torch's deterministic algorithms (a GPU's
    # too). Needs both set; costs the speed of whatever the world could have done otherwise.
    deterministic: bool = False


RENAMED = {"train.pack_relations": "train.pack_units (a unit is a relation under one sweep variant)"}
QUIRKS = ("causal_loss_shift", "mask_before_subject", "lm_dropout", "latest_tie", "drop_last",
          "last_epoch_unevaluated", "lm_fp16", "bpe_spaces")


@dataclass
class ProtocolConfig:
    """What the paper describes (paper) or what THUDM's LAMA code did (reference). Each quirk of the reference can
    be set on its own; one left unset follows `name`. After loading every quirk is true or false."""
    name: str = field(default="paper", metadata=_choices("paper", "reference"))
    # causal LMs: train the logits one position before the scored one (the reference put the label at the last
    # position and let Hugging Face shift it: the loss is at L-2, evaluation at L-1)
    causal_loss_shift: bool | None = None
    # masked LMs: [CLS] P*t0 [MASK] P*t1 subject ... (the mask before the subject; THUDM/P-tuning#40)
    mask_before_subject: bool | None = None
    lm_dropout: bool | None = None  # the frozen LM in train mode while prompts train: its dropout is active
    latest_tie: bool | None = None  # dev selection by >=: the latest tied epoch wins, and a tie resets patience
    drop_last: bool | None = None  # each epoch drops its last incomplete training batch
    # dev is evaluated after epochs 1..max_epochs-1 only (the reference trains a last epoch it never evaluates;
    # here that epoch is not run, since it cannot be selected)
    last_epoch_unevaluated: bool | None = None
    lm_fp16: bool | None = None  # the LM's weights in float16, without loss scaling
    # BPE tokenizers: manual prompts start with a space and, for causal LMs, end with the space before [Y] (a lone
    # 'Ġ' token whose position is scored); masked templates with t2 = 0 end with '.' rather than 'Ġ.'
    bpe_spaces: bool | None = None

    def quirks(self) -> dict[str, bool]:
        return {q: getattr(self, q) for q in QUIRKS}

    def describe(self) -> str:
        """'paper', 'reference', or the name with the quirks set otherwise, e.g. 'paper + latest_tie'."""
        base = self.name == "reference"
        return self.name + "".join(f" {'-' if base else '+'} {q}" for q, on in self.quirks().items() if on != base)


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    # A DeepSpeed config (zero_optimization, bf16, fp16, ...). When present, the LM fine-tuning modes put their
    # trainable parameters through deepspeed.initialize; prompt-only runs keep the plain per-relation Adam.
    deepspeed: dict | None = None
    # Variants of the settings that belong to one prompt encoder, trained together as units (ptuning/config/sweep.py):
    # {"variants": [{"train.lr": 1e-3}, ...], "grid": {"train.seed": [34, 35, 36]}}: every variant with every
    # combination of the grid. None: the run's own settings, one variant.
    sweep: dict | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = tuple(f.name for f in dataclasses.fields(ExperimentConfig))


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


def config_from_dict(raw: dict[str, Any], source: str = "config") -> ExperimentConfig:
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
    if config.sweep is not None:
        from ptuning.config.sweep import variants  # every variant's settings checked now, before anything runs

        variants(config, source)
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
        raise ConfigError(f"{source}: train.pack_units: must be >= 0 (0: each data-parallel group's share in one "
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
        from ptuning.config.sweep import parse_axis

        if not isinstance(raw.setdefault("sweep", {}) or {}, dict):
            raise ConfigError(f"{source}: sweep: expected an object with 'variants' and/or 'grid'")
        raw["sweep"] = raw["sweep"] or {}
        grid = raw["sweep"].setdefault("grid", {})
        for text in sweep:
            key, values = parse_axis(text)
            grid[key] = values
    return config_from_dict(raw, source)
