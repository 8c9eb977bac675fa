"""Many units' prompt encoders of one shape as ONE computation: parameters stacked along a leading unit dimension.

Each unit's parameters are one row of a [K, P] tensor, laid out by name (`Layout`, the names and shapes of
`encoders.PromptEncoder`, the paper's module and the format of the saved files). The forward and the backward are
written out by hand over the unit dimension:

    lstm  embedding -> 2-layer BiLSTM -> MLP      per layer: one batched product for the input projection of
                                                  every step, then per step and direction one [K, 1, H/2] x
                                                  [K, H/2, 2H] product; the backward runs the steps in reverse
                                                  and forms each weight gradient in ONE product over all steps
    mlp   embedding -> Linear, ReLU, Linear       two batched products each way
    none  the vectors themselves

so a step costs the same few dozen kernels whether the stack holds 1 unit or 100, and no unit's floats depend on
which others share its stack (the batched products compute each unit's product on its own: checked equal to the
bit against a stack of one in tests/test_encoder_stack.py). Dropout between the LSTM layers (prompt.lstm_dropout)
comes in as a mask the caller draws from each unit's own generator.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ptuning.encoders import PromptEncoder


@dataclass(frozen=True, eq=False)
class Layout:
    """Where each named tensor of one unit's encoder sits in its row of P numbers (PromptEncoder's names). One
    object per shape (Layout.of caches), so a layout is its stack's key."""
    kind: str
    n_pseudo: int
    hidden: int
    slots: dict  # name -> (offset, shape)
    size: int  # P

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def of(kind: str, n_pseudo: int, hidden: int) -> "Layout":
        with torch.device("meta"):
            shapes = {name: tuple(t.shape) for name, t in PromptEncoder(n_pseudo, hidden, kind).state_dict().items()}
        # The two directions of a layer side by side, so that one product projects the inputs of both.
        order = sorted(shapes, key=lambda name: _order(name))
        slots, offset = {}, 0
        for name in order:
            slots[name] = (offset, shapes[name])
            offset += _numel(shapes[name])
        return Layout(kind, n_pseudo, hidden, slots, offset)

    def view(self, rows: torch.Tensor, name: str, count: int = 1) -> torch.Tensor:
        """rows[:, the named tensor] as [K, *shape]; count 2 takes it and its `_reverse` twin (adjacent) as
        [K, 2, *shape]."""
        offset, shape = self.slots[name]
        n = _numel(shape)
        part = rows[:, offset:offset + count * n]
        return part.view(rows.shape[0], *shape) if count == 1 else part.view(rows.shape[0], count, *shape)

    def unpack(self, row: torch.Tensor) -> dict[str, torch.Tensor]:
        """One unit's row as PromptEncoder's state dict (views)."""
        return {name: row[offset:offset + _numel(shape)].view(shape) for name, (offset, shape) in self.slots.items()}

    def pack(self, state: dict[str, torch.Tensor], row: torch.Tensor) -> None:
        """Write a PromptEncoder state dict into one unit's row; every name must be there, with its shape."""
        missing = set(self.slots) - set(state)
        unexpected = set(state) - set(self.slots)
        if missing or unexpected:
            raise ValueError(f"missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        for name, (offset, shape) in self.slots.items():
            if tuple(state[name].shape) != shape:
                raise ValueError(f"{name}: shape {tuple(state[name].shape)}, expected {shape}")
            row[offset:offset + _numel(shape)].copy_(state[name].reshape(-1))


def _numel(shape: tuple) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _order(name: str) -> tuple:
    """embedding, then per LSTM layer: input weights (forward, reverse), recurrent weights, input biases, recurrent
    biases; then the MLP."""
    if name.startswith("lstm."):
        base = name[len("lstm."):].removesuffix("_reverse")
        kind, layer = base.rsplit("_l", 1)
        return 1, int(layer), ("weight_ih", "weight_hh", "bias_ih", "bias_hh").index(kind), name.endswith("_reverse")
    return (0,) if not name.startswith("mlp.") else (2, name)


def vectors(rows: torch.Tensor, layout: Layout, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Every unit's prompt vectors, [K, n_pseudo, hidden], differentiable into `rows` ([K, P]). mask: the dropout
    mask between the LSTM layers, [K, n_pseudo, hidden], already scaled (None: no dropout)."""
    if layout.kind == "none":
        return layout.view(rows, "vectors")
    return _Stacked.apply(rows, layout, mask)


class _Stacked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, layout, mask):
        x = layout.view(rows, "embedding.weight")
        saved = [x]
        if layout.kind == "lstm":
            for layer in range(2):
                if layer == 1 and mask is not None:
                    x = x * mask
                out, states = _layer_forward(rows, layout, layer, x)
                saved += states
                x = out
                saved.append(x)
        w1, b1 = layout.view(rows, "mlp.0.weight"), layout.view(rows, "mlp.0.bias")
        w2, b2 = layout.view(rows, "mlp.2.weight"), layout.view(rows, "mlp.2.bias")
        z = torch.baddbmm(b1.unsqueeze(1), x, w1.transpose(1, 2))
        a = z.relu()
        out = torch.baddbmm(b2.unsqueeze(1), a, w2.transpose(1, 2))
        ctx.layout = layout
        ctx.save_for_backward(rows, mask if mask is not None else rows.new_empty(0), z, a, *saved)
        ctx.has_mask = mask is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        layout = ctx.layout
        rows, mask, z, a, *saved = ctx.saved_tensors
        grads = torch.empty_like(rows)
        w1, w2 = layout.view(rows, "mlp.0.weight"), layout.view(rows, "mlp.2.weight")
        x = saved[-1]  # the MLP's input
        layout.view(grads, "mlp.2.weight").copy_(torch.bmm(grad.transpose(1, 2), a))
        layout.view(grads, "mlp.2.bias").copy_(grad.sum(1))
        dz = torch.bmm(grad, w2) * (z > 0)
        layout.view(grads, "mlp.0.weight").copy_(torch.bmm(dz.transpose(1, 2), x))
        layout.view(grads, "mlp.0.bias").copy_(dz.sum(1))
        dx = torch.bmm(dz, w1)
        if layout.kind == "lstm":
            # saved: embedding, [layer 0: states..., out], [layer 1: states..., out]
            per = (len(saved) - 1) // 2
            for layer in (1, 0):
                start = 1 + layer * per
                states = saved[start:start + per - 1]
                x_in = saved[start - 1]  # the layer's input: the embedding, or layer 0's output (dropped out)
                if layer == 1 and ctx.has_mask:
                    x_in = x_in * mask
                dx = _layer_backward(rows, grads, layout, layer, x_in, states, dx)
                if layer == 1 and ctx.has_mask:
                    dx = dx * mask
        layout.view(grads, "embedding.weight").copy_(dx)
        return grads, None, None


def _layer_forward(rows, layout, layer, x):
    """One BiLSTM layer over every unit: x [K, T, D] -> out [K, T, H] (forward half, then reverse half)."""
    k, t, _ = x.shape
    w_ih = layout.view(rows, f"lstm.weight_ih_l{layer}", 2)  # [K, 2, 4h, D]
    w_hh = layout.view(rows, f"lstm.weight_hh_l{layer}", 2)  # [K, 2, 4h, h]
    bias = layout.view(rows, f"lstm.bias_ih_l{layer}", 2) + layout.view(rows, f"lstm.bias_hh_l{layer}", 2)
    gates_in = torch.baddbmm(bias.reshape(k, 1, -1), x, w_ih.flatten(1, 2).transpose(1, 2))  # [K, T, 2 * 4h]
    four_h = w_hh.shape[2]
    halves, states = [], []
    for direction in range(2):
        g = gates_in[:, :, direction * four_h:(direction + 1) * four_h]
        h, acts, cells = _recur(g, w_hh[:, direction], reverse=direction == 1)
        halves.append(h)
        states += [h, acts, cells]
    return torch.cat(halves, dim=2), states


def _recur(gates_in, w_hh, reverse):
    """The recurrence of one direction: gates_in [K, T, 4h] (input projection plus both biases), w_hh [K, 4h, h].
    Returns h [K, T, h] and, for the backward, the gates' activations [K, T, 4h] and cells [K, T, h]."""
    k, t, four_h = gates_in.shape
    n = four_h // 4
    h_all = gates_in.new_empty(k, t, n)
    acts = gates_in.new_empty(k, t, four_h)
    cells = gates_in.new_empty(k, t, n)
    h = c = None
    for step in range(t):
        i = t - 1 - step if reverse else step
        g = gates_in[:, i] if h is None else torch.baddbmm(gates_in[:, i].unsqueeze(1), h.unsqueeze(1),
                                                            w_hh.transpose(1, 2)).squeeze(1)
        gi, gf, gg, go = g.chunk(4, dim=1)
        gi, gf, gg, go = gi.sigmoid(), gf.sigmoid(), gg.tanh(), go.sigmoid()
        c = gi * gg if c is None else gf * c + gi * gg
        h = go * c.tanh()
        acts[:, i] = torch.cat((gi, gf, gg, go), dim=1)
        cells[:, i] = c
        h_all[:, i] = h
    return h_all, acts, cells


def _layer_backward(rows, grads, layout, layer, x, states, dout):
    """The gradients of one BiLSTM layer's weights (written into `grads`) and of its input, from dout [K, T, H]."""
    k, t, _ = x.shape
    w_ih = layout.view(rows, f"lstm.weight_ih_l{layer}", 2)
    w_hh = layout.view(rows, f"lstm.weight_hh_l{layer}", 2)
    n = w_hh.shape[-1]
    dgates, dw_hh = [], []
    for direction in range(2):
        h_all, acts, cells = states[3 * direction:3 * direction + 3]
        dg, dw = _recur_backward(dout[:, :, direction * n:(direction + 1) * n], w_hh[:, direction], h_all, acts,
                                 cells, reverse=direction == 1)
        dgates.append(dg)
        dw_hh.append(dw)
    dgates = torch.cat(dgates, dim=2)  # [K, T, 2 * 4h], the input projection's layout
    layout.view(grads, f"lstm.weight_hh_l{layer}", 2).copy_(torch.stack(dw_hh, dim=1))
    bias = dgates.sum(1).view(k, 2, 4 * n)
    layout.view(grads, f"lstm.bias_ih_l{layer}", 2).copy_(bias)
    layout.view(grads, f"lstm.bias_hh_l{layer}", 2).copy_(bias)
    layout.view(grads, f"lstm.weight_ih_l{layer}", 2).copy_(torch.bmm(dgates.transpose(1, 2), x).view(k, 2, 4 * n, -1))
    return torch.bmm(dgates, w_ih.flatten(1, 2))


def _recur_backward(dh_out, w_hh, h_all, acts, cells, reverse):
    """Back through one direction's recurrence: the gates' pre-activation gradients [K, T, 4h] and the recurrent
    weights' gradient [K, 4h, h], the latter as one product over every step."""
    k, t, n = dh_out.shape
    dgates = dh_out.new_empty(k, t, 4 * n)
    dh = dc = None
    for step in reversed(range(t)):
        i = t - 1 - step if reverse else step
        prev = i + 1 if reverse else i - 1
        gi, gf, gg, go = acts[:, i].chunk(4, dim=1)
        tc = cells[:, i].tanh()
        dh_i = dh_out[:, i] if dh is None else dh_out[:, i] + dh
        do = dh_i * tc
        dc_i = dh_i * go * (1 - tc * tc) if dc is None else dh_i * go * (1 - tc * tc) + dc
        di, dg = dc_i * gg, dc_i * gi
        df = dc_i * cells[:, prev] if step else torch.zeros_like(dc_i)
        dc = dc_i * gf
        d = torch.cat((di * gi * (1 - gi), df * gf * (1 - gf), dg * (1 - gg * gg), do * go * (1 - go)), dim=1)
        dgates[:, i] = d
        if step:
            dh = torch.bmm(d.unsqueeze(1), w_hh).squeeze(1)
    # the recurrent product at step s read h of step s-1 (zero at the first step, which has no product)
    h_prev = torch.zeros_like(h_all)
    if reverse:
        h_prev[:, :-1] = h_all[:, 1:]
    else:
        h_prev[:, 1:] = h_all[:, :-1]
    return dgates, torch.bmm(dgates.transpose(1, 2), h_prev)
