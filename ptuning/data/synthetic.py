"""Tokenizers made from LAMA's own words, for tests and benchmarks on machines with no model hub: with them a
random model of any shape runs the whole path (tokenize, filter answers, train, score) on real facts."""
from __future__ import annotations

import json
from pathlib import Path


def lama_words(lama: Path, relations: list[str]) -> list[str]:
    """The 29k and 34k word lists plus every word of the given relations' subjects and of the templates."""
    words = list(dict.fromkeys(json.loads((lama / "vocab" / "29k-vocab.json").read_text())["bert-base-cased"]
                               + json.loads((lama / "vocab" / "34k-vocab.json").read_text())["bert-base-cased"]))
    extra = set()
    for rel in relations:
        for split in ("train", "dev", "test"):
            for line in (lama / "fact-retrieval" / "original" / rel / f"{split}.jsonl").open():
                extra.update(json.loads(line)["sub_label"].replace("-", " ").split())
    for line in (lama / "relations.jsonl").open():
        extra.update(json.loads(line)["template"].replace("[X]", " ").replace("[Y]", " ").split())
    return words + sorted(extra - set(words))


def byte_bpe(lama: Path, relations: list[str], specials: list[str], vocab_size: int = 40000):
    """A byte-level BPE ('Ġ' convention, as GPT-2 and RoBERTa) trained on the LAMA words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([f"a {w}" for w in lama_words(lama, relations)] * 2, trainer=trainer)
    return tok


def gpt2_tokenizer(lama: Path, relations: list[str]):
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast(tokenizer_object=byte_bpe(lama, relations, ["<|endoftext|>"]),
                             bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")


def roberta_tokenizer(lama: Path, relations: list[str]):
    from transformers import RobertaTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    return RobertaTokenizerFast(tokenizer_object=byte_bpe(lama, relations, specials), bos_token="<s>",
                                eos_token="</s>", sep_token="</s>", cls_token="<s>", unk_token="<unk>",
                                pad_token="<pad>", mask_token="<mask>")


def bert_tokenizer(lama: Path, relations: list[str]):
    """WordPiece whose vocabulary holds every LAMA word whole."""
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ","]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + lama_words(lama, relations)))}
    return BertTokenizerFast(vocab=vocab, do_lower_case=False)  # vocab=, not vocab_file= (transformers 5)
