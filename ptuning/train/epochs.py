"""When units' epochs end: the scheduler's step, dev P@1, the best copy and early stopping (each unit by its own
settings); and when units stop: their best state back, test evaluated at their best dev epoch, their outcome, and
their leaving the bank."""
from __future__ import annotations

import torch

from ptuning.model.metrics import TOP, figures
from ptuning.train.unit_run import UnitOutcome, UnitRun


class Epochs:
    def __init__(self, forward, bank, step, lm, templates, progress):
        self.forward, self.bank, self.step, self.lm = forward, bank, step, lm
        self.templates, self.progress = templates, progress

    def end(self, runs: list[UnitRun]) -> None:
        """The scheduler step, dev P@1, best copy and early stopping of the units whose epoch just ended."""
        for run, metrics in zip(runs, self.forward.evaluate_runs(runs, "dev")):
            self.step.decay_lr(run)
            if run.end_epoch(metrics["p@1"]) and run.holds:  # the best so far: its weights, in host memory
                run.best_state = {"encoder": self.bank.weights(run.unit.id)} if self.bank.has(run.unit.id) else {}
                if self.lm is not None:
                    run.best_state["lm"] = self.lm.snapshot()
            self.progress(f"{run.unit.id} epoch {run.epoch}: dev P@1 {metrics['p@1']:.3f} "
                          f"(best {run.best_dev:.3f} at epoch {run.best_epoch})")

    def finish(self, runs: list[UnitRun]) -> list[UnitOutcome]:
        """Each unit's best state back, test evaluated at its best dev epoch; the units leave the bank."""
        for run in runs:
            if self.bank.has(run.unit.id):
                self.bank.load_weights(run.unit.id, run.best_state["encoder"])
            if self.lm is not None:
                self.lm.load(run.best_state["lm"])
            run.best_state = run.optimizer = None  # free them before the next units start
        with torch.no_grad():
            vectors = self.forward.vectors(runs)
        outcomes = []
        ranks, tops = self.forward.predictions([(v, r.rows["test"]) for v, r in zip(vectors, runs)], TOP)
        for run, ranks, top, vector in zip(runs, ranks, tops, vectors):
            uid = run.unit.id
            prompt = (self.bank.weights(uid), vector.detach().cpu()) if self.bank.has(uid) else None
            metrics = {"dev_p@1": run.best_dev, **figures(ranks, "test_"), "best_epoch": run.best_epoch,
                       "epochs_run": run.epoch, "seconds": round(run.elapsed(), 1), "dev_history": run.dev_history}
            outcomes.append(UnitOutcome(run.unit, metrics, prompt, ranks.tolist(), top.tolist(),
                                        self.templates.counts(run.cfg), run.writes))
            if self.bank.has(uid):
                self.bank.drop(uid)
        for run in runs if self.lm is not None else []:
            self.lm.end(run.engine)
            run.engine = None
        return outcomes
