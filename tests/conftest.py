"""Shared fixtures: the LAMA data in ../shared/lama (or $LAMA_DATA) and tiny random models saved as real Hugging Face
folders, with tokenizers built from LAMA's own words so that the whole path (tokenize, filter, train, score) runs.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from ptuning.data.synthetic import bert_tokenizer, gpt2_tokenizer, roberta_tokenizer

REPO = Path(__file__).resolve().parents[1]
TINY_RELATIONS = ["P1376", "P36", "P37"]  # small relations: 248/62/234, 416/104/703, 248/62/966 facts


def free_ports(n: int) -> list[int]:
    """n different ports no one listens on now, for rendezvous of launches that run side by side."""
    import socket

    sockets = [socket.socket() for _ in range(n)]
    try:
        for sock in sockets:  # all bound at once, so the ports differ
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    return free_ports(1)[0]


def lama_dir() -> Path | None:
    """The full LAMA: $LAMA_DATA, else ../shared/lama (CI's), else data/lama (`make data`); None without one."""
    for path in (os.environ.get("LAMA_DATA"), REPO.parent / "shared" / "lama", REPO / "data" / "lama"):
        if path and (Path(path) / "fact-retrieval" / "original").is_dir():
            return Path(path)
    return None


@pytest.fixture(scope="session")
def lama() -> Path:
    path = lama_dir()
    if path is None:
        pytest.skip("needs the full LAMA (41 relations): set LAMA_DATA, or fetch it with `make data`; the quick "
                    "start's shipped subset (data/quickstart) is not enough for this test")
    return path


def _save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert(lama, tmp_path_factory) -> Path:
    """A 2-layer random BertForMaskedLM with a WordPiece vocabulary holding every LAMA vocab word."""
    from transformers import BertConfig, BertForMaskedLM

    tokenizer = bert_tokenizer(lama, TINY_RELATIONS)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    return _save(BertForMaskedLM(config), tokenizer, tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_gpt2(lama, tmp_path_factory) -> Path:
    """A 2-layer random GPT2LMHeadModel with a byte-level BPE ('Ġ') tokenizer trained on LAMA words."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = gpt2_tokenizer(lama, TINY_RELATIONS)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return _save(GPT2LMHeadModel(config), tokenizer, tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_roberta(lama, tmp_path_factory) -> Path:
    """A 2-layer random RobertaForMaskedLM with a byte-level BPE tokenizer: masked LM with the 'Ġ' convention."""
    from transformers import RobertaConfig, RobertaForMaskedLM

    tokenizer = roberta_tokenizer(lama, TINY_RELATIONS)
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=130, pad_token_id=1)
    return _save(RobertaForMaskedLM(config), tokenizer, tmp_path_factory.mktemp("tiny-roberta"))


@pytest.fixture
def lama_copy(lama, tmp_path) -> Path:
    """A writable copy of three relations of the LAMA layout, to break on purpose."""
    root = tmp_path / "lama"
    for rel in TINY_RELATIONS:
        shutil.copytree(lama / "fact-retrieval" / "original" / rel, root / "fact-retrieval" / "original" / rel)
    shutil.copytree(lama / "vocab", root / "vocab")
    shutil.copy(lama / "relations.jsonl", root / "relations.jsonl")
    return root



def _tiny_causal(family: str, lama: Path, folder: Path) -> Path:
    """A 2-layer random causal LM of a family that transformers can shard (tp_plan="auto"), with the byte-level
    BPE tokenizer of tiny_gpt2; 4 query and 2 key/value heads, so tensor parallel 2 splits both."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = gpt2_tokenizer(lama, TINY_RELATIONS)
    families = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    config_class, model_class = families[family]
    torch.manual_seed(0)
    config = config_class(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          tie_word_embeddings=False)
    return _save(model_class(config), tokenizer, folder)


@pytest.fixture(scope="session")
def tiny_llama(lama, tmp_path_factory) -> Path:
    return _tiny_causal("llama", lama, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_qwen2(lama, tmp_path_factory) -> Path:
    return _tiny_causal("qwen2", lama, tmp_path_factory.mktemp("tiny-qwen2"))

