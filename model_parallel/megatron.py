"""MegatronLM-11B (fairseq transformer_lm_megatron_11b) as our own module, dense or tensor-parallel.

    x = embed_scale * inputs_embeds + sinusoidal(positions)     positions past fairseq's padding index
    72 x [ x += out_proj(attn(LN(x)));  x += fc2(gelu(fc1(LN(x)))) ]      pre-LayerNorm, causal
    logits = LN(x) @ embed_tokens.T                             tied output projection

fairseq's dropout sits where fairseq has it (after the embeddings, on the attention weights, after out_proj and
fc2, after the activation) and acts only in train mode: the frozen model is in eval mode unless the reference
protocol's lm_dropout asks for the reference's model.train(). Ranks of a tensor-parallel group draw the same masks
for the replicated activations because they hold the same RNG state and draw the same shapes; so their different
heads also draw the same attention masks as one another, a correlation a TP 1 run does not have (it is still
dropout at the same rate).

Prompt vectors enter as inputs_embeds and, like the subject's token embeddings, get the sqrt(hidden) scale inside
the model, as the reference P-tuning code did when it passed embeddings through fairseq's decoder.

tp == 1: plain torch layers (the merged single-GPU model). tp > 1: megatron-core's VocabParallelEmbedding,
ColumnParallelLinear(gather_output=False) for q/k/v and fc1, RowParallelLinear(input_is_parallel=True) for out_proj
and fc2; each rank holds its heads and its slice of the vocabulary, and the logits stay vocab-parallel.
Parameter names are fairseq's without the `decoder.` prefix, so checkpoints load by name.

The module is built on the meta device (empty_megatron) and then given its weights: load_weights copies the
checkpoint's tensors one at a time straight to their device and dtype, random_megatron fills fresh memory on the
device. 11B parameters are never initialised on the CPU only to be overwritten, and never held twice.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from model_parallel.release import MegatronSpec, ReleaseError
from ptuning.files import one_line


def sinusoidal_table(rows: int, dim: int, padding_idx: int) -> torch.Tensor:
    """fairseq's SinusoidalPositionalEmbedding table (sin half, then cos half; the padding row zero). Computed on
    the CPU even under a meta-device context: ops on meta import torch._dynamo, seconds for nothing."""
    half = dim // 2
    scale = math.log(10000) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float, device="cpu") * -scale)
    angles = torch.arange(rows, dtype=torch.float, device="cpu")[:, None] * freqs[None, :]
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2:
        table = torch.cat([table, torch.zeros(rows, 1, device="cpu")], dim=1)
    table[padding_idx] = 0
    return table


def _out(result):
    """megatron-core's linear layers return (output, bias); plain layers return output."""
    return result[0] if isinstance(result, tuple) else result


class _Layers:
    """Builds the layers of one tensor-parallel size."""

    def __init__(self, tp: int, dtype: torch.dtype, device: str | torch.device):
        self.tp, self.dtype, self.device = tp, dtype, device
        if tp > 1:
            from megatron.core.model_parallel_config import ModelParallelConfig

            # use_cpu_initialization: allocate on the default device (meta in empty_megatron), not on cuda
            self.config = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                                              perform_initialization=False, params_dtype=dtype)

    def embedding(self, rows: int, dim: int) -> nn.Module:
        if self.tp == 1:  # uninitialised like the tensor-parallel layers (and normal_ on meta imports torch._dynamo)
            return nn.Embedding.from_pretrained(torch.empty(rows, dim, device=self.device, dtype=self.dtype),
                                                freeze=False)
        from megatron.core.tensor_parallel import VocabParallelEmbedding

        return VocabParallelEmbedding(rows, dim, init_method=_no_init, config=self.config)

    def column(self, n_in: int, n_out: int) -> nn.Module:
        if self.tp == 1:
            return nn.Linear(n_in, n_out, device=self.device, dtype=self.dtype)
        from megatron.core.tensor_parallel import ColumnParallelLinear

        return ColumnParallelLinear(n_in, n_out, config=self.config, init_method=_no_init, bias=True,
                                    gather_output=False)

    def row(self, n_in: int, n_out: int) -> nn.Module:
        if self.tp == 1:
            return nn.Linear(n_in, n_out, device=self.device, dtype=self.dtype)
        from megatron.core.tensor_parallel import RowParallelLinear

        return RowParallelLinear(n_in, n_out, config=self.config, init_method=_no_init, bias=True,
                                 input_is_parallel=True, skip_bias_add=False)

    def norm(self, dim: int) -> nn.Module:
        return nn.LayerNorm(dim, device=self.device, dtype=self.dtype)


def _no_init(weight: torch.Tensor) -> None:
    """Weights come from the checkpoint."""


class SelfAttention(nn.Module):
    def __init__(self, spec: MegatronSpec, layers: _Layers):
        super().__init__()
        self.heads = spec.heads // layers.tp  # this rank's heads
        self.head_dim = spec.hidden // spec.heads
        self.attention_dropout = spec.attention_dropout
        self.q_proj = layers.column(spec.hidden, spec.hidden)
        self.k_proj = layers.column(spec.hidden, spec.hidden)
        self.v_proj = layers.column(spec.hidden, spec.hidden)
        self.out_proj = layers.row(spec.hidden, spec.hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (_out(proj(x)).view(b, t, self.heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,  # scale head_dim**-0.5, as fairseq
                                             dropout_p=self.attention_dropout if self.training else 0.0)
        return _out(self.out_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim)))


class DecoderLayer(nn.Module):
    def __init__(self, spec: MegatronSpec, layers: _Layers):
        super().__init__()
        self.self_attn = SelfAttention(spec, layers)
        self.self_attn_layer_norm = layers.norm(spec.hidden)
        self.fc1 = layers.column(spec.hidden, spec.ffn)
        self.fc2 = layers.row(spec.ffn, spec.hidden)
        self.final_layer_norm = layers.norm(spec.hidden)
        self.dropout, self.activation_dropout = spec.dropout, spec.activation_dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + F.dropout(self.self_attn(self.self_attn_layer_norm(x), mask), self.dropout, self.training)
        hidden = F.dropout(F.gelu(_out(self.fc1(self.final_layer_norm(x)))), self.activation_dropout, self.training)
        return x + F.dropout(_out(self.fc2(hidden)), self.dropout, self.training)


class MegatronLM(nn.Module):
    def __init__(self, spec: MegatronSpec, tp: int = 1, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        super().__init__()
        if spec.heads % tp or spec.vocab_size % tp or spec.ffn % tp:
            raise ValueError(f"tensor parallel size {tp} does not divide heads/vocabulary/FFN of {spec}")
        self.spec, self.tp = spec, tp
        layers = _Layers(tp, dtype, device)
        self.embed_tokens = layers.embedding(spec.vocab_size, spec.hidden)
        self.layers = nn.ModuleList(DecoderLayer(spec, layers) for _ in range(spec.layers))
        self.layer_norm = layers.norm(spec.hidden)
        self.embed_scale = math.sqrt(spec.hidden) if spec.scale_embedding else 1.0
        self.register_buffer("positions_table", _positions_table(spec).to(device), persistent=False)
        self.eval()  # a frozen LM: no dropout unless train mode is asked for

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def forward(self, inputs_embeds: torch.Tensor, position: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """Final hidden states (B, T, hidden). position: each token's position inside its sequence (0-based;
        fairseq's positions start after the padding index); allowed: (B, 1, T, T) which keys each query sees."""
        x = self.embed_scale * inputs_embeds + self.positions_table[position + self.spec.padding_idx + 1].to(
            inputs_embeds.dtype)
        x = F.dropout(x, self.spec.dropout, self.training)
        for layer in self.layers:
            x = layer(x, allowed)
        return self.layer_norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over this rank's slice of the vocabulary (all of it when tp == 1)."""
        if self.tp > 1:
            from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

            hidden = copy_to_tensor_model_parallel_region(hidden)  # backward all-reduces the input gradient
        return hidden @ self.embed_tokens.weight.t()


def _positions_table(spec: MegatronSpec) -> torch.Tensor:
    """Computed, never loaded: the buffer is not persistent."""
    return sinusoidal_table(spec.max_positions + spec.padding_idx + 1, spec.hidden, spec.padding_idx)


@contextmanager
def _parameter_attributes_kept(model: nn.Module) -> Iterator[None]:
    """to_empty and load_state_dict(assign=True) put new Parameter objects in place; megatron-core marks its
    parameters with attributes (tensor_model_parallel, partition_dim, allreduce, sequence_parallel) that its
    gradient and optimizer code read, so they move to the new objects."""
    marks = {name: dict(vars(param)) for name, param in model.named_parameters()}
    yield
    for name, param in model.named_parameters():
        vars(param).update(marks[name])


def empty_megatron(spec: MegatronSpec, tp: int = 1, dtype: torch.dtype = torch.float32) -> MegatronLM:
    """Shapes and dtypes only: every parameter and buffer on the meta device, no memory, no initialisation.
    megatron-core's layers (use_cpu_initialization) allocate with the default device, so the meta context
    reaches them too."""
    with torch.device("meta"):
        return MegatronLM(spec, tp, dtype, device="meta")


def load_weights(model: MegatronLM, tensors: Iterable[tuple[str, torch.Tensor]],
                 device: str | torch.device) -> MegatronLM:
    """Give a meta-built model its weights: each (name, tensor), as it is read, is copied once into a new tensor of
    its parameter's dtype on the device (copy_ casts, moves and makes row-parallel slices contiguous), which then
    becomes the parameter (assign=True) instead of being copied again into memory allocated beforehand. So host
    memory holds the model, if it is on the CPU, and the tensor being read; no parameter keeps a file mapped."""
    dtypes = {name: param.dtype for name, param in model.named_parameters()}
    state = {}
    for name, tensor in tensors:  # the tensor's own shape: a wrong one fails in load_state_dict, as a wrong name
        state[name] = torch.empty(tensor.shape, dtype=dtypes.get(name, tensor.dtype), device=device).copy_(tensor)
    try:
        with _parameter_attributes_kept(model):
            model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise ReleaseError(f"weights do not fit the model built from its config ({one_line(error)})") from None
    model.positions_table = _positions_table(model.spec).to(device)
    return model


def random_megatron(spec: MegatronSpec, tp: int = 1, dtype: torch.dtype = torch.bfloat16,
                    device: str | torch.device = "cuda", seed: int = 0) -> MegatronLM:
    """Random weights made in place on the device, for measuring the full-size model without its checkpoint:
    nothing passes through host memory. Matrices normal(0, 0.02), biases zero, LayerNorms the identity."""
    model = empty_megatron(spec, tp, dtype)
    with _parameter_attributes_kept(model):
        model.to_empty(device=device)
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.02, generator=generator)
            elif "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.zero_()
    model.positions_table = _positions_table(spec).to(device)
    return model
