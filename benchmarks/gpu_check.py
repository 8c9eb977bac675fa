"""The GPU check: one command that measures the whole training path on whatever accelerator is here, with random
weights at the paper's shapes (no checkpoints, no hub: tokenizers are made from LAMA's words).

    make gpu-check                                   # python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --tiny            # tiny shapes, CPU: the smoke test CI runs

Measured side by side in one run, on one device:
- the device's bf16 (fp32 on a CPU) matrix-product rate, the yardstick for model FLOP/s;
- Megatron-11B shapes (TP 1, bf16): build time; for 1, 8 and the auto-packed number of relations, the packed step
  time, peak memory (beside capacity.py's estimate), facts/s and model FLOP/s as a fraction of the measured rate;
  evaluation facts/s;
- GPT2-xl and BERT-base shapes: our step against the raw frozen forward+backward on the same facts; 8 relations
  packed against the same 8 one after another; ours against PEFT's P-tuning (if peft is installed), facts/s;
- Llama-3.1-8B shapes (TP 1, bf16, random weights): packed step time, facts/s and peak memory for 1, 8 and the
  auto-packed number of relations;
- for Megatron (8 and the auto pack), GPT2-xl and BERT-base (8 relations): the step's profile
  (benchmarks/step_profile.py: encoders, LM forward and backward, optimizer, batch building, host syncs) and the
  packed step against the frozen LM's own forward+backward on the same batch;
- the prompt bank alone (8 encoders at BERT-base's and Megatron-11B's shapes): eager against one CUDA graph.
Prints one markdown table and writes the figures as JSON (--out).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from ptuning.model.megatron_backbone import MegatronBackbone  # noqa: E402
from model_parallel.megatron import random_megatron  # noqa: E402
from model_parallel.release import MegatronSpec  # noqa: E402
from ptuning.model import capacity  # noqa: E402
from ptuning.model.backbone import HFBackbone  # noqa: E402
from ptuning.train.batching import collate  # noqa: E402
from ptuning.config import load_config  # noqa: E402
from ptuning.model.stacked import Layout  # noqa: E402
from ptuning.model.encoders import PromptEncoder  # noqa: E402
from ptuning.train.stack import EncoderStack, Settings  # noqa: E402
from step_profile import PHASES, profile  # noqa: E402
from ptuning.data.lama import find_layout, read_relation_infos, select_relations  # noqa: E402
from ptuning.data.synthetic import bert_tokenizer, gpt2_tokenizer, roberta_tokenizer  # noqa: E402
from ptuning.data.tasks import prepare_task, read_relation  # noqa: E402
from ptuning.train.trainer import Trainer  # noqa: E402
from ptuning.data.vocab import build_answer_vocab  # noqa: E402

GIB = 2**30
BATCH = 8  # facts per relation per step, the paper's


class Check:
    def __init__(self, device: torch.device, reps: int, eval_facts: int | None = None):
        self.device, self.reps = device, reps
        self.eval_facts = eval_facts  # test facts per relation for the evaluation figure (None: all of them)
        self.rows: list[tuple[str, str, str]] = []  # (what, figure, note) for the table
        self.figures: dict = {"device": device_name(device)}

    def add(self, key: str, what: str, value, fmt: str, note: str = "") -> None:
        self.figures[key] = value
        self.rows.append((what, format(value, fmt) if isinstance(value, (int, float)) else str(value), note))
        print(f"[gpu-check] {what}: {self.rows[-1][1]} {note}", flush=True)  # a cut-off run still says something

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time(self, fn, warmup: int = 2, reps: int | None = None) -> float:
        """Median seconds of fn over reps, after warm-up."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps or self.reps):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def reset_peak(self) -> None:
        if self.device.type == "cuda":  # a CPU's peak is not measured: no collection to wait for
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> float | None:
        return torch.cuda.max_memory_allocated() / GIB if self.device.type == "cuda" else None

    def table(self) -> str:
        lines = [f"GPU check on {self.figures['device']}", "", "| what | figure | note |", "|---|---:|---|"]
        lines += [f"| {w} | {v} | {n} |" for w, v, n in self.rows]
        return "\n".join(lines)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores)"


def matmul_rate(check: Check, dtype: torch.dtype, n: int) -> float:
    a = torch.randn(n, n, device=check.device, dtype=dtype)
    b = torch.randn(n, n, device=check.device, dtype=dtype)
    return 2 * n**3 / check.time(lambda: a @ b)


def tasks_for(tokenizer, vocab_size: int, relations: list[str], layout, vocab_key: str, cfg):
    infos = read_relation_infos(layout)
    vocab = build_answer_vocab(tokenizer, vocab_size, "shared", layout, vocab_key)
    tasks = [prepare_task(infos[r], read_relation(layout, r), vocab, cfg.data) for r in relations]
    return [t for t in tasks if t.skip_reason is None], vocab


def fresh_runs(trainer: Trainer, tasks) -> list:
    runs = trainer.prepare(tasks)
    for run in runs:
        run.order = run.order[:BATCH]  # the same facts every step
    return runs


def step_fn(trainer: Trainer, runs: list):
    def step() -> None:
        for run in runs:
            run.cursor = 0
        trainer.step(runs)
    return step


def step_tokens(runs: list) -> int:
    return sum(len(run.rows["train"][i].ids) for run in runs for i in run.order[:BATCH])


def add_profile(check: Check, key: str, what: str, trainer: Trainer, runs: list) -> None:
    """benchmarks/step_profile.py's breakdown of one packed step, and the step against the frozen LM's own
    forward and backward on the same packed batch (the yardstick: how close to the LM's cost the step is)."""
    parts = profile(trainer, runs, BATCH, reps=check.reps)
    check.figures[f"{key}_profile_ms"] = parts
    phases = ", ".join(f"{p} {parts[p]:.1f}" for p in PHASES)
    batch = parts["batch building (in LM forward)"]
    syncs = parts.get("host syncs per step")
    check.add(f"{key}_step_over_lm", f"{what}: packed step / LM forward+backward alone", parts["step / LM only"],
              ".2f", f"(target <= 1.25); ms per step: {phases}; batch building {batch:.1f}"
                     + (f"; host syncs per step {syncs:.0f}" if syncs is not None else ""))


def check_bank_graph(check: Check, name: str, n_pseudo: int, hidden: int, units: int) -> None:
    """The prompt bank's forward, backward and Adam step for `units` encoders of one shape, eager against one
    captured CUDA graph (a measurement for deciding whether the trainer should capture it)."""
    layout = Layout.of("lstm", n_pseudo, hidden)
    init = PromptEncoder(n_pseudo, hidden, "lstm").state_dict()
    stack = EncoderStack(layout, [init] * units, [Settings(1e-5, 5e-4, 0.0, i) for i in range(units)], check.device)
    grad = torch.randn(units, n_pseudo, hidden, device=check.device)
    rows = list(range(units))

    def step() -> None:
        stack(training=True).backward(grad)
        stack.step(rows)
        stack.release_grad()

    eager = check.time(step)
    if check.device.type != "cuda":
        check.add(f"bank_{name}_ms", f"bank, {units} x {name} encoders (hidden {hidden}): forward, backward, Adam",
                  eager * 1e3, ".1f", "ms (no CUDA graph on a CPU)")
        return
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # graph capture wants its warm-up off the default stream
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    replay = check.time(graph.replay)
    check.add(f"bank_{name}_graph_speedup", f"bank, {units} x {name} encoders (hidden {hidden}): eager / CUDA graph",
              eager / replay,
              ".2f", f"x; {eager * 1e3:.2f} ms eager, {replay * 1e3:.2f} ms replayed")


def check_megatron(check: Check, spec: MegatronSpec, layout, relations: list[str], tokenizer, auto_cap: int) -> None:
    dtype = torch.bfloat16 if check.device.type == "cuda" else torch.float32
    check.reset_peak()
    start = time.perf_counter()
    model = random_megatron(spec, 1, dtype, check.device)
    check.sync()
    check.add("megatron_build_s", f"Megatron {spec.layers} layers, hidden {spec.hidden}: build on the device",
              time.perf_counter() - start, ".1f", f"s; {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B "
              f"parameters, {str(dtype).split('.')[-1]} random weights made in place (meta -> device)")
    backbone = MegatronBackbone(model, tokenizer)
    cfg = load_config(None, ["prompt.template=[3,3,0]", f"train.batch_size={BATCH}"])
    tasks, vocab = tasks_for(tokenizer, backbone.vocab_size, relations, layout, "roberta-large", cfg)
    trainer = Trainer(backbone, cfg, vocab.allowed)
    plan = capacity.plan_for(backbone, cfg, 1)
    auto = min(plan.units if plan.units is not None else len(tasks), len(tasks), auto_cap)
    check.add("megatron_auto", "Megatron: relations that pack (auto)", auto, "d", plan.reason)
    shape = capacity.shape_of(backbone)
    dense = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)
    for n in dict.fromkeys([1, min(8, len(tasks)), auto]):
        if n < 1:
            continue
        check.reset_peak()
        base = torch.cuda.memory_allocated() / GIB if check.device.type == "cuda" else None
        runs = fresh_runs(trainer, tasks[:n])
        seconds = check.time(step_fn(trainer, runs))
        tokens = step_tokens(runs)
        # forward and backward to the inputs only (the LM is frozen): two matrix products per weight and token
        flops = 4 * dense * tokens + 4 * BATCH * n * shape.hidden * shape.vocab
        peak = check.peak()
        estimate = (n * capacity.activation_bytes(shape, BATCH, capacity.step_tokens((3, 3, 0)), 1,
                                                  2 if dtype != torch.float32 else 4)
                    + n * capacity.device_encoder_bytes(trainer.forward.layout(runs[0].cfg, runs[0].n_pseudo).size)) / GIB
        check.add(f"megatron_step_s_{n}", f"Megatron: packed step, {n} relation(s), {BATCH * n} facts", seconds,
                  ".3f", f"s; {BATCH * n / seconds:.0f} facts/s; {flops / seconds / check.figures['matmul_flops']:.1%}"
                         f" of the measured matmul rate ({flops / seconds / 1e12:.1f} TFLOP/s, {tokens} tokens)")
        check.figures[f"megatron_facts_per_s_{n}"] = BATCH * n / seconds
        check.figures[f"megatron_mfu_{n}"] = flops / seconds / check.figures["matmul_flops"]
        if peak is not None:
            check.add(f"megatron_peak_gib_{n}", f"Megatron: peak memory, {n} relation(s)", peak, ".1f",
                      f"GiB; weights {base:.1f} GiB, so {peak - base:.1f} GiB for the relations (estimate "
                      f"{estimate:.1f} GiB)")
        if n > 1:
            add_profile(check, f"megatron_{n}", f"Megatron, {n} relations", trainer, runs)
        if n == min(8, len(tasks)):
            items = [(v, r.rows["test"][:check.eval_facts]) for v, r in zip(_vectors(trainer, runs), runs)]
            facts = sum(len(rows) for _, rows in items)
            seconds = check.time(partial(trainer.forward.ranks, items), warmup=1, reps=1)  # thousands of facts: once
            check.add("megatron_eval_facts_per_s", f"Megatron: evaluation, {n} relations' test facts",
                      facts / seconds, ".0f", f"facts/s ({facts} facts, {cfg.train.eval_batch_size} a forward)")
        del runs
    del trainer, backbone, model
    check.reset_peak()


def check_llama(check: Check, config, layout, relations: list[str], tokenizer) -> None:
    """An 8B-class Llama (random bf16 weights made on the device) at TP 1: packed step time, facts/s and peak
    memory for 1, 8 and the auto-packed number of relations (issue: Hugging Face models bigger than one GPU)."""
    from transformers import LlamaForCausalLM

    dtype = torch.bfloat16 if check.device.type == "cuda" else torch.float32
    check.reset_peak()
    start = time.perf_counter()
    with torch.device(check.device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    check.sync()
    count = sum(p.numel() for p in model.parameters())
    check.add("llama_build_s", f"Llama {config.num_hidden_layers} layers, hidden {config.hidden_size}: random "
              "weights on the device", time.perf_counter() - start, ".1f", f"s; {count / 1e9:.2f}B parameters")
    backbone = HFBackbone(model, tokenizer, "causal")
    cfg = load_config(None, ["prompt.template=[3,3,0]", f"train.batch_size={BATCH}"])
    tasks, vocab = tasks_for(tokenizer, backbone.vocab_size, relations, layout, "gpt2-xl", cfg)
    trainer = Trainer(backbone, cfg, vocab.allowed)
    plan = capacity.plan_for(backbone, cfg, 1)
    auto = min(plan.units if plan.units is not None else len(tasks), len(tasks))
    for n in dict.fromkeys([1, min(8, len(tasks)), auto]):
        check.reset_peak()
        runs = fresh_runs(trainer, tasks[:n])
        seconds = check.time(step_fn(trainer, runs))
        check.add(f"llama_step_s_{n}", f"Llama: packed step, {n} relation(s), {BATCH * n} facts", seconds, ".3f",
                  f"s; {BATCH * n / seconds:.0f} facts/s")
        peak = check.peak()
        if peak is not None:
            check.add(f"llama_peak_gib_{n}", f"Llama: peak memory, {n} relation(s)", peak, ".1f", "GiB")
        del runs
    del trainer, backbone, model
    check.reset_peak()


def _vectors(trainer: Trainer, runs: list) -> list:
    with torch.no_grad():
        return trainer.forward.vectors(runs)


def check_hf(check: Check, name: str, model, tokenizer, kind: str, layout, relations: list[str]) -> None:
    counts = "[3,3,0]" if kind == "causal" else "[3,3,3]"
    backbone = HFBackbone(model, tokenizer, kind)
    cfg = load_config(None, [f"prompt.template={counts}", f"train.batch_size={BATCH}", "train.lr=1e-4"])
    key = "bert-base-cased" if kind == "masked" else "gpt2-xl"
    tasks, vocab = tasks_for(tokenizer, backbone.vocab_size, relations, layout, key, cfg)
    trainer = Trainer(backbone, cfg, vocab.allowed)
    runs = fresh_runs(trainer, tasks[:8])
    one = check.time(step_fn(trainer, runs[:1]))

    # the raw frozen model on the same facts: one padded fact per row, prompts filled once, all logits
    rows = [runs[0].rows["train"][i] for i in runs[0].order]
    batch = collate(rows, [0] * len(rows), [0], backbone.pad_id, backbone.padding_side, 0, backbone.device)
    with torch.no_grad():
        fixed = backbone.embed(batch.ids)
    kwargs = backbone.forward_kwargs(batch.layout)

    def raw() -> None:
        embeds = fixed.clone().requires_grad_(True)
        logits = model(inputs_embeds=embeds, **kwargs).logits[batch.layout.target_row, batch.layout.target_col]
        F.cross_entropy(logits.float(), batch.labels).backward()

    raw_s = check.time(raw)
    check.add(f"{name}_step_over_raw", f"{name}: our step / raw frozen forward+backward", one / raw_s, ".2f",
              f"{one * 1e3:.1f} ms against {raw_s * 1e3:.1f} ms, {BATCH} facts")
    packed = check.time(step_fn(trainer, runs))
    add_profile(check, f"{name}_8", f"{name}, {len(runs)} relations", trainer, runs)
    alone = sum(check.time(step_fn(trainer, [run])) for run in runs)
    check.add(f"{name}_packing_speedup", f"{name}: {len(runs)} relations packed against one after another",
              alone / packed, ".2f", f"x (target >= 5x); {BATCH * len(runs) / packed:.0f} against "
                                     f"{BATCH * len(runs) / alone:.0f} facts/s")
    check.figures[f"{name}_facts_per_s_packed"] = BATCH * len(runs) / packed
    check.figures[f"{name}_facts_per_s_one"] = BATCH / one
    if kind == "causal":
        peft = peft_facts_per_s(check, model, backbone, rows)
        if peft is None:
            check.rows.append((f"{name}: PEFT P-tuning", "-", "peft is not installed here"))
        else:
            check.add(f"{name}_peft_facts_per_s", f"{name}: PEFT P-tuning (LSTM, 6 virtual tokens)", peft, ".0f",
                      f"facts/s against ours {BATCH / one:.0f} (one relation) and "
                      f"{BATCH * len(runs) / packed:.0f} (8 packed)")
    del runs, trainer, backbone
    check.reset_peak()


def peft_facts_per_s(check: Check, model, backbone, rows) -> float | None:
    """PEFT's P-tuning on the same facts (its virtual tokens before the subject), one relation per model."""
    try:
        from peft import PromptEncoderConfig, TaskType, get_peft_model
    except ImportError:
        return None
    peft_model = get_peft_model(model, PromptEncoderConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=6, encoder_hidden_size=backbone.hidden_size,
        encoder_reparameterization_type="LSTM"))
    peft_model.base_model.eval()
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4,
                                 fused=check.device.type in ("cpu", "cuda"))
    pad = backbone.pad_id
    seqs = [[i for i, p in zip(r.ids, r.pseudo) if p < 0] + [r.label] for r in rows]  # subject and object
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=check.device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=check.device)
    labels = torch.tensor([[-100] * (len(s) - 1) + [s[-1]] + [-100] * (width - len(s)) for s in seqs],
                          device=check.device)

    def step() -> None:
        peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return len(rows) / check.time(step)


def guarded(check: Check, name: str, fn) -> None:
    """One section's failure is reported in the table and the JSON, and the other sections still run: a GPU
    lease is too short to lose every figure to one error."""
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - reported, with its traceback
        traceback.print_exc()
        check.figures.setdefault("errors", {})[name] = f"{type(error).__name__}: {error}"
        check.rows.append((f"{name}: FAILED", "-", f"{type(error).__name__}: {str(error)[:200]}"))
    check.reset_peak()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU smoke test)")
    parser.add_argument("--data-dir", default=os.environ.get("LAMA_DATA") or str(REPO.parent / "shared" / "lama"))
    parser.add_argument("--out", default="runs/gpu_check.json")
    parser.add_argument("--megatron-layers", type=int, help="fewer than 72 to fit a smaller GPU")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--auto-cap", type=int, default=41, help="at most this many relations for the auto pack")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    check = Check(device, 2 if args.tiny else args.reps, 64 if args.tiny else None)
    layout = find_layout(args.data_dir)
    relations = select_relations(layout, None)[:8 if args.tiny else None]  # tiny: no tokenizer for all 41
    started = time.perf_counter()

    rate_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    check.figures["matmul_flops"] = matmul_rate(check, rate_dtype, 256 if args.tiny else 8192)
    check.add("matmul_tflops", f"matrix product rate ({str(rate_dtype).split('.')[-1]})",
              check.figures["matmul_flops"] / 1e12, ".1f", "TFLOP/s, measured here")

    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaConfig

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    some = relations[:8]
    if args.tiny:
        spec = MegatronSpec(layers=2, hidden=64, ffn=256, heads=8, vocab_size=40064, max_positions=128)
        gpt2 = GPT2Config(n_embd=32, n_layer=2, n_head=2)
        bert = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
        llama = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2)
    else:
        spec = MegatronSpec(layers=args.megatron_layers or 72)
        gpt2 = GPT2Config(n_embd=1600, n_layer=48, n_head=25)  # GPT2-xl
        bert = BertConfig(vocab_size=28996)  # BERT-base, cased
        llama = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=8, tie_word_embeddings=False)  # Llama-3.1-8B's shapes
    megatron_tok = roberta_tokenizer(layout.root, relations)
    causal_tok = gpt2_tokenizer(layout.root, some)  # GPT-2's and Llama's
    guarded(check, "Megatron", lambda: check_megatron(check, spec, layout, relations, megatron_tok,
                                                      8 if args.tiny else args.auto_cap))
    for name, config, build, tokenizer, kind in (
            ("GPT2-xl" if not args.tiny else "GPT-2 tiny", gpt2, GPT2LMHeadModel, causal_tok, "causal"),
            ("BERT-base" if not args.tiny else "BERT tiny", bert, BertForMaskedLM, bert_tokenizer(layout.root, some),
             "masked")):
        config.vocab_size = max(config.vocab_size, len(tokenizer))

        def run_one() -> None:
            with torch.device(device):
                model = build(config).to(dtype).eval()
            check_hf(check, name.split()[0].lower().replace("-", ""), model, tokenizer, kind, layout, some)

        guarded(check, name, run_one)
    llama.vocab_size = len(causal_tok)
    llama.bos_token_id, llama.eos_token_id = causal_tok.bos_token_id, causal_tok.eos_token_id
    guarded(check, "Llama", lambda: check_llama(check, llama, layout, some, causal_tok))
    for name, n_pseudo, hidden in (("BERT-base", 9, 768), ("Megatron-11B", 6, 3072)):
        if args.tiny:
            name, hidden = f"{name} (tiny)", 32
        guarded(check, f"bank {name}", lambda: check_bank_graph(check, name.split()[0], n_pseudo, hidden, 8))
    check.figures["seconds"] = time.perf_counter() - started
    check.rows.append(("whole check", f"{check.figures['seconds']:.0f}", "s"))
    print(check.table())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(check.figures, indent=2) + "\n")
    print(f"figures: {args.out}")
    if check.figures.get("errors"):
        sys.exit(1)


if __name__ == "__main__":
    main()
