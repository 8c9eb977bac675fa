"""The coordinator (rank 0): gathers every unit's record as it lands in the output folder, rewrites results.json /
results.md, drives the progress bar and logs to W&B; at the end, the statistics over seeds and test facts, the
table, the summaries and the bar chart."""
from __future__ import annotations

import threading
from typing import Any

from ptuning.data.controls import subset_mask
from ptuning.output import probing, stats
from ptuning.files import WriteError
from ptuning.output.progress import Progress
from ptuning.output.results import Report, plot_p_at_1
from ptuning.output.store import RunStore, is_final
from ptuning.config.sweep import Variant, unit_id
from ptuning.output.wandb_log import WandbLogger


class Coordinator:
    def __init__(self, store: RunStore, header: dict[str, Any], relations: dict[str, dict[str, Any]],
                 variants: list[Variant], logger: WandbLogger | None = None, progress: Progress | None = None):
        self.store, self.logger, self.progress = store, logger, progress or Progress("off")
        self.variants = variants
        self.report = Report(store.root, header)
        self.report.merge(relations)
        self.relations = [rid for rid, r in relations.items() if r.get("status") != "skipped"]
        self._seen: dict[str, dict] = {}
        self._epochs_logged: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: WriteError | None = None  # what stopped the polling thread

    def poll(self) -> None:
        with self._lock:
            relations, units, finals = {}, {}, []
            units_done = epochs_done = 0
            for rid in self.relations:
                own = self.store.result(rid)
                if own is not None and own != self._seen.get(rid):
                    relations[rid] = own
                for variant in self.variants:
                    uid = unit_id(rid, variant.name)
                    epochs = self._log_epochs(uid, rid, variant)
                    record = own if not variant.name else self.store.result(uid)
                    final = is_final(record)
                    units_done += final
                    # a unit that stopped early has done its remaining epochs too
                    epochs_done += variant.cfg.train.max_epochs if final else epochs
                    if record is None or (variant.name and record == self._seen.get(uid)):
                        continue
                    was_final = is_final(self._seen.get(uid))
                    self._seen[uid] = record
                    if variant.name:
                        units[rid, variant.name] = record
                    if final and not was_final:
                        finals.append((uid, rid, variant, record))
                if own is not None:
                    self._seen[rid] = own
            self.progress.advance(units_done, epochs_done)
            for final in finals:
                self._announce(*final)
            if relations or units:
                self.report.merge(relations, units)

    def _announce(self, uid: str, relation: str, variant: Variant, record: dict) -> None:
        if self.logger is not None:
            self.logger.unit_final(relation, variant.name, {**(self.store.result(relation) or {}), **record})
        if record.get("test_p@1") is not None:
            best = f" (best dev epoch {record['best_epoch']})" if "best_epoch" in record else ""
            self.progress.unit_done(f"{uid} done: test P@1 {record['test_p@1']:.3f}{best}")

    def _log_epochs(self, uid: str, relation: str, variant: Variant) -> int:
        """Dev P@1 of the epochs not yet logged; returns how many epochs the unit has run."""
        progress = self.store.progress(uid)
        if not progress:
            return 0
        history = progress["dev_history"]
        if self.logger is not None:
            for epoch in range(self._epochs_logged.get(uid, 0), len(history)):
                self.logger.epoch(relation, variant.name, epoch + 1, history[epoch])
        self._epochs_logged[uid] = len(history)
        return len(history)

    def start(self, interval: float = 2.0) -> None:
        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.poll()
                except WriteError as error:  # a full disk, say: the main thread says it when the run ends
                    self.error = error
                    return

        self._thread = threading.Thread(target=loop, name="coordinator", daemon=True)
        self._thread.start()

    def finish(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.error is not None:
            raise self.error
        self.poll()
        self.probe()
        self.report.add_statistics(self.statistics())
        payload = self.report.payload
        plot = plot_p_at_1(payload, self.store.root / "p_at_1.png")
        if self.logger is not None:
            self.logger.finish(payload, plot)
        return payload

    def probe(self) -> None:
        """Each finished unit's controls (ptuning/output/probing.py) into the report, and its predictions.jsonl."""
        relations, units = {}, {}
        for rid in self.relations:
            facts = self.store.facts(rid)
            if facts is None:  # a folder from before the controls
                continue
            majority = self.report.payload["relations"][rid]["majority_object"]
            manual_ranks = self.store.ranks(rid, "manual")
            manual = None if manual_ranks is None else (manual_ranks, self.store.top(rid, "manual"))
            fields = {} if manual is None else probing.manual_fields(facts, manual_ranks)
            for variant in self.variants:
                uid = unit_id(rid, variant.name)
                ranks = self.store.ranks(uid, "test")
                ptuned = None if ranks is None else (ranks, self.store.top(uid, "test"))
                if ptuned is not None:
                    own = probing.unit_fields(facts, *ptuned, majority)
                    if variant.name:
                        units[rid, variant.name] = own
                    else:
                        fields.update(own)
                if ptuned is not None or (manual is not None and not variant.name):
                    self.store.write_predictions(uid, probing.prediction_lines(facts, manual, ptuned))
            relations[rid] = fields
        self.report.merge(relations, units)

    def statistics(self) -> dict[str, Any]:
        """Per setting (the variants that differ only by seed): the seeds pooled over the relations every one of
        them finished; the manual prompt; a sweep's settings against its first."""
        settings: dict[str, list[Variant]] = {}
        for variant in self.variants:
            settings.setdefault(variant.setting if variant.name else "", []).append(variant)
        out: dict[str, Any] = {"settings": {}}
        hits: dict[str, stats.Setting] = {}
        for name, members in settings.items():
            ranks = {}
            for rid in self.relations:
                rows = [self.store.ranks(unit_id(rid, v.name), "test") for v in members]
                if all(r is not None for r in rows):
                    ranks[rid] = rows
            if not ranks:
                continue
            seeds = [v.cfg.train.seed for v in members]
            hits[name] = stats.setting_from_ranks(ranks, seeds)
            out["settings"][name] = {**stats.summary(hits[name]), "relations": stats.relation_spread(hits[name])}
        manual = {rid: [r] for rid in self.relations if (r := self.store.ranks(rid, "manual")) is not None}
        facts = {rid: f for rid in self.relations if (f := self.store.facts(rid)) is not None}
        uhn = {rid: subset_mask(f, "uhn") for rid, f in facts.items()}
        if facts:
            majority = {rid: self.report.payload["relations"][rid]["majority_object"] for rid in facts}
            out["majority"] = stats.summary(probing.majority_setting(facts, majority))
        for name, setting in hits.items():
            if uhn.keys() >= setting.hits.keys():
                out["settings"][name]["uhn"] = stats.summary(probing.subset_setting(setting, uhn))
        if manual:
            manual_setting = stats.setting_from_ranks(manual, [0])
            out["manual"] = stats.summary(manual_setting)
            if uhn.keys() >= manual.keys():
                out["manual"]["uhn"] = stats.summary(probing.subset_setting(manual_setting, uhn))
            for name, setting in hits.items():
                if setting.hits.keys() == manual_setting.hits.keys():
                    out["settings"][name]["gain_over_manual"] = stats.difference(setting, manual_setting)
                    if "uhn" in out["settings"][name]:
                        out["settings"][name]["uhn"]["gain_over_manual"] = stats.difference(
                            probing.subset_setting(setting, uhn), probing.subset_setting(manual_setting, uhn))
        names = list(hits)
        if len(names) > 1:
            first = hits[names[0]]
            out["against_first"] = {n: stats.difference(hits[n], first) for n in names[1:]
                                    if hits[n].hits.keys() == first.hits.keys()}
        return out
