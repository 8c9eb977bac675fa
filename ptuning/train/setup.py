"""Units made ready to train together: each unit's run (its template, its place and so its encoder's home under
tensor parallelism), its encoder's starting weights in the prompt bank, and its LM optimizer when the LM trains."""
from __future__ import annotations

from ptuning.config.sweep import Unit, Variant
from ptuning.data.tasks import RelationTask
from ptuning.model.encoders import initial_state
from ptuning.train.stack import Settings
from ptuning.train.unit_run import UnitRun, dropout_seed, relation_seed


class Setup:
    def __init__(self, cfg, backbone, templates, bank, forward, parallel, lm, embedding_std: float):
        self.cfg, self.backbone, self.templates, self.bank = cfg, backbone, templates, bank
        self.forward, self.parallel, self.lm, self.embedding_std = forward, parallel, lm, embedding_std

    def runs(self, units: list[Unit | RelationTask], first: int = 0) -> list[UnitRun]:
        """Runs for units that train together (unit i at place first + i of its replica's list, which decides its
        encoder's home), fresh: their encoders in the bank, their LM optimizers when the LM trains."""
        units = [Unit(u, Variant("", {}, self.cfg)) if isinstance(u, RelationTask) else u for u in units]
        runs = [UnitRun(u, self.templates.training(u.task, u.variant.cfg), self.bank.holds(first + i),
                        self.bank.writes(first + i),
                        drop_last=self.cfg.train.batch_size if u.variant.cfg.protocol.drop_last else 0)
                for i, u in enumerate(units)]
        if self.cfg.train.uses_prompts:
            members = []
            for run in runs:
                cfg, seed = run.cfg, relation_seed(run.cfg.train.seed, run.unit.relation)
                state = initial_state(run.template, self.backbone, seed, cfg, self.embedding_std, run.holds)
                if run.holds and not self.bank.sharded and self.parallel.tp_size > 1:  # replicated: peers start
                    state = {k: v.to(self.backbone.device) for k, v in state.items()}  # from the same prompts
                    self.parallel.sync_tensors(list(state.values()))
                if run.holds:
                    members.append((run.unit.id, self.forward.layout(cfg, run.n_pseudo), state, Settings(
                        cfg.train.lr, cfg.train.weight_decay, cfg.prompt.lstm_dropout,
                        dropout_seed(cfg.train.seed, run.unit.relation))))
            self.bank.build(members)
        for run in runs if self.lm is not None else []:
            stack = self.bank.stack_of(run.unit.id) if self.cfg.train.uses_prompts else None
            run.optimizer, run.engine = self.lm.begin(stack, relation_seed(run.cfg.train.seed, run.unit.relation),
                                                      run.cfg)
        return runs
