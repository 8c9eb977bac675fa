"""W&B: one run per variant (the coordinator's), all in one group, offline by default with every file inside the
output folder. Without a sweep that is one run, named after the group and the seed; a sweep's variants are runs
of their own (W&B's own convention for sweeps: its grouping and parallel-coordinates views line them up by the
config and the summary).

WANDB_MODE=online (and a key) sends them to the server; logging.wandb=false turns it off. The runs' ids are kept
in <out>/wandb/run_ids.json so a resumed sweep continues the same runs.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from ptuning.output.results import CONTROL_KEYS

TABLE_COLUMNS = ["relation", "label", "n_test", "manual_p@1", "dev_p@1", "test_p@1", "test_p@10", "test_mrr",
                 "best_epoch", "epochs_run", "n_uhn", *CONTROL_KEYS]


class WandbLogger:
    def __init__(self, out_dir: Path, header: dict[str, Any], group: str, job_type: str, variants: list,
                 project: str):
        folder = (out_dir / "wandb").resolve()
        folder.mkdir(parents=True, exist_ok=True)
        # Nothing lands in $HOME: wandb's cache, config, data and artifact folders live in the run's folder too.
        for variable, sub in (("WANDB_DIR", ""), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"),
                              ("WANDB_DATA_DIR", "data"), ("WANDB_ARTIFACT_DIR", "artifacts")):
            os.environ.setdefault(variable, str(folder / sub))
        ids_file = folder / "run_ids.json"
        ids = json.loads(ids_file.read_text()) if ids_file.is_file() else {}
        if not ids and (folder / "run_id").is_file():  # a folder from before sweeps: its one run continues
            ids[""] = (folder / "run_id").read_text().strip()
        import wandb

        self.wandb = wandb
        self.runs: dict[str, Any] = {}
        self._seen: dict[str, set[str]] = {}
        for variant in variants:
            ids.setdefault(variant.name, uuid.uuid4().hex[:12])
            name = f"{group}-seed{variant.cfg.train.seed}" if not variant.name else f"{group}-{variant.name}"
            config = {**header, "config": variant.cfg.to_dict(), "variant": variant.name,
                      **{key: value for key, value in variant.overrides.items()}}
            config.pop("variants", None)
            self.runs[variant.name] = wandb.init(
                project=project, group=group, job_type=job_type, name=name, id=ids[variant.name], resume="allow",
                mode=os.environ.get("WANDB_MODE", "offline"), config=config, dir=str(folder),
                reinit="create_new", settings=wandb.Settings(x_disable_stats=True, console="off", silent=True))
            self._seen[variant.name] = set()
        ids_file.write_text(json.dumps(ids, indent=1) + "\n")

    def _define(self, variant: str, relation: str) -> Any:
        run = self.runs[variant]
        if relation not in self._seen[variant]:
            # each relation's curve has its own x axis: relations train at different paces
            run.define_metric(f"{relation}/epoch")
            run.define_metric(f"{relation}/*", step_metric=f"{relation}/epoch")
            self._seen[variant].add(relation)
        return run

    def epoch(self, relation: str, variant: str, epoch: int, dev_p1: float) -> None:
        self._define(variant, relation).log({f"{relation}/epoch": epoch, f"{relation}/dev_p@1": dev_p1})

    def unit_final(self, relation: str, variant: str, record: dict[str, Any]) -> None:
        values = {f"{relation}/{k}": record[k] for k in ("test_p@1", "manual_p@1") if record.get(k) is not None}
        if values:
            self._define(variant, relation).log({f"{relation}/epoch": record.get("best_epoch", 0), **values})

    def finish(self, payload: dict[str, Any], plot: Path | None) -> None:
        settings = (payload.get("statistics") or {}).get("settings", {})
        for variant, run in self.runs.items():
            view, averages = _view(payload, variant)
            rows = [[rid] + [r.get(c) for c in TABLE_COLUMNS[1:]] for rid, r in view.items()
                    if r.get("status") != "skipped"]
            logged: dict[str, Any] = {"relations": self.wandb.Table(columns=TABLE_COLUMNS, data=rows)}
            if plot is not None:
                logged["p_at_1"] = self.wandb.Image(str(plot))
            run.log(logged)
            summary = {"vocab": payload["vocab"], "n_relations": averages["macro"].get("n_relations"),
                       "n_test_facts": averages["micro"].get("n_test_facts")}
            for average in ("macro", "micro"):
                for key, value in averages[average].items():
                    if key.endswith("p@1") or key in CONTROL_KEYS:
                        summary[f"{average}_{'p@1' if key == 'test_p@1' else key}"] = value
            setting = settings.get(payload.get("variants", {}).get(variant, {}).get("setting", ""))
            if setting:  # the variant's setting over its seeds: what the group view compares
                summary.update(setting_macro_mean=setting["macro_mean"], setting_macro_std=setting["macro_std"],
                               setting_macro_ci95_low=setting["macro_ci95"][0],
                               setting_macro_ci95_high=setting["macro_ci95"][1])
            run.summary.update(summary)
            run.finish()


def _view(payload: dict[str, Any], variant: str) -> tuple[dict[str, dict], dict[str, dict]]:
    """One variant's relations and averages (without a sweep: the run's own)."""
    if not payload.get("variants"):
        return payload["relations"], payload
    relations = {rid: {**{k: v for k, v in r.items() if k != "variants"}, **(r.get("variants") or {}).get(variant, {})}
                 for rid, r in payload["relations"].items()}
    return relations, payload["variants"][variant]
