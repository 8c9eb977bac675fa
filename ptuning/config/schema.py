"""The experiment's settings: one typed section each (model, data, prompt, train, output, logging, parallel,
protocol) and, in one place, what each setting is to the rest of the program: a prompt encoder's own (a sweep may
vary it), neutral to a unit's figures (a resumed folder may differ in it), a quirk of the reference protocol.
Reading JSON into these (typed, checked) is ptuning/config/checks.py; --set and sweeps, ptuning/config/load.py."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


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
    # random-lm: the same architecture and tokenizer with freshly initialised weights, seeded by train.seed (the
    # run's; a sweep's variants share the LM): what P-tuning learns from the training facts alone.
    control: str = field(default="none", metadata=_choices("none", "random-lm"))


@dataclass
class DataConfig:
    data_dir: str | None = None  # else --data-dir, else $LAMA_DATA, else ./data
    vocab: str = field(default="shared", metadata=_choices("original", "shared", "lama"))
    vocab_key: str | None = None  # which word list of the vocab file; default follows the model family
    relations: list[str] | None = None  # None: all 41 relations found
    max_train: int | None = None  # cap per relation (first N after filtering), for quick runs
    max_dev: int | None = None
    max_test: int | None = None

    @property
    def uses_vocab_file(self) -> bool:
        """Answers restricted to a vocabulary file's word list (LAMA-29k or -34k), not the tokenizer's whole one."""
        return self.vocab != "original"


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
    # in order, the same under any world size; 0: each replica's share as one pack; "auto": as many as
    # the device's memory holds (python -m model_parallel.memory shows the arithmetic).
    pack_units: int | str = 0
    # A step's packed rows go through the LM in length-sorted chunks of at most this many rows (0: one padded
    # batch). Less padding; the same gradients (one backward over the summed chunk losses).
    bucket_rows: int = 64
    # Facts share batch rows of up to this many tokens, back to back, attention kept inside each fact (when the
    # backbone supports it; 0: one padded fact per row). Training and evaluation; results change only by rounding.
    row_tokens: int = 64
    manual_baseline: bool = True  # also evaluate the manual prompt on test for each relation

    @property
    def tunes_lm(self) -> bool:
        """The LM trains too (finetune, ptuning_finetune): each unit on its own copy, one at a time."""
        return self.mode != "ptuning"

    @property
    def uses_prompts(self) -> bool:
        """There are prompt encoders (ptuning, ptuning_finetune); finetune trains the LM with the manual prompt."""
        return self.mode != "finetune"


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
    # World = replicas x tensor_parallel. Units are spread over the replicas (data-parallel copies of the model); the
    # ranks of one tensor-parallel group hold shards of one model and train the same units.
    tensor_parallel: int = 1
    # Each unit's prompt encoder lives on ONE rank of its tensor-parallel group (its state divided by the
    # group's size); false keeps a copy on every rank.
    shard_prompts: bool = True
    threads: int = 0  # CPU threads each rank computes with (torch.set_num_threads); 0 leaves torch's default
    # The same floats for a relation under 1 or N ranks: packs of train.pack_units (> 0) that do not depend on
    # the world size, parallel.threads (> 0) threads on every rank, and torch's deterministic algorithms (a GPU's
    # too). Needs both set; costs the speed of whatever the world could have done otherwise.
    deterministic: bool = False


RENAMED = {"train.pack_relations": "train.pack_units (a unit is a relation under one sweep variant)"}

# What each setting is to the rest of the program.
QUIRKS = ("causal_loss_shift", "mask_before_subject", "lm_dropout", "latest_tie", "drop_last",
          "last_epoch_unevaluated", "lm_fp16", "bpe_spaces")  # the reference protocol's differences (ProtocolConfig)
# A prompt encoder's own settings: a sweep may vary them (ptuning/config/sweep.py). Anything else (the model, its
# dtype and dropout, the data, the vocabulary, batch shapes, the training mode) every unit of a pack shares.
PER_UNIT = ("train.seed", "train.lr", "train.weight_decay", "train.lr_decay", "train.patience", "train.max_epochs",
            "prompt.encoder", "prompt.template", "prompt.anchors", "prompt.init", "prompt.lstm_dropout",
            "protocol.causal_loss_shift", "protocol.mask_before_subject", "protocol.latest_tie",
            "protocol.drop_last", "protocol.last_epoch_unevaluated")
# Settings that do not change a unit's figures beyond float rounding (a unit computes the same alone or packed: its
# encoder's stack, Adam and dropout generator are its own): a resumed folder may differ in them
# (ptuning/output/store.py). Under protocol.lm_dropout the LM's masks come from the process's generator, so there
# the packs count (ExperimentConfig.result_neutral).
RESULT_NEUTRAL = ("model.device", "data.data_dir", "data.relations", "train.pack_units", "train.bucket_rows",
                  "train.row_tokens", "train.eval_batch_size", "train.manual_baseline")


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

    def result_neutral(self) -> tuple[str, ...]:
        """RESULT_NEUTRAL, less train.pack_units under protocol.lm_dropout (the LM's masks follow the packs)."""
        return tuple(k for k in RESULT_NEUTRAL if not (k == "train.pack_units" and self.protocol.lm_dropout))


SECTIONS = tuple(f.name for f in dataclasses.fields(ExperimentConfig))
