"""Answer vocabularies: which token ids may be predicted, and which objects are answerable.

Strategies (data.vocab):
  original  the tokenizer's full vocabulary: any object that is one token
  shared    29k-vocab.json: LAMA-29k (objects in the BERT, RoBERTa and GPT-2 vocabularies)
  lama      34k-vocab.json: LAMA-34k (the BERT vocabulary)

The vocab files hold word lists for bert-base-cased, bert-large-cased, roberta-large and gpt2-xl. For any other
tokenizer the word list is mapped into it: a word is allowed where it is ONE token of that tokenizer when written
mid-sentence, that is with the tokenizer's own leading-space convention (WordPiece: none; byte-level BPE: 'Ġ';
SentencePiece: '▁'), which is how an object follows the prompt.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ptuning.data.lama import VOCAB_NAMES, LamaLayout, read_vocab_words

VOCAB_KEYS = ("bert-base-cased", "bert-large-cased", "roberta-large", "gpt2-xl")
_ANCHOR = "a"  # a word that every tokenizer has; what follows it is encoded as mid-sentence text


def encode_in_context(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text as it reads after a space in the middle of a sentence."""
    if not texts:
        return []
    prefix = tokenizer(_ANCHOR, add_special_tokens=False)["input_ids"]
    joined = tokenizer([f"{_ANCHOR} {t}" for t in texts], add_special_tokens=False)["input_ids"]
    out = []
    for text, ids in zip(texts, joined):
        if ids[: len(prefix)] == prefix:
            out.append(ids[len(prefix):])
        else:  # the anchor merged with the text: fall back to the text with a leading space
            out.append(tokenizer(" " + text, add_special_tokens=False)["input_ids"])
    return out


def default_vocab_key(model_name: str) -> str:
    """The word list of the vocab file that fits a model family; other tokenizers get the BERT list mapped."""
    name = model_name.lower()
    for key in VOCAB_KEYS:
        if key in name:
            return key
    if "roberta" in name or "megatron" in name:
        return "roberta-large"
    if "gpt2" in name:
        return "gpt2-xl"
    if "bert-large" in name:
        return "bert-large-cased"
    return "bert-base-cased"


@dataclass
class AnswerVocab:
    name: str  # LAMA-29k, LAMA-34k, or the full model vocabulary
    allowed: torch.Tensor  # bool (vocab_size,): the ids a prediction may take
    word_ids: dict[str, int] | None  # restricted strategies: allowed word -> its one token id
    tokenizer: object

    @property
    def size(self) -> int:
        return int(self.allowed.sum())

    def __post_init__(self):
        self.id_words = {i: w for w, i in (self.word_ids or {}).items()}

    def words(self, ids: list[int]) -> list[str]:
        """The answer word of each id: the vocabulary file's word where there is one, else the decoded token."""
        return [self.id_words.get(i) or self.tokenizer.decode([i]).strip() for i in ids]

    def object_ids(self, words: list[str]) -> list[int | None]:
        """The answer id of each object word, or None where the object cannot be answered in this vocabulary."""
        if self.word_ids is not None:
            return [self.word_ids.get(w) for w in words]
        out = []
        for ids in encode_in_context(self.tokenizer, words):
            out.append(ids[0] if len(ids) == 1 and bool(self.allowed[ids[0]]) else None)
        return out


def build_answer_vocab(
    tokenizer, vocab_size: int, strategy: str, layout: LamaLayout | None, vocab_key: str
) -> AnswerVocab:
    special = set(tokenizer.all_special_ids)
    if strategy == "original":
        allowed = torch.ones(vocab_size, dtype=torch.bool)
        allowed[len(tokenizer):] = False  # rows the model pads its head with have no token
        for i in special:
            if i < vocab_size:
                allowed[i] = False
        return AnswerVocab(VOCAB_NAMES[strategy], allowed, None, tokenizer)
    words = list(dict.fromkeys(read_vocab_words(layout, strategy, vocab_key)))
    word_ids = {}
    for word, ids in zip(words, encode_in_context(tokenizer, words)):
        if len(ids) == 1 and ids[0] not in special and ids[0] < vocab_size:
            word_ids[word] = ids[0]
    allowed = torch.zeros(vocab_size, dtype=torch.bool)
    allowed[torch.tensor(list(word_ids.values()), dtype=torch.long)] = True
    return AnswerVocab(VOCAB_NAMES[strategy], allowed, word_ids, tokenizer)


def answer_vocab(cfg, backbone, layout) -> tuple[AnswerVocab, str]:
    """The configured answer vocabulary in the backbone's tokenizer, and the vocab file's word list it came from
    (data.vocab_key, or the one that fits the model family)."""
    vocab_key = vocab_key_of(cfg)
    vocab = build_answer_vocab(backbone.tokenizer, backbone.vocab_size, cfg.data.vocab,
                               layout if cfg.data.uses_vocab_file else None, vocab_key)
    return vocab, vocab_key


def vocab_key_of(cfg) -> str:
    """The vocab file's word list to read: data.vocab_key, or the one that fits the model family."""
    return cfg.data.vocab_key or default_vocab_key(Path(cfg.model.name).name)
