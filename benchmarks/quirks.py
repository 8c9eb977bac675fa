"""What each difference between the paper's protocol and THUDM's reference code does to P@1: SmolLM2-135M (causal,
so quirks 1, 3, 4, 5 and 7 apply), a fixed set of 8 relations, 3 seeds per setting.

    python benchmarks/quirks.py --data-dir ../shared/lama [--out runs/quirks] [--seeds 34,35,36]

Three commands (a rerun resumes them; finished units are read back, not trained again):
  frozen/    the LM in eval mode: a sweep of the paper protocol and each per-encoder quirk alone (1: loss at L-2;
             4: latest tie; 5: drop_last with the last epoch unevaluated), x seeds, all units packed together
  dropout/   protocol.lm_dropout (3) on for the whole run (it is the shared LM's mode, so it cannot be a variant):
             a sweep of quirk 3 alone and of the reference protocol's causal quirks (1, 3, 4, 5), x seeds
  manual/    the manual prompt under bpe_spaces (7), the one quirk that changes it (--manual-baseline)
The LM runs in bf16 where the CPU has bf16 matrix units (model.dtype auto; every setting alike), packs of 24 units.
lm_fp16 (6) is left out on a CPU, where float16 is emulated (1.6x slower) and fp16 without loss scaling is a GPU
matter; mask_before_subject (2) needs a masked LM (a tiny random BERT cannot measure it; tests show it runs).

Prints one markdown table: macro test P@1 (percent) mean ± std over seeds, the 95% bootstrap interval, the
difference from the paper protocol paired on test facts and seeds with its interval, and the manual prompt.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ptuning.output import stats  # noqa: E402
from ptuning.output.compare import entries  # noqa: E402
from ptuning.config.sweep import name_of  # noqa: E402

RELATIONS = "P1001,P103,P1376,P138,P176,P36,P37,P407"
BUDGET = ["data.max_train=96", "data.max_dev=48", "data.max_test=200", "train.max_epochs=5", "train.patience=5",
          "train.lr=1e-3", "train.batch_size=8", "model.dtype=auto", "train.pack_units=24", "logging.wandb=false",
          "logging.progress=lines"]
Q1 = {"protocol.causal_loss_shift": True}
Q4 = {"protocol.latest_tie": True}
Q5 = {"protocol.drop_last": True, "protocol.last_epoch_unevaluated": True}
RUNS = {  # folder: (extra --set overrides, the sweep's variants as (row name, overrides, what it means))
    "frozen": ([], [("paper", {}, "the paper protocol (default)"),
                    ("1 causal_loss_shift", Q1, "loss at L-2, evaluation at L-1"),
                    ("4 latest_tie", Q4, "dev ties go to the latest epoch, and reset patience"),
                    ("5 drop_last + last_epoch_unevaluated", Q5, "incomplete batches dropped; dev after epochs "
                                                                 "1..max-1")]),
    "dropout": (["protocol.lm_dropout=true"], [
        ("3 lm_dropout", {}, "the frozen LM's dropout on while prompts train"),
        ("reference (1, 3, 4, 5, 7)", {**Q1, **Q4, **Q5}, "every causal quirk; the manual prompt under 7")]),
}


def _variants_json(variants) -> str:
    import json

    return json.dumps([overrides for _, overrides, _ in variants])


def run(out: Path, data_dir: str, folder: str, seeds: str) -> None:
    extra, variants = RUNS[folder]
    args = [sys.executable, str(REPO / "launcher" / "run.py"), "--relations", RELATIONS, "--data-dir", data_dir,
            "--out", str(out / folder), "--sweep", f"train.seed={seeds}",
            "--set", f"sweep.variants={_variants_json(variants)}"]
    for override in BUDGET + extra + (["train.manual_baseline=false"] if folder != "frozen" else []):
        args += ["--set", override]
    subprocess.run(args, check=True, cwd=REPO)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out", default="runs/quirks")
    parser.add_argument("--seeds", default="34,35,36")
    opts = parser.parse_args(argv)
    out = Path(opts.out)
    for folder in RUNS:
        run(out, opts.data_dir, folder, opts.seeds)
    manual_args = [sys.executable, str(REPO / "launcher" / "run.py"), "--relations", RELATIONS, "--data-dir",
                   opts.data_dir, "--out", str(out / "manual"), "--manual-baseline"]
    for override in BUDGET + ["protocol.bpe_spaces=true"]:
        manual_args += ["--set", override]
    subprocess.run(manual_args, check=True, cwd=REPO)

    rows = {name: (entries(f"{out / folder}:{name_of(overrides)}")[0].setting, meaning)
            for folder, (_, variants) in RUNS.items() for name, overrides, meaning in variants}
    paper = rows["paper"][0]
    manual = {"paper": entries(f"{out / 'frozen'}:manual")[0].setting,
              "bpe_spaces": entries(f"{out / 'manual'}:manual")[0].setting}
    print(f"SmolLM2-135M, LAMA-29k (mapped), relations {RELATIONS}; {', '.join(BUDGET[:8])}; seeds {opts.seeds}")
    print()
    print("| setting | what it changes | macro test P@1, mean ± std | 95% CI | vs paper (paired) | 95% CI | "
          "manual prompt |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, (setting, meaning) in rows.items():
        s = stats.summary(setting)
        d = stats.difference(setting, paper) if name != "paper" else None
        prompt = manual["bpe_spaces" if name.startswith("reference") else "paper"]
        print(f"| {name} | {meaning} | {100 * s['macro_mean']:.1f} ± {100 * s['macro_std']:.1f} | "
              f"[{100 * s['macro_ci95'][0]:.1f}, {100 * s['macro_ci95'][1]:.1f}] | "
              + (f"{100 * d['mean']:+.1f} | [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]" if d else " | ")
              + f" | {100 * stats.summary(prompt)['macro_mean']:.1f} |")
    s = stats.summary(manual["bpe_spaces"])
    d = stats.difference(manual["bpe_spaces"], manual["paper"])
    print(f"| 7 bpe_spaces | manual prompt: ' ' + text, scored after a lone 'Ġ' (P-tuning unchanged) | "
          f"{100 * stats.summary(paper)['macro_mean']:.1f} (the paper row's) | | | | {100 * s['macro_mean']:.1f} "
          f"({100 * d['mean']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}] vs the paper's manual) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
