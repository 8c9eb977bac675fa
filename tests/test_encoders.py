import pytest
import torch

from ptuning.model.encoders import PromptEncoder


@pytest.mark.parametrize("kind", ["lstm", "mlp", "none"])
def test_shapes_and_gradients(kind):
    encoder = PromptEncoder(6, 16, kind)
    out = encoder()
    assert out.shape == (6, 16)
    out.sum().backward()
    assert all(p.grad is not None for p in encoder.parameters())


def test_lstm_is_the_papers():
    encoder = PromptEncoder(9, 16, "lstm")
    assert encoder.lstm.num_layers == 2 and encoder.lstm.bidirectional and encoder.lstm.hidden_size == 8
    assert [type(m).__name__ for m in encoder.mlp] == ["Linear", "ReLU", "Linear"]


def test_init_from_words():
    word = torch.arange(16.0)
    direct = PromptEncoder(3, 16, "none")
    direct.init_from([None, word, None])
    assert torch.equal(direct()[1], word)
    lstm = PromptEncoder(3, 16, "lstm")
    lstm.init_from([word, None, None])
    assert torch.equal(lstm.embedding.weight[0], word)
