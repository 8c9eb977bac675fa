"""The coordinator (rank 0): gathers each relation's record as it lands in the output folder, rewrites
results.json / results.md, and logs to W&B; at the end, the table, the summary and the bar chart."""
from __future__ import annotations

import threading
from typing import Any, Callable

from ptuning.results import Report, plot_p_at_1
from ptuning.store import FINAL, RunStore
from ptuning.wandb_log import WandbLogger


class Coordinator:
    def __init__(self, store: RunStore, header: dict[str, Any], relations: dict[str, dict[str, Any]],
                 logger: WandbLogger | None = None, announce: Callable[[str], None] = lambda line: None):
        self.store, self.logger, self.announce = store, logger, announce
        self.report = Report(store.root, header)
        self.report.merge(relations)
        self._seen: dict[str, dict] = {}
        self._epochs_logged: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self) -> None:
        with self._lock:
            updates = {}
            for rid, current in self.report.payload["relations"].items():
                if current.get("status") == "skipped":
                    continue
                self._log_epochs(rid)
                record = self.store.result(rid)
                if record is None or record == self._seen.get(rid):
                    continue
                was_final = self._seen.get(rid, {}).get("status") in FINAL
                self._seen[rid] = record
                updates[rid] = record
                if record.get("status") in FINAL and not was_final:
                    if self.logger is not None:
                        self.logger.relation_final(rid, record)
                    if record.get("test_p@1") is not None:
                        best = f" (best dev epoch {record['best_epoch']})" if "best_epoch" in record else ""
                        self.announce(f"{rid} done: test P@1 {record['test_p@1']:.3f}{best}")
            if updates:
                self.report.merge(updates)

    def _log_epochs(self, relation: str) -> None:
        if self.logger is None:
            return
        progress = self.store.progress(relation)
        if not progress:
            return
        history = progress["dev_history"]
        for epoch in range(self._epochs_logged.get(relation, 0), len(history)):
            self.logger.epoch(relation, epoch + 1, history[epoch])
        self._epochs_logged[relation] = len(history)

    def start(self, interval: float = 2.0) -> None:
        def loop() -> None:
            while not self._stop.wait(interval):
                self.poll()

        self._thread = threading.Thread(target=loop, name="coordinator", daemon=True)
        self._thread.start()

    def finish(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.poll()
        payload = self.report.payload
        plot = plot_p_at_1(payload, self.store.root / "p_at_1.png")
        if self.logger is not None:
            self.logger.finish(payload, plot)
        return payload
