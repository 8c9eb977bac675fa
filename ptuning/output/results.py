"""The results contract: <out>/results.json, <out>/results.md, <out>/relations/<unit>/*.safetensors.

results.json: the header (model, vocabulary, protocol, config), "relations" (each relation's record: counts, the
manual prompt's figures and, without a sweep, its one unit's figures; in a sweep its units' records under
"variants"), "variants" (a sweep's per-variant macro and micro averages), "macro" / "micro" (each relation's unit
chosen on dev: without a sweep, the only one), "best_on_dev" (which variant that was), and "statistics" (per
setting, over seeds and test facts: mean, spread, 95% bootstrap interval, gain over the manual prompt).

Everything is written whole (ptuning/files.py: a temporary file in the same folder, renamed), so a reader (or a
crash) never sees half a file.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from ptuning.files import atomic_write_bytes, atomic_write_text
from ptuning.output.markdown import pct, render_markdown
from ptuning.output.store import is_final


# the probing controls' per-relation figures (ptuning/output/probing.py), averaged like the P@1 columns
CONTROL_KEYS = ("majority_p@1", "prior_share", "in_subject", "manual_uhn_p@1", "test_uhn_p@1")
RESULT_KEYS = ("relations", "macro", "micro", "best_on_dev", "statistics")  # what a run adds to its header


def header_of(payload: dict[str, Any]) -> dict[str, Any]:
    """A results.json's header: what the run was (model, vocabulary, protocol, config, a sweep's variants)."""
    header = {k: v for k, v in payload.items() if k not in RESULT_KEYS}
    if "variants" in header:
        header["variants"] = {n: {"overrides": v["overrides"], "setting": v["setting"]}
                              for n, v in header["variants"].items()}
    return header


def averages(relations: dict[str, dict]) -> dict[str, dict[str, Any]]:
    """Macro (mean over relations, the paper's number) and micro (over facts) averages of every P@1 column."""
    done = [r for r in relations.values() if is_final(r)]
    out: dict[str, dict[str, Any]] = {"macro": {}, "micro": {}}
    for key in ("manual_p@1", "test_p@1", "test_p@10", "test_mrr", "dev_p@1") + CONTROL_KEYS:
        rows = [r for r in done if r.get(key) is not None]
        if not rows:
            continue
        weight = "n_dev" if key.startswith("dev") else "n_uhn" if "uhn" in key else "n_test"
        facts = sum(r[weight] for r in rows)
        out["macro"][key] = sum(r[key] for r in rows) / len(rows)
        out["micro"][key] = sum(r[key] * r[weight] for r in rows) / facts if facts else 0.0
    out["macro"]["n_relations"] = len(done)
    out["micro"]["n_test_facts"] = sum(r["n_test"] for r in done)
    return out


class Report:
    """results.json / results.md for one output folder, rewritten atomically after every change."""

    def __init__(self, out_dir: str | Path, header: dict[str, Any]):
        self.out_dir = Path(out_dir)
        self.payload: dict[str, Any] = {**header, "relations": {}}
        self.sweep = bool(header.get("variants"))

    def merge(self, relations: dict[str, dict[str, Any]], units: dict[tuple[str, str], dict[str, Any]] = {}
              ) -> None:
        """Fold in new fields of some relations' own records and of some units' ((relation, variant) -> record;
        without a sweep a relation's record is its unit's), then rewrite both files once."""
        for relation, fields in relations.items():
            self.payload["relations"].setdefault(relation, {}).update(fields)
        for (relation, variant), fields in units.items():
            self.payload["relations"].setdefault(relation, {}).setdefault("variants", {}).setdefault(
                variant, {}).update(fields)
        if self.sweep:
            self._sweep_averages()
        else:
            self.payload.update(averages(self.payload["relations"]))
        self.write()

    def _sweep_averages(self) -> None:
        """Per variant; and the headline: each relation's variant with the best dev P@1 (the first of equals)."""
        relations = self.payload["relations"]

        def view(variant: str) -> dict[str, dict]:
            out = {}
            for rid, r in relations.items():
                base = {k: v for k, v in r.items() if k not in ("variants", "status")}
                unit = (r.get("variants") or {}).get(variant)
                out[rid] = {**r, "status": "skipped"} if r.get("status") == "skipped" else {**base, **(unit or {})}
            return out

        self.payload["variants"] = {name: {**spec, **averages(view(name))}
                                    for name, spec in self.payload["variants"].items()}
        best: dict[str, str] = {}
        for rid, r in relations.items():
            done = {n: u for n, u in (r.get("variants") or {}).items()
                    if is_final(u)}
            if done:
                best[rid] = max(done, key=lambda n: (done[n].get("dev_p@1", -1), -list(done).index(n)))
        self.payload["best_on_dev"] = best
        chosen = {rid: {**{k: v for k, v in r.items() if k != "variants"}, **r["variants"][best[rid]]}
                  if rid in best else {k: v for k, v in r.items() if k != "variants"} for rid, r in relations.items()}
        self.payload.update(averages(chosen))

    def add_statistics(self, statistics: dict[str, Any]) -> None:
        self.payload["statistics"] = statistics
        self.write()

    def write(self) -> None:
        atomic_write_text(self.out_dir / "results.json", json.dumps(self.payload, indent=2) + "\n")
        atomic_write_text(self.out_dir / "results.md", render_markdown(self.payload))


def plot_p_at_1(payload: dict, path: str | Path) -> Path | None:
    """Bar chart of test P@1 per relation, manual prompt next to P-tuned (each setting of a sweep: its mean over
    seeds, the standard deviation as an error bar); None when there is nothing to draw."""
    rows = [(rid, r) for rid, r in payload["relations"].items() if r.get("status") != "skipped"
            and (is_final(r) or r.get("variants"))]
    if not rows:
        return None
    settings = (payload.get("statistics") or {}).get("settings", {}) if payload.get("variants") else {}
    series = [(f"manual ({pct(payload['macro'].get('manual_p@1'))})",
               [100 * (r.get("manual_p@1") or 0) for _, r in rows], None)]
    if settings:
        for name, s in settings.items():
            spread = [s["relations"].get(rid, {"mean": 0, "std": 0}) for rid, _ in rows]
            series.append((f"{name or 'P-tuned'} ({pct(s['macro_mean'])})", [100 * x["mean"] for x in spread],
                           [100 * x["std"] for x in spread]))
    else:
        series.append((f"P-tuned ({pct(payload['macro'].get('test_p@1'))})",
                       [100 * (r.get("test_p@1") or 0) for _, r in rows], None))
    title = (f"{payload['model']}, {payload['vocab']} (legend: macro average"
             + ("; bars: mean over seeds, whiskers: std" if settings else "") + "; ticks: majority baseline)")
    baseline = payload["macro"].get("majority_p@1")
    majority = [(f"majority baseline ({pct(baseline)})", [100 * (r.get("majority_p@1") or 0) for _, r in rows])
                ] if baseline is not None else []
    return grouped_bars(path, [rid for rid, _ in rows], series, title, marks=majority)


def grouped_bars(path: str | Path, relations: list[str], series: list[tuple[str, list[float], list[float] | None]],
                 title: str, marks: list[tuple[str, list[float]]] = ()) -> Path:
    """Test P@1 (percent) per relation, one bar per series (label, values, error bars or None), and marks (label,
    values) drawn as a tick across each relation's group, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * len(relations) * len(series) + 2), 3.6))
    for k, (label, values, errors) in enumerate(series):
        ax.bar([i - 0.4 + width * (k + 0.5) for i in range(len(relations))], values, width=width, label=label,
               yerr=errors, capsize=1.5 if errors else 0)
    for label, values in marks:
        ax.hlines(values, [i - 0.42 for i in range(len(relations))], [i + 0.42 for i in range(len(relations))],
                  colors="black", linewidth=1.2, label=label)
    ax.set_xticks(list(range(len(relations))), relations, rotation=90, fontsize=7)
    ax.set_ylabel("test P@1 (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)
