"""Run as a script (one process, a one-rank gloo group): the LM fine-tuning path with and without DeepSpeed, on a
tiny model. Writes what the test checks to the JSON file named by argv[3]."""
import gc
import json
import sys

import torch

from launcher.distributed import init_parallel, shutdown
from ptuning.config import load_config
from ptuning.data.lama import find_layout, read_relation_infos
from ptuning.model.loading import load_backbone
from ptuning.data.tasks import prepare_task, read_relation
from ptuning.train.trainer import Events, Trainer
from ptuning.data.vocab import build_answer_vocab

model, lama, out = sys.argv[1:4]
parallel = init_parallel(solo_groups=True, device="cpu")
BASE = [f"model.name={model}", "train.mode=ptuning_finetune", "data.max_train=16", "data.max_dev=8",
        "data.max_test=8", "train.max_epochs=1", "train.lr=1e-3", "train.lm_lr=1e-3", "train.weight_decay=0.1"]


class OnEach(Events):
    """Calls `then` after each unit finishes."""

    def __init__(self, then):
        self.then = then

    def finished(self, outcome) -> None:
        self.then()


def trainer_for(*extra):
    cfg = load_config(None, BASE + list(extra))
    backbone = load_backbone(cfg.model)
    layout = find_layout(lama)
    vocab = build_answer_vocab(backbone.tokenizer, backbone.vocab_size, "shared", layout, "bert-base-cased")
    infos = read_relation_infos(layout)
    tasks = [prepare_task(infos[r], read_relation(layout, r), vocab, cfg.data) for r in ("P36", "P37", "P1376")]
    return Trainer(backbone, cfg, vocab.allowed, parallel=parallel), tasks


def after_one_step(*extra):
    trainer, tasks = trainer_for(*extra)
    run, = trainer.prepare(tasks[:1])
    trainer.step([run])
    return {k: v.detach().float().clone() for k, v in trainer.backbone.model.state_dict().items()}


report = {}
plain = after_one_step()
ds = after_one_step('deepspeed.zero_optimization={"stage": 1}')
start = trainer_for()[0].lm.pristine
moved = max(float((plain[k] - start[k]).abs().max()) for k in plain)
report["plain_vs_deepspeed"] = max(float((plain[k] - ds[k]).abs().max()) for k in plain)
report["moved"] = moved

# several relations under one engine each: nothing of a finished relation's engine stays alive
trainer, tasks = trainer_for('deepspeed.zero_optimization={"stage": 1}')
lm = trainer.backbone.model


def alive() -> dict:
    gc.collect()
    import deepspeed

    hooks = sum(len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) + len(p._backward_hooks or {})
                for p in lm.parameters())
    objects = gc.get_objects()
    engines = sum(isinstance(o, deepspeed.DeepSpeedEngine) for o in objects)
    storages = {o.untyped_storage().data_ptr(): o.untyped_storage().nbytes() for o in objects
                if isinstance(o, torch.Tensor) and o.device.type != "meta"}
    return {"engines": engines, "hooks": hooks, "tensor_bytes": sum(storages.values()),
            "dtype": str(next(lm.parameters()).dtype),
            "pristine": all(torch.equal(v, trainer.lm.pristine[k]) for k, v in lm.state_dict().items())}


report["before"] = alive()
report["after_each"] = []
trainer.train([tasks], OnEach(lambda: report["after_each"].append(alive())))

# a bf16 engine casts the modules it is given: the shared LM comes back in its own dtype and values
trainer, tasks = trainer_for('deepspeed.zero_optimization={"stage": 1}', 'deepspeed.bf16={"enabled": true}')
lm = trainer.backbone.model
dtypes = []
trainer.train([tasks[:2]], OnEach(lambda: dtypes.append(alive())))
report["bf16_after_each"] = dtypes
json.dump(report, open(out, "w"))
shutdown()
