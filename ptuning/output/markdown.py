"""results.md: the run's tables in Markdown, rendered from results.json's payload (ptuning/output/results.py)."""
from __future__ import annotations


def pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def _bold(text: str) -> str:
    return f"**{text}**" if text else ""  # a manual-only run has no test P@1 to stand out


def _mrr(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _ci(interval: list[float] | None) -> str:
    return "" if not interval else f"[{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def _signed(value: float) -> str:
    return f"{100 * value:+.1f}"


def render_markdown(payload: dict) -> str:
    lines = [
        f"# P-tuning on LAMA: {payload['model']} ({payload['vocab']})",
        "",
        f"Mode: {payload['mode']}. Protocol: {payload.get('protocol', 'paper')}. Answer vocabulary: "
        f"{payload['vocab']}, {payload['answer_vocab_size']} tokens. P@1 in percent; test at the best dev epoch.",
        *([f"Control {payload['control']}: the model's architecture and tokenizer with freshly initialised weights "
           f"(seed {payload['config']['train']['seed']}): what the training facts alone teach."]
          if payload.get("control", "none") != "none" else []),
        "",
    ]
    if payload.get("variants"):
        return "\n".join(lines + _sweep_tables(payload)) + "\n"
    lines += [
        "| relation | label | n test | manual P@1 | dev P@1 | test P@1 | test P@10 | test MRR | best epoch | epochs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rid, r in payload["relations"].items():
        if r.get("status") == "skipped":
            lines.append(f"| {rid} | {r['label']} | skipped: {r['reason']} | | | | | | | |")
            continue
        lines.append(
            f"| {rid} | {r['label']} | {r['n_test']} | {pct(r.get('manual_p@1'))} | {pct(r.get('dev_p@1'))} | "
            f"{pct(r.get('test_p@1'))} | {pct(r.get('test_p@10'))} | {_mrr(r.get('test_mrr'))} | "
            f"{r.get('best_epoch', '')} | {r.get('epochs_run', '')} |"
        )
    for name in ("macro", "micro"):
        a = payload[name]
        count = f"{a['n_relations']} relations" if name == "macro" else f"{a['n_test_facts']} facts"
        lines.append(
            f"| **{name} average** | {count} | | {pct(a.get('manual_p@1'))} | {pct(a.get('dev_p@1'))} | "
            f"{_bold(pct(a.get('test_p@1')))} | {pct(a.get('test_p@10'))} | {_mrr(a.get('test_mrr'))} | | |"
        )
    setting = (payload.get("statistics") or {}).get("settings", {}).get("")
    if setting:
        lines += ["", f"Macro test P@1 {pct(setting['macro_mean'])}, 95% CI {_ci(setting['macro_ci95'])} "
                      "(bootstrap over the test facts of each relation)"
                  + (f"; gain over the manual prompt {_signed(setting['gain_over_manual']['mean'])}, 95% CI "
                     f"{_ci(setting['gain_over_manual']['ci95'])} (paired on the same facts)."
                     if setting.get("gain_over_manual") else ".")]
    return "\n".join(lines + _controls_table(payload, payload["relations"])) + "\n"


def _controls_table(payload: dict, relations: dict[str, dict]) -> list[str]:
    """Recall or a learned guess (ptuning/data/controls.py): per relation, the controls beside its P@1."""
    if not any("majority_object" in r for r in relations.values()):
        return []  # a folder from before the controls
    lines = ["", "Probing controls: the majority baseline (always the training split's most frequent object), how "
             "often the P-tuned top-1 is that object, the share of test facts whose object is in the subject's name, "
             "and P@1 on the UHN subset (those facts removed: LAMA-UHN's string rule).", "",
             "| relation | majority object | majority P@1 | P-tuned top-1 = majority | in subject | n UHN | "
             "manual UHN P@1 | P-tuned UHN P@1 |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for rid, r in relations.items():
        if r.get("status") != "skipped":
            lines.append(f"| {rid} | {r['majority_object']} | {pct(r.get('majority_p@1'))} | "
                         f"{pct(r.get('prior_share'))} | {pct(r.get('in_subject'))} | {r.get('n_uhn', '')} | "
                         f"{pct(r.get('manual_uhn_p@1'))} | {pct(r.get('test_uhn_p@1'))} |")
    for name in ("macro", "micro"):
        a = payload.get(name, {})  # the averages of the same rows (results.averages)
        lines.append(f"| **{name} average** | | {pct(a.get('majority_p@1'))} | {pct(a.get('prior_share'))} | "
                     f"{pct(a.get('in_subject'))} | | {pct(a.get('manual_uhn_p@1'))} | "
                     f"{_bold(pct(a.get('test_uhn_p@1')))} |")
    statistics = payload.get("statistics") or {}
    said = []
    if statistics.get("majority"):
        said.append(f"majority baseline macro {pct(statistics['majority']['macro_mean'])} "
                    f"{_ci(statistics['majority']['macro_ci95'])}")
    if (statistics.get("manual") or {}).get("uhn"):
        said.append(f"manual prompt on UHN {pct(statistics['manual']['uhn']['macro_mean'])} "
                    f"{_ci(statistics['manual']['uhn']['macro_ci95'])}")
    for name, s in statistics.get("settings", {}).items():
        if s.get("uhn"):
            gain = s["uhn"].get("gain_over_manual")
            said.append(f"P-tuned{f' ({_setting_label(name)})' if name else ''} on UHN {pct(s['uhn']['macro_mean'])} "
                        f"{_ci(s['uhn']['macro_ci95'])}"
                        + (f", gain over manual {_signed(gain['mean'])} {_ci(gain['ci95'])}" if gain else ""))
    if said:
        lines += ["", "Macro, 95% bootstrap intervals: " + "; ".join(said) + "."]
    return lines


def _setting_label(name: str) -> str:
    """A sweep's settings are named by what they override; the one overriding nothing is the run's own."""
    return name or "(the run settings)"


def _sweep_tables(payload: dict) -> list[str]:
    stats = payload.get("statistics") or {}
    settings = stats.get("settings", {})
    lines = [f"A sweep of {len(payload['variants'])} variants: every relation trained under each (a unit each, "
             "packed together). Settings pool their seeds: mean ± standard deviation over seeds, and a 95% bootstrap "
             "interval resampling test facts within relations and seeds.", "",
             "| setting | seeds | macro test P@1 | 95% CI | micro test P@1 | 95% CI | gain over manual | 95% CI |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    manual = stats.get("manual")
    if manual:
        lines.append(f"| manual prompt | | {pct(manual['macro_mean'])} | {_ci(manual['macro_ci95'])} | "
                     f"{pct(manual['micro_mean'])} | {_ci(manual.get('micro_ci95'))} | | |")
    for name, s in settings.items():
        gain = s.get("gain_over_manual") or {}
        seeds = ", ".join(map(str, s["seeds"]))
        lines.append(f"| {_setting_label(name)} | {seeds} | {pct(s['macro_mean'])} ± "
                     f"{100 * s['macro_std']:.1f} | {_ci(s['macro_ci95'])} | {pct(s['micro_mean'])} | "
                     f"{_ci(s.get('micro_ci95'))} | "
                     f"{_signed(gain['mean']) if gain else ''} | {_ci(gain.get('ci95'))} |")
    lines.append(f"| best variant per relation, chosen on dev | | {pct(payload['macro'].get('test_p@1'))} | | "
                 f"{pct(payload['micro'].get('test_p@1'))} | | | |")
    for name, diff in stats.get("against_first", {}).items():
        first = _setting_label(next(iter(settings)))
        lines += ["", f"{_setting_label(name)} against {first}: macro {_signed(diff['mean'])}, 95% CI "
                      f"{_ci(diff['ci95'])} (paired on facts{' and seeds' if diff['paired_seeds'] else ''})."]
    lines += ["", "Per relation, test P@1 (mean ± standard deviation over seeds):", "",
              "| relation | label | n test | manual | " + " | ".join(map(_setting_label, settings))
              + " | best on dev (variant) |",
              "|---|---|---:|---:|" + "---:|" * len(settings) + "---|"]
    for rid, r in payload["relations"].items():
        if r.get("status") == "skipped":
            lines.append(f"| {rid} | {r['label']} | skipped: {r['reason']} |" + " |" * (len(settings) + 2))
            continue
        cells = []
        for s in settings.values():
            spread = s["relations"].get(rid)
            cells.append(f"{pct(spread['mean'])} ± {100 * spread['std']:.1f}" if spread else "")
        best = payload.get("best_on_dev", {}).get(rid)
        chosen = (r.get("variants") or {}).get(best, {})
        lines.append(f"| {rid} | {r['label']} | {r['n_test']} | {pct(r.get('manual_p@1'))} | " + " | ".join(cells)
                     + f" | {pct(chosen.get('test_p@1'))} ({best or ''}) |")
    lines += ["", "Per variant:", "", "| variant | macro test P@1 | micro test P@1 | macro dev P@1 |",
              "|---|---:|---:|---:|"]
    for name, v in payload["variants"].items():
        lines.append(f"| {name} | {pct(v['macro'].get('test_p@1'))} | {pct(v['micro'].get('test_p@1'))} | "
                     f"{pct(v['macro'].get('dev_p@1'))} |")
    # the controls of each relation's variant chosen on dev, like the headline
    best = payload.get("best_on_dev", {})
    chosen = {rid: {**{k: v for k, v in r.items() if k != "variants"}, **(r.get("variants") or {}).get(best.get(rid), {})}
              for rid, r in payload["relations"].items()}
    return lines + _controls_table(payload, chosen)
