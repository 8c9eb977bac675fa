"""A tiny checkpoint in the exact layout of fairseq's Megatron-11B release: 8 parts named
model-model_part-{i}.pt, each {'args': argparse.Namespace, 'model': tensors split for model parallel size 8 under
fairseq's names (plus the _float_tensor and version entries)}, a dict.txt, and a byte-level BPE tokenizer whose
ids are the dictionary's (<s>, <pad>, </s>, <unk>, then dict.txt order), as RoBERTa's are for the real one."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from model_parallel.release import N_PARTS, PART, MegatronSpec, split_dim
from model_parallel.megatron import MegatronLM

SPEC = MegatronSpec(layers=2, hidden=64, ffn=256, heads=8, vocab_size=512, max_positions=128)
ARGS = argparse.Namespace(arch="transformer_lm_megatron_11b", decoder_layers=2, decoder_embed_dim=64,
                          decoder_ffn_embed_dim=256, decoder_attention_heads=8, activation_fn="gelu",
                          decoder_normalize_before=True, no_scale_embedding=False,
                          share_decoder_input_output_embed=True, max_target_positions=128, model_parallel_size=8,
                          dropout=0.1, attention_dropout=0.1)


def tokenizer(lama: Path, folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = []
    for rel in ("P1376", "P36", "P37"):
        for split in ("train", "dev", "test"):
            for line in (lama / "fact-retrieval" / "original" / rel / f"{split}.jsonl").open():
                record = json.loads(line)
                words += [record["obj_label"]] * 3 + [record["sub_label"]]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([f"a {w}" for w in words], trainer=trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", pad_token="<pad>", eos_token="</s>",
                                  unk_token="<unk>")
    tok.save_pretrained(folder)
    return tok


def dense_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = MegatronLM(SPEC)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias") or "norm" in name:
                p.copy_(0.05 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.5 if "embed" in name else 0.15))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def write_release(lama: Path, root: Path, args: argparse.Namespace = ARGS,
                  tied_projection: bool = False) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """(release folder, tokenizer folder, the dense state the parts were cut from). tied_projection: each part
    also holds decoder.output_projection.weight, the same tensor as its embed_tokens slice, as fairseq >= 0.10
    saves it."""
    release, tok_dir = root / "release", root / "tokenizer"
    release.mkdir(parents=True)
    tok = tokenizer(lama, tok_dir)
    assert len(tok) <= SPEC.vocab_size
    (release / "dict.txt").write_text("".join(f"{i} {1000 - i}\n" for i in range(4, len(tok))))
    state = dense_state()
    for part in range(N_PARTS):
        model = {"decoder.embed_positions._float_tensor": torch.tensor([]), "decoder.version": torch.tensor([3.0])}
        for name, tensor in state.items():
            dim = split_dim(name)
            model["decoder." + name] = (tensor.clone() if dim is None
                                        else tensor.chunk(N_PARTS, dim=dim)[part].clone())
        if tied_projection:
            model["decoder.output_projection.weight"] = model["decoder.embed_tokens.weight"]
        torch.save({"args": args, "model": model, "optimizer_history": []}, release / PART.format(part))
    return release, tok_dir, state
