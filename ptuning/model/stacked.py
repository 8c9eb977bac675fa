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
bit against a stack of one in tests/test_prompt_bank.py, with MKL in strict mode as ptuning/__init__.py sets it).
Dropout between the LSTM layers (prompt.lstm_dropout) comes in as a mask the caller draws from each unit's own
generator.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ptuning.model.encoders import PromptEncoder


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


def vectors(rows: torch.Tensor, layout: Layout, mask: torch.Tensor | None = None,
            grads: torch.Tensor | None = None) -> torch.Tensor:
    """Every unit's prompt vectors, [K, n_pseudo, hidden], differentiable into `rows` ([K, P]). mask: the dropout
    mask between the LSTM layers, [K, n_pseudo, hidden], already scaled (None: no dropout). grads: a [K, P]
    buffer the backward writes the gradient into (and hands to autograd), so that no step allocates one."""
    if layout.kind == "none":
        return layout.view(rows, "vectors")
    return _Stacked.apply(rows, layout, mask, grads)


class _Stacked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, layout, mask, grads):
        x = layout.view(rows, "embedding.weight")
        saved = [x]
        if layout.kind == "lstm":
            for layer in range(2):
                if layer == 1 and mask is not None:
                    x = x * mask
                x, states = _layer_forward(rows, layout, layer, x)
                saved += [*states, x]
        w1, b1 = layout.view(rows, "mlp.0.weight"), layout.view(rows, "mlp.0.bias")
        w2, b2 = layout.view(rows, "mlp.2.weight"), layout.view(rows, "mlp.2.bias")
        z = torch.baddbmm(b1.unsqueeze(1), x, w1.transpose(1, 2))
        a = z.relu()
        out = torch.baddbmm(b2.unsqueeze(1), a, w2.transpose(1, 2))
        ctx.layout, ctx.has_mask, ctx.grads = layout, mask is not None, grads
        ctx.save_for_backward(rows, mask if mask is not None else rows.new_empty(0), z, a, *saved)
        return out

    @staticmethod
    def backward(ctx, grad):
        layout = ctx.layout
        rows, mask, z, a, *saved = ctx.saved_tensors
        grads, ctx.grads = ctx.grads, None  # handed on: autograd keeps it as the gradient only if no one else holds it
        if grads is None:
            grads = torch.empty_like(rows)
        g = lambda name, count=1: layout.view(grads, name, count)  # noqa: E731  the gradient's slot for a tensor
        w1, w2 = layout.view(rows, "mlp.0.weight"), layout.view(rows, "mlp.2.weight")
        grad = grad.contiguous()
        torch.bmm(grad.transpose(1, 2), a, out=g("mlp.2.weight"))
        torch.sum(grad, 1, out=g("mlp.2.bias"))
        dz = torch.bmm(grad, w2).mul_(z > 0)
        torch.bmm(dz.transpose(1, 2), saved[-1], out=g("mlp.0.weight"))  # saved[-1]: the MLP's input
        torch.sum(dz, 1, out=g("mlp.0.bias"))
        dx = torch.bmm(dz, w1)
        if layout.kind == "lstm":
            # saved: embedding, then per layer its 6 states and its output
            for layer in (1, 0):
                start = 1 + 7 * layer
                x_in = saved[start - 1]  # the layer's input: the embedding, or layer 0's output (dropped out)
                if layer == 1 and ctx.has_mask:
                    x_in = x_in * mask
                dx = _layer_backward(rows, g, layout, layer, x_in, saved[start:start + 6], dx)
                if layer == 1 and ctx.has_mask:
                    dx = dx * mask
        g("embedding.weight").copy_(dx)
        return grads, None, None, None


def _layer_forward(rows, layout, layer, x):
    """One BiLSTM layer over every unit: x [K, T, D] -> out [K, T, H] (forward half, then reverse half)."""
    k = x.shape[0]
    w_ih = layout.view(rows, f"lstm.weight_ih_l{layer}", 2)  # [K, 2, 4h, D]
    w_hh = layout.view(rows, f"lstm.weight_hh_l{layer}", 2)  # [K, 2, 4h, h]
    bias = layout.view(rows, f"lstm.bias_ih_l{layer}", 2) + layout.view(rows, f"lstm.bias_hh_l{layer}", 2)
    # the input projection of every step of both directions, time-major: [T, K, 2 * 4h]
    gates_in = torch.baddbmm(bias.reshape(k, 1, -1), x, w_ih.flatten(1, 2).transpose(1, 2)).transpose(0, 1)
    four_h = w_hh.shape[2]
    halves, states = [], []
    for direction in range(2):
        h, acts, cells = _recur(gates_in[:, :, direction * four_h:(direction + 1) * four_h], w_hh[:, direction],
                                reverse=direction == 1)
        halves.append(h)
        states += [h, acts, cells]
    return torch.cat(halves, dim=2).transpose(0, 1), states  # [K, T, 2h]


def _recur(gates_in, w_hh, reverse):
    """The recurrence of one direction: gates_in [T, K, 4h] (input projection plus both biases), w_hh [K, 4h, h].
    Returns h [T, K, h] and, for the backward, the gates' activations [T, K, 4h] (i, f, g, o) and cells [T, K, h],
    all time-major."""
    t, k, four_h = gates_in.shape
    n = four_h // 4
    acts = torch.empty(t, k, four_h, dtype=gates_in.dtype, device=gates_in.device)
    cells = torch.empty(t, k, n, dtype=gates_in.dtype, device=gates_in.device)
    h_all = torch.empty(t, k, n, dtype=gates_in.dtype, device=gates_in.device)
    h = c = None
    for step in range(t):
        i = t - 1 - step if reverse else step
        gates = acts[i]
        if h is None:
            gates.copy_(gates_in[i])
        else:
            torch.baddbmm(gates_in[i].unsqueeze(1), h.unsqueeze(1), w_hh.transpose(1, 2), out=gates.unsqueeze(1))
        gates[:, :2 * n].sigmoid_()  # input and forget gates
        gates[:, 2 * n:3 * n].tanh_()  # the cell's candidate
        gates[:, 3 * n:].sigmoid_()  # output gate
        gi, gf, gg, go = gates.chunk(4, dim=1)
        c = torch.mul(gi, gg, out=cells[i]) if c is None else torch.addcmul(gi * gg, gf, c, out=cells[i])
        h = torch.mul(go, c.tanh(), out=h_all[i])
    return h_all, acts, cells


def _layer_backward(rows, g, layout, layer, x, states, dout):
    """The gradients of one BiLSTM layer's weights (written into their slots, g(name)) and of its input, from
    dout [K, T, H]."""
    k, t, _ = x.shape
    w_ih = layout.view(rows, f"lstm.weight_ih_l{layer}", 2)
    w_hh = layout.view(rows, f"lstm.weight_hh_l{layer}", 2)
    n = w_hh.shape[-1]
    dgates = torch.empty(t, k, 2 * 4 * n, dtype=x.dtype, device=x.device)  # time-major, the projection's layout
    dw_hh = g(f"lstm.weight_hh_l{layer}", 2)
    dout = dout.transpose(0, 1)  # [T, K, H]
    for direction in range(2):
        h_all, acts, cells = states[3 * direction:3 * direction + 3]
        _recur_backward(dout[:, :, direction * n:(direction + 1) * n], w_hh[:, direction], h_all, acts, cells,
                        direction == 1, dgates[:, :, direction * 4 * n:(direction + 1) * 4 * n], dw_hh[:, direction])
    by_unit = dgates.transpose(0, 1)  # [K, T, 2 * 4h]
    bias = g(f"lstm.bias_ih_l{layer}", 2)
    torch.sum(by_unit, 1, out=bias.view(k, -1))
    g(f"lstm.bias_hh_l{layer}", 2).copy_(bias)
    torch.bmm(by_unit.transpose(1, 2), x, out=g(f"lstm.weight_ih_l{layer}", 2).flatten(1, 2))
    return torch.bmm(by_unit, w_ih.flatten(1, 2))


def _recur_backward(dh_out, w_hh, h_all, acts, cells, reverse, dgates, dw_hh):
    """Back through one direction's recurrence: the gates' pre-activation gradients into dgates [T, K, 4h], and
    the recurrent weights' gradient into dw_hh [K, 4h, h] as one product over every step."""
    t, k, n = dh_out.shape
    dh = dc = None
    for step in reversed(range(t)):
        i = t - 1 - step if reverse else step
        gi, gf, gg, go = acts[i].chunk(4, dim=1)
        tc = cells[i].tanh()
        dh_i = dh_out[i] if dh is None else dh_out[i] + dh
        dc_i = dh_i * go * (1 - tc * tc)
        if dc is not None:
            dc_i += dc
        d = dgates[i]
        torch.mul(dc_i * gg, gi * (1 - gi), out=d[:, :n])  # input gate
        if step:
            torch.mul(dc_i * cells[i + 1 if reverse else i - 1], gf * (1 - gf), out=d[:, n:2 * n])  # forget
        else:
            d[:, n:2 * n].zero_()  # the first step's cell had no predecessor
        torch.mul(dc_i * gi, 1 - gg * gg, out=d[:, 2 * n:3 * n])  # candidate
        torch.mul(dh_i * tc, go * (1 - go), out=d[:, 3 * n:])  # output gate
        dc = dc_i * gf
        if step:
            dh = torch.bmm(d.unsqueeze(1), w_hh).squeeze(1)
    # the recurrent product at step s read h of step s-1 (zero at the first step, which has no product)
    h_prev = torch.zeros_like(h_all)
    if reverse:
        h_prev[:-1] = h_all[1:]
    else:
        h_prev[1:] = h_all[:-1]
    torch.bmm(dgates.permute(1, 2, 0), h_prev.transpose(0, 1), out=dw_hh)
