"""W&B: one run per sweep (the coordinator's), offline by default with every file inside the output folder.

WANDB_MODE=online (and a key) sends it to the server; logging.wandb=false turns it off. The run id is kept in
<out>/wandb/run_id so a resumed sweep continues the same run.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

TABLE_COLUMNS = ["relation", "label", "n_test", "manual_p@1", "dev_p@1", "test_p@1", "test_p@10", "test_mrr",
                 "best_epoch", "epochs_run"]


class WandbLogger:
    def __init__(self, out_dir: Path, config: dict[str, Any], group: str, job_type: str, name: str, project: str):
        folder = (out_dir / "wandb").resolve()
        folder.mkdir(parents=True, exist_ok=True)
        # Nothing lands in $HOME: wandb's cache, config, data and artifact folders live in the run's folder too.
        for variable, sub in (("WANDB_DIR", ""), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"),
                              ("WANDB_DATA_DIR", "data"), ("WANDB_ARTIFACT_DIR", "artifacts")):
            os.environ.setdefault(variable, str(folder / sub))
        id_file = folder / "run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=project, group=group, job_type=job_type, name=name, id=run_id, resume="allow",
            mode=os.environ.get("WANDB_MODE", "offline"), config=config, dir=str(folder),
            settings=wandb.Settings(x_disable_stats=True, console="off", silent=True))
        self._relations_seen: set[str] = set()

    def _define(self, relation: str) -> None:
        if relation not in self._relations_seen:
            # each relation's curve has its own x axis: relations train at different paces
            self.run.define_metric(f"{relation}/epoch")
            self.run.define_metric(f"{relation}/*", step_metric=f"{relation}/epoch")
            self._relations_seen.add(relation)

    def epoch(self, relation: str, epoch: int, dev_p1: float) -> None:
        self._define(relation)
        self.run.log({f"{relation}/epoch": epoch, f"{relation}/dev_p@1": dev_p1})

    def relation_final(self, relation: str, record: dict[str, Any]) -> None:
        self._define(relation)
        values = {f"{relation}/{k}": record[k] for k in ("test_p@1", "manual_p@1") if record.get(k) is not None}
        if values:
            self.run.log({f"{relation}/epoch": record.get("best_epoch", 0), **values})

    def finish(self, payload: dict[str, Any], plot: Path | None) -> None:
        rows = [[rid] + [r.get(c) for c in TABLE_COLUMNS[1:]] for rid, r in payload["relations"].items()
                if r.get("status") != "skipped"]
        logged: dict[str, Any] = {"relations": self.wandb.Table(columns=TABLE_COLUMNS, data=rows)}
        if plot is not None:
            logged["p_at_1"] = self.wandb.Image(str(plot))
        self.run.log(logged)
        summary = {"vocab": payload["vocab"], "n_relations": payload["macro"]["n_relations"],
                   "n_test_facts": payload["micro"]["n_test_facts"]}
        for average in ("macro", "micro"):
            for key, value in payload[average].items():
                if key.endswith("p@1"):
                    name = "p@1" if key == "test_p@1" else key
                    summary[f"{average}_{name}"] = value
        self.run.summary.update(summary)
        self.run.finish()
