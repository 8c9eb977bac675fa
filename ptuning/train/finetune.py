"""LM fine-tuning (train.mode finetune, ptuning_finetune): each relation fine-tunes its own copy of the LM from the
same pristine weights, one relation at a time; with a `deepspeed` section its trainable parameters (LM and prompt
encoder) go through deepspeed.initialize.

    begin(encoder, seed)   pristine weights and dtype back, dropout on, trainable; the optimizer (and engine)
    step(engine, loss)     DeepSpeed's backward and step
    snapshot() / state()   the LM's part of a relation's best copy / checkpoint (plain optimizer only)
    end(engine)            the engine destroyed (its hooks and optimizer state released), pristine weights back,
                           frozen

The optimizer is Adam with L2 weight decay (torch.optim.Adam's) and no gradient clipping, under DeepSpeed too:
DeepSpeed's "Adam" is AdamW unless adam_w_mode is false, and it clips gradients at norm 1.0 unless told otherwise. A bf16/fp16 engine casts the modules it is given in place; the LM is shared by every
relation, so the next relation starts from the pristine dtype as well as the pristine values. A relation trained
under DeepSpeed is not checkpointed mid-training (its optimizer state does not load with weights_only, and a copy
of an LM per epoch is what DeepSpeed's own checkpoints are for): after a stop it restarts from scratch.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ptuning.config import ExperimentConfig
from ptuning.parallel.context import ParallelContext


class LMTuning:
    def __init__(self, backbone, cfg: ExperimentConfig, parallel: ParallelContext,
                 progress: Callable[[str], None] = lambda line: None):
        self.backbone, self.cfg, self.parallel, self.progress = backbone, cfg, parallel, progress
        model = backbone.model
        self.pristine = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())

    @property
    def deepspeed(self) -> bool:
        return self.cfg.deepspeed is not None

    def _restore(self) -> None:
        model = self.backbone.model
        model.to(dtype=self.dtype)  # undo an engine's cast of the shared module
        model.load_state_dict(self.pristine)

    def begin(self, encoder: torch.nn.Module | None, seed: int,
              unit_cfg: ExperimentConfig | None = None) -> tuple[torch.optim.Optimizer, Any]:
        """(optimizer, DeepSpeed engine or None) for a unit that starts from the pristine LM (unit_cfg: its own
        settings: the encoder's lr and the weight decay; the LM's lr is the run's)."""
        train = (unit_cfg or self.cfg).train
        self._restore()
        groups = []
        if encoder is not None:
            groups.append({"params": list(encoder.parameters()), "lr": train.lr})
        groups.append({"params": self.backbone.unfreeze(), "lr": self.cfg.train.lm_lr})
        if self.deepspeed:
            optimizer, engine = self._engine(encoder, groups, train)
        else:
            optimizer, engine = torch.optim.Adam(groups, weight_decay=train.weight_decay,
                                                 fused=self.backbone.device.type in ("cpu", "cuda")), None
        torch.manual_seed(seed)  # the LM's dropout masks; after deepspeed.initialize, which draws random numbers
        return optimizer, engine

    def _engine(self, encoder: torch.nn.Module | None, groups: list[dict], train):
        """Each replica fine-tunes its own unit, so DeepSpeed's data-parallel group is this rank
        alone."""
        import deepspeed

        if self.backbone.device.type == "cpu":
            # On CPU ranks DeepSpeed JIT-compiles a shared-memory all-reduce (30 s once per environment, with a C++
            # compiler) that only its inference all-reduce calls; the engine's gradients go through gloo.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        modules = torch.nn.ModuleDict({"lm": self.backbone.model})
        if encoder is not None:
            modules["encoder"] = encoder
        # no gradient clipping unless the section asks for it: DeepSpeed 0.19 clips at 1.0 by default, the plain
        # optimizer never does
        config = {"train_micro_batch_size_per_gpu": self.cfg.train.batch_size, "gradient_accumulation_steps": 1,
                  "gradient_clipping": 0.0, **self.cfg.deepspeed,
                  "optimizer": {"type": "Adam", "params": {"lr": train.lr, "torch_adam": True, "adam_w_mode": False,
                                                           "weight_decay": train.weight_decay}}}
        engine, optimizer, _, _ = deepspeed.initialize(model=modules, model_parameters=groups, config=config,
                                                       mpu=self.parallel.solo_mpu())
        self.progress(f"DeepSpeed engine: ZeRO stage {engine.zero_optimization_stage()}, "
                      f"{type(optimizer).__name__}, bf16 {engine.bfloat16_enabled()}, fp16 {engine.fp16_enabled()}")
        return optimizer, engine

    @staticmethod
    def step(engine, loss: torch.Tensor) -> None:
        engine.backward(loss)
        engine.step()

    def snapshot(self) -> dict[str, torch.Tensor]:
        """The LM's weights now, in host memory (the best epoch's copy)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.backbone.model.state_dict().items()}

    def state(self) -> dict[str, torch.Tensor]:
        """The LM's part of a checkpoint: its tensors as they are (torch.save copies one storage at a time), no
        whole second copy in memory."""
        return self.backbone.model.state_dict()

    def load(self, weights: dict[str, torch.Tensor]) -> None:
        self.backbone.model.load_state_dict(weights)

    def end(self, engine) -> None:
        """After a relation's test: its engine destroyed, the pristine LM back, frozen."""
        if engine is not None:
            engine.destroy()
        self._restore()
        self.backbone.freeze()
