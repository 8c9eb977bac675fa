"""The results contract: <out>/results.json, <out>/results.md, <out>/relations/<P>/*.safetensors.

Everything is written to a temporary file in the same folder and renamed, so a reader (or a crash) never sees
half a file.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """write(handle) fills a temporary file beside path, which is then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save_safetensors(cpu, metadata=metadata))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    return load_safetensors(Path(path).read_bytes())


def averages(relations: dict[str, dict]) -> dict[str, dict[str, Any]]:
    """Macro (mean over relations, the paper's number) and micro (over facts) averages of every P@1 column."""
    done = [r for r in relations.values() if r.get("status") in ("done", "manual_only", "evaluated")]
    out: dict[str, dict[str, Any]] = {"macro": {}, "micro": {}}
    for key in ("manual_p@1", "test_p@1", "test_p@10", "test_mrr", "dev_p@1"):
        rows = [r for r in done if r.get(key) is not None]
        if not rows:
            continue
        weight = "n_dev" if key.startswith("dev") else "n_test"
        facts = sum(r[weight] for r in rows)
        out["macro"][key] = sum(r[key] for r in rows) / len(rows)
        out["micro"][key] = sum(r[key] * r[weight] for r in rows) / facts if facts else 0.0
    out["macro"]["n_relations"] = len(done)
    out["micro"]["n_test_facts"] = sum(r["n_test"] for r in done)
    return out


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def _mrr(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def render_markdown(payload: dict) -> str:
    lines = [
        f"# P-tuning on LAMA: {payload['model']} ({payload['vocab']})",
        "",
        f"Mode: {payload['mode']}. Protocol: {payload.get('protocol', 'paper')}. Answer vocabulary: "
        f"{payload['vocab']}, {payload['answer_vocab_size']} tokens. P@1 in percent; test at the best dev epoch.",
        "",
        "| relation | label | n test | manual P@1 | dev P@1 | test P@1 | test P@10 | test MRR | best epoch | epochs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rid, r in payload["relations"].items():
        if r.get("status") == "skipped":
            lines.append(f"| {rid} | {r['label']} | skipped: {r['reason']} | | | | | | | |")
            continue
        lines.append(
            f"| {rid} | {r['label']} | {r['n_test']} | {_pct(r.get('manual_p@1'))} | {_pct(r.get('dev_p@1'))} | "
            f"{_pct(r.get('test_p@1'))} | {_pct(r.get('test_p@10'))} | {_mrr(r.get('test_mrr'))} | "
            f"{r.get('best_epoch', '')} | {r.get('epochs_run', '')} |"
        )
    for name in ("macro", "micro"):
        a = payload[name]
        count = f"{a['n_relations']} relations" if name == "macro" else f"{a['n_test_facts']} facts"
        lines.append(
            f"| **{name} average** | {count} | | {_pct(a.get('manual_p@1'))} | {_pct(a.get('dev_p@1'))} | "
            f"**{_pct(a.get('test_p@1'))}** | {_pct(a.get('test_p@10'))} | {_mrr(a.get('test_mrr'))} | | |"
        )
    return "\n".join(lines) + "\n"


class Report:
    """results.json / results.md for one output folder, rewritten atomically after every change."""

    def __init__(self, out_dir: str | Path, header: dict[str, Any]):
        self.out_dir = Path(out_dir)
        self.payload: dict[str, Any] = {**header, "relations": {}}

    def merge(self, updates: dict[str, dict[str, Any]]) -> None:
        """Fold in new fields of some relations, then rewrite both files once."""
        for relation, fields in updates.items():
            self.payload["relations"].setdefault(relation, {}).update(fields)
        self.payload.update(averages(self.payload["relations"]))
        atomic_write_text(self.out_dir / "results.json", json.dumps(self.payload, indent=2) + "\n")
        atomic_write_text(self.out_dir / "results.md", render_markdown(self.payload))


def plot_p_at_1(payload: dict, path: str | Path) -> Path | None:
    """Bar chart of test P@1 per relation, manual prompt next to P-tuned; None when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(rid, r) for rid, r in payload["relations"].items() if r.get("status") in ("done", "manual_only",
                                                                                        "evaluated")]
    if not rows:
        return None
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(rows) + 2), 3.6))
    manual = [100 * (r.get("manual_p@1") or 0) for _, r in rows]
    tuned = [100 * (r.get("test_p@1") or 0) for _, r in rows]
    ax.bar([i - 0.2 for i in x], manual, width=0.4, label=f"manual ({_pct(payload['macro'].get('manual_p@1'))})")
    ax.bar([i + 0.2 for i in x], tuned, width=0.4, label=f"P-tuned ({_pct(payload['macro'].get('test_p@1'))})")
    ax.set_xticks(list(x), [rid for rid, _ in rows], rotation=90, fontsize=7)
    ax.set_ylabel("test P@1 (%)")
    ax.set_title(f"{payload['model']}, {payload['vocab']} (legend: macro average)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)
